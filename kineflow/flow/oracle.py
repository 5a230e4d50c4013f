"""Exact denoisers and exact solver laws for small problems: ground truth for the solver.

For a finite data distribution ``q = Σ_k w_k δ_{s_k}`` over sequences (not factorised across
positions), the posterior of a factorised path is available in closed form by Bayes' rule:

    p(x_1 = s_k | x_t) ∝ w_k · Π_i p_t(x_t^i | s_k^i)
    p(x_1^i = v | x_t) = Σ_{k: s_k^i = v} p(x_1 = s_k | x_t)

:class:`ExactPosterior` is a drop-in ``model_fn`` returning the log of those marginals. With it,
the sampler's only error is time discretisation, and :func:`euler_law` computes the *exact*
distribution of the Euler solver's output by propagating the law of the chain over the whole
state space (``Π_i V_i`` sequences), without Monte Carlo noise.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from kineflow.flow.path import DiscretePath
from kineflow.flow.solver import jump_probability, uniform_grid


class ExactPosterior:
    """Exact ``p(x_1^i | x_t)`` for data ``q = Σ_k w_k δ_{s_k}``, usable as a solver ``model_fn``.

    Args:
        support: Long[K, N], the sequences ``s_k``.
        weights: Float[K] (normalised here), or None for uniform.
        path: the path of every position, or a mapping from modality name to path.
        modality: with a mapping, the modality name of each of the N positions.
    """

    def __init__(
        self,
        support: Tensor,
        weights: Tensor | None,
        path: DiscretePath | Mapping[str, DiscretePath],
        modality: Sequence[str] | None = None,
    ) -> None:
        if support.ndim != 2:
            raise ValueError(f"support must be Long[K, N], got shape {tuple(support.shape)}")
        K, N = support.shape
        # float64 throughout: laws are compared at the 1e-3 level after hundreds of steps.
        weights = torch.ones(K) if weights is None else weights.double()
        if weights.shape != (K,) or (weights < 0).any() or weights.sum() <= 0:
            raise ValueError("weights must be non-negative Float[K] with a positive sum")
        self.single = isinstance(path, DiscretePath)
        self.paths = {"tokens": path} if self.single else dict(path)
        modality = ["tokens"] * N if self.single else list(modality or [])
        if len(modality) != N or set(modality) - set(self.paths):
            raise ValueError("modality must name a path for each of the N positions")
        self.positions = {
            name: torch.tensor([i for i, m in enumerate(modality) if m == name], dtype=torch.long)
            for name in self.paths
        }
        self.vocab_sizes = [self.paths[m].vocab_size for m in modality]
        self.support = support.long()
        self.log_weights = (weights / weights.sum()).double().log()

    def log_posterior(self, x_t: Tensor, t: Tensor) -> Tensor:
        """``log p(x_1 = s_k | x_t)``: Float[B, K], for x_t Long[B, N] and t Float[B]."""
        B, K = x_t.shape[0], self.support.shape[0]
        device = x_t.device
        support, log_weights = self.support.to(device), self.log_weights.to(device)
        log_lik = log_weights.expand(B, K).clone()
        for name, pos in self.positions.items():
            if pos.numel() == 0:
                continue
            pos = pos.to(device)
            s = support[:, pos]  # [K, n]
            idx = x_t[:, pos]  # [B, n]
            if (t == t[0]).all():  # the solver's case: one time for the whole batch
                lp = self.paths[name].log_probs(s, float(t[0])).expand(B, *s.shape, -1)
            else:
                lp = self.paths[name].log_probs(s.expand(B, *s.shape), t)
            lp = lp.gather(-1, idx[:, None, :, None].expand(B, K, -1, 1))[..., 0]
            log_lik += lp.double().sum(-1)
        # A state no data point can reach (e.g. unmasked garbage under the masked path) has
        # zero likelihood everywhere; fall back to the prior weights instead of NaN.
        unreachable = torch.isneginf(log_lik.amax(-1, keepdim=True))
        log_lik = torch.where(unreachable, log_weights.expand(B, K), log_lik)
        return torch.log_softmax(log_lik, dim=-1)

    def __call__(self, x_t: Tensor, t: Tensor) -> Tensor | dict[str, Tensor]:
        """Log posterior marginals: Float[B, N, V] (or one tensor per modality)."""
        post = self.log_posterior(x_t, t).exp()
        B, N = x_t.shape
        support = self.support.to(x_t.device)
        out = {}
        for name, pos in self.positions.items():
            V = self.paths[name].vocab_size
            logits = torch.zeros(B, N, V, dtype=torch.float64, device=x_t.device)
            if pos.numel():
                pos = pos.to(x_t.device)
                onehot = F.one_hot(support[:, pos], V).double()  # [K, n, V]
                logits[:, pos] = torch.einsum("bk,knv->bnv", post, onehot).log()
            out[name] = logits
        return out["tokens"] if self.single else out

    # -- the state space and laws over it -------------------------------------------------------
    def states(self) -> Tensor:
        """Long[S, N]: every sequence, in row-major order of the per-position vocabularies."""
        return torch.tensor(list(itertools.product(*[range(v) for v in self.vocab_sizes])))

    def flat_index(self, x: Tensor) -> Tensor:
        """Row-major index in :meth:`states` of each sequence of x: Long[B, N] -> Long[B]."""
        idx = torch.zeros(x.shape[0], dtype=torch.long)
        for i, v in enumerate(self.vocab_sizes):
            idx = idx * v + x[:, i].long()
        return idx

    def data_law(self) -> Tensor:
        """Float[S]: the data distribution q over :meth:`states`."""
        S = int(torch.tensor(self.vocab_sizes).prod())
        law = torch.zeros(S, dtype=torch.float64)
        return law.index_add_(0, self.flat_index(self.support), self.log_weights.exp())

    def empirical_law(self, samples: Tensor) -> Tensor:
        """Float[S]: frequencies of the rows of ``samples`` (Long[B, N])."""
        S = int(torch.tensor(self.vocab_sizes).prod())
        counts = torch.bincount(self.flat_index(samples), minlength=S).double()
        return counts / samples.shape[0]


def total_variation(p: Tensor, q: Tensor) -> float:
    """``½ Σ |p − q|`` between two distributions over the same states."""
    return 0.5 * float((p - q).abs().sum())


def euler_law(
    posterior: ExactPosterior,
    steps: int | None = None,
    time_grid: Tensor | None = None,
    rate: str = "integrated",
) -> Tensor:
    """Exact law (Float[S] over ``posterior.states()``) of :class:`EulerSolver`'s output when
    driven by ``posterior`` from the paths' source, at temperature 1 without top-k.

    One step maps the law ``π`` to ``π K`` with ``K[x, x'] = Π_i T_i(x'^i | x)`` and
    ``T_i(v | x) = Σ_y p(x_1^i = y | x) · k_i(v | x^i, y)``, where ``k_i`` is the jump kernel
    of the step (stay with prob. ``e^{−Δs λ}``, else move ∝ rates); the final step of a grid
    ending at 1 moves to ``path.final_state(x^i, y)`` (for most paths ``y`` itself).
    Computed on the CPU in float64.
    """
    grid = uniform_grid(steps) if time_grid is None else time_grid
    states = posterior.states()  # [S, N]
    mods = [
        next(m for m, p in posterior.positions.items() if i in p) for i in range(states.shape[1])
    ]
    law = torch.ones(states.shape[0], dtype=torch.float64)
    for i, m in enumerate(mods):
        law = law * posterior.paths[m].prior_probs()[states[:, i]]
    n = grid.numel() - 1
    for k in range(n):
        t, t_next = grid[k], grid[k + 1]
        logits = posterior(states, t.expand(states.shape[0]))
        kernel = torch.ones(states.shape[0], states.shape[0], dtype=torch.float64)
        for i, m in enumerate(mods):
            path = posterior.paths[m]
            marg = torch.softmax(
                (logits if posterior.single else logits[m])[:, i], dim=-1
            )  # [S, V]
            S, V = marg.shape
            here = states[:, i, None].expand(S, V)  # current value, for every target y
            if k == n - 1 and grid[-1] == 1:
                end = path.final_state(here, torch.arange(V).expand(S, V))
                step = torch.zeros_like(marg).scatter_add_(-1, end, marg)
            else:
                rates = path._unit_rates(here, torch.arange(V).expand(S, V), t).double()
                total = rates.sum(-1, keepdim=True)
                p_jump = jump_probability(path, rate, t, t_next, total)
                move = torch.where(total > 0, rates / total.clamp_min(1e-30), 0.0) * p_jump
                move = move + (1 - p_jump) * F.one_hot(here, V)  # stay
                step = torch.einsum("sy,syv->sv", marg, move)
            kernel = kernel * step[:, states[:, i]]
        law = law @ kernel
    return law
