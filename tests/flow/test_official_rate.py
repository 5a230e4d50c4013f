"""``EulerSolver(rate="official")``: the official FUDOKI solver's step, checked against the
official formulas written out here (not kineflow's path code): one step's law on the metric
path, the wasted first call at t = 0, the masked path's clear refusal, and the solver-quality
benchmark using the library option."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import bench_script

from kineflow.flow import EmbeddingMetric, EulerSolver, MaskedPath, MetricPath
from kineflow.flow.solver import jump_probability

pytestmark = pytest.mark.usefixtures("one_thread")

A, C = 0.9, 3.0  # FUDOKI's schedule β_t = c (t / (1 − t))^a
V, D = 5, 3


def _problem() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    E = torch.randn(V, D, generator=g, dtype=torch.float64)
    target_logits = torch.randn(V, generator=g, dtype=torch.float64)
    return E, target_logits


def _official_next_law(
    E: torch.Tensor, target_logits: torch.Tensor, t: float, h: float, increment: str
) -> torch.Tensor:
    """``T[z, v]``: the law of the next state v from z after one step of the official solver.

    Written from the formulas: d(x, y) = ‖ê_x − ê_y‖⁴ (unit rows), p_t = softmax(−β_t d(·, x1)),
    u_t(x, z) = β̇_t p_t(x) [d(z, x1) − d(x, x1)]_+, jump with 1 − exp(−h Σ_x u_t(x, z)) to a
    state ∝ u_t(·, z), with β̇_0 := 0 (``increment="official"``). ``increment="integrated"``
    replaces h·β̇_t by β_{t+h} − β_t, only to show the two differ at the tested step.
    """
    e = E / E.norm(dim=-1, keepdim=True)
    d = torch.cdist(e, e) ** 4  # d[x, y]
    q = torch.softmax(target_logits, -1)  # the model's p(x1 = y), the same for every x_t
    beta = C * (t / (1 - t)) ** A
    beta_dot = 0.0 if t == 0 else C * A * (t / (1 - t)) ** (A - 1) / (1 - t) ** 2
    dclock = h * beta_dot
    if increment == "integrated":
        dclock = C * ((t + h) / (1 - t - h)) ** A - beta
    law = torch.zeros(V, V, dtype=torch.float64)
    for z in range(V):
        for y in range(V):
            p = torch.softmax(-beta * d[:, y], -1)
            u = p * (d[z, y] - d[:, y]).clamp(min=0)  # per unit of β̇ (or of Δβ)
            rate = u.sum()
            stay = torch.zeros(V, dtype=torch.float64)
            stay[z] = 1.0
            if rate == 0:
                law[z] += q[y] * stay
                continue
            jump = 1 - torch.exp(-dclock * rate)
            law[z] += q[y] * ((1 - jump) * stay + jump * u / rate)
    return law


def _solver_next_states(
    E: torch.Tensor, target_logits: torch.Tensor, t: float, h: float, copies: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """One ``rate="official"`` step from every state, ``copies`` times: (starts, next states)."""
    path = MetricPath(EmbeddingMetric(E, exponent=4.0, dtype=torch.float64), a=A, c=C)
    solver = EulerSolver(path, rate="official")
    starts = torch.arange(V).repeat_interleave(copies)[:, None]  # [V·copies, 1]

    def model_fn(x: torch.Tensor, _t: torch.Tensor) -> torch.Tensor:
        return target_logits.expand(*x.shape, V)

    grid = torch.tensor([t, t + h], dtype=torch.float64)  # one step, not ending at 1
    out = solver.sample(
        model_fn, starts, time_grid=grid, generator=torch.Generator().manual_seed(1)
    )
    return starts[:, 0], out[:, 0]


def test_official_step_law_matches_the_official_formula() -> None:
    E, target_logits = _problem()
    t, h, copies = 0.3, 0.3, 40_000
    expected = _official_next_law(E, target_logits, t, h, "official")
    # The tested step tells the rules apart: the exact clock increment moves more.
    other = _official_next_law(E, target_logits, t, h, "integrated")
    assert (expected - other).abs().max() > 0.04
    starts, nxt = _solver_next_states(E, target_logits, t, h, copies)
    for z in range(V):
        empirical = torch.bincount(nxt[starts == z], minlength=V).double() / copies
        # Monte Carlo: the standard error of each frequency is at most 0.0025.
        assert (empirical - expected[z]).abs().max() < 0.012, (z, empirical, expected[z])


def test_official_first_step_moves_nothing() -> None:
    """β̇_0 := 0: from t = 0 no token moves, whatever h, where the plain Euler rate (β̇_0 = ∞)
    moves every token that has somewhere closer to go."""
    E, target_logits = _problem()
    starts, nxt = _solver_next_states(E, target_logits, 0.0, 0.25, copies=200)
    assert torch.equal(nxt, starts)
    assert torch.equal(_official_next_law(E, target_logits, 0.0, 0.25, "official"),
                       torch.eye(V, dtype=torch.float64))  # fmt: skip
    path = MetricPath(EmbeddingMetric(E, exponent=4.0, dtype=torch.float64), a=A, c=C)
    euler = EulerSolver(path, rate="euler").sample(
        lambda x, _t: target_logits.expand(*x.shape, V),
        starts[:, None],
        time_grid=torch.tensor([0.0, 0.25], dtype=torch.float64),
        generator=torch.Generator().manual_seed(1),
    )
    assert (euler[:, 0] != starts).float().mean() > 0.5


def test_masked_path_refuses_the_official_rate_clearly() -> None:
    masked = MaskedPath(4, mask_id=3)
    with pytest.raises(ValueError, match=r"rate='official'.*MaskedPath.*use rate='euler'"):
        EulerSolver(masked, rate="official")
    metric = MetricPath(EmbeddingMetric(torch.randn(3, 2)))
    with pytest.raises(ValueError, match=r"the path of 'image' is a MaskedPath"):
        EulerSolver({"text": metric, "image": masked}, rate="official")
    # The step function refuses it too (exact-law code such as euler_law calls it directly).
    t = torch.tensor(0.5)
    with pytest.raises(ValueError, match="MaskedPath"):
        jump_probability(masked, "official", t, t + 0.1, torch.ones(2))
    with pytest.raises(ValueError, match="rate must be one of 'integrated', 'euler', 'official'"):
        EulerSolver(metric, rate="Official")
    EulerSolver({"text": metric, "image": masked}, rate="euler")  # still accepted


def test_solver_quality_benchmark_uses_the_library_option(capsys) -> None:
    with bench_script("solver_quality") as bench:
        path, rate, _ = bench.rules(torch.randn(4, 3))["official"]
        assert type(path) is MetricPath and rate == "official"
        report = bench.main(["--steps", "2,4"])
    printed = json.loads(capsys.readouterr().out)
    assert printed == report and printed["steps"] == [2, 4]
    for entry in printed["problems"].values():
        assert set(entry["tv"]) == {"integrated", "euler", "official", "integrated_late_grid",
                                    "masked_integrated"}  # fmt: skip
        assert all(0 <= v <= 1 for v in entry["tv"]["official"])
