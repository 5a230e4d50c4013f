"""Categorical sampling primitives used by paths and solvers.

Sampling is by a two-level inverse CDF: pick a block of ~√V states from the block sums, then a
state inside the block, both by ``cumsum`` + ``searchsorted`` in float64 with one uniform per
row. Compared with ``torch.multinomial`` it is 10-40x faster on CPU at V = 10^4-10^5
(``bench/solver_speed.py``); compared with one float32 ``cumsum`` over V it never loses rare
states to round-off (at V = 102400 a flat float32 CDF cannot draw ~1e-3 of the mass) and it
writes no [..., V] prefix sums.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def _search(cdf: Tensor, u: Tensor) -> Tensor:
    """First index whose cdf exceeds ``u`` (Float[M, 1], kept below the row total).

    ``right=True`` means a zero-weight index, whose cdf equals its predecessor's, is never hit.
    """
    total = cdf[:, -1:]
    u = torch.minimum(u, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, u, right=True)


def categorical(
    weights: Tensor, generator: torch.Generator | None = None, u: Tensor | None = None
) -> Tensor:
    """Draw one index per row from unnormalised non-negative ``weights``.

    Args:
        weights: Float[..., V], each row with a positive sum.
        generator: source of the one uniform per row.
        u: Float64[M, 1] (M = rows), uniforms on [0, 1) drawn beforehand instead of from
            ``generator`` (e.g. by :func:`uniforms`, so that a compiled step draws nothing).
    Returns:
        Long[...]: ``i`` with probability ``weights[..., i] / weights.sum(-1)``. Indices with
        zero weight are never drawn.
    """
    lead, V = weights.shape[:-1], weights.shape[-1]
    w = weights.reshape(-1, V)
    M = w.shape[0]
    if M == 0:
        return torch.empty(lead, dtype=torch.long, device=weights.device)
    size = max(1, math.isqrt(V))  # block width: both levels then cost O(√V) per row
    full = V // size
    # Block sums in the input dtype (a float64 copy of w would double the memory); only the
    # small [M, V/size] result is promoted.
    sums = w[:, : full * size].reshape(M, full, size).sum(-1)
    if full * size < V:
        sums = torch.cat([sums, w[:, full * size :].sum(-1, keepdim=True)], 1)
    block_cdf = sums.double().cumsum(-1)
    if u is None:
        u = uniforms(M, generator, w.device)
    u = u * block_cdf[:, -1:]
    block = _search(block_cdf, u)  # [M, 1]
    # Position of u inside the chosen block, then the same search over that block's states.
    u = u - torch.where(block > 0, block_cdf.gather(-1, (block - 1).clamp(min=0)), 0.0)
    cols = block * size + torch.arange(size, device=w.device)
    inside = cols < V  # the last block may be shorter
    w_block = torch.where(inside, w.gather(-1, cols.clamp(max=V - 1)), 0).to(torch.float64)
    return (cols.gather(-1, _search(w_block.cumsum(-1), u))).reshape(lead)


def widened(logits: Tensor) -> Tensor:
    """``logits`` in float32 at least: half-precision logits are widened, float64 ones kept.
    A float64 model then samples in float64 end to end: a difference of one float64 rounding
    (another thread count sums in another order) no longer crosses a float32 rounding boundary
    and flips a draw."""
    return logits if logits.dtype == torch.float64 else logits.float()


def uniforms(rows: int, generator: torch.Generator | None, device: torch.device | str) -> Tensor:
    """The Float64[rows, 1] uniforms :func:`categorical` consumes for ``rows`` draws."""
    return torch.rand(rows, 1, generator=generator, device=device, dtype=torch.float64)


def race(weights: Tensor, exponentials: Tensor) -> Tensor:
    """Draw one index per row by an exponential race: ``argmax_i w_i / E_i``, ``E_i ~ Exp(1)``.

    ``E_i / w_i ~ Exp(w_i)`` independently, and the first of independent exponential clocks to
    ring is ``i`` with probability ``w_i / Σ_j w_j`` (the Gumbel-max trick in another form), so
    this is an exact categorical draw. It takes one elementwise pass and one ``argmax`` over
    ``[..., V]`` and no prefix sums: on a GPU a few fused kernels with static shapes, where the
    inverse CDF needs two searches. Zero weights never win.

    Args:
        weights: Float[..., V], non-negative; a row of zeros returns index 0 (callers mask it).
        exponentials: Float[..., V], i.i.d. Exp(1) (``torch.empty(...).exponential_()``).
    Returns:
        Long[...].
    """
    return (weights / exponentials).argmax(-1)


def sample_logits(
    logits: Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Sample token ids from ``logits`` (Float[..., V]) with temperature and top-k.

    ``temperature == 0`` or ``top_k == 1`` is greedy (argmax), with no randomness consumed.
    """
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be a positive integer or None, got {top_k}")
    if temperature == 0 or top_k == 1:
        return logits.argmax(-1)
    logits = widened(logits)
    if temperature != 1:
        logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        vals, idx = logits.topk(top_k, dim=-1)
        choice = categorical(torch.softmax(vals, dim=-1), generator)
        return idx.gather(-1, choice.unsqueeze(-1)).squeeze(-1)
    return categorical(torch.softmax(logits, dim=-1), generator)
