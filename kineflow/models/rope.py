"""Rotary position embedding (RoPE), rotate-half convention.

With ``inv_freq_k = theta^(−2k / head_dim)`` (``k < head_dim / 2``) and the angles
``p · inv_freq`` of a position ``p`` duplicated to ``head_dim``,

    RoPE(x) = x · cos + rotate_half(x) · sin,     rotate_half([x1, x2]) = [−x2, x1],

so the score of a query at ``p`` and a key at ``p'`` depends on ``p − p'`` only.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["rope_cos_sin", "rotate_half"]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """``[x1, x2] -> [-x2, x1]`` on the last dimension."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def rope_cos_sin(
    position_ids: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos``, ``sin`` ``[B, N, head_dim]`` for integer positions ``[B, N]``.

    Angles are computed in float32 (bf16 positions lose precision past 256). On a CPU NumPy
    takes their cosines and sines, in float64 on the calling thread, rounded once to ``dtype``:
    torch's CPU ``cos`` may hand part of a tensor to another thread whose vector routine is far
    less accurate (torch 2.13 with two threads: off by up to 1.5e-4 in float32 and 7e-9 in
    float64, in some processes and not others), which made even a float64 model's outputs,
    and so its samples, depend on the thread count and differ from run to run. Elsewhere torch
    takes them in float32 (float64 for a float64 model).
    """
    inv_freq = theta ** (
        -torch.arange(0, head_dim, 2, device=position_ids.device, dtype=torch.float32) / head_dim
    )
    angles = position_ids.float()[..., None] * inv_freq  # [B, N, head_dim / 2]
    emb = torch.cat([angles, angles], dim=-1)
    if emb.device.type == "cpu":
        wide = emb.numpy().astype(np.float64)
        return torch.from_numpy(np.cos(wide)).to(dtype), torch.from_numpy(np.sin(wide)).to(dtype)
    wide = emb.double() if dtype == torch.float64 else emb
    return wide.cos().to(dtype), wide.sin().to(dtype)
