"""Training times for the tokens of one picture: one ``t`` per block of its token grid.

A flow model is trained on ``x_t`` drawn at one time ``t ~ U(low, high)`` per sample, so every
token of a picture is equally noisy. :func:`block_times` draws one time per ``b × b`` block of
a square ``s × s`` token grid instead (row-major, the last blocks of a row or column smaller
when ``b`` does not divide ``s``):

    t_ij = τ[i // b, j // b],   τ ~ U(low, high)^(k × k),   k = ⌈s / b⌉

so that one part of a picture is clean while another is noisy, and what one object is can be
read off another (docs/generation.md, finding 5).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def block_times(
    n: int, block: int, low: float, high: float, generator: torch.Generator | None = None
) -> Tensor:
    """Float[n]: the times of the ``n`` tokens (a square grid, row-major) of one picture, one
    ``U(low, high)`` draw per ``block × block`` block (``k × k`` uniforms from ``generator``).

    Raises:
        ValueError: ``n`` is not a square or ``block`` < 1.
    """
    side = math.isqrt(n)
    if side * side != n:
        raise ValueError(f"block times need a square token grid, got {n} tokens")
    if block < 1:
        raise ValueError(f"block must be >= 1, got {block}")
    k = -(-side // block)
    blocks = low + (high - low) * torch.rand(k, k, generator=generator)
    rows = torch.arange(side) // block
    return blocks[rows[:, None], rows[None, :]].flatten()
