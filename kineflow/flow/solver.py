"""Euler solver for factorised CTMCs driven by a denoiser ``p_θ(x_1 | x_t)``.

One step from ``t`` to ``t + h``, independently for every position ``i`` being generated:

1. draw a target ``x_1^i ~ p_θ(· | x_t)`` (after temperature / top-k / guidance);
2. total unit-clock rate ``λ^i = Σ_{x ≠ x_t^i} r_t(x, x_t^i | x_1^i)`` (:mod:`kineflow.flow.path`);
3. jump with probability ``1 − exp(−Δs · λ^i)`` to a state drawn from
   ``r_t(·, x_t^i | x_1^i) / λ^i``, where the clock increment ``Δs`` is set by ``rate``:

   * ``"integrated"`` (default): ``Δs = s_{t+h} − s_t``, the exact clock increment;
   * ``"euler"``: ``Δs = h · ṡ_t``, the plain Euler rate (``h · β̇_t`` for the metric path);
   * ``"official"``: ``Δs = h · ṡ_t`` with ``ṡ_0 := 0``, the official FUDOKI solver's step.
     For the metric path its jump probability is ``1 − exp(−h · Σ_x u_t(x, z | x_1))`` with
     ``u_t(x, z | x_1) = β̇_t p_t(x | x_1) [d(z, x_1) − d(x, x_1)]_+``,
     ``p_t = softmax(−β_t d(·, x_1))``, ``β̇_t = c a t^(a−1) / (1 − t)^(a+1)`` for t > 0 and
     ``β̇_0 := 0``, so the first model call of a grid starting at 0 moves nothing;

4. on the last step of a grid ending at t = 1, move to where the path ends, ``p_1 = δ_{x_1}``:
   ``x^i = x_1^i`` (for the masked path: only still-masked tokens; revealed ones never move).

For the metric path ``β̇_0 = ∞`` (a < 1): the official FUDOKI solver patches this with
``β̇_0 := 0`` (``rate="official"``), which wastes the first model call. The integrated increment
``β_h − β_0`` is finite, so every model call moves tokens; ``bench/solver_quality.py`` measures
the difference. The plain Euler rate is kept for comparison but is *inconsistent* when
``ṡ_0 = ∞``: its first step moves every token that can move, whatever h, so its error stops
shrinking with more steps.

``"official"`` is refused for :class:`~kineflow.flow.MaskedPath`: its clock rate
``κ̇_0 / (1 − κ_0)`` is finite for the usual schedules, so zeroing it would only waste a call,
and the official code has no such patch for masked paths (its ``MixtureDiscreteEulerSolver``
uses the plain ``h · κ̇_t / (1 − κ_t)``, which is ``rate="euler"`` here).

Several modalities share one sequence through the same code path: the solver holds one path
per modality name, ``region`` maps each name to the positions it generates, and ``model_fn``
returns one logits tensor per name (over that modality's vocabulary). Tokens outside every
region never change. Work is done on the flattened region positions in chunks, so peak memory
is ``O(chunk · V)`` no matter how long the sequence.

Two strategies compute the same step (same next-state law):

* ``"compact"`` (CPU): small chunks that fit the caches, targets de-duplicated, only the
  positions that jump draw a destination, bad logits raise at once. Each of these reads a value
  back to the host (``jump.any()``, boolean indexing, ``torch.unique``, the finiteness test).
* ``"static"`` (GPU): :mod:`kineflow.flow.static_step`, fixed shapes over every region
  position, random numbers drawn before each step, chunks only where the memory bound asks for
  them, bad logits flagged on the device and reported once after the last step. Per solve the
  host reads the region positions and the flags once; per step, nothing.

``strategy="auto"`` picks ``"static"`` with the exponential-race sampler on CUDA and
``"compact"`` elsewhere: on the 2-core CPU the compact step is the faster one
(``bench/solver_speed.py`` reports both).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor
from tqdm.auto import tqdm

from kineflow.flow._checks import check_ids
from kineflow.flow.jumps import Rate, check_rate, jump_probability
from kineflow.flow.path import DiscretePath
from kineflow.flow.sampling import categorical, sample_logits, widened
from kineflow.flow.static_step import SAMPLERS, Sampler, draw_noise, static_step

ModelFn = Callable[[Tensor, Tensor], "Tensor | Mapping[str, Tensor]"]
Strategy = Literal["auto", "compact", "static"]
STRATEGIES: tuple[str, ...] = ("auto", "compact", "static")
_SINGLE = "tokens"  # the modality name used when the solver holds a single path
#: Default chunk bounds (elements of a Float[rows, V] buffer): 16 MiB for the CPU step (see
#: ``max_chunk_elements``), 512 MiB for the fixed-shape step, whose point is few, big kernels.
_CHUNK_ELEMENTS = {"compact": 1 << 22, "static": 1 << 27}


@dataclass
class SolverResult:
    """Output of :meth:`EulerSolver.solve`.

    Attributes:
        samples: Long[B, N], the final sequence.
        times: Float[n + 1], the time grid.
        nfe: number of ``model_fn`` calls.
        states: Long[n + 1, B, N], ``x_t`` at every grid time (``return_trajectory=True``).
        predictions: Long[n, B, N], the targets ``x_1`` drawn at every step, equal to ``x_t``
            outside the regions (``return_trajectory=True``).
    """

    samples: Tensor
    times: Tensor
    nfe: int
    states: Tensor | None = None
    predictions: Tensor | None = None


def _bad_logits(name: str, t: float) -> ValueError:
    """The error for NaN / +inf logits, or a row with no valid target, at time ``t`` (raised by
    the compact step at once, by the static step after the solve)."""
    return ValueError(
        f"model_fn returned NaN/inf logits (or no valid target) for modality {name!r} at t={t:.4f}"
    )


def uniform_grid(steps: int, device: torch.device | str | None = None) -> Tensor:
    """``t_k = k / steps``, k = 0..steps: Float[steps + 1]."""
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    return torch.linspace(0.0, 1.0, steps + 1, device=device)


def power_grid(steps: int, power: float = 2.0, device: torch.device | str | None = None) -> Tensor:
    """``t_k = 1 − (1 − k/steps)^power``: steps concentrate near t = 1 for ``power > 1``.

    The metric path resolves near-duplicate tokens (tiny ``d``) only when ``β_t d`` becomes
    large, i.e. close to t = 1; with clustered embeddings a late-dense grid cuts the error at a
    fixed number of model calls several-fold (``bench/solver_quality.py``). It costs accuracy on
    well-separated vocabularies, hence not the default.
    """
    if not power > 0:
        raise ValueError(f"power must be > 0, got {power}")
    return 1 - (1 - uniform_grid(steps, device)) ** power


class EulerSolver:
    """Sample sequences by simulating the CTMC of one or several discrete paths.

    Args:
        path: a :class:`DiscretePath`, or a mapping from modality name to path (e.g.
            ``{"text": text_path, "image": image_path}``).
        rate: the clock increment of a step (module docstring): ``"integrated"``
            (``s_{t+h} − s_t``), ``"euler"`` (``h·ṡ_t``) or ``"official"`` (``h·ṡ_t`` with
            ``ṡ_0 := 0``, the official FUDOKI step; refused for a :class:`MaskedPath`).
        strategy: ``"compact"``, ``"static"`` or ``"auto"`` (module docstring).
        sampler: the categorical sampler of the static step, ``"inverse_cdf"``, ``"race"`` or
            ``"auto"`` (race on CUDA; see :mod:`kineflow.flow.static_step`). The compact step
            always uses the inverse CDF.
        max_chunk_elements: positions are processed ``max(min_chunk_rows,
            max_chunk_elements // V)`` at a time; each chunk holds a few Float[rows, V], which
            bounds the solver's own peak memory. The default for the compact step keeps those
            buffers at 16 MiB: larger ones are handed back to the OS after every use by glibc's
            allocator, and the page faults cost ~3x at V = 16384 (``bench/solver_speed.py``);
            for the static step, 2^27 elements (512 MiB in float32).
        min_chunk_rows: floor on the rows of a chunk: each chunk multiplies its targets'
            embeddings with the whole table, which is only efficient for enough rows (at
            V = 102400, D = 2048, 40-row chunks are ~40% slower than 128-row ones).
    """

    def __init__(
        self,
        path: DiscretePath | Mapping[str, DiscretePath],
        rate: Rate = "integrated",
        max_chunk_elements: int | None = None,
        min_chunk_rows: int = 128,
        *,
        strategy: Strategy = "auto",
        sampler: Sampler | Literal["auto"] = "auto",
    ) -> None:
        if isinstance(path, DiscretePath):
            self.paths: dict[str, DiscretePath] = {_SINGLE: path}
            self.single = True
        elif isinstance(path, Mapping) and path:
            bad = [k for k, p in path.items() if not isinstance(p, DiscretePath)]
            if bad:
                raise TypeError(f"paths for modalities {bad} are not DiscretePath instances")
            self.paths = dict(path)
            self.single = False
        else:
            raise TypeError("path must be a DiscretePath or a non-empty mapping of them")
        for name, p in self.paths.items():
            check_rate(p, rate, "the path" if self.single else f"the path of {name!r}")
        if (max_chunk_elements is not None and max_chunk_elements < 1) or min_chunk_rows < 1:
            raise ValueError(
                f"max_chunk_elements and min_chunk_rows must be positive, got "
                f"{max_chunk_elements} and {min_chunk_rows}"
            )
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
        if sampler != "auto" and sampler not in SAMPLERS:
            raise ValueError(f"sampler must be 'auto' or one of {SAMPLERS}, got {sampler!r}")
        self.rate = rate
        self.strategy = strategy
        self.sampler = sampler
        self.max_chunk_elements = None if max_chunk_elements is None else int(max_chunk_elements)
        self.min_chunk_rows = int(min_chunk_rows)

    def plan(self, device: torch.device | str) -> tuple[str, str]:
        """``(strategy, sampler)`` the solver uses for states on ``device``."""
        cuda = torch.device(device).type == "cuda"
        strategy = self.strategy if self.strategy != "auto" else ("static" if cuda else "compact")
        sampler = self.sampler if self.sampler != "auto" else ("race" if cuda else "inverse_cdf")
        return strategy, sampler

    def _chunk_rows(self, strategy: str, vocab_size: int) -> int:
        bound = self.max_chunk_elements or _CHUNK_ELEMENTS[strategy]
        return max(self.min_chunk_rows, bound // vocab_size)

    # -- public API ---------------------------------------------------------------------------
    def sample(
        self,
        model_fn: ModelFn,
        x_init: Tensor,
        steps: int | None = None,
        region: Tensor | Mapping[str, Tensor] | None = None,
        generator: torch.Generator | None = None,
        **kwargs,
    ) -> Tensor:
        """Run the solver and return the final Long[B, N]. Keyword arguments as :meth:`solve`."""
        return self.solve(model_fn, x_init, steps, region, generator, **kwargs).samples

    def solve(
        self,
        model_fn: ModelFn,
        x_init: Tensor,
        steps: int | None = None,
        region: Tensor | Mapping[str, Tensor] | None = None,
        generator: torch.Generator | None = None,
        *,
        time_grid: Tensor | None = None,
        temperature: float | Mapping[str, float] = 1.0,
        top_k: int | Mapping[str, int | None] | None = None,
        return_trajectory: bool = False,
        progress: bool = False,
    ) -> SolverResult:
        """Simulate from ``x_init`` along the time grid.

        Args:
            model_fn: ``(x_t: Long[B, N], t: Float[B]) -> logits``: Float[B, N, V] for a single
                path, else a mapping from modality name to Float[B, N, V_name].
            x_init: Long[B, N], the start state (e.g. from :meth:`init_state`); positions
                outside ``region`` are kept as they are (prompt, placeholders, padding).
            steps: number of uniform steps (= model calls); or give ``time_grid``.
            region: Bool[B, N] of positions to generate (default: all) for a single path, or a
                mapping from every modality name to its (disjoint) Bool[B, N] region.
            generator: source of all randomness; the same seed gives the same samples.
            time_grid: Float[n + 1], strictly increasing in [0, 1]; a grid ending at 1 ends
                on the path's final state (``x = x_1``; for the masked path the remaining masks
                are filled); one starting above 0 continues a partially generated state.
            temperature, top_k: applied to the model's predictions of ``x_1``; a number, or a
                mapping per modality name. ``top_k=1`` (or temperature 0) is greedy.
            return_trajectory: also return every ``x_t`` and every predicted ``x_1``.
            progress: show a progress bar.
        """
        x = self._check_state(x_init)
        regions = self._regions(x, region)
        grid = self._grid(steps, time_grid, x.device)
        positions = {name: r.nonzero(as_tuple=True) for name, r in regions.items()}
        options = {
            name: (
                self._option(temperature, name, "temperature"),
                self._option(top_k, name, "top_k"),
            )
            for name in self.paths
        }
        strategy, sampler = self.plan(x.device)
        # Static step: the first step at which each modality saw bad logits (-1: none), kept on
        # the device and read once after the loop.
        first_bad = {name: torch.tensor(-1, device=x.device) for name in self.paths}
        x = x.clone()
        states, predictions = ([x.clone()], []) if return_trajectory else (None, None)
        n = grid.numel() - 1
        ends_at_one = bool(grid[-1] == 1)
        for k in tqdm(range(n), disable=not progress, desc="flow sampling", unit="step"):
            t, t_next = grid[k], grid[k + 1]
            logits = self._call_model(model_fn, x, t)
            final = ends_at_one and k == n - 1
            predicted = x.clone() if return_trajectory else None
            for name, path in self.paths.items():
                args = (path, x, logits[name], positions[name], t, t_next, final, *options[name])
                if strategy == "compact":
                    x1 = self._advance(name, *args, generator)
                else:
                    x1, bad = self._advance_static(*args, generator, sampler)
                    unseen = (first_bad[name] < 0) & bad
                    first_bad[name] = torch.where(unseen, k, first_bad[name])
                if predicted is not None:
                    predicted[positions[name]] = x1
            if return_trajectory:
                states.append(x.clone())
                predictions.append(predicted)
        if strategy == "static":
            self._raise_on_bad_logits(first_bad, grid)
        return SolverResult(
            samples=x,
            times=grid,
            nfe=n,
            states=torch.stack(states) if return_trajectory else None,
            predictions=torch.stack(predictions) if return_trajectory else None,
        )

    def init_state(
        self,
        x: Tensor,
        region: Tensor | Mapping[str, Tensor] | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """A copy of ``x`` (Long[B, N]) whose region positions are drawn from each path's
        source ``p_0`` (uniform for the metric path, all-mask for the masked path)."""
        x = self._check_state(x)
        out = x.clone()
        for name, r in self._regions(x, region, check_ids_in_region=False).items():
            count = int(r.sum())
            out[r] = self.paths[name].sample_prior((count,), generator, device=x.device)
        return out

    # -- one step for one modality --------------------------------------------------------------
    def _advance(
        self,
        name: str,
        path: DiscretePath,
        x: Tensor,
        logits: Tensor,
        positions: tuple[Tensor, Tensor],
        t: Tensor,
        t_next: Tensor,
        final: bool,
        temperature: float,
        top_k: int | None,
        generator: torch.Generator | None,
    ) -> Tensor:
        """Update ``x`` in place on ``positions``; return the predicted targets there (Long[M])."""
        rows, cols = positions
        chunk = self._chunk_rows("compact", path.vocab_size)
        targets = torch.empty(rows.numel(), dtype=torch.long, device=x.device)
        for start in range(0, rows.numel(), chunk):
            b, i = rows[start : start + chunk], cols[start : start + chunk]
            x1 = self._targets(name, path, logits[b, i], t, temperature, top_k, generator)
            targets[start : start + b.numel()] = x1
            x_t = x[b, i]
            if final:
                x[b, i] = path.final_state(x_t, x1)
                continue
            rates = path._unit_rates(x_t, x1, t)
            p_jump = jump_probability(path, self.rate, t, t_next, rates.sum(-1))
            jump = torch.rand(p_jump.shape, generator=generator, device=x.device) < p_jump
            if jump.any():
                x_t[jump] = categorical(rates[jump], generator)
                x[b, i] = x_t
        return targets

    def _advance_static(
        self,
        path: DiscretePath,
        x: Tensor,
        logits: Tensor,
        positions: tuple[Tensor, Tensor],
        t: Tensor,
        t_next: Tensor,
        final: bool,
        temperature: float,
        top_k: int | None,
        generator: torch.Generator | None,
        sampler: Sampler,
    ) -> tuple[Tensor, Tensor]:
        """The fixed-shape step on ``positions``: updates ``x`` in place, returns the targets
        (Long[M]) and whether any row had bad logits (Bool[], on the device)."""
        rows, cols = positions
        chunk = self._chunk_rows("static", path.vocab_size)
        targets = torch.empty(rows.numel(), dtype=torch.long, device=x.device)
        bad_any = torch.zeros((), dtype=torch.bool, device=x.device)
        for start in range(0, rows.numel(), chunk):  # one chunk unless memory says otherwise
            b, i = rows[start : start + chunk], cols[start : start + chunk]
            noise = draw_noise(
                sampler, b.numel(), path.vocab_size, temperature=temperature, top_k=top_k,
                final=final, generator=generator, device=x.device,
            )  # fmt: skip
            x_next, x1, bad = static_step(
                path, self.rate, x[b, i], logits[b, i], t, t_next, noise,
                temperature=temperature, top_k=top_k, final=final, sampler=sampler,
            )  # fmt: skip
            x[b, i] = x_next
            targets[start : start + b.numel()] = x1
            bad_any |= bad.any()
        return targets, bad_any

    @staticmethod
    def _raise_on_bad_logits(first_bad: dict[str, Tensor], grid: Tensor) -> None:
        steps = torch.stack(list(first_bad.values())).tolist()  # the solve's one host read
        for name, k in zip(first_bad, steps, strict=True):
            if k >= 0:
                raise _bad_logits(name, float(grid[k]))

    @staticmethod
    def _targets(
        name: str,
        path: DiscretePath,
        logits: Tensor,
        t: Tensor,
        temperature: float,
        top_k: int | None,
        generator: torch.Generator | None,
    ) -> Tensor:
        logits = path.without_invalid_targets(widened(logits))
        # max() propagates NaN and +inf, and is -inf only when no valid target is left.
        peak = logits.amax(-1)
        if not torch.isfinite(peak).all():
            raise _bad_logits(name, float(t))
        return sample_logits(logits, temperature, top_k, generator)

    # -- validation -----------------------------------------------------------------------------
    def _check_state(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor):
            raise TypeError(f"x_init must be a torch.Tensor, got {type(x).__name__}")
        if x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool:
            raise TypeError(f"x_init must be an integer tensor of token ids, got dtype {x.dtype}")
        if x.ndim != 2:
            raise ValueError(f"x_init must have shape [B, N], got {tuple(x.shape)}")
        return x.long()

    def _regions(
        self,
        x: Tensor,
        region: Tensor | Mapping[str, Tensor] | None,
        check_ids_in_region: bool = True,
    ) -> dict[str, Tensor]:
        if self.single:
            if isinstance(region, Mapping):
                raise TypeError("region must be a Bool[B, N] tensor for a single-path solver")
            regions = {_SINGLE: torch.ones_like(x, dtype=torch.bool) if region is None else region}
        else:
            if not isinstance(region, Mapping) or set(region) != set(self.paths):
                got = sorted(region) if isinstance(region, Mapping) else type(region).__name__
                raise ValueError(
                    f"region must map every modality {sorted(self.paths)} to a Bool[B, N] mask, "
                    f"got {got}"
                )
            regions = dict(region)
        covered = torch.zeros_like(x, dtype=torch.int32)
        for name, r in regions.items():
            label = "region" if self.single else f"region[{name!r}]"
            if not isinstance(r, Tensor) or r.dtype != torch.bool:
                kind = r.dtype if isinstance(r, Tensor) else type(r).__name__
                raise TypeError(f"{label} must be a bool tensor, got {kind}")
            if r.shape != x.shape:
                raise ValueError(
                    f"{label} has shape {tuple(r.shape)}, expected x_init's {tuple(x.shape)}"
                )
            regions[name] = r = r.to(x.device)
            covered += r
            if check_ids_in_region:
                ids = "x_init" if self.single else f"x_init in region[{name!r}]"
                check_ids(ids, x[r], self.paths[name].vocab_size)
        if (covered > 1).any():
            raise ValueError("regions of different modalities overlap")
        return regions

    @staticmethod
    def _grid(steps: int | None, time_grid: Tensor | None, device: torch.device) -> Tensor:
        if time_grid is None:
            if steps is None:
                raise ValueError("give either steps or time_grid")
            return uniform_grid(steps, device)
        if not isinstance(time_grid, Tensor) or not time_grid.is_floating_point():
            raise TypeError("time_grid must be a floating-point tensor")
        if time_grid.ndim != 1 or time_grid.numel() < 2:
            raise ValueError(f"time_grid must be 1-D with >= 2 times, got {tuple(time_grid.shape)}")
        if steps is not None and steps != time_grid.numel() - 1:
            raise ValueError(
                f"steps={steps} disagrees with a time_grid of {time_grid.numel()} times"
            )
        grid = time_grid.to(device=device, dtype=torch.get_default_dtype())
        if (grid[0] < 0) or (grid[-1] > 1) or not (grid[1:] > grid[:-1]).all():
            raise ValueError(f"time_grid must increase strictly within [0, 1], got {time_grid}")
        return grid

    def _option(self, value, name: str, what: str):
        if isinstance(value, Mapping):
            unknown = set(value) - set(self.paths)
            if unknown:
                raise ValueError(f"{what} names unknown modalities {sorted(unknown)}")
            return value.get(name, 1.0 if what == "temperature" else None)
        return value

    def _call_model(self, model_fn: ModelFn, x: Tensor, t: Tensor) -> dict[str, Tensor]:
        B, N = x.shape
        out = model_fn(x, t.expand(B))
        if self.single:
            if isinstance(out, Mapping):
                raise TypeError("model_fn must return a logits tensor for a single-path solver")
            out = {_SINGLE: out}
        elif not isinstance(out, Mapping) or set(out) != set(self.paths):
            got = sorted(out) if isinstance(out, Mapping) else type(out).__name__
            raise ValueError(
                f"model_fn must return logits for modalities {sorted(self.paths)}, got {got}"
            )
        for name, logits in out.items():
            expected = (B, N, self.paths[name].vocab_size)
            label = "model_fn output" if self.single else f"model_fn output[{name!r}]"
            if not isinstance(logits, Tensor) or not logits.is_floating_point():
                raise TypeError(f"{label} must be a floating-point tensor of logits")
            if tuple(logits.shape) != expected:
                raise ValueError(f"{label} has shape {tuple(logits.shape)}, expected {expected}")
        return out
