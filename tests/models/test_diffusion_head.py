"""The per-token diffusion head: schedule algebra, exact-oracle sampling, loss, guidance."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from kineflow.models.diffusion_head import CosineSchedule, DiffusionHead, DiffusionHeadConfig

pytestmark = pytest.mark.usefixtures("one_thread")


def test_cosine_schedule() -> None:
    s = CosineSchedule(1000)
    a = s.alphas_bar
    assert (a[1:] < a[:-1]).all() and 0 < a[-1] < 1e-3 and a[0] > 0.99
    assert (s.betas > 0).all() and (s.betas <= 0.999).all()
    # The posterior q(x_{t-1} | x_t, x_0) by direct Gaussian conditioning.
    for t in (1, 10, 500, 999):
        prev, alpha = s.alphas_bar_prev[t], 1 - s.betas[t]
        precision = 1 / (1 - prev) + alpha / s.betas[t]
        assert math.isclose(s.posterior_variance[t], 1 / precision, rel_tol=1e-9)
        assert math.isclose(s.coef_x0[t], prev.sqrt() / (1 - prev) / precision, rel_tol=1e-9)
        assert math.isclose(s.coef_xt[t], alpha.sqrt() / s.betas[t] / precision, rel_tol=1e-9)
    r = CosineSchedule.respaced(1000, 100)
    assert len(r) == 100 and r.kept[0] == 0 and r.kept[-1] == 999
    torch.testing.assert_close(r.alphas_bar, a[r.kept])  # each kept step keeps its ᾱ
    torch.testing.assert_close(torch.cumprod(1 - r.betas, 0), r.alphas_bar)


class GaussianOracle(nn.Module):
    """The exact ε̂ = E[ε | x_t] for data N(mu, std²), and a fixed variance choice v."""

    def __init__(self, schedule: CosineSchedule, mu: float, std: float, v: float) -> None:
        super().__init__()
        self.a, self.mu, self.var, self.v = schedule.alphas_bar, mu, std**2, v

    def forward(self, x, t, z):
        a = self.a[t.long()].to(x.dtype)[:, None]
        eps = (1 - a).sqrt() * (x - a.sqrt() * self.mu) / (a * self.var + 1 - a)
        return torch.cat([eps, torch.full_like(x, self.v)], dim=-1)


# 100 respaced steps: the small posterior variance (v = -1) under-disperses a little.
@pytest.mark.parametrize(("v", "tol"), [(-1.0, 0.08), (1.0, 0.03)])
def test_sampler_reproduces_a_gaussian_with_the_exact_denoiser(v, tol) -> None:
    head = DiffusionHead(DiffusionHeadConfig(token_dim=4, cond_dim=2)).double()
    head.net = GaussianOracle(head.train_schedule, mu=0.7, std=0.3, v=v)
    x = head.sample(torch.zeros(20000, 2, dtype=torch.float64),
                    generator=torch.Generator().manual_seed(0))  # fmt: skip
    assert abs(float(x.mean()) - 0.7) < 0.01
    assert abs(float(x.std()) / 0.3 - 1) < tol


def test_sampler_returns_a_point_mass_exactly() -> None:
    head = DiffusionHead(DiffusionHeadConfig(token_dim=3, cond_dim=2)).double()
    head.net = GaussianOracle(head.train_schedule, mu=-0.4, std=0.0, v=0.0)
    g = torch.Generator().manual_seed(1)
    x = head.sample(torch.zeros(5, 2, dtype=torch.float64), generator=g)
    torch.testing.assert_close(x, torch.full_like(x, -0.4))


def test_loss_trains_the_head() -> None:
    torch.manual_seed(0)
    head = DiffusionHead(DiffusionHeadConfig(token_dim=4, cond_dim=8, width=64, depth=2, draws=4))
    # Two clusters told apart by the condition.
    z = torch.randn(2, 8).repeat(64, 1)
    x0 = torch.tensor([[1.0, -1, 0.5, 0], [-1.0, 1, -0.5, 0]]).repeat(64, 1)
    first = head.loss(x0, z, torch.Generator().manual_seed(0))
    assert first.shape == (128,) and torch.isfinite(first).all()
    opt = torch.optim.Adam(head.parameters(), lr=2e-3)
    for step in range(300):
        loss = head.loss(x0, z, torch.Generator().manual_seed(step)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss < 0.6 * first.mean()
    g = torch.Generator().manual_seed(0)
    samples = head.sample(z[:2].repeat(200, 1), clip_x0=2.0, generator=g)
    means = samples.view(200, 2, 4).mean(0)
    torch.testing.assert_close(means, x0[:2], atol=0.25, rtol=0)


def test_guidance() -> None:
    torch.manual_seed(0)
    head = DiffusionHead(DiffusionHeadConfig(token_dim=2, cond_dim=3, width=32, depth=1,
                                             sample_steps=10))  # fmt: skip
    for p in head.parameters():
        nn.init.normal_(p, std=0.3)
    z, u = torch.randn(4, 3), torch.randn(4, 3)

    def run(**kw):
        return head.sample(z, generator=torch.Generator().manual_seed(5), **kw)

    torch.testing.assert_close(run(z_uncond=u, cfg_scale=1.0), run(), atol=1e-5, rtol=1e-5)
    # Per-token weights: token i uses weight w[i].
    w = torch.tensor([1.0, 1.0, 3.0, 3.0])
    mixed = run(z_uncond=u, cfg_scale=w)
    torch.testing.assert_close(mixed[:2], run()[:2], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(mixed[2:], run()[2:])


def test_bad_shapes() -> None:
    head = DiffusionHead(DiffusionHeadConfig(token_dim=4, cond_dim=8))
    with pytest.raises(ValueError, match=r"tokens must be \[M, 4\]"):
        head.loss(torch.zeros(3, 5), torch.zeros(3, 8))
    with pytest.raises(ValueError, match=r"z must be \[M, 8\]"):
        head.sample(torch.zeros(3, 7))
    with pytest.raises(ValueError, match="sample_steps=20 exceeds steps=10"):
        DiffusionHeadConfig(4, 8, steps=10, sample_steps=20)


def _sample_by_hand(head: DiffusionHead, z, z_uncond, w, generator) -> torch.Tensor:
    """The reverse chain written out with host-side tables and noise drawn step by step, the way
    the sampler worked before its loop was made static: the static loop must match it."""
    sched = head.sample_schedule
    M, C = z.shape[0], head.config.token_dim
    x = torch.randn((M, C), generator=generator)
    for i in reversed(range(len(sched))):
        index = torch.full((M,), i)
        t = torch.full((M,), float(sched.kept[i]))
        both = head.net(torch.cat([x, x]), torch.cat([t, t]), torch.cat([z, z_uncond]))
        cond, uncond = both.chunk(2)
        eps = uncond[:, :C] + w * (cond[:, :C] - uncond[:, :C])
        mean = sched.posterior_mean(sched.predict_x0(x, index, eps), x, index)
        if i == 0:
            return mean
        std = torch.exp(0.5 * sched.log_variance(index, cond[:, C:]))
        x = mean + 0.7 * std * torch.randn((M, C), generator=generator)
    return x


def test_static_sampling_loop_draws_the_same_tokens_as_the_step_by_step_chain() -> None:
    torch.manual_seed(0)
    head = DiffusionHead(DiffusionHeadConfig(token_dim=3, cond_dim=4, width=16, depth=2,
                                             steps=50, sample_steps=10))  # fmt: skip
    for p in head.parameters():
        nn.init.normal_(p, std=0.3)
    z, z_uncond = torch.randn(5, 4), torch.randn(5, 4)
    want = _sample_by_hand(head, z, z_uncond, 2.5, torch.Generator().manual_seed(3))
    got = head.sample(z, z_uncond=z_uncond, cfg_scale=2.5, temperature=0.7,
                      generator=torch.Generator().manual_seed(3))  # fmt: skip
    assert torch.equal(got, want)


@pytest.mark.parametrize("last", [False, True])
def test_one_denoising_step_compiles_as_one_graph(last: bool) -> None:
    """GPU-friendliness checked on the CPU: a reverse step has static shapes and no host reads,
    so dynamo takes it as a single graph (then ``torch.compile`` or a CUDA graph can)."""
    import torch._dynamo

    head = DiffusionHead(DiffusionHeadConfig(token_dim=3, cond_dim=4, width=16, depth=2,
                                             steps=50, sample_steps=10))  # fmt: skip
    sched = head.sample_schedule
    i = 0 if last else 5

    def step(x, z, z_uncond, w, noise):
        return head.denoise_step(x, i, z, None if last else noise, sched=sched,
                                 z_uncond=z_uncond, cfg_scale=w, clip_x0=3.0)  # fmt: skip

    torch._dynamo.reset()
    args = (torch.randn(6, 3), torch.randn(6, 4), torch.randn(6, 4), torch.full((6, 1), 2.0),
            torch.randn(6, 3))  # fmt: skip
    report = torch._dynamo.explain(step)(*args)
    assert report.graph_break_count == 0, report.break_reasons
    assert report.graph_count == 1
