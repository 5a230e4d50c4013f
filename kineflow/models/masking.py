"""Who attends to whom in the decoder: attention masks, position ids and the KV cache.

Rows are padded sequences: ``mask [B, N]`` marks the real tokens, and padding may sit on
either side. :func:`build_attention_mask` turns it into a boolean ``[B, 1, N, N_k]`` mask in
one of three modes, ``"causal"`` (autoregressive), ``"full"`` (bidirectional, FUDOKI) or
``"prefix"`` (PaliGemma / UniFluid prefix-LM), optionally restricted to a sliding window.
Position ids (:func:`default_position_ids`) are the running count of real tokens, so a
left-padded row gets the same positions as the same row unpadded. When nothing is padded the
mask is often plain causal or none at all (:func:`plain_attention`): then no mask tensor is
built and attention can use SDPA's fused kernels (``is_causal``, or no mask).
:class:`KVCache` keeps the keys and values of earlier tokens so that causal decoding costs one
step per new token.
"""

from __future__ import annotations

import torch

__all__ = [
    "MASK_MODES",
    "KVCache",
    "build_attention_mask",
    "default_position_ids",
    "plain_attention",
]

MASK_MODES = ("causal", "full", "prefix")


class KVCache:
    """Keys and values of earlier tokens for incremental decoding.

    ``keys[i]`` / ``values[i]`` are layer ``i``'s ``[B, H_kv, N_past, head_dim]`` tensors (after
    RoPE, before the grouped-query expansion); ``key_mask`` ``[B, N_past]`` marks which cached
    tokens are real. :class:`LlamaModel` appends to it on every forward it is passed to.
    """

    def __init__(self) -> None:
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.key_mask: torch.Tensor | None = None

    @property
    def seq_length(self) -> int:
        """Number of cached positions (padding included)."""
        return 0 if self.key_mask is None else self.key_mask.shape[1]

    def num_real(self) -> torch.Tensor | None:
        """Real (non-padding) tokens cached per row, ``[B]`` long, or None when empty."""
        return None if self.key_mask is None else self.key_mask.sum(1)

    def append_mask(self, new_mask: torch.Tensor) -> torch.Tensor:
        """Append ``[B, N_new]`` real-token flags; returns the full ``[B, N_past + N_new]``."""
        if self.key_mask is not None:
            new_mask = torch.cat([self.key_mask, new_mask], dim=1)
        self.key_mask = new_mask
        return new_mask

    def update(
        self, layer: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append layer ``layer``'s new keys / values and return the cached + new ones."""
        if layer == len(self.keys):
            self.keys.append(k)
            self.values.append(v)
        elif layer < len(self.keys):
            self.keys[layer] = torch.cat([self.keys[layer], k], dim=2)
            self.values[layer] = torch.cat([self.values[layer], v], dim=2)
        else:
            raise ValueError(
                f"KVCache layers must be filled in order; got layer {layer} "
                f"with {len(self.keys)} cached"
            )
        return self.keys[layer], self.values[layer]

    def reorder(self, index: torch.Tensor) -> None:
        """Keep rows ``index [B']`` of the batch (with repeats): beam search's reshuffle."""
        self.keys = [k.index_select(0, index) for k in self.keys]
        self.values = [v.index_select(0, index) for v in self.values]
        if self.key_mask is not None:
            self.key_mask = self.key_mask.index_select(0, index)


def build_attention_mask(
    key_mask: torch.Tensor,
    num_queries: int | None = None,
    mode: str = "causal",
    prefix_lengths: torch.Tensor | None = None,
    window: int | None = None,
    segment_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Boolean attention mask ``[B, 1, N, N_k]`` (True = may attend).

    ``key_mask [B, N_k]`` marks real keys; the ``N = num_queries`` queries (default ``N_k``) are
    the last ``N`` key positions (the tokens just appended after a KV cache). With query ``i``
    at key position ``q_i = N_k - N + i`` and ``r_j`` the number of real keys before ``j``:

    - ``"full"``: every real key (bidirectional among real tokens, FUDOKI);
    - ``"causal"``: real keys ``j <= q_i``;
    - ``"prefix"``: real keys ``j <= q_i`` plus every real key among the first
      ``prefix_lengths[b]`` real tokens (``r_j < prefix_lengths[b]``), i.e. bidirectional
      within the prefix and causal afterwards (PaliGemma / UniFluid prefix-LM).

    ``window`` (sliding-window layers) also drops keys ``window`` or more real tokens away
    from the query (``|r_q − r_j| >= window``; in causal rows only earlier keys remain).

    ``segment_ids [B, N_k]`` (packed rows, :mod:`kineflow.inputs.packing`) also drops every
    key of another segment than the query's: several sequences share a row without seeing
    each other (not with ``"prefix"``, whose lengths count from the row's start).

    Padding keys are never attended. A query row left with no key at all (a padding query
    before the first real token) attends to its own position instead, so softmax stays finite;
    its output is meaningless and should be ignored.
    """
    if key_mask.ndim != 2:
        raise ValueError(f"key_mask must be [B, N_k], got shape {tuple(key_mask.shape)}")
    if mode not in MASK_MODES:
        raise ValueError(f"mask must be one of {MASK_MODES}, got {mode!r}")
    key_mask = key_mask.bool()
    B, N_k = key_mask.shape
    N = N_k if num_queries is None else num_queries
    if not 0 < N <= N_k:
        raise ValueError(f"num_queries must be in [1, N_k={N_k}], got {N}")
    device = key_mask.device
    q_pos = torch.arange(N_k - N, N_k, device=device)[:, None]  # [N, 1]
    k_pos = torch.arange(N_k, device=device)[None, :]  # [1, N_k]
    if mode == "full":
        allowed = key_mask[:, None, :].expand(B, N, N_k)
    else:
        allowed = (k_pos <= q_pos)[None] & key_mask[:, None, :]
        if mode == "prefix":
            if prefix_lengths is None:
                raise ValueError("mask='prefix' needs prefix_lengths ([B] real-token counts)")
            prefix_lengths = torch.as_tensor(prefix_lengths, device=device).long().reshape(-1)
            if prefix_lengths.shape[0] != B:
                raise ValueError(
                    f"prefix_lengths must have one entry per row (B={B}), got "
                    f"{prefix_lengths.shape[0]}"
                )
            if bool((prefix_lengths < 0).any()):
                raise ValueError(f"prefix_lengths must be >= 0, got {prefix_lengths.tolist()}")
            rank = torch.cumsum(key_mask.long(), dim=1) - 1  # [B, N_k] rank among real tokens
            in_prefix = key_mask & (rank < prefix_lengths[:, None])
            allowed = allowed | in_prefix[:, None, :]
    if segment_ids is not None:
        if mode == "prefix":
            raise ValueError("segment_ids (packed rows) cannot be combined with mask='prefix'")
        if tuple(segment_ids.shape) != (B, N_k):
            raise ValueError(
                f"segment_ids must be [B, N_k] = {(B, N_k)}, got {tuple(segment_ids.shape)}"
            )
        segment_ids = segment_ids.to(device)
        allowed = allowed & (segment_ids[:, N_k - N :, None] == segment_ids[:, None, :])
    if window is not None:
        rank = torch.cumsum(key_mask.long(), dim=1) - 1  # [B, N_k]
        gap = rank[:, N_k - N :, None] - rank[:, None, :]  # [B, N, N_k] query minus key rank
        allowed = allowed & (gap.abs() < window)
    # Rows with nothing to attend to would softmax to NaN; let them see their own position.
    empty = ~allowed.any(dim=-1, keepdim=True)  # [B, N, 1]
    allowed = allowed | (empty & (k_pos == q_pos)[None])
    return allowed[:, None]


def plain_attention(
    key_mask: torch.Tensor,
    num_queries: int | None = None,
    mode: str = "causal",
    window: int | None = None,
) -> str | None:
    """``"causal"`` or ``"full"`` when :func:`build_attention_mask` would give the plain
    causal mask (query ``i`` attends to keys ``0..i``, ``N = N_k``) or attend-to-everything,
    None otherwise (some padding, a prefix mode, a window, or causal queries after a cache).

    Every key must be real (``key_mask`` all True: one device sync on a GPU). Then
    ``"full"`` is ``"full"``, and ``"causal"`` is ``"causal"`` when the queries are all the
    keys, ``"full"`` when there is one query (the newest token sees every key). Causal
    queries appended after a KV cache (``1 < N < N_k``) keep the tensor: SDPA's
    ``is_causal`` aligns its triangle to the top-left corner, not to the last key.
    """
    if window is not None or mode == "prefix" or key_mask.device.type == "meta":
        return None
    N_k = key_mask.shape[1]
    N = N_k if num_queries is None else num_queries
    if not bool(key_mask.all()):
        return None
    if mode == "full" or N == 1:
        return "full"
    return "causal" if N_k == N else None


def default_position_ids(
    attention_mask: torch.Tensor, past_real: torch.Tensor | None = None
) -> torch.Tensor:
    """Running count of real tokens (0-based), continuing from ``past_real [B]`` cached ones.

    Padding positions get the count so far (clamped at 0); they are never attended to.
    """
    pos = torch.cumsum(attention_mask.long(), dim=1) - 1
    if past_real is not None:
        pos = pos + past_real[:, None]
    return pos.clamp_min(0)
