"""The masked (absorbing-state) path of MaskGIT / LLaDA-style discrete diffusion.

Per coordinate, with a dedicated mask state ``m`` and a scheduler ``κ_t``:

    p_t(x | x_1) = κ_t · δ_{x_1}(x) + (1 − κ_t) · δ_m(x),      p_0 = δ_m

Velocity: a masked token is revealed as ``x_1`` at rate ``κ̇_t / (1 − κ_t)``; revealed tokens
never move:  ``u_t(x, m | x_1) = κ̇_t/(1−κ_t) · δ_{x_1}(x)`` for ``x ≠ m``, and ``u_t(·, z|x_1) = 0``
for ``z ≠ m``. Clock ``s_t = −log(1 − κ_t)``, so the exact clock increment gives the exact
reveal probability ``1 − e^{−(s_{t+h} − s_t)} = (κ_{t+h} − κ_t)/(1 − κ_t)`` over a step.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kineflow.flow.path import DiscretePath, as_float_tensor
from kineflow.flow.schedulers import CosineScheduler, PolynomialScheduler


class MaskedPath(DiscretePath):
    """Absorbing-state path over ``vocab_size`` states, one of which (``mask_id``) is the mask.

    Args:
        vocab_size: number of states, mask included.
        mask_id: the mask state; it is never a valid target ``x_1``.
        scheduler: ``κ_t``; linear (``PolynomialScheduler(1)``) by default.
    """

    def __init__(
        self,
        vocab_size: int,
        mask_id: int,
        scheduler: PolynomialScheduler | CosineScheduler | None = None,
    ) -> None:
        super().__init__()
        if vocab_size < 2:
            raise ValueError(f"vocab_size must be >= 2 (tokens + mask), got {vocab_size}")
        if not 0 <= mask_id < vocab_size:
            raise ValueError(f"mask_id={mask_id} is outside the vocabulary [0, {vocab_size})")
        self.vocab_size = int(vocab_size)
        self.mask_id = int(mask_id)
        self.invalid_targets = (self.mask_id,)
        self.scheduler = scheduler if scheduler is not None else PolynomialScheduler(1.0)

    def kappa(self, t: Tensor | float) -> Tensor:
        return self.scheduler.kappa(as_float_tensor(t))

    def clock(self, t: Tensor | float) -> Tensor:
        """``s_t = −log(1 − κ_t)``."""
        return -torch.log1p(-self.kappa(t))

    def clock_dot(self, t: Tensor | float) -> Tensor:
        """``ṡ_t = κ̇_t / (1 − κ_t)``."""
        t = as_float_tensor(t)
        return self.scheduler.kappa_dot(t) / (1 - self.scheduler.kappa(t))

    def prior_probs(self) -> Tensor:
        p0 = torch.zeros(self.vocab_size)  # the mask state is a constant: no buffers to follow
        p0[self.mask_id] = 1.0
        return p0

    def final_state(self, x_t: Tensor, x1: Tensor) -> Tensor:
        """Masks are revealed as ``x1``; revealed tokens never move, not even at the end."""
        return torch.where(x_t == self.mask_id, x1, x_t)

    def _log_probs(self, x1: Tensor, t: Tensor) -> Tensor:
        kappa = self.kappa(t).expand(x1.shape)
        out = torch.full(
            (*x1.shape, self.vocab_size), -torch.inf, dtype=kappa.dtype, device=x1.device
        )
        out[..., self.mask_id] = torch.log1p(-kappa)
        # A target equal to the mask (never valid) would be overwritten here; _time rejects it.
        return out.scatter_(-1, x1.unsqueeze(-1), torch.log(kappa).unsqueeze(-1))

    def _unit_rates(self, x_t: Tensor, x1: Tensor, t: Tensor) -> Tensor:
        """``r(x, x_t | x1) = δ_{x1}(x)`` if ``x_t`` is the mask, else 0."""
        rates = torch.zeros(*x1.shape, self.vocab_size, dtype=t.dtype, device=x1.device)
        masked = (x_t == self.mask_id).to(rates.dtype).unsqueeze(-1)
        return rates.scatter_(-1, x1.unsqueeze(-1), masked)

    def extra_repr(self) -> str:
        return f"vocab_size={self.vocab_size}, mask_id={self.mask_id}, scheduler={self.scheduler}"
