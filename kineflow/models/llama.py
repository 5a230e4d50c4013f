"""The Llama-style decoder backbone shared by every model in kineflow.

A stack of ``L`` pre-norm blocks over hidden states ``h [B, N, D]``:

    h = embed_tokens(input_ids)                    (or the caller's inputs_embeds)
    h = h + o_proj(Attn(RoPE(q_proj(n)), RoPE(k_proj(n)), v_proj(n), mask)),  n = RMSNorm(h)
    h = h + down_proj(SiLU(gate_proj(n)) * up_proj(n)),                        n = RMSNorm(h)
    out = norm(h)                                   [B, N, D]

with ``RMSNorm(x) = w * x / sqrt(mean(x^2) + eps)`` computed in float32. Attention is
grouped-query: ``H`` query heads share ``H_kv`` key / value heads (``H_kv`` divides ``H``), each of
width ``head_dim``, scaled by ``1 / sqrt(head_dim)``. Rotary position embedding uses the
rotate-half convention: with ``inv_freq_k = theta^(-2k / head_dim)`` and angles ``p * inv_freq``
duplicated to ``head_dim``, ``RoPE(x) = x cos + rotate_half(x) sin`` where
``rotate_half([x1, x2]) = [-x2, x1]``.

Attention masks (see :func:`build_attention_mask`) are ``"causal"`` (autoregressive), ``"full"``
(bidirectional, FUDOKI) or ``"prefix"`` (PaliGemma / UniFluid prefix-LM). Padding may sit on
either side; position ids default to the running count of real tokens, so a left-padded row
gets the same positions as the same row unpadded. :class:`KVCache` lets causal decoding cost
one step per new token.

**Gemma-2 options** (all off by default; :meth:`LlamaConfig.gemma2_2b`,
:meth:`LlamaConfig.from_hf_gemma2`): ``norm_offset`` (RMSNorm scale ``1 + w``, applied in
float32 before the cast, weights initialised to 0), ``embed_scale`` (token embeddings times
``sqrt(D)``), ``hidden_act="gelu_tanh"`` (GeGLU), ``query_pre_attn_scalar`` (attention scale
``s^-1/2`` instead of ``head_dim^-1/2``), ``attn_logit_softcapping`` (scores
``c·tanh(scores / c)`` before the mask), ``sandwich_norms`` (the block becomes
``h + post_attention_layernorm(attn(input_layernorm(h)))`` then
``h + post_feedforward_layernorm(mlp(pre_feedforward_layernorm(h)))``), ``sliding_window``
with per-layer ``layer_types`` (a sliding layer only sees keys fewer than ``window`` real
tokens away), and ``final_logit_softcapping`` for heads (:func:`softcap`).

Parameter names follow Hugging Face's ``LlamaModel`` (``embed_tokens``,
``layers.{i}.self_attn.{q,k,v,o}_proj``, ``layers.{i}.mlp.{gate,up,down}_proj``,
``layers.{i}.{input,post_attention}_layernorm``, ``norm``), so Janus's
``language_model.model.*`` state dict loads as is; with ``sandwich_norms`` they are
``Gemma2Model``'s (``pre_feedforward_layernorm``, ``post_feedforward_layernorm`` added).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from kineflow.config import check_config_keys
from kineflow.interop.checkpoint_files import read_weights
from kineflow.io import check_state_dict, read_json_object

MASK_MODES = ("causal", "full", "prefix")
ACTIVATIONS = ("silu", "gelu_tanh")
LAYER_TYPES = ("full_attention", "sliding_attention")


@dataclass
class LlamaConfig:
    """Shape of a :class:`LlamaModel` (see the module docstring)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int | None = None  # None: same as num_attention_heads (plain MHA)
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 4096
    attention_bias: bool = False
    hidden_act: str = "silu"
    norm_offset: bool = False
    embed_scale: bool = False
    sandwich_norms: bool = False
    query_pre_attn_scalar: float | None = None
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None
    sliding_window: int | None = None
    layer_types: list[str] | None = None

    def __post_init__(self) -> None:
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "max_position_embeddings",
        ):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} must divide "
                f"hidden_size={self.hidden_size}"
            )
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.num_key_value_heads < 1 or self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_key_value_heads={self.num_key_value_heads} must be >= 1 and divide "
                f"num_attention_heads={self.num_attention_heads}"
            )
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.head_dim < 2 or self.head_dim % 2:
            # RoPE rotates pairs of channels.
            raise ValueError(f"head_dim must be a positive even number, got {self.head_dim}")
        if self.rms_norm_eps <= 0 or self.rope_theta <= 0:
            raise ValueError(
                f"rms_norm_eps and rope_theta must be > 0, got {self.rms_norm_eps}, "
                f"{self.rope_theta}"
            )
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"hidden_act must be one of {ACTIVATIONS}, got {self.hidden_act!r}")
        for name in ("query_pre_attn_scalar", "attn_logit_softcapping", "final_logit_softcapping"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"{name} must be None or > 0, got {value!r}")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"sliding_window must be None or >= 1, got {self.sliding_window}")
        if self.layer_types is None:
            self.layer_types = ["full_attention"] * self.num_hidden_layers
        self.layer_types = list(self.layer_types)
        if len(self.layer_types) != self.num_hidden_layers or any(
            t not in LAYER_TYPES for t in self.layer_types
        ):
            raise ValueError(
                f"layer_types must list {self.num_hidden_layers} entries from {LAYER_TYPES}, "
                f"got {self.layer_types}"
            )
        if "sliding_attention" in self.layer_types and self.sliding_window is None:
            raise ValueError("sliding_attention layers need a sliding_window")

    @classmethod
    def janus_1_3b(cls) -> LlamaConfig:
        """Janus-1.3B / FUDOKI language model (docs/design.md §1.5); its ``lm_head`` is separate and
        untied."""
        return cls(
            vocab_size=102400,
            hidden_size=2048,
            intermediate_size=5632,
            num_hidden_layers=24,
            num_attention_heads=16,
            num_key_value_heads=16,
            rms_norm_eps=1e-6,
            rope_theta=10000.0,
            max_position_embeddings=16384,
        )

    @classmethod
    def gemma2_2b(cls) -> LlamaConfig:
        """Gemma-2 2B's backbone (UniFluid's language model, docs/design.md §2.1)."""
        return cls.from_hf_gemma2(
            {
                "vocab_size": 256000,
                "hidden_size": 2304,
                "intermediate_size": 9216,
                "num_hidden_layers": 26,
                "num_attention_heads": 8,
                "num_key_value_heads": 4,
                "head_dim": 256,
                "max_position_embeddings": 8192,
                "query_pre_attn_scalar": 256,
                "sliding_window": 4096,
            }
        )

    @classmethod
    def from_hf_gemma2(cls, config: dict) -> LlamaConfig:
        """The backbone of a Hugging Face ``Gemma2Config`` (its ``config.json`` as a dict);
        fields it leaves out take Gemma-2's defaults. Layer types alternate sliding / full
        starting with sliding, as in ``transformers``, unless ``layer_types`` is given."""
        c = dict(config)
        L = int(c["num_hidden_layers"])
        act = c.get("hidden_activation") or c.get("hidden_act") or "gelu_pytorch_tanh"
        if act not in ("gelu_pytorch_tanh", "gelu_tanh"):
            raise ValueError(f"Gemma-2 uses the tanh GELU; this config asks for {act!r}")
        return cls(
            vocab_size=int(c["vocab_size"]),
            hidden_size=int(c["hidden_size"]),
            intermediate_size=int(c["intermediate_size"]),
            num_hidden_layers=L,
            num_attention_heads=int(c["num_attention_heads"]),
            num_key_value_heads=int(c.get("num_key_value_heads", c["num_attention_heads"])),
            head_dim=int(c.get("head_dim", 256)),
            rms_norm_eps=float(c.get("rms_norm_eps", 1e-6)),
            rope_theta=float(c.get("rope_theta", 10000.0)),
            max_position_embeddings=int(c.get("max_position_embeddings", 8192)),
            attention_bias=bool(c.get("attention_bias", False)),
            hidden_act="gelu_tanh",
            norm_offset=True,
            embed_scale=True,
            sandwich_norms=True,
            query_pre_attn_scalar=float(c.get("query_pre_attn_scalar", 256)),
            attn_logit_softcapping=c.get("attn_logit_softcapping", 50.0),
            final_logit_softcapping=c.get("final_logit_softcapping", 30.0),
            sliding_window=c.get("sliding_window", 4096),
            layer_types=c.get("layer_types")
            or ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(L)],
        )

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> LlamaConfig:
        check_config_keys(d, cls, "LlamaConfig")
        return cls(**d)


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
    if window is not None:
        rank = torch.cumsum(key_mask.long(), dim=1) - 1  # [B, N_k]
        gap = rank[:, N_k - N :, None] - rank[:, None, :]  # [B, N, N_k] query minus key rank
        allowed = allowed & (gap.abs() < window)
    # Rows with nothing to attend to would softmax to NaN; let them see their own position.
    empty = ~allowed.any(dim=-1, keepdim=True)  # [B, N, 1]
    allowed = allowed | (empty & (k_pos == q_pos)[None])
    return allowed[:, None]


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


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """``[x1, x2] -> [-x2, x1]`` on the last dimension."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def rope_cos_sin(
    position_ids: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos``, ``sin`` ``[B, N, head_dim]`` for integer positions ``[B, N]``.

    Angles are computed in float32 (bf16 positions lose precision past 256) then cast.
    """
    inv_freq = theta ** (
        -torch.arange(0, head_dim, 2, device=position_ids.device, dtype=torch.float32) / head_dim
    )
    angles = position_ids.float()[..., None] * inv_freq  # [B, N, head_dim / 2]
    emb = torch.cat([angles, angles], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


class RMSNorm(nn.Module):
    """``w * x / sqrt(mean(x^2) + eps)``, normalised in float32 and cast back before scaling
    (Llama); with ``offset`` ``(1 + w) * x / sqrt(...)``, scaled in float32 then cast, ``w``
    starting at 0 (Gemma)."""

    def __init__(self, dim: int, eps: float = 1e-6, offset: bool = False) -> None:
        super().__init__()
        self.offset = offset
        self.weight = nn.Parameter(torch.zeros(dim) if offset else torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.offset:
            return (x32 * (1.0 + self.weight.float())).to(dtype)
        return self.weight * x32.to(dtype)


def softcap(x: torch.Tensor, cap: float | None) -> torch.Tensor:
    """``cap · tanh(x / cap)`` (Gemma-2's logit soft-capping); ``x`` unchanged when ``cap`` is
    None."""
    return x if cap is None else cap * torch.tanh(x / cap)


class LlamaAttention(nn.Module):
    """Grouped-query self-attention with RoPE (see the module docstring)."""

    def __init__(self, config: LlamaConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = int(config.num_key_value_heads)
        self.head_dim = int(config.head_dim)
        D, bias = config.hidden_size, config.attention_bias
        self.q_proj = nn.Linear(D, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(D, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(D, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, D, bias=bias)
        scalar = config.query_pre_attn_scalar
        self.scale = (scalar if scalar is not None else self.head_dim) ** -0.5
        self.softcap = config.attn_logit_softcapping

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor,
        kv_cache: KVCache | None = None,
    ) -> torch.Tensor:
        B, N, _ = x.shape
        q = self.q_proj(x).view(B, N, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, N, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, N, self.num_kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = cos[:, None], sin[:, None]  # broadcast over heads
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_idx, k, v)
        groups = self.num_heads // self.num_kv_heads
        if groups > 1:
            # Expand shared KV heads to match queries (portable to torch without enable_gqa).
            k = k.repeat_interleave(groups, dim=1)
            v = v.repeat_interleave(groups, dim=1)
        if self.softcap is None:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)
        else:  # soft-capped scores: SDPA cannot apply tanh before the softmax
            scores = softcap(q @ k.transpose(-1, -2) * self.scale, self.softcap)
            scores = scores.masked_fill(~mask, float("-inf"))
            out = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype) @ v
        return self.o_proj(out.transpose(1, 2).reshape(B, N, self.num_heads * self.head_dim))


class LlamaMLP(nn.Module):
    """Gated MLP ``down_proj(act(gate_proj(x)) * up_proj(x))``: SwiGLU (``act`` = SiLU) or
    GeGLU (tanh-approximated GELU, Gemma)."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        D, F_ = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(D, F_, bias=False)
        self.up_proj = nn.Linear(D, F_, bias=False)
        self.down_proj = nn.Linear(F_, D, bias=False)
        self.gelu = config.hidden_act == "gelu_tanh"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.gate_proj(x)
        gate = F.gelu(gate, approximate="tanh") if self.gelu else F.silu(gate)
        return self.down_proj(gate * self.up_proj(x))


class LlamaDecoderLayer(nn.Module):
    """Pre-norm block: ``h + attn(norm(h))`` then ``h + mlp(norm(h))``; with
    ``sandwich_norms`` the attention and MLP outputs are normalised too (Gemma-2)."""

    def __init__(self, config: LlamaConfig, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(config, layer_idx)
        self.mlp = LlamaMLP(config)
        self.sliding = config.layer_types[layer_idx] == "sliding_attention"

        def norm() -> RMSNorm:
            return RMSNorm(config.hidden_size, config.rms_norm_eps, config.norm_offset)

        self.input_layernorm = norm()
        # Llama: the norm before the MLP; Gemma-2: the norm of the attention output.
        self.post_attention_layernorm = norm()
        self.sandwich = config.sandwich_norms
        if self.sandwich:
            self.pre_feedforward_layernorm = norm()
            self.post_feedforward_layernorm = norm()

    def forward(
        self,
        h: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor,
        kv_cache: KVCache | None = None,
    ) -> torch.Tensor:
        attn = self.self_attn(self.input_layernorm(h), cos, sin, mask, kv_cache)
        if not self.sandwich:
            h = h + attn
            return h + self.mlp(self.post_attention_layernorm(h))
        h = h + self.post_attention_layernorm(attn)
        return h + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h)))


class LlamaModel(nn.Module):
    """Embedding, ``num_hidden_layers`` decoder blocks and the final RMSNorm (no LM head)."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(config, i) for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, config.norm_offset)
        self.reset_parameters()

    def reset_parameters(self, std: float = 0.02) -> None:
        """Llama's initialisation: weights ``N(0, std^2)``, biases 0, norm scales 1."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=std)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, RMSNorm):
                nn.init.constant_(m.weight, 0.0 if m.offset else 1.0)  # a scale of 1 either way

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        mask: str = "causal",
        prefix_lengths: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
    ) -> torch.Tensor:
        """Final hidden states ``[B, N, D]``.

        Pass exactly one of ``input_ids [B, N]`` and ``inputs_embeds [B, N, D]``.
        ``attention_mask [B, N]`` (bool or 0/1; default all real) marks real tokens of *this*
        call; with ``kv_cache`` the cache remembers earlier ones, the new tokens attend to cached
        + new keys and are appended to it. ``mask`` and ``prefix_lengths`` are as in
        :func:`build_attention_mask` (prefix lengths count real tokens from the start, cache
        included). ``position_ids [B, N]`` default to the running count of real tokens.
        """
        if (input_ids is None) == (inputs_embeds is None):
            got = "both" if input_ids is not None else "neither"
            raise ValueError(f"pass exactly one of input_ids and inputs_embeds, got {got}")
        if mask not in MASK_MODES:
            raise ValueError(f"mask must be one of {MASK_MODES}, got {mask!r}")
        if mask == "prefix" and prefix_lengths is None:
            raise ValueError("mask='prefix' needs prefix_lengths ([B] real-token counts)")
        if mask != "prefix" and prefix_lengths is not None:
            raise ValueError(f"prefix_lengths is only used with mask='prefix', got mask={mask!r}")
        if input_ids is not None:
            if input_ids.ndim != 2:
                raise ValueError(f"input_ids must be [B, N], got shape {tuple(input_ids.shape)}")
            if input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool:
                raise ValueError(f"input_ids must be an integer tensor, got {input_ids.dtype}")
            V = self.config.vocab_size
            if input_ids.numel() and input_ids.device.type != "meta":
                lo, hi = int(input_ids.min()), int(input_ids.max())
                if lo < 0 or hi >= V:
                    raise ValueError(
                        f"input_ids must lie in [0, vocab_size={V}), got {lo if lo < 0 else hi}"
                    )
            inputs_embeds = self.embed(input_ids)
        elif inputs_embeds.ndim != 3 or inputs_embeds.shape[-1] != self.config.hidden_size:
            raise ValueError(
                f"inputs_embeds must be [B, N, {self.config.hidden_size}], got shape "
                f"{tuple(inputs_embeds.shape)}"
            )
        B, N, _ = inputs_embeds.shape
        if N == 0:
            raise ValueError("need at least one token (N >= 1)")
        device = inputs_embeds.device

        if attention_mask is None:
            attention_mask = torch.ones(B, N, dtype=torch.bool, device=device)
        elif tuple(attention_mask.shape) != (B, N):
            raise ValueError(
                f"attention_mask must have shape [B, N] = {(B, N)} matching the input, got "
                f"{tuple(attention_mask.shape)}"
            )
        elif attention_mask.dtype != torch.bool and device.type != "meta":
            non_binary = (attention_mask != 0) & (attention_mask != 1)
            if bool(non_binary.any()):
                raise ValueError("attention_mask must be bool or 0/1")
        attention_mask = attention_mask.to(device=device, dtype=torch.bool)

        if kv_cache is not None and kv_cache.key_mask is not None:
            if kv_cache.key_mask.shape[0] != B:
                raise ValueError(
                    f"kv_cache holds batch size {kv_cache.key_mask.shape[0]}, input has {B}"
                )
            past_real = kv_cache.num_real()
        else:
            past_real = None

        if position_ids is None:
            position_ids = default_position_ids(attention_mask, past_real)
        else:
            position_ids = torch.as_tensor(position_ids, device=device)
            if position_ids.ndim == 1:
                position_ids = position_ids[None].expand(B, -1)
            if tuple(position_ids.shape) != (B, N):
                raise ValueError(
                    f"position_ids must have shape [B, N] = {(B, N)} (or [N]), got "
                    f"{tuple(position_ids.shape)}"
                )

        key_mask = attention_mask if kv_cache is None else kv_cache.append_mask(attention_mask)
        attn_mask = build_attention_mask(key_mask, N, mask, prefix_lengths)
        window_mask = None
        if "sliding_attention" in self.config.layer_types:
            window = self.config.sliding_window
            window_mask = build_attention_mask(key_mask, N, mask, prefix_lengths, window)
        cos, sin = rope_cos_sin(
            position_ids, int(self.config.head_dim), self.config.rope_theta, inputs_embeds.dtype
        )
        h = inputs_embeds
        for layer in self.layers:
            h = layer(h, cos, sin, window_mask if layer.sliding else attn_mask, kv_cache)
        return self.norm(h)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings ``[B, N, D]``, times ``sqrt(D)`` (in their dtype) with
        ``embed_scale``; callers that build ``inputs_embeds`` themselves use this for text."""
        embeds = self.embed_tokens(input_ids)
        if self.config.embed_scale:
            embeds = embeds * torch.tensor(self.config.hidden_size**0.5, dtype=embeds.dtype)
        return embeds


def load_hf_gemma2(folder: str | os.PathLike[str]) -> LlamaModel:
    """The Gemma-2 backbone of a local Hugging Face folder (``config.json`` with
    ``model_type: gemma2`` and its weights, from ``Gemma2Model`` or ``Gemma2ForCausalLM``),
    in the checkpoint's dtype. Gemma-2 ties its LM head to ``embed_tokens``: read logits as
    ``softcap(h @ embed_tokens.weight.T, config.final_logit_softcapping)``.

    Raises:
        FileNotFoundError, ValueError: a missing file, another model type, or weights that do
            not fit (each missing, unexpected or mis-shaped tensor named).
    """
    folder = Path(folder)
    config = read_json_object(folder / "config.json")
    if config.get("model_type") != "gemma2":
        raise ValueError(
            f"{folder / 'config.json'}: model_type is {config.get('model_type')!r}, not 'gemma2'"
        )
    weights = read_weights(folder)
    head = weights.pop("lm_head.weight", None)
    prefix = "model." if any(k.startswith("model.") for k in weights) else ""
    state = {k.removeprefix(prefix): v for k, v in weights.items()}
    model = LlamaModel(LlamaConfig.from_hf_gemma2(config))
    check_state_dict(model.state_dict(), state, str(folder), prefix=prefix)
    if head is not None and not torch.equal(head, state["embed_tokens.weight"]):
        raise ValueError(f"{folder}: lm_head.weight differs from embed_tokens (Gemma-2 ties them)")
    dtypes = {t.dtype for t in state.values()}
    model.to(dtypes.pop() if len(dtypes) == 1 else torch.float32)
    model.load_state_dict(state)
    return model.eval()
