"""Schedulers ``κ_t`` for the masked path: the probability that a token is revealed by t.

Each gives ``κ_t`` and ``κ̇_t`` with ``κ_0 = 0``, ``κ_1 = 1``, increasing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class PolynomialScheduler:
    """``κ_t = t^n`` (n = 1 is LLaDA's linear schedule)."""

    exponent: float = 1.0

    def __post_init__(self) -> None:
        if not self.exponent > 0:
            raise ValueError(f"exponent must be > 0, got {self.exponent}")

    def kappa(self, t: Tensor) -> Tensor:
        return t**self.exponent

    def kappa_dot(self, t: Tensor) -> Tensor:
        return self.exponent * t ** (self.exponent - 1)


@dataclass(frozen=True)
class CosineScheduler:
    """``κ_t = 1 − cos(π t / 2)``: MaskGIT's cosine masking ratio ``cos(π t / 2)``."""

    def kappa(self, t: Tensor) -> Tensor:
        return 1 - torch.cos(0.5 * math.pi * t)

    def kappa_dot(self, t: Tensor) -> Tensor:
        return 0.5 * math.pi * torch.sin(0.5 * math.pi * t)
