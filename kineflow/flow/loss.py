"""The discrete flow matching training loss: cross-entropy against ``x_1`` on a region.

A denoiser trained for the conditional path ``p_t(·|x_1)`` predicts the clean token: its loss
is the cross-entropy of the posterior logits against ``x_1`` on the positions it generates
(docs/design.md §1.8). In FUDOKI's unified model the logits of position ``i`` come from the
hidden state at ``i − 1`` (the shifted logits of docs/design.md §1.5) and from one of two
heads, the image head on image positions and the text head on answer positions; the model
produces them (:meth:`kineflow.models.fudoki.FudokiModel.forward` with ``heads=``) and this
module only scores them, so the loss knows nothing of models or wrappers.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["region_cross_entropy"]


def region_cross_entropy(
    logits: Sequence[Tensor],
    regions: Sequence[Tensor],
    targets: Tensor,
    samples: Tensor | None = None,
    num_samples: int | None = None,
) -> Tensor:
    """Per-sample mean cross-entropy over the union of disjoint regions, one head per region.

    ``regions[k]`` is a bool ``[B, N]`` mask and ``logits[k]`` is ``[M_k, C_k]``: one row per
    marked position of ``regions[k]``, in row-major order (``M_k = regions[k].sum()``), e.g.
    ``logits[k][m] = head_k(h[b, i − 1])`` for the ``m``-th marked ``(b, i)``. ``targets``
    (Long ``[B, N]``) holds the clean tokens ``x_1``. With ``R_b = ∪_k regions[k][b]``:

        ℓ_b = (1 / |R_b|) Σ_{i ∈ R_b} −log softmax(z_{b,i})[x_{1,b}^i]

    where ``z_{b,i}`` is the row of the head whose region holds ``(b, i)`` (a sample with an
    empty region scores 0). Returns ``ℓ`` as Float ``[B]`` (cross-entropy in float32 whatever
    the logits' dtype); the batch loss is its mean, which averages exactly over processes.

    Packed rows (several samples per row, :mod:`kineflow.inputs.packing`): ``samples``
    (Long ``[B, N]``) names the sample of each position and ``num_samples`` their count;
    ``R_b`` then gathers sample ``b``'s positions from whichever row holds them, and the
    result is Float ``[num_samples]``.

    Raises:
        ValueError: ``logits`` and ``regions`` of different lengths, or regions that overlap
            or do not match their logits' row counts.
    """
    if len(logits) != len(regions):
        raise ValueError(f"{len(logits)} logits for {len(regions)} regions")
    region = torch.zeros_like(targets, dtype=torch.bool)
    for r in regions:
        region = region | r
    rows, cols = region.nonzero(as_tuple=True)
    if sum(z.shape[0] for z in logits) != rows.numel():
        raise ValueError(
            f"the regions mark {rows.numel()} distinct positions but the logits have "
            f"{[z.shape[0] for z in logits]} rows: overlapping regions or mis-sized logits"
        )
    picked = targets[rows, cols]
    ce = torch.zeros(rows.numel(), device=targets.device)
    for z, r in zip(logits, regions, strict=True):
        if z.shape[0]:  # a head with no positions has no logits (and was not run)
            own = r[rows, cols]
            ce[own] = F.cross_entropy(z.float(), picked[own], reduction="none")
    if samples is None:
        per_sample = torch.zeros(targets.shape[0], device=ce.device).index_add_(0, rows, ce)
        return per_sample / region.sum(1).clamp(min=1)
    if num_samples is None:
        raise ValueError("samples (packed rows) needs num_samples")
    owner = samples.to(ce.device)[rows, cols]  # regions lie in filled slots (owner >= 0)
    total = torch.zeros(num_samples, device=ce.device).index_add_(0, owner, ce)
    count = torch.zeros(num_samples, device=ce.device).index_add_(0, owner, torch.ones_like(ce))
    return total / count.clamp(min=1)
