"""The fixed-shape (GPU) solver step against the exact law and against the CPU step.

``euler_law`` (:mod:`kineflow.flow.oracle`) is built from the formulas with no solver code, so
a sampled law that matches it checks the static step independently; where the random draws
coincide, the static step must reproduce the compact step's samples bit for bit.
"""

from __future__ import annotations

import pytest
import torch
from conftest import random_metric_path, text_and_image_problem

from kineflow.flow import (
    EulerSolver,
    ExactPosterior,
    MaskedPath,
    MetricPath,
    euler_law,
    total_variation,
)
from kineflow.flow.metric import HammingMetric
from kineflow.flow.sampling import race
from kineflow.flow.static_step import draw_noise, static_step


def angle_path(**kw) -> MetricPath:
    angles = torch.tensor([0.0, 1.0, 2.0, 3.0])
    return MetricPath.from_embeddings(torch.stack([angles.cos(), angles.sin()], -1), **kw)


def uniform_path() -> MetricPath:
    return MetricPath(HammingMetric(4), a=1.0)


def solve(solver, oracle, B, N, seed=0, **kw):
    g = torch.Generator().manual_seed(seed)
    x0 = solver.init_state(torch.zeros(B, N, dtype=torch.long), kw.pop("region", None), g)
    return solver.solve(oracle, x0, kw.pop("steps", None), generator=g, **kw)


PATHS = [(angle_path(a=1.0), 0.06), (uniform_path(), 0.3), (MaskedPath(4, mask_id=3), 0.5)]


@pytest.mark.parametrize("sampler", ["inverse_cdf", "race"])
@pytest.mark.parametrize("rate", ["integrated", "euler"])
@pytest.mark.parametrize("path,h", PATHS, ids=["metric", "uniform", "masked"])
def test_one_static_step_follows_the_exact_transition(path, h, rate, sampler) -> None:
    """One step [0, h] from the source, 40000 chains: the law of x_h is the oracle's."""
    oracle = ExactPosterior(torch.tensor([[0], [1]]), torch.tensor([0.7, 0.3]), path)
    solver = EulerSolver(path, rate=rate, strategy="static", sampler=sampler)
    grid = torch.tensor([0.0, h])
    samples = solve(solver, oracle, 40000, 1, time_grid=grid).samples
    exact = euler_law(oracle, time_grid=grid, rate=rate)
    assert total_variation(oracle.empirical_law(samples), exact) < 0.02


@pytest.mark.parametrize("sampler", ["inverse_cdf", "race"])
def test_a_whole_static_solve_with_text_and_image_regions_follows_the_exact_law(sampler) -> None:
    """conftest.text_and_image_problem: text (metric path) at positions 0 and 2, image (masked
    path) at 1, a prompt token at 3 that must never change."""
    B = 20000
    oracle, model, region, prompt = text_and_image_problem(B)
    solver = EulerSolver(oracle.paths, strategy="static", sampler=sampler)
    g = torch.Generator().manual_seed(0)
    x0 = solver.init_state(torch.full((B, 4), prompt), region, g)
    result = solver.solve(model, x0, 24, region, g)
    assert (result.samples[:, 3] == prompt).all()
    exact = euler_law(oracle, 24)
    assert total_variation(oracle.empirical_law(result.samples[:, :3]), exact) < 0.05


@pytest.mark.parametrize(
    "rate,grid,top_k",
    [
        # a < 1: β̇_0 = ∞, so every position not already on its target jumps; greedy targets
        # and a start off them make that every position.
        ("euler", [0.0, 0.25], 1),
        ("official", [0.0, 0.25], None),  # β̇_0 := 0: no position jumps
        ("integrated", [0.5, 1.0], None),  # one final step: no jump draws at all
    ],
)
def test_static_and_compact_steps_give_the_same_samples_when_the_draws_coincide(
    rate, grid, top_k
) -> None:
    """With the inverse-CDF sampler the static step consumes the generator in the compact
    step's order (target, jump, destination). Where every position jumps, the compact step
    draws a destination for every row too; where none jumps, the destinations are unused; on
    the final step neither draws one. In each case both steps must agree exactly, chunk by
    chunk (6 chunks of 64 rows here)."""
    path = random_metric_path(V=50, D=4, seed=1)
    logits = torch.randn(6, 64, 50, generator=torch.Generator().manual_seed(3))
    x0 = (logits.argmax(-1) + 1) % 50
    outs = []
    for strategy in ("compact", "static"):
        solver = EulerSolver(path, rate=rate, strategy=strategy, sampler="inverse_cdf",
                             max_chunk_elements=50 * 64, min_chunk_rows=1)  # fmt: skip
        g = torch.Generator().manual_seed(11)
        time_grid = torch.tensor(grid, dtype=torch.float64)
        result = solver.solve(lambda x, t: logits, x0, generator=g, time_grid=time_grid,
                              top_k=top_k)  # fmt: skip
        outs.append(result.samples)
    assert torch.equal(outs[0], outs[1])
    if rate == "official":
        assert torch.equal(outs[0], x0)
    else:  # the cases are not vacuous: (nearly) every token moved
        assert (outs[0] != x0).float().mean() > 0.9


def test_static_step_samples_the_same_greedy_targets_as_the_compact_step() -> None:
    path = random_metric_path(V=30, D=4, seed=2)
    logits = torch.randn(3, 20, 30, generator=torch.Generator().manual_seed(5))
    x0 = torch.randint(0, 30, (3, 20), generator=torch.Generator().manual_seed(6))
    got = []
    for strategy in ("compact", "static"):
        solver = EulerSolver(path, strategy=strategy, sampler="inverse_cdf")
        result = solver.solve(lambda x, t: logits, x0, 4, return_trajectory=True, top_k=1)
        got.append(result.predictions)
    assert torch.equal(got[0], got[1])
    assert torch.equal(got[1][-1], logits.argmax(-1))


def test_race_draws_the_categorical_law() -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.tensor([0.0, 1.0, 2.0, 5.0, 0.5])
    e = torch.empty(200000, 5).exponential_(generator=g)
    freq = torch.bincount(race(w.expand(200000, 5), e), minlength=5).float() / 200000
    assert freq[0] == 0  # zero weights never win
    assert total_variation(freq, w / w.sum()) < 0.005


def test_bad_logits_are_reported_after_the_solve_with_their_time() -> None:
    path = random_metric_path(V=6, D=3, seed=0)
    calls = []

    def model(x, t):
        calls.append(float(t[0]))
        out = torch.zeros(*x.shape, 6)
        if len(calls) == 3:
            out[1, 2, 4] = torch.nan
        return out

    solver = EulerSolver(path, strategy="static")
    x0 = solver.init_state(torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"NaN/inf logits .* 'tokens' at t=0\.5000"):
        solver.solve(model, x0, 4)
    assert len(calls) == 4  # no host read per step: the flag is read once, at the end


def test_the_plan_picks_static_on_cuda_and_compact_on_cpu() -> None:
    solver = EulerSolver(random_metric_path(V=6, D=3, seed=0))
    assert solver.plan("cpu") == ("compact", "inverse_cdf")
    assert solver.plan("cuda") == ("static", "race")
    forced = EulerSolver(random_metric_path(V=6, D=3, seed=0), strategy="static", sampler="race")
    assert forced.plan("cpu") == ("static", "race")
    with pytest.raises(ValueError, match="strategy"):
        EulerSolver(random_metric_path(V=6, D=3, seed=0), strategy="fast")
    with pytest.raises(ValueError, match="sampler"):
        EulerSolver(random_metric_path(V=6, D=3, seed=0), sampler="multinomial")


# -- compiles with no graph break (GPU-friendliness checked on the CPU) ----------------------
def _explain(fn, *args):
    import torch._dynamo

    torch._dynamo.reset()
    return torch._dynamo.explain(fn)(*args)


@pytest.mark.parametrize("final", [False, True])
@pytest.mark.parametrize(
    "path", [random_metric_path(V=64, D=8, seed=0), MaskedPath(65, mask_id=64)],
    ids=["metric", "masked"],
)  # fmt: skip
def test_the_static_step_compiles_as_one_graph(path, final) -> None:
    M, V = 32, path.vocab_size
    g = torch.Generator().manual_seed(0)
    x_t = torch.randint(0, V - 1, (M,), generator=g)
    logits = torch.randn(M, V, generator=g)
    noise = draw_noise("race", M, V, temperature=1.0, top_k=None, final=final, generator=g,
                       device="cpu")  # fmt: skip

    def step(x_t, logits, t, t_next, target, jump, move):
        noise.target, noise.jump, noise.move = target, jump, move
        return static_step(path, "integrated", x_t, logits, t, t_next, noise, final=final)

    args = (x_t, logits, torch.tensor(0.3), torch.tensor(0.4), noise.target, noise.jump,
            noise.move)  # fmt: skip
    report = _explain(step, *args)
    assert report.graph_break_count == 0, report.break_reasons
    assert report.graph_count == 1
