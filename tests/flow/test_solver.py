"""The Euler CTMC solver against exact answers.

The data are small *non-factorised* joints over sequences, the model is the exact Bayes
posterior (:class:`ExactPosterior`), and :func:`euler_law` gives the exact law of the
discretised chain. ``euler_law`` shares no code with the solver or the paths' rate and clock
methods: it rebuilds the rates from ``p_t`` and its derivative, and the step's transition
matrix from them and the clock increment (``test_exact_law_uses_no_solver_or_path_rate_code``
pins that). So a sampled law that matches ``euler_law`` checks the implementation against an
independent derivation, and ``euler_law`` approaching the data checks the math (velocity,
clock, final step).
"""

from __future__ import annotations

import pytest
import torch
from conftest import LargestAllocation, random_metric_path, text_and_image_problem

import kineflow.flow.solver as solver_module
from kineflow.flow import (
    CosineScheduler,
    EulerSolver,
    ExactPosterior,
    GuidedModel,
    MaskedPath,
    MetricPath,
    PolynomialScheduler,
    blank_span,
    classifier_free_guidance,
    euler_law,
    power_grid,
    sample_logits,
    total_variation,
    uniform_grid,
)
from kineflow.flow.oracle import PathFormulas


def embeddings(V: int, D: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(V, D, generator=torch.Generator().manual_seed(seed))


def correlated_joint(V: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """2 positions × V states; mass concentrated on x^1 = x^2 plus a skewed background."""
    support = torch.cartesian_prod(torch.arange(V), torch.arange(V))
    w = torch.linspace(0.1, 1.0, V * V) ** 2
    w[support[:, 0] == support[:, 1]] += 1.5
    return support, w / w.sum()


@pytest.fixture
def oracle() -> ExactPosterior:
    support, w = correlated_joint()
    return ExactPosterior(support, w, MetricPath.from_embeddings(embeddings(4, 3)))


def run(solver: EulerSolver, model, B: int, N: int, steps: int, seed: int = 0, **kw):
    g = torch.Generator().manual_seed(seed)
    x0 = solver.init_state(torch.zeros(B, N, dtype=torch.long), kw.pop("region", None), g)
    return solver.solve(model, x0, steps, generator=g, **kw)


def test_joint_is_not_factorised(oracle: ExactPosterior) -> None:
    q = oracle.data_law().view(4, 4)
    product = torch.outer(q.sum(1), q.sum(0))
    assert total_variation(product.flatten(), q.flatten()) > 0.3


@pytest.mark.parametrize("rate", ["integrated", "euler"])
def test_solver_samples_follow_the_exact_law_and_the_data(
    oracle: ExactPosterior, rate: str
) -> None:
    solver = EulerSolver(oracle.paths["tokens"], rate=rate)
    samples = run(solver, oracle, B=20000, N=2, steps=64).samples
    empirical = oracle.empirical_law(samples)
    exact = euler_law(oracle, 64, rate=rate)
    assert total_variation(empirical, exact) < 0.03  # sampling noise only (~0.01 expected)
    # Discretisation error at 64 steps (exact: integrated 0.02, Euler 0.07).
    assert total_variation(empirical, oracle.data_law()) < (0.05 if rate == "integrated" else 0.1)


@pytest.mark.parametrize(
    "path",
    [MetricPath.from_embeddings(embeddings(4, 3)), MaskedPath(5, mask_id=4)],
    ids=["metric", "masked"],
)
def test_exact_law_converges_to_the_data(path) -> None:
    support, w = correlated_joint()
    oracle = ExactPosterior(support, w, path)
    q = oracle.data_law()
    tv = [total_variation(euler_law(oracle, n), q) for n in (4, 16, 64, 256)]
    assert tv == sorted(tv, reverse=True)
    assert tv[-1] < 0.01


def angle_path(**kw) -> MetricPath:
    """FUDOKI's metric over 4 unit vectors at angles 0, 1, 2, 3 rad: d(0, ·) ≈ 0, 0.85, 8, 16."""
    angles = torch.tensor([0.0, 1.0, 2.0, 3.0])
    return MetricPath.from_embeddings(torch.stack([angles.cos(), angles.sin()], -1), **kw)


@pytest.mark.parametrize("rate", ["integrated", "euler"])
@pytest.mark.parametrize(
    "path,h",
    # h puts Δs·λ near 1 for many states, where 1 − e^{−Δs λ} differs most from Δs·λ. a = 1
    # keeps the Euler rate β̇_0 finite, so the Euler step at t = 0 is not a certain jump.
    [(angle_path(a=1.0), 0.06), (MaskedPath(4, mask_id=3), 0.5)],
    ids=["metric", "masked"],
)
def test_one_step_follows_the_exact_transition(path, h: float, rate: str) -> None:
    """One step [0, h] from the source: the sampled law of x_h is the oracle's exactly.

    A first-order jump probability ``Δs·λ`` in place of ``1 − e^{−Δs λ}`` moves this law by
    0.07-0.19 in total variation (0.076 / 0.076 / 0.19 / 0.11), against ~0.004 of sampling
    noise at B = 40000.
    """
    oracle = ExactPosterior(torch.tensor([[0], [1]]), torch.tensor([0.7, 0.3]), path)
    solver = EulerSolver(path, rate=rate)
    grid = torch.tensor([0.0, h])
    samples = run(solver, oracle, B=40000, N=1, steps=None, time_grid=grid).samples
    exact = euler_law(oracle, time_grid=grid, rate=rate)
    assert total_variation(oracle.empirical_law(samples), exact) < 0.02


def test_exact_law_uses_no_solver_or_path_rate_code(monkeypatch, oracle) -> None:
    """The oracle must not share a formula with what it checks: with the solver's jump
    probability and every rate, clock and end-state method of the paths disabled, it computes
    the same law. (The model, :class:`ExactPosterior`, still asks the paths for ``p_t``: it
    plays the network, whose predictions the solver takes as given.)"""
    masked = ExactPosterior(*correlated_joint(), MaskedPath(5, 4, CosineScheduler()))
    expected = [euler_law(o, 8, rate=r) for o in (oracle, masked) for r in ("integrated", "euler")]

    def disabled(*args, **kwargs):
        raise AssertionError("the oracle called code it is meant to check")

    monkeypatch.setattr(solver_module, "jump_probability", disabled)
    monkeypatch.setattr(solver_module, "uniform_grid", disabled)
    for cls in (MetricPath, MaskedPath):
        for name in ("_unit_rates", "unit_rates", "velocity", "clock", "clock_dot", "final_state"):
            monkeypatch.setattr(cls, name, disabled)
    monkeypatch.setattr(MetricPath, "beta_dot", disabled)
    monkeypatch.setattr(CosineScheduler, "kappa_dot", disabled)
    got = [euler_law(o, 8, rate=r) for o in (oracle, masked) for r in ("integrated", "euler")]
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("t", [0.0, 0.3, 0.9, 0.995])
@pytest.mark.parametrize(
    "path",
    [
        random_metric_path(V=6, D=3, seed=2),
        MaskedPath(5, mask_id=1, scheduler=PolynomialScheduler(2.0)),
        MaskedPath(5, mask_id=4, scheduler=CosineScheduler()),
    ],
    ids=["metric", "masked-quadratic", "masked-cosine"],
)
def test_oracle_rates_and_clock_agree_with_the_paths(path, t: float) -> None:
    """Two derivations of the same numbers: the paths' closed forms and the oracle's
    kinetic-optimal rates from ``p_t`` and its derivative (a check on both)."""
    formulas = PathFormulas(path)
    V = path.vocab_size
    tt = torch.tensor(t, dtype=torch.float64)
    rates = formulas.unit_rates(t)
    for y in set(range(V)) - set(path.invalid_targets):
        closed = path.unit_rates(torch.arange(V), torch.full((V,), y), tt).double()
        torch.testing.assert_close(rates[y], closed, rtol=1e-6, atol=1e-9)
    h = 0.003
    torch.testing.assert_close(
        formulas.clock_increment(t, t + h, "integrated"), (path.clock(tt + h) - path.clock(tt))
    )
    torch.testing.assert_close(formulas.clock_increment(t, t + h, "euler"), h * path.clock_dot(tt))


def test_oracle_refuses_paths_it_has_no_formulas_for() -> None:
    class Other(MaskedPath):
        pass

    PathFormulas(Other(3, 2))  # a subclass keeps the masked formulas
    with pytest.raises(TypeError, match="no exact formula for scheduler"):
        PathFormulas(MaskedPath(3, 2, scheduler=object()))
    with pytest.raises(ValueError, match="rate must be"):
        euler_law(ExactPosterior(torch.tensor([[0]]), None, MaskedPath(3, 2)), 2, rate="exact")
    with pytest.raises(ValueError, match="steps must be a positive integer"):
        euler_law(ExactPosterior(torch.tensor([[0]]), None, MaskedPath(3, 2)), 0)


def test_several_modalities_in_one_sequence() -> None:
    """Text (metric path) at positions 0 and 2, image (masked path) at position 1, and a
    prompt token at position 3 that is in neither vocabulary (conftest.text_and_image_problem)."""
    B = 20000
    oracle, model, region, prompt = text_and_image_problem(B)
    solver = EulerSolver(oracle.paths)
    gen = torch.Generator().manual_seed(0)
    x0 = solver.init_state(torch.full((B, 4), prompt), region, gen)
    assert (x0[:, 1] == 3).all() and (x0[:, 3] == prompt).all()
    result = solver.solve(model, x0, 48, region, gen, return_trajectory=True)
    assert (result.states[..., 3] == prompt).all()
    empirical = oracle.empirical_law(result.samples[:, :3])
    exact = euler_law(oracle, 48)
    assert total_variation(empirical, exact) < 0.05
    assert total_variation(exact, oracle.data_law()) < 0.06


def test_tokens_outside_region_never_change(gen: torch.Generator) -> None:
    path = random_metric_path(V=6)
    B, N = 8, 10
    x0 = torch.randint(-5, 100, (B, N), generator=gen)  # outside the region: anything
    region = torch.rand(B, N, generator=gen) < 0.5
    x0[region] = torch.randint(0, 6, (int(region.sum()),), generator=gen)

    def model(x, t):
        return torch.randn(B, N, 6, generator=gen)

    result = EulerSolver(path).solve(model, x0, 12, region, gen, return_trajectory=True)
    assert (result.states[:, ~region] == x0[~region]).all()
    assert (result.predictions[:, ~region] == x0[~region]).all()
    assert (result.states[:, region] != x0[region]).any()


def test_same_seed_same_samples(oracle: ExactPosterior) -> None:
    solver = EulerSolver(oracle.paths["tokens"])
    a = run(solver, oracle, 64, 2, 16, seed=3).samples
    b = run(solver, oracle, 64, 2, 16, seed=3).samples
    c = run(solver, oracle, 64, 2, 16, seed=4).samples
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_trajectory_and_model_call_count(oracle: ExactPosterior) -> None:
    calls = []

    def model(x, t):
        calls.append(t.clone())
        return oracle(x, t)

    result = run(EulerSolver(oracle.paths["tokens"]), model, 32, 2, 10, return_trajectory=True)
    assert result.nfe == len(calls) == 10
    assert result.states.shape == (11, 32, 2) and result.predictions.shape == (10, 32, 2)
    assert torch.equal(result.states[-1], result.samples)
    assert torch.equal(result.predictions[-1], result.samples)  # last step sets x = x1
    torch.testing.assert_close(torch.stack([c[0] for c in calls]), torch.linspace(0, 0.9, 10))
    assert calls[0].shape == (32,)


def test_first_model_call_is_not_wasted(oracle: ExactPosterior) -> None:
    """β̇_0 = ∞; the official fix β̇_0 := 0 freezes step 1. The integrated clock moves tokens."""
    result = run(EulerSolver(oracle.paths["tokens"]), oracle, 2000, 2, 8, return_trajectory=True)
    moved = (result.states[1] != result.states[0]).float().mean()
    assert 0.05 < moved < 0.95


def test_custom_time_grid_and_continuing_from_midway(oracle: ExactPosterior) -> None:
    """Start at t = 0.5 from the exact marginal p_0.5 and finish on a non-uniform grid."""
    path = oracle.paths["tokens"]
    g = torch.Generator().manual_seed(5)
    B = 20000
    x1 = oracle.support[torch.multinomial(oracle.log_weights.exp(), B, True, generator=g)]
    x_mid = path.sample(x1, 0.5, generator=g)
    grid = 0.5 + 0.5 * torch.sin(torch.linspace(0, torch.pi / 2, 25))
    result = EulerSolver(path).solve(oracle, x_mid, time_grid=grid, generator=g)
    assert result.nfe == 24
    assert total_variation(oracle.empirical_law(result.samples), oracle.data_law()) < 0.05


def test_small_chunks_give_the_same_law(oracle: ExactPosterior) -> None:
    solver = EulerSolver(oracle.paths["tokens"], max_chunk_elements=1, min_chunk_rows=64)
    samples = run(solver, oracle, B=4000, N=2, steps=16).samples
    assert total_variation(oracle.empirical_law(samples), euler_law(oracle, 16)) < 0.05


def test_solver_memory_is_bounded_by_the_chunk(gen: torch.Generator) -> None:
    V, B, N, chunk_rows = 2000, 4, 64, 8
    path = MetricPath.from_embeddings(torch.randn(V, 8, generator=gen))
    logits = torch.randn(B, N, V, generator=gen)
    solver = EulerSolver(path, max_chunk_elements=chunk_rows * V, min_chunk_rows=1)
    x0 = solver.init_state(torch.zeros(B, N, dtype=torch.long), generator=gen)
    with LargestAllocation() as probe:
        solver.sample(lambda x, t: logits, x0, 3, generator=gen)
    assert probe.largest <= chunk_rows * V  # never [B, N, V] nor [V, V]


def test_greedy_targets_and_temperature(gen: torch.Generator) -> None:
    path = random_metric_path(V=6)
    logits = torch.randn(4, 5, 6, generator=gen)
    x0 = EulerSolver(path).init_state(torch.zeros(4, 5, dtype=torch.long), generator=gen)
    out = EulerSolver(path).sample(lambda x, t: logits, x0, 6, generator=gen, top_k=1)
    assert torch.equal(out, logits.argmax(-1))
    row = torch.tensor([2.0, 1.0, 0.0, -1.0])
    draws = sample_logits(row.expand(40000, 4), temperature=0.5, generator=gen)
    freq = torch.bincount(draws, minlength=4).float() / 40000
    assert total_variation(freq, torch.softmax(row / 0.5, -1)) < 0.01
    draws = sample_logits(row.expand(40000, 4), top_k=2, generator=gen)
    assert set(draws.unique().tolist()) == {0, 1}
    assert torch.equal(sample_logits(row.expand(3, 4), temperature=0.0), torch.zeros(3).long())


def test_masked_path_never_predicts_the_mask(gen: torch.Generator) -> None:
    path = MaskedPath(5, mask_id=2)
    logits = torch.zeros(3, 4, 5)
    logits[..., 2] = 50.0  # a model that loves the mask token
    solver = EulerSolver(path)
    out = solver.sample(lambda x, t: logits, solver.init_state(torch.zeros(3, 4).long()), 4)
    assert not (out == 2).any()


def test_classifier_free_guidance() -> None:
    cond, uncond = torch.tensor([1.0, 2.0]), torch.tensor([0.5, 3.0])
    torch.testing.assert_close(classifier_free_guidance(cond, uncond, 5.0), 6 * cond - 5 * uncond)
    calls = []

    def model(x, t):
        calls.append(x.clone())
        return {
            "image": x.float().unsqueeze(-1).expand(*x.shape, 3).clone(),
            "text": torch.ones(*x.shape, 2),
        }

    span = torch.tensor([[True, True, False]])
    guided = GuidedModel(model, blank_span(span, pad_id=0), scale=2.0, modalities=["image"])
    out = guided(torch.tensor([[4, 5, 6]]), torch.tensor([0.3]))
    assert len(calls) == 1 and calls[0].tolist() == [[4, 5, 6], [0, 0, 6]]  # one batched call
    torch.testing.assert_close(out["image"][0, :, 0], torch.tensor([12.0, 15.0, 6.0]))
    torch.testing.assert_close(out["text"], torch.ones(1, 3, 2))
    assert GuidedModel(model, blank_span(span, 0), 0.0)(torch.tensor([[1, 2, 3]]), None)
    assert len(calls) == 2  # scale 0: no unconditional half


def test_power_grid_is_late_dense() -> None:
    grid = power_grid(8, power=2.0)
    assert grid[0] == 0 and grid[-1] == 1 and (grid.diff() > 0).all()
    assert (grid.diff()[1:] < grid.diff()[:-1]).all()  # steps shrink towards t = 1
    torch.testing.assert_close(power_grid(8, power=1.0), uniform_grid(8))
    with pytest.raises(ValueError, match="power must be > 0"):
        power_grid(8, power=0.0)


def test_masked_final_step_keeps_revealed_tokens(gen: torch.Generator) -> None:
    """The last step fills the remaining masks; it never rewrites a revealed token."""
    path = MaskedPath(5, mask_id=4)
    logits = torch.randn(64, 8, 5, generator=gen)  # an uncertain model: x1 varies per call
    result = EulerSolver(path).solve(
        lambda x, t: logits, torch.full((64, 8), 4), 6, generator=gen, return_trajectory=True
    )
    before = result.states[-2]
    revealed = before != 4
    assert revealed.any() and (~revealed).any()
    assert torch.equal(result.samples[revealed], before[revealed])
    assert not (result.samples == 4).any()


def test_low_precision_logits_are_accepted(oracle: ExactPosterior) -> None:
    """bf16 / fp16 model outputs (mixed-precision models) go through the float32 step."""
    solver = EulerSolver(oracle.paths["tokens"])
    for dtype in (torch.bfloat16, torch.float16):
        samples = run(solver, lambda x, t, d=dtype: oracle(x, t).to(d), B=4000, N=2, steps=32)
        tv = total_variation(oracle.empirical_law(samples.samples), euler_law(oracle, 32))
        assert tv < 0.05


def test_widened_keeps_float64_and_widens_half_precision() -> None:
    from kineflow.flow.sampling import widened

    x64 = torch.randn(3, 5, dtype=torch.float64)
    assert widened(x64) is x64
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        assert widened(x64.to(dtype)).dtype == torch.float32
