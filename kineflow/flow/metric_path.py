"""The metric-induced probability path of FUDOKI and its kinetic-optimal velocity.

Path (per coordinate, target ``x_1``):

    p_t(x | x_1) = softmax_x(−β_t · d(x, x_1)),     β_t = c · (t / (1 − t))^a

``β_0 = 0`` gives the uniform source (no mask token); ``β_t → ∞`` as ``t → 1`` gives ``δ_{x_1}``.

Kinetic-optimal velocity (Shaul et al., 2024), for ``x ≠ z``:

    u_t(x, z | x_1) = β̇_t · p_t(x | x_1) · [d(z, x_1) − d(x, x_1)]_+

i.e. a token at ``z`` only jumps to states strictly closer to ``x_1``, at a rate proportional
to their path probability. With ``E_t = Σ_x p_t(x|x_1) d(x, x_1)`` it satisfies the Kolmogorov
forward equation: ``∂_t p_t(x) = −β̇_t p_t(x) (d(x, x_1) − E_t) = Σ_z p_t(z) u_t(x, z | x_1)``.
The clock of this path is ``β_t`` itself (see :mod:`kineflow.flow.path`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from kineflow.flow.metric import EmbeddingMetric, make_metric
from kineflow.flow.path import DiscretePath, as_float_tensor


class MetricPath(DiscretePath):
    """Metric-induced path ``p_t(x|x_1) = softmax(−β_t d(x, x_1))`` with kinetic-optimal rates.

    Args:
        metric: a callable ``Long[...] -> Float[..., V]`` giving ``d(·, y)`` (e.g.
            :class:`EmbeddingMetric`), or a metric name (``fudoki``, ``euclidean``,
            ``squared_euclidean``, ``hamming``) built from ``embeddings``/``vocab_size``.
        a, c: schedule ``β_t = c (t/(1−t))^a``; FUDOKI uses a = 0.9, c = 3.
        vocab_size: needed when ``metric`` has no ``vocab_size`` attribute.
        embeddings: Float[V, D], for metrics given by name.
    """

    def __init__(
        self,
        metric: Callable[[Tensor], Tensor] | str,
        a: float = 0.9,
        c: float = 3.0,
        *,
        vocab_size: int | None = None,
        embeddings: Tensor | None = None,
    ) -> None:
        super().__init__()
        if isinstance(metric, str):
            metric = make_metric(metric, embeddings=embeddings, vocab_size=vocab_size)
        elif embeddings is not None:
            raise ValueError("pass embeddings only together with a metric name")
        if not callable(metric):
            raise TypeError(f"metric must be callable or a name, got {type(metric).__name__}")
        V = vocab_size if vocab_size is not None else getattr(metric, "vocab_size", None)
        if V is None:
            raise ValueError("vocab_size is required for a metric without a vocab_size attribute")
        if getattr(metric, "vocab_size", V) != V:
            raise ValueError(f"vocab_size={V} disagrees with metric.vocab_size={metric.vocab_size}")
        if not (a > 0 and c > 0):
            raise ValueError(f"schedule parameters must be positive, got a={a}, c={c}")
        self.metric = metric
        self.vocab_size = int(V)
        self.a, self.c = float(a), float(c)

    @classmethod
    def from_embeddings(
        cls, embeddings: Tensor, exponent: float = 4.0, a: float = 0.9, c: float = 3.0
    ) -> MetricPath:
        """FUDOKI's path over an embedding table Float[V, D]."""
        return cls(EmbeddingMetric(embeddings, exponent), a=a, c=c)

    # -- schedule ---------------------------------------------------------------------------
    def beta(self, t: Tensor | float) -> Tensor:
        """``β_t = c · (t / (1 − t))^a``; 0 at t = 0, +inf at t = 1."""
        t = as_float_tensor(t)
        return self.c * (t / (1 - t)) ** self.a

    def beta_dot(self, t: Tensor | float) -> Tensor:
        """``β̇_t = c · a · t^(a−1) · (1 − t)^(−a−1)`` (= c·a·(t/(1−t))^(a−1)/(1−t)²);
        +inf at t = 0 when a < 1 and at t = 1."""
        t = as_float_tensor(t)
        return self.c * self.a * t ** (self.a - 1) * (1 - t) ** (-self.a - 1)

    clock = beta
    clock_dot = beta_dot

    # -- distributions and rates --------------------------------------------------------------
    def prior_probs(self) -> Tensor:
        return torch.full((self.vocab_size,), 1.0 / self.vocab_size, device=self._device())

    def _device(self) -> torch.device:
        buf = next(self.buffers(), None)
        return buf.device if buf is not None else torch.device("cpu")

    def distances(self, x1: Tensor) -> Tensor:
        """``d(·, x1)``: Long[...] -> Float[..., V], with ``d(x1, x1) = 0`` exactly."""
        d = self.metric(x1)
        if d.shape != (*x1.shape, self.vocab_size):
            raise ValueError(
                f"metric returned shape {tuple(d.shape)}, expected {(*x1.shape, self.vocab_size)}"
            )
        if getattr(self.metric, "exact_zero_diagonal", False):
            return d
        # Out of place: a user metric may hand back a cached or shared tensor.
        return d.scatter(-1, x1.unsqueeze(-1), 0.0)

    def _logits(self, d: Tensor, t: Tensor) -> Tensor:
        beta = self.beta(t).to(d.dtype).unsqueeze(-1)
        scaled = d * -beta
        if not torch.isfinite(beta).all():  # t = 1: β = inf and 0·inf would be NaN at x1
            scaled = torch.where(d > 0, scaled, torch.zeros_like(scaled))
        return scaled

    def _log_probs(self, x1: Tensor, t: Tensor) -> Tensor:
        return torch.log_softmax(self._logits(self.distances(x1), t), dim=-1)

    def _unit_rates(self, x_t: Tensor, x1: Tensor, t: Tensor) -> Tensor:
        """``r_t(x, x_t | x1) = p_t(x | x1) · [d(x_t, x1) − d(x, x1)]_+``."""
        targets, inverse = x1, None
        if t.numel() == 1:
            # With one time for all rows, p_t(·|x1) and d(·, x1) depend on the target only:
            # compute them once per distinct target. Predicted targets repeat a lot
            # (backgrounds, padding, confident text).
            unique, where = torch.unique(x1, return_inverse=True)
            if unique.numel() < x1.numel():
                targets, inverse, t = unique, where, t.reshape(())
        d = self.distances(targets)
        p = torch.log_softmax(self._logits(d, t), dim=-1).exp_()
        if inverse is not None:
            d, p = d[inverse], p[inverse]
        return self._downhill(d, x_t).mul_(p)

    def fixed_shape_unit_rates(self, x_t: Tensor, x1: Tensor, t: Tensor) -> Tensor:
        """:meth:`_unit_rates` for every row (no ``torch.unique`` of the targets, whose size
        depends on the data) and with the ``β_t = ∞`` guard applied unconditionally (no host
        read of ``isfinite``). Equal values: where ``d = 0`` the guard writes 0 and the product
        is ``−0`` or NaN; where ``d > 0`` both keep ``−β_t d``."""
        d = self.distances(x1)
        beta = self.beta(t).to(d.dtype).unsqueeze(-1)
        logits = torch.where(d > 0, d * -beta, torch.zeros_like(d))
        p = torch.log_softmax(logits, dim=-1).exp_()
        return self._downhill(d, x_t).mul_(p)

    @staticmethod
    def _downhill(d: Tensor, x_t: Tensor) -> Tensor:
        """``[d(x_t, x1) − d(x, x1)]_+`` for every x: Float[..., V]."""
        return (d.gather(-1, x_t.unsqueeze(-1)) - d).clamp_(min=0.0)

    def extra_repr(self) -> str:
        return f"vocab_size={self.vocab_size}, a={self.a}, c={self.c}"
