"""Distances between tokens, the ingredient of metric-induced probability paths.

A *metric* here is any callable ``metric(y: Long[...]) -> Float[..., V]`` returning the
distance ``d(x, y)`` from every state ``x`` of the vocabulary to each ``y``. Working with one
row ``d(·, y)`` per query keeps memory at ``[..., V]``; no ``[V, V]`` matrix is ever built.
Objects may expose ``vocab_size``; plain functions need it passed to the path.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@runtime_checkable
class Metric(Protocol):
    """``d(·, y)`` for a batch of states y: Long[...] -> Float[..., V]; d ≥ 0, d(y, y) = 0."""

    def __call__(self, y: Tensor) -> Tensor: ...


class EmbeddingMetric(nn.Module):
    """Distance between L2-normalised token embeddings raised to a power.

        d(x, y) = ‖ê_x − ê_y‖₂^p,   ê = e / ‖e‖₂,   ‖ê_x − ê_y‖₂² = 2 − 2·⟨ê_x, ê_y⟩

    ``p = 4`` (default) is what the released FUDOKI model was trained with: the official code
    squares the squared distance, ``(2 − 2 cos)²``, with range [0, 16]. ``p = 1`` is the plain
    Euclidean distance named in the paper's text.

    One call costs a ``[..., D] x [D, V]`` matmul and allocates ``[..., V]``.

    Args:
        embeddings: Float[V, D] embedding table (e.g. the LM input embeddings for text, the VQ
            codebook for images). Copied, detached and normalised once.
        exponent: the power ``p > 0``.
        dtype: precision of the normalised table and the distances. float32 by default: cosines
            near 1 lose all precision in bf16 and the distances to near neighbours matter most.
    """

    #: Rows come back with d(y, y) = 0 exactly, so paths need not copy them to enforce it.
    exact_zero_diagonal = True

    def __init__(
        self, embeddings: Tensor, exponent: float = 4.0, dtype: torch.dtype = torch.float32
    ) -> None:
        super().__init__()
        if not isinstance(embeddings, Tensor) or embeddings.ndim != 2:
            shape = tuple(embeddings.shape) if isinstance(embeddings, Tensor) else None
            raise ValueError(f"embeddings must be a [V, D] tensor, got shape {shape}")
        if not embeddings.is_floating_point():
            raise TypeError(f"embeddings must be floating point, got {embeddings.dtype}")
        if embeddings.shape[0] < 2:
            raise ValueError(f"embeddings need at least 2 rows (states), got {embeddings.shape[0]}")
        if not torch.isfinite(embeddings).all():
            raise ValueError("embeddings contain NaN or inf")
        norms = embeddings.detach().float().norm(dim=-1)
        if (norms == 0).any():
            rows = torch.nonzero(norms == 0).flatten()[:5].tolist()
            raise ValueError(f"embeddings have all-zero rows (cannot be normalised): {rows}")
        if not exponent > 0:
            raise ValueError(f"exponent must be > 0, got {exponent}")
        self.exponent = float(exponent)
        unit = F.normalize(embeddings.detach().to(dtype), dim=-1)
        self.register_buffer("unit", unit, persistent=False)

    @property
    def vocab_size(self) -> int:
        return self.unit.shape[0]

    def forward(self, y: Tensor) -> Tensor:
        """Long[...] -> Float[..., V]: ``d(x, y)`` for every state ``x``."""
        cos = F.embedding(y, self.unit) @ self.unit.T
        sq = cos.mul_(-2.0).add_(2.0).clamp_(min=0.0)  # ‖ê_x − ê_y‖², clamped against round-off
        d = sq.square_() if self.exponent == 4.0 else sq.pow_(self.exponent / 2.0)
        # Round-off leaves d(y, y) ~ 1e-7 instead of 0; the path's limit at t -> 1 needs exact 0.
        return d.scatter_(-1, y.unsqueeze(-1), 0.0)

    def extra_repr(self) -> str:
        return f"vocab_size={self.vocab_size}, dim={self.unit.shape[1]}, exponent={self.exponent}"


class HammingMetric(nn.Module):
    """``d(x, y) = 1[x ≠ y]``. With it the metric path becomes the uniform-noise mixture path
    ``p_t = (1 − w_t)·Uniform + w_t·δ_{x_1}`` (no notion of token similarity)."""

    exact_zero_diagonal = True

    def __init__(self, vocab_size: int, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        if vocab_size < 2:
            raise ValueError(f"vocab_size must be >= 2, got {vocab_size}")
        self.vocab_size = int(vocab_size)
        self.dtype = dtype

    def forward(self, y: Tensor) -> Tensor:
        d = torch.ones(*y.shape, self.vocab_size, dtype=self.dtype, device=y.device)
        return d.scatter_(-1, y.unsqueeze(-1), 0.0)


_EMBEDDING_METRICS = {"fudoki": 4.0, "euclidean": 1.0, "squared_euclidean": 2.0}
METRIC_NAMES = (*_EMBEDDING_METRICS, "hamming")


def make_metric(
    name: str, embeddings: Tensor | None = None, vocab_size: int | None = None
) -> nn.Module:
    """Build a metric by name: ``fudoki`` (‖ê_x−ê_y‖⁴), ``euclidean`` (‖ê_x−ê_y‖),
    ``squared_euclidean`` (‖ê_x−ê_y‖²) need ``embeddings``; ``hamming`` needs ``vocab_size``."""
    if name in _EMBEDDING_METRICS:
        if embeddings is None:
            raise ValueError(f"metric {name!r} needs an embeddings table [V, D]")
        return EmbeddingMetric(embeddings, exponent=_EMBEDDING_METRICS[name])
    if name == "hamming":
        if vocab_size is None:
            if embeddings is None:
                raise ValueError("metric 'hamming' needs vocab_size")
            vocab_size = embeddings.shape[0]
        return HammingMetric(vocab_size)
    raise ValueError(f"unknown metric {name!r}; choose one of {', '.join(METRIC_NAMES)}")
