"""Sampling the demo's paths with an exact denoiser, and measuring them: memorisation,
self-correction and jumps along each trajectory, and the exact total-variation error of the
Euler solver on a small correlated joint distribution.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from kineflow.apps.demo.world import PATH_KINDS, PATH_LABELS, Palette, build_path, colour_embeddings
from kineflow.flow import (
    DiscretePath,
    EulerSolver,
    ExactPosterior,
    SolverResult,
    euler_law,
    total_variation,
)

__all__ = ["TV_RATES", "TV_STEPS", "PathRun", "memorised_fraction", "sample_all", "sample_path",
           "sweep_steps", "toy_problem", "toy_tv_table", "trajectory_stats"]  # fmt: skip

#: Step counts of the exact total-variation table.
TV_STEPS = (1, 2, 4, 8, 16, 32, 64)
TV_RATES = ("integrated", "euler")


@dataclass
class PathRun:
    """One path's sampling run: the solver result (with trajectory) and its wall time."""

    kind: str
    result: SolverResult
    seconds: float


def sample_path(
    path: DiscretePath,
    data: Tensor,
    samples: int,
    steps: int,
    seed: int,
    return_trajectory: bool = False,
) -> tuple[SolverResult, float]:
    """Sample ``samples`` sequences with the exact posterior of ``data`` as the model.

    Each call seeds its own generator, so every path starts from the same seed and the runs do
    not depend on one another. Returns the solver result and the wall time in seconds.
    """
    model = ExactPosterior(data, None, path)
    solver = EulerSolver(path)
    gen = torch.Generator(device=data.device).manual_seed(seed)
    blank = torch.zeros(samples, data.shape[1], dtype=torch.long, device=data.device)
    x0 = solver.init_state(blank, generator=gen)
    start = time.perf_counter()
    result = solver.solve(model, x0, steps, generator=gen, return_trajectory=return_trajectory)
    return result, time.perf_counter() - start


def memorised_fraction(samples: Tensor, data: Tensor) -> float:
    """Fraction of rows of ``samples`` (Long[B, N]) equal to some row of ``data`` (Long[K, N])."""
    hits = (samples[:, None, :] == data[None, :, :]).all(-1).any(-1)
    return float(hits.float().mean())


def trajectory_stats(states: Tensor, palette: Palette) -> dict[str, Any]:
    """Statistics of a trajectory Long[n + 1, B, N] of token ids.

    - ``self_correction_fraction``: tokens that reach their final value, leave it, and come back
      (always 0 for the masked path: a revealed token does not move before the last step);
    - ``mean_jumps_per_token``: changes of value along the trajectory;
    - ``mean_jump_colour_distance``: RGB distance (in palette levels) of jumps between two
      colours, ``None`` when there are none;
    - ``settled_fraction``: per grid time, the fraction of tokens already at their final value;
    - ``final_step_change_fraction``: tokens changed by the last step, where the solver sets
      every token to its drawn ``x̂_1``.
    """
    final = states[-1]
    at_final = states == final
    # A token leaves its final value after first reaching it iff some False follows a True.
    reached_before = torch.cummax(at_final.int(), dim=0).values.bool()
    left_again = (reached_before & ~at_final).any(0)
    before, after = states[:-1], states[1:]
    jumped = before != after
    colour_jump = jumped & (before < palette.size) & (after < palette.size)
    if colour_jump.any():
        delta = palette.grid[before[colour_jump]] - palette.grid[after[colour_jump]]
        jump_distance: float | None = float(delta.float().norm(dim=-1).mean())
    else:
        jump_distance = None
    return {
        "self_correction_fraction": float(left_again.float().mean()),
        "mean_jumps_per_token": float(jumped.sum(0).float().mean()),
        "mean_jump_colour_distance": jump_distance,
        "settled_fraction": [round(float(f), 4) for f in at_final.float().mean((1, 2))],
        "final_step_change_fraction": float((~at_final[-2]).float().mean()),
    }


def sweep_steps(steps: int) -> list[int]:
    """Step counts of the memorisation sweep: a quarter, one and four times ``steps``."""
    return sorted({max(1, steps // 4), steps, 4 * steps})


def sample_all(
    palette: Palette, data: Tensor, steps: int, seed: int, samples: int
) -> tuple[list[PathRun], dict[str, dict[str, Any]]]:
    """Sample every path of :data:`PATH_KINDS`; return the runs and their statistics."""
    runs, stats = [], {}
    for kind in PATH_KINDS:
        path = build_path(kind, palette.embeddings)
        result, seconds = sample_path(path, data, samples, steps, seed, return_trajectory=True)
        runs.append(PathRun(kind, result, seconds))
        memorised = {steps: memorised_fraction(result.samples, data)}
        for n in sweep_steps(steps):
            if n not in memorised:
                swept, _ = sample_path(path, data, samples, n, seed)
                memorised[n] = memorised_fraction(swept.samples, data)
        stats[kind] = {
            "label": PATH_LABELS[kind],
            "nfe": result.nfe,
            "wall_time_s": round(seconds, 4),
            "memorised_fraction": memorised[steps],
            "memorised_fraction_vs_steps": {str(n): memorised[n] for n in sorted(memorised)},
            **trajectory_stats(result.states, palette),
        }
    return runs, stats


# -- exact solver error on a correlated joint ---------------------------------------------------
def toy_problem() -> tuple[Tensor, Tensor, Tensor]:
    """Two pixels, four grey levels, strongly correlated: the pixels mostly agree.

    Returns (support Long[4, 2], weights Float[4], embeddings Float[4, 4]). A one-step sampler
    draws the two pixels independently from their marginals (TV 0.71 from this joint); the
    correlation only comes back over several steps.
    """
    support = torch.tensor([[0, 0], [3, 3], [1, 2], [2, 1]])
    weights = torch.tensor([0.35, 0.35, 0.15, 0.15])
    greys = torch.arange(4)[:, None].expand(4, 3)
    return support, weights, colour_embeddings(greys, levels=4)


def toy_tv_table(step_counts: Sequence[int] = TV_STEPS) -> dict[str, Any]:
    """Exact ``TV(law of the solver's output, target)`` per path, rate and step count."""
    support, weights, embeddings = toy_problem()
    rows: dict[str, dict[str, list[float]]] = {}
    for kind in PATH_KINDS:
        posterior = ExactPosterior(support, weights, build_path(kind, embeddings))
        target = posterior.data_law()
        rows[kind] = {
            rate: [
                round(total_variation(euler_law(posterior, n, rate=rate), target), 5)
                for n in step_counts
            ]
            for rate in TV_RATES
        }
    return {
        "problem": "2 pixels x 4 grey levels; q(0,0)=q(3,3)=0.35, q(1,2)=q(2,1)=0.15",
        "step_counts": list(step_counts),
        "tv": rows,
    }
