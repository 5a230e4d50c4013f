"""Probability paths: the formulas, their limits, sampling, and the Kolmogorov forward equation.

The forward equation ``∂_t p_t(x) = Σ_z p_t(z) u_t(x, z | x_1)`` is what makes a velocity
generate its path; it is checked numerically (central differences in float64) for random
embeddings, several metrics, and the masked path with two schedulers.
"""

from __future__ import annotations

import pytest
import torch
from conftest import random_metric_path

from kineflow.flow import (
    CosineScheduler,
    DiscretePath,
    HammingMetric,
    MaskedPath,
    MetricPath,
    PolynomialScheduler,
    total_variation,
)

TIMES = [0.05, 0.2, 0.5, 0.8, 0.95]


def paths() -> list[tuple[str, DiscretePath]]:
    return [
        ("fudoki", random_metric_path(exponent=4.0)),
        ("euclidean", random_metric_path(exponent=1.0, seed=1)),
        ("hamming", MetricPath(HammingMetric(6, dtype=torch.float64))),
        ("masked-linear", MaskedPath(6, mask_id=5)),
        ("masked-cubic", MaskedPath(6, mask_id=0, scheduler=PolynomialScheduler(3.0))),
        ("masked-cosine", MaskedPath(6, mask_id=2, scheduler=CosineScheduler())),
    ]


def valid_targets(path: DiscretePath) -> torch.Tensor:
    return torch.tensor([x for x in range(path.vocab_size) if x not in path.invalid_targets])


# -- metric path formulas -------------------------------------------------------------------------
def test_metric_probs_equal_softmax_formula() -> None:
    path = random_metric_path(V=9, D=4)
    x1 = torch.tensor([[0, 3, 8], [5, 5, 1]])
    t = torch.tensor([0.1, 0.7], dtype=torch.float64)
    d = path.metric(x1)
    beta = 3.0 * (t / (1 - t)) ** 0.9
    expected = torch.softmax(-beta[:, None, None] * d, dim=-1)
    torch.testing.assert_close(path.probs(x1, t), expected)


def test_metric_probs_uniform_at_zero_and_delta_at_one() -> None:
    path = random_metric_path(V=9, D=4)
    x1 = torch.arange(9)
    torch.testing.assert_close(path.probs(x1, 0.0), torch.full((9, 9), 1 / 9, dtype=torch.float64))
    assert (path.probs(x1, 0.999).diagonal() > 0.99).all()
    torch.testing.assert_close(path.probs(x1, 1.0), torch.eye(9, dtype=torch.float64))
    mass = [float(path.probs(x1, t).diagonal().mean()) for t in [0.0, 0.3, 0.6, 0.9, 0.99]]
    assert mass == sorted(mass)  # concentrates monotonically on x1


def test_beta_schedule_and_its_derivative() -> None:
    path = random_metric_path()
    t = torch.tensor([0.1, 0.4, 0.75], dtype=torch.float64)
    torch.testing.assert_close(path.beta(t), 3.0 * (t / (1 - t)) ** 0.9)
    eps = 1e-6
    fd = (path.beta(t + eps) - path.beta(t - eps)) / (2 * eps)
    torch.testing.assert_close(path.beta_dot(t), fd, rtol=1e-6, atol=0)
    assert float(path.beta(0.0)) == 0.0 and float(path.beta(1.0)) == float("inf")
    assert float(path.beta_dot(0.0)) == float("inf")  # a < 1: the Euler rate blows up at t = 0


@pytest.mark.parametrize("t", [0.0, 0.4, 0.9])
def test_time_broadcasts_scalar_batch_and_full(t: float) -> None:
    path = random_metric_path()
    x1 = torch.randint(0, 7, (3, 5), generator=torch.Generator().manual_seed(0))
    p_scalar = path.probs(x1, t)
    t_b = torch.full((3,), t, dtype=torch.float64)
    torch.testing.assert_close(path.probs(x1, t_b), p_scalar)
    torch.testing.assert_close(path.probs(x1, t_b[:, None].expand(3, 5)), p_scalar)
    mixed = path.probs(x1, torch.tensor([0.0, 0.4, 0.9], dtype=torch.float64))
    for b, tb in enumerate([0.0, 0.4, 0.9]):
        torch.testing.assert_close(mixed[b], path.probs(x1[b], tb))


# -- masked path formulas ------------------------------------------------------------------------
def test_masked_probs_and_reveal_probability() -> None:
    path = MaskedPath(5, mask_id=4, scheduler=PolynomialScheduler(2.0))
    x1 = torch.tensor([0, 3])
    p = path.probs(x1, 0.5)
    torch.testing.assert_close(p, torch.tensor([[0.25, 0, 0, 0, 0.75], [0, 0, 0, 0.25, 0.75]]))
    torch.testing.assert_close(path.probs(x1, 0.0)[:, 4], torch.ones(2))
    # The clock increment gives the exact reveal probability (κ_{t+h} − κ_t) / (1 − κ_t).
    t, h = torch.tensor(0.3), torch.tensor(0.2)
    reveal = -torch.expm1(-(path.clock(t + h) - path.clock(t)))
    kappa = path.kappa
    torch.testing.assert_close(reveal, (kappa(t + h) - kappa(t)) / (1 - kappa(t)))


# -- sampling ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,path", paths(), ids=[n for n, _ in paths()])
def test_sample_follows_probs(name: str, path: DiscretePath, gen: torch.Generator) -> None:
    x1 = valid_targets(path)[:3]
    n = 40000
    xt = path.sample(x1.repeat(n, 1), 0.4, generator=gen)  # [n, 3]
    for i, target in enumerate(x1):
        freq = torch.bincount(xt[:, i], minlength=path.vocab_size).double() / n
        assert total_variation(freq, path.probs(target, 0.4).double()) < 0.015


def test_prior_samples_are_the_source(gen: torch.Generator) -> None:
    metric, masked = random_metric_path(V=5), MaskedPath(5, mask_id=1)
    freq = torch.bincount(metric.sample_prior((50000,), gen), minlength=5).double() / 50000
    assert total_variation(freq, torch.full((5,), 0.2, dtype=torch.float64)) < 0.01
    assert (masked.sample_prior((4, 3), gen) == 1).all()


# -- velocities ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,path", paths(), ids=[n for n, _ in paths()])
@pytest.mark.parametrize("t", TIMES)
def test_velocity_is_a_rate_matrix(name: str, path: DiscretePath, t: float) -> None:
    """For every (current state z, target x1): off-diagonal ≥ 0, diagonal = −row sum."""
    V = path.vocab_size
    z = torch.arange(V).repeat_interleave(V)
    x1 = torch.arange(V).repeat(V)
    keep = ~torch.isin(x1, torch.tensor(path.invalid_targets, dtype=torch.long))
    z, x1 = z[keep], x1[keep]
    u = path.velocity(z, x1, torch.tensor(t, dtype=torch.float64))
    off = u.clone().scatter_(-1, z[:, None], 0.0)
    assert (off >= 0).all()
    torch.testing.assert_close(u.sum(-1), torch.zeros(len(z), dtype=u.dtype), atol=1e-9, rtol=0)
    assert (u.gather(-1, z[:, None]) <= 0).all()


@pytest.mark.parametrize("t", TIMES)
def test_metric_velocity_only_moves_downhill(t: float) -> None:
    path = random_metric_path(V=8)
    V = 8
    z, x1 = torch.arange(V).repeat_interleave(V), torch.arange(V).repeat(V)
    u = path.velocity(z, x1, t)
    d = path.metric(x1)
    d_z = d.gather(-1, z[:, None])
    moves = (u > 0) & (torch.arange(V) != z[:, None])
    assert (d[moves] < d_z.expand_as(d)[moves]).all()
    assert (u[x1 == z].clamp(min=0) == 0).all()  # at the target: no outgoing rate
    expected = path.probs(x1, t) * path.beta_dot(t) * (d_z - d).clamp(min=0)
    off = torch.arange(V) != z[:, None]
    torch.testing.assert_close(u[off], expected[off])


@pytest.mark.parametrize("name,path", paths(), ids=[n for n, _ in paths()])
@pytest.mark.parametrize("t", TIMES)
def test_kolmogorov_forward_equation(name: str, path: DiscretePath, t: float) -> None:
    """∂_t p_t(x|x1) (central differences) = Σ_z p_t(z|x1) u_t(x, z|x1), for every target."""
    V = path.vocab_size
    tt = torch.tensor(t, dtype=torch.float64)
    eps = 1e-6
    largest = 0.0
    for target in valid_targets(path):
        x1 = target.expand(V)  # one row per current state z
        p = path.probs(target, tt).double()
        dp_dt = (path.probs(target, tt + eps) - path.probs(target, tt - eps)).double() / (2 * eps)
        u = path.velocity(torch.arange(V), x1, tt).double()  # u[z, x]
        flux = p @ u  # Σ_z p(z) u(x, z)
        torch.testing.assert_close(flux, dp_dt, rtol=1e-5, atol=1e-7)
        largest = max(largest, float(dp_dt.abs().max()))
    if t <= 0.8:  # later the path has converged and both sides are ~0 for some paths
        assert largest > 1e-3  # the check is not vacuous


def test_unit_rates_dedup_path_matches_plain_rows() -> None:
    """The solver's shortcut (distances once per distinct target) gives the same rates."""
    path = random_metric_path(V=11, D=5)
    g = torch.Generator().manual_seed(3)
    x1 = torch.randint(0, 3, (64,), generator=g)  # many repeats: the shortcut is taken
    x_t = torch.randint(0, 11, (64,), generator=g)
    t = torch.tensor(0.35, dtype=torch.float64)
    rows = torch.stack([path.unit_rates(x_t[i : i + 1], x1[i : i + 1], t)[0] for i in range(64)])
    torch.testing.assert_close(path.unit_rates(x_t, x1, t), rows)
