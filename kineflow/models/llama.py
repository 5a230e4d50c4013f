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

Attention masks are ``"causal"`` (autoregressive), ``"full"`` (bidirectional, FUDOKI) or
``"prefix"`` (PaliGemma / UniFluid prefix-LM); padding may sit on either side, position ids
default to the running count of real tokens, and a :class:`~kineflow.models.masking.KVCache`
lets causal decoding cost one step per new token (all in :mod:`kineflow.models.masking`).

**Gemma-2 options** (all off by default; :meth:`LlamaConfig.gemma2_2b`;
:func:`kineflow.interop.gemma.llama_config_from_gemma2` reads a Hugging Face ``Gemma2Config``):
``norm_offset`` (RMSNorm scale ``1 + w``, applied in float32 before the cast, weights
initialised to 0), ``embed_scale`` (token embeddings times ``sqrt(D)``),
``hidden_act="gelu_tanh"`` (GeGLU), ``query_pre_attn_scalar`` (attention scale ``s^-1/2``
instead of ``head_dim^-1/2``), ``attn_logit_softcapping`` (scores ``c·tanh(scores / c)`` before
the mask), ``sandwich_norms`` (the block becomes
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

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from kineflow.config import check_config_keys
from kineflow.models.masking import (
    MASK_MODES,
    KVCache,
    build_attention_mask,
    default_position_ids,
    plain_attention,
)
from kineflow.models.rope import rope_cos_sin, rotate_half

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
        """Gemma-2 2B's backbone (UniFluid's language model, docs/design.md §2.1): every Gemma-2
        option on, sliding-window layers first and then alternating, as in ``transformers``."""
        return cls(
            vocab_size=256000,
            hidden_size=2304,
            intermediate_size=9216,
            num_hidden_layers=26,
            num_attention_heads=8,
            num_key_value_heads=4,
            head_dim=256,
            max_position_embeddings=8192,
            hidden_act="gelu_tanh",
            norm_offset=True,
            embed_scale=True,
            sandwich_norms=True,
            query_pre_attn_scalar=256.0,
            attn_logit_softcapping=50.0,
            final_logit_softcapping=30.0,
            sliding_window=4096,
            layer_types=["sliding_attention", "full_attention"] * 13,
        )

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> LlamaConfig:
        check_config_keys(d, cls, "LlamaConfig")
        return cls(**d)


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
        mask: torch.Tensor | str,
        kv_cache: KVCache | None = None,
    ) -> torch.Tensor:
        """``mask``: a boolean ``[B, 1, N, N_k]`` tensor (True = may attend), or ``"causal"`` /
        ``"full"`` when nothing is padded (:func:`~kineflow.models.masking.plain_attention`):
        then SDPA gets ``is_causal`` or no mask, which lets it pick its fused kernels."""
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
            plain = isinstance(mask, str)
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=None if plain else mask, is_causal=plain and mask == "causal",
                scale=self.scale,
            )  # fmt: skip
        else:  # soft-capped scores: SDPA cannot apply tanh before the softmax
            scores = softcap(q @ k.transpose(-1, -2) * self.scale, self.softcap)
            if isinstance(mask, str) and mask == "causal":
                mask = torch.ones(N, k.shape[2], dtype=torch.bool, device=x.device).tril()
            if not isinstance(mask, str):
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
        mask: torch.Tensor | str,
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
        segment_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Final hidden states ``[B, N, D]``.

        Pass exactly one of ``input_ids [B, N]`` and ``inputs_embeds [B, N, D]``.
        ``attention_mask [B, N]`` (bool or 0/1; default all real) marks real tokens of *this*
        call; with ``kv_cache`` the cache remembers earlier ones, the new tokens attend to cached
        + new keys and are appended to it. ``mask`` and ``prefix_lengths`` are as in
        :func:`~kineflow.models.masking.build_attention_mask` (prefix lengths count real tokens
        from the start, cache included). ``position_ids [B, N]`` default to the running count
        of real tokens. ``segment_ids [B, N]`` packs several sequences in a row: a token attends
        only to its own segment's tokens (pass each segment's own ``position_ids``; see
        :mod:`kineflow.inputs.packing`).
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
        if segment_ids is not None and kv_cache is not None:
            raise ValueError("segment_ids (packed rows) cannot be used with a kv_cache")
        # No padding: "causal" / "full" instead of a tensor (SDPA's fused kernels).
        plain = None if segment_ids is not None else plain_attention(key_mask, N, mask)
        attn_mask = plain or build_attention_mask(
            key_mask, N, mask, prefix_lengths, segment_ids=segment_ids
        )
        window_mask = None
        if "sliding_attention" in self.config.layer_types:
            window = self.config.sliding_window
            window_mask = build_attention_mask(
                key_mask, N, mask, prefix_lengths, window, segment_ids=segment_ids
            )
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
