"""Factorised discrete probability paths: the interface the solver and trainer rely on.

Every path in kineflow writes its conditional velocity as a *clock* times unit-clock rates,

    u_t(x, z | x_1) = ṡ_t · r_t(x, z | x_1)  (x ≠ z),    u_t(z, z | x_1) = −Σ_{x≠z} u_t(x, z | x_1),

where ``s_t`` is a monotone clock (``β_t`` for the metric path, ``−log(1 − κ_t)`` for the
masked path) and ``r_t ≥ 0`` are the rates per unit of clock. The split lets a solver replace
the Euler increment ``h·ṡ_t`` by the exact clock increment ``s_{t+h} − s_t``, which stays
finite where ``ṡ_t`` does not (``β̇_0 = ∞`` for ``a < 1``) and is exact for the masked path.

Subclasses implement ``_log_probs``, ``_unit_rates``, ``clock``, ``clock_dot`` and
``prior_probs``; the public methods here validate inputs and broadcast time.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from kineflow.flow._checks import as_time, check_ids, check_same_shape
from kineflow.flow.sampling import categorical


def as_float_tensor(t: Tensor | float) -> Tensor:
    """``t`` as a floating tensor, keeping the dtype/device of a floating tensor input."""
    if isinstance(t, Tensor) and t.is_floating_point():
        return t
    return torch.as_tensor(t, dtype=torch.get_default_dtype())


class DiscretePath(nn.Module):
    """Base class of factorised discrete paths over a vocabulary of ``vocab_size`` states.

    Shapes: token ids are Long[...] (any leading shape, usually [B, N]); distributions and
    rates are Float[..., V]; ``t`` is a float, or a tensor matching the leading dims of the ids.
    """

    vocab_size: int
    #: States a model must never predict as x_1 (e.g. the mask token of a masked path).
    invalid_targets: tuple[int, ...] = ()

    # -- to implement ---------------------------------------------------------------------
    def clock(self, t: Tensor) -> Tensor:
        """The clock ``s_t`` (monotone in t, ``s_0`` finite)."""
        raise NotImplementedError

    def clock_dot(self, t: Tensor) -> Tensor:
        """Its time derivative ``ṡ_t`` (may be +inf at the ends of [0, 1])."""
        raise NotImplementedError

    def prior_probs(self) -> Tensor:
        """Float[V]: the source distribution ``p_0`` (the same for every x_1)."""
        raise NotImplementedError

    def _log_probs(self, x1: Tensor, t: Tensor) -> Tensor:
        """Unchecked ``log p_t(·|x1)``; ``t`` already broadcasts against ``x1``."""
        raise NotImplementedError

    def _unit_rates(self, x_t: Tensor, x1: Tensor, t: Tensor) -> Tensor:
        """Unchecked ``r_t(·, x_t | x1)`` (zero on the entry of ``x_t``)."""
        raise NotImplementedError

    def fixed_shape_unit_rates(self, x_t: Tensor, x1: Tensor, t: Tensor) -> Tensor:
        """``_unit_rates`` computed with no data-dependent shapes and no host reads, for the
        solver's fixed-shape step (:mod:`kineflow.flow.static_step`). The same values; by
        default the same code, which subclasses override where theirs branches on the data."""
        return self._unit_rates(x_t, x1, t)

    def without_invalid_targets(self, logits: Tensor) -> Tensor:
        """``logits`` (Float[..., V]) with −inf at :attr:`invalid_targets`, out of place. The
        mask is filled slice by slice, so no index tensor is copied from the host (a GPU
        step stays free of host transfers)."""
        if not self.invalid_targets:
            return logits
        valid = torch.ones(logits.shape[-1], dtype=torch.bool, device=logits.device)
        for state in self.invalid_targets:
            valid[state] = False
        return torch.where(valid, logits, -torch.inf)

    def final_state(self, x_t: Tensor, x1: Tensor) -> Tensor:
        """Where the chain ends at t = 1 from ``x_t`` given target ``x1`` (the solver's last
        step). ``p_1 = δ_{x1}``, so by default every token lands on ``x1``."""
        return x1

    # -- public, validated API -----------------------------------------------------------
    def _time(self, t: Tensor | float, x1: Tensor) -> Tensor:
        check_ids("x1", x1, self.vocab_size)
        bad = [i for i in self.invalid_targets if (x1 == i).any()]
        if bad:
            raise ValueError(f"x1 contains state(s) {bad}, which cannot be a target of this path")
        return as_time(t, x1.shape, x1.device)

    def log_probs(self, x1: Tensor, t: Tensor | float) -> Tensor:
        """``log p_t(x | x1)`` for every state x: Long[...] -> Float[..., V]."""
        return self._log_probs(x1, self._time(t, x1))

    def probs(self, x1: Tensor, t: Tensor | float) -> Tensor:
        """``p_t(x | x1)`` for every state x: Long[...] -> Float[..., V]."""
        return self.log_probs(x1, t).exp()

    def sample(
        self,
        x1: Tensor,
        t: Tensor | float,
        generator: torch.Generator | None = None,
        u: Tensor | None = None,
    ) -> Tensor:
        """Draw ``x_t ~ p_t(·|x1)`` independently per coordinate: Long[...] -> Long[...].

        ``u``: Float64[x1.numel(), 1], the uniforms of the draws (row-major over ``x1``),
        drawn beforehand (:func:`~kineflow.flow.sampling.uniforms`) instead of from
        ``generator``. With the uniforms a sample's generator would have given, one call over
        many samples' coordinates draws exactly what one call per sample draws.
        """
        if u is not None and tuple(u.shape) != (x1.numel(), 1):
            raise ValueError(
                f"u must be [{x1.numel()}, 1] (one per coordinate), got {list(u.shape)}"
            )
        return categorical(self.probs(x1, t), generator, u=u)

    def unit_rates(self, x_t: Tensor, x1: Tensor, t: Tensor | float) -> Tensor:
        """Rates per unit clock ``r_t(x, x_t | x1) ≥ 0`` to every state x (0 at ``x_t``)."""
        tt = self._time(t, x1)
        check_ids("x_t", x_t, self.vocab_size)
        check_same_shape("x_t", x_t, "x1", x1)
        return self._unit_rates(x_t, x1, tt)

    def velocity(self, x_t: Tensor, x1: Tensor, t: Tensor | float) -> Tensor:
        """Conditional velocity ``u_t(x, x_t | x1)``: Float[..., V], rates to every state x,
        the entry of ``x_t`` holding minus the total outgoing rate (rows sum to zero)."""
        tt = self._time(t, x1)
        check_ids("x_t", x_t, self.vocab_size)
        check_same_shape("x_t", x_t, "x1", x1)
        rates = self._unit_rates(x_t, x1, tt)
        speed = self.clock_dot(tt).to(rates.dtype).unsqueeze(-1).expand_as(rates)
        # ṡ_t may be infinite (t = 0 with a < 1); a zero rate stays zero rather than NaN.
        u = torch.where(rates > 0, rates * speed, torch.zeros_like(rates))
        return u.scatter_(-1, x_t.unsqueeze(-1), -u.sum(-1, keepdim=True))

    def sample_prior(
        self,
        shape: Sequence[int],
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
    ) -> Tensor:
        """Draw ``x_0 ~ p_0`` of the given shape: Long[*shape]."""
        p0 = self.prior_probs().to(device) if device is not None else self.prior_probs()
        return categorical(p0.expand(*shape, p0.shape[-1]), generator)
