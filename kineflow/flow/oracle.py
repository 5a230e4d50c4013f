"""Exact denoisers and exact solver laws for small problems: ground truth for the solver.

For a finite data distribution ``q = Σ_k w_k δ_{s_k}`` over sequences (not factorised across
positions), the posterior of a factorised path is available in closed form by Bayes' rule:

    p(x_1 = s_k | x_t) ∝ w_k · Π_i p_t(x_t^i | s_k^i)
    p(x_1^i = v | x_t) = Σ_{k: s_k^i = v} p(x_1 = s_k | x_t)

:class:`ExactPosterior` is a drop-in ``model_fn`` returning the log of those marginals. With it,
the sampler's only error is time discretisation, and :func:`euler_law` computes the *exact*
distribution of the Euler solver's output by propagating the law of the chain over the whole
state space (``Π_i V_i`` sequences), without Monte Carlo noise.

:func:`euler_law` is an *independent* oracle: it shares no code with
:mod:`kineflow.flow.solver` nor with the paths' rate and clock methods. It rebuilds every
ingredient of a step from the path's definition alone (``softmax(−β_t d)`` with
``β_t = c (t/(1−t))^a``, or the mask mixture with ``κ_t``), in float64:

- the unit-clock rates from the kinetic-optimal velocity of a path (Shaul et al., 2024),
  ``r(x, z | y) = [∂_s p_s(x|y) − p_s(x|y) · ∂_s log p_s(z|y)]_+``, with the derivative in
  the clock ``s`` taken by forward-mode autodiff of the path's probabilities, not by hand;
- the clock increment ``s_{t+h} − s_t`` (or ``h · ṡ_t``, again by autodiff);
- the step's transition matrix: stay with probability ``exp(−Δs · λ)``, ``λ = Σ_x r``,
  otherwise jump to ``x`` with probability ``∝ r(x, z | y)``.

So a wrong jump probability, rate or clock in the solver makes its samples disagree with
:func:`euler_law`, instead of being copied into the reference.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from kineflow.flow.masked_path import MaskedPath
from kineflow.flow.metric_path import MetricPath
from kineflow.flow.path import DiscretePath
from kineflow.flow.schedulers import CosineScheduler, PolynomialScheduler


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


class PathFormulas:
    """One path's step ingredients, rebuilt in float64 from its definition (see module doc).

    Supports :class:`MetricPath` (any metric) and :class:`MaskedPath` with a polynomial or
    cosine scheduler; anything else raises TypeError, since its formulas are unknown here.
    """

    def __init__(self, path: DiscretePath) -> None:
        V = self.vocab_size = path.vocab_size
        states = torch.arange(V)
        if isinstance(path, MetricPath):
            # d[y, x] = d(x, y), with d(y, y) = 0 by definition of a metric.
            d = path.metric(states).detach().double().cpu().fill_diagonal_(0.0)
            a, c = path.a, path.c
            self._clock: Callable[[Tensor], Tensor] = lambda t: c * (t / (1 - t)) ** a
            self._probs: Callable[[Tensor], Tensor] = lambda s: torch.softmax(-s * d, -1)
            self._log_probs: Callable[[Tensor], Tensor] = lambda s: torch.log_softmax(-s * d, -1)
            self.prior = torch.full((V,), 1.0 / V, dtype=torch.float64)
            self._final = lambda z, y: y  # p_1 = δ_y: every token lands on its target
        elif isinstance(path, MaskedPath):
            m = path.mask_id
            kappa = _kappa(path.scheduler)
            self._clock = lambda t: -torch.log(1 - kappa(t))
            keep = torch.eye(V, dtype=torch.float64)
            mask = F.one_hot(states.new_tensor(m), V).double()
            # p_s(·|y) = κ δ_y + (1 − κ) δ_m with κ = 1 − e^{−s}; log 0 = −inf off the support.
            self._probs = lambda s: (1 - torch.exp(-s)) * keep + torch.exp(-s) * mask
            self._log_probs = lambda s: torch.log(self._probs(s))
            self.prior = mask
            # Revealed tokens never move, not even at the end; masks become the target.
            self._final = lambda z, y: torch.where(z == m, y, z)
        else:
            raise TypeError(f"no exact formulas for path type {type(path).__name__}")

    def clock_increment(self, t: float, t_next: float, rate: str) -> Tensor:
        """``s_{t_next} − s_t`` (``"integrated"``), ``(t_next − t) · ṡ_t`` (``"euler"``), or
        the same with ``ṡ_0 := 0`` (``"official"``, the official FUDOKI step; metric path only,
        as the solver)."""
        tt, tn = torch.tensor(t, dtype=torch.float64), torch.tensor(t_next, dtype=torch.float64)
        if rate == "integrated":
            return self._clock(tn) - self._clock(tt)
        if rate == "official" and t == 0:
            return torch.zeros((), dtype=torch.float64)
        if rate in ("euler", "official"):
            _, speed = torch.func.jvp(self._clock, (tt,), (torch.ones_like(tt),))
            return (tn - tt) * speed
        raise ValueError(f"rate must be 'integrated', 'euler' or 'official', got {rate!r}")

    def unit_rates(self, t: float) -> Tensor:
        """Float[V(y), V(z), V(x)]: kinetic-optimal rates per unit clock from z to x ≠ z."""
        s = self._clock(torch.tensor(t, dtype=torch.float64))
        one = torch.ones_like(s)
        log_p, dlog_p = torch.func.jvp(self._log_probs, (s,), (one,))
        p, dp = torch.func.jvp(self._probs, (s,), (one,))
        # ∂ log p is only defined (and only needed) where p_s(z|y) > 0. Judged in log space:
        # late in the metric path p_s(z|y) underflows to 0 for far z, yet the chain can be there.
        reachable = torch.isfinite(log_p)
        dlog_p = torch.where(reachable, dlog_p, torch.zeros_like(dlog_p))
        rates = (dp[:, None, :] - p[:, None, :] * dlog_p[:, :, None]).clamp(min=0.0)
        rates = torch.where(reachable[:, :, None], rates, torch.zeros_like(rates))
        # No rate to the state itself (the formula gives 0 up to round-off).
        return rates * (1 - torch.eye(self.vocab_size, dtype=torch.float64))

    def step_kernel(self, t: float, t_next: float, rate: str) -> Tensor:
        """Float[V(y), V(z), V(x)]: probability to be at x after one Euler step from z, target y.

        Stay with ``exp(−Δs λ)``, else jump ∝ the rates. Where ``Δs = +inf`` (Euler rate at
        t = 0 with ``a < 1``) every state with ``λ > 0`` jumps and states with ``λ = 0`` stay.
        """
        rates = self.unit_rates(t)
        total = rates.sum(-1, keepdim=True)
        dclock = self.clock_increment(t, t_next, rate)
        stay = torch.where(total > 0, torch.exp(-dclock * total), torch.ones_like(total))
        direction = rates / torch.where(total > 0, total, torch.ones_like(total))
        return stay * torch.eye(self.vocab_size, dtype=torch.float64) + (1 - stay) * direction

    def final_kernel(self) -> Tensor:
        """Float[V(y), V(z), V(x)]: the last step of a grid ending at t = 1 (deterministic)."""
        V = self.vocab_size
        y, z = torch.meshgrid(torch.arange(V), torch.arange(V), indexing="ij")
        return F.one_hot(self._final(z, y), V).double()


def _kappa(scheduler: object) -> Callable[[Tensor], Tensor]:
    """``κ_t`` of the schedulers kineflow ships, written out here (not their methods)."""
    if isinstance(scheduler, PolynomialScheduler):
        n = scheduler.exponent
        return lambda t: t**n
    if isinstance(scheduler, CosineScheduler):
        return lambda t: 1 - torch.cos(0.5 * math.pi * t)
    raise TypeError(f"no exact formula for scheduler {type(scheduler).__name__}")


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
    of the step (:meth:`PathFormulas.step_kernel`); the final step of a grid ending at 1 moves
    to where the path ends (``y``; for the masked path only still-masked tokens move).
    Computed on the CPU in float64, from :class:`PathFormulas` only (no solver code).
    """
    if rate not in ("integrated", "euler", "official"):
        raise ValueError(f"rate must be 'integrated', 'euler' or 'official', got {rate!r}")
    if time_grid is None:
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
            raise ValueError(f"steps must be a positive integer, got {steps!r}")
        grid = [k / steps for k in range(steps + 1)]
    else:
        grid = [float(t) for t in time_grid]
    states = posterior.states()  # [S, N]
    mods = [
        next(m for m, p in posterior.positions.items() if i in p) for i in range(states.shape[1])
    ]
    formulas = {m: PathFormulas(path) for m, path in posterior.paths.items()}
    law = torch.ones(states.shape[0], dtype=torch.float64)
    for i, m in enumerate(mods):
        law = law * formulas[m].prior[states[:, i]]
    n = len(grid) - 1
    for k in range(n):
        t, t_next = grid[k], grid[k + 1]
        # The solver hands the model its own (default-dtype) times; so does the oracle.
        logits = posterior(states, torch.full((states.shape[0],), t))
        final = k == n - 1 and t_next == 1.0
        kernels = {
            m: f.final_kernel() if final else f.step_kernel(t, t_next, rate)
            for m, f in formulas.items()
        }
        kernel = torch.ones(states.shape[0], states.shape[0], dtype=torch.float64)
        for i, m in enumerate(mods):
            marg = torch.softmax((logits if posterior.single else logits[m])[:, i], dim=-1)
            # T_i(v | x) = Σ_y marg[x, y] · k(v | x^i, y): Float[S, V]
            step = torch.einsum("sy,ysv->sv", marg, kernels[m][:, states[:, i]])
            kernel = kernel * step[:, states[:, i]]
        law = law @ kernel
    return law
