"""Input validation shared by the flow module: every public entry point fails loudly and
names the offending argument, its shape/dtype/range, before any work is done."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def check_ids(name: str, ids: Tensor, vocab_size: int) -> None:
    """Raise unless ``ids`` is an integer tensor with every entry in ``[0, vocab_size)``."""
    if not isinstance(ids, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of token ids, got {type(ids).__name__}")
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor of token ids, got dtype {ids.dtype}")
    if ids.numel() == 0:
        return
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= vocab_size:
        raise ValueError(
            f"{name} holds ids outside the vocabulary [0, {vocab_size}): min {lo}, max {hi}"
        )


def as_time(t: Tensor | float, shape: Sequence[int], device: torch.device | str) -> Tensor:
    """Validate a time argument and shape it to broadcast against ``shape`` (left-aligned).

    ``t`` is a scalar, or a tensor whose shape is a prefix of ``shape`` (``[B]`` or ``[B, N]``
    against ids of shape ``[B, N]``). The result has ``len(shape)`` dims with trailing ones.
    """
    if isinstance(t, Tensor):
        if not t.is_floating_point():
            raise TypeError(f"t must be a floating-point tensor, got dtype {t.dtype}")
        t = t.to(device)
    elif isinstance(t, (float, int)) and not isinstance(t, bool):
        t = torch.tensor(float(t), device=device)
    else:
        raise TypeError(f"t must be a float or a floating-point tensor, got {type(t).__name__}")
    shape = tuple(shape)
    if t.ndim > len(shape) or tuple(t.shape) != shape[: t.ndim]:
        raise ValueError(
            f"t has shape {tuple(t.shape)}; it must be a scalar or match the leading dims of "
            f"the token tensor, shape {shape}"
        )
    if t.numel() and (torch.isnan(t).any() or (t < 0).any() or (t > 1).any()):
        raise ValueError(
            f"t must lie in [0, 1], got values in [{float(t.min())}, {float(t.max())}]"
            + (" including NaN" if torch.isnan(t).any() else "")
        )
    return t.reshape(t.shape + (1,) * (len(shape) - t.ndim))


def check_same_shape(name_a: str, a: Tensor, name_b: str, b: Tensor) -> None:
    if a.shape != b.shape:
        raise ValueError(
            f"{name_a} and {name_b} must have the same shape, got {tuple(a.shape)} "
            f"and {tuple(b.shape)}"
        )
