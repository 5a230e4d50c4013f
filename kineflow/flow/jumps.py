"""How far the clock moves in one solver step, and the jump probability that follows.

A step from ``t`` to ``t + h`` leaves the current state with probability ``1 − exp(−Δs · λ)``,
``λ`` the total unit-clock rate (:mod:`kineflow.flow.path`), where ``rate`` sets ``Δs``:
``"integrated"`` ``s_{t+h} − s_t``, ``"euler"`` ``h·ṡ_t``, ``"official"`` ``h·ṡ_t`` with
``ṡ_0 := 0`` (the official FUDOKI step; see :mod:`kineflow.flow.solver` for why each exists).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from kineflow.flow.masked_path import MaskedPath
from kineflow.flow.path import DiscretePath

Rate = Literal["integrated", "euler", "official"]
RATES: tuple[str, ...] = ("integrated", "euler", "official")


def check_rate(path: DiscretePath, rate: str, label: str = "path") -> None:
    """Raise ValueError unless ``rate`` is one of :data:`RATES` and applies to ``path``
    (``"official"`` is refused for a :class:`MaskedPath`; see the module docstring)."""
    if rate not in RATES:
        raise ValueError(f"rate must be one of {', '.join(map(repr, RATES))}, got {rate!r}")
    if rate == "official" and isinstance(path, MaskedPath):
        raise ValueError(
            f"rate='official' is the official FUDOKI metric-path step (h·β̇_t with β̇_0 := 0); "
            f"{label} is a MaskedPath, whose official step is the plain Euler one: use "
            f"rate='euler' (h·κ̇_t/(1−κ_t)) or rate='integrated' (exact reveal probabilities)"
        )


def clock_increment(path: DiscretePath, rate: str, t: Tensor, t_next: Tensor) -> Tensor:
    """The clock increment ``Δs`` of one step from ``t`` to ``t_next`` under ``rate``:
    ``s_{t_next} − s_t`` ("integrated"), ``(t_next − t) · ṡ_t`` ("euler"), or the latter with
    ``ṡ_t := 0`` where ``t = 0`` ("official", the FUDOKI solver's patch of ``β̇_0 = ∞``)."""
    check_rate(path, rate)
    if rate == "integrated":
        return path.clock(t_next) - path.clock(t)
    speed = path.clock_dot(t)
    if rate == "official":
        speed = torch.where(torch.as_tensor(t) == 0, torch.zeros_like(speed), speed)
    return (t_next - t) * speed


def jump_probability(
    path: DiscretePath, rate: str, t: Tensor, t_next: Tensor, total: Tensor
) -> Tensor:
    """Probability of leaving the current state during ``[t, t_next]``: ``1 − exp(−Δs · λ)``.

    ``total`` holds the unit-clock rates ``λ`` (Float[...]); ``Δs`` is
    :func:`clock_increment`. Rows with ``λ = 0`` stay put even where ``Δs = +inf`` (Euler at
    t = 0).
    """
    dclock = clock_increment(path, rate, t, t_next)
    p = -torch.expm1(-dclock.to(total.dtype) * total)
    return torch.where(total > 0, p, torch.zeros_like(p))
