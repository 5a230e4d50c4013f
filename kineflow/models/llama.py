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

Parameter names follow Hugging Face's ``LlamaModel`` (``embed_tokens``,
``layers.{i}.self_attn.{q,k,v,o}_proj``, ``layers.{i}.mlp.{gate,up,down}_proj``,
``layers.{i}.{input,post_attention}_layernorm``, ``norm``), so Janus's
``language_model.model.*`` state dict loads as is.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from kineflow.config import check_config_keys

MASK_MODES = ("causal", "full", "prefix")


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

    @classmethod
    def janus_1_3b(cls) -> LlamaConfig:
        """Janus-1.3B / FUDOKI language model (SPEC §1.5); its ``lm_head`` is separate and
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


def build_attention_mask(
    key_mask: torch.Tensor,
    num_queries: int | None = None,
    mode: str = "causal",
    prefix_lengths: torch.Tensor | None = None,
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
    """``w * x / sqrt(mean(x^2) + eps)``, normalised in float32 and cast back before scaling."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


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
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # [B, H, N, head_dim]
        return self.o_proj(out.transpose(1, 2).reshape(B, N, self.num_heads * self.head_dim))


class LlamaMLP(nn.Module):
    """SwiGLU: ``down_proj(SiLU(gate_proj(x)) * up_proj(x))``."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        D, F_ = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(D, F_, bias=False)
        self.up_proj = nn.Linear(D, F_, bias=False)
        self.down_proj = nn.Linear(F_, D, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaDecoderLayer(nn.Module):
    """Pre-norm block: ``h + attn(norm(h))`` then ``h + mlp(norm(h))``."""

    def __init__(self, config: LlamaConfig, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(config, layer_idx)
        self.mlp = LlamaMLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self,
        h: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor,
        kv_cache: KVCache | None = None,
    ) -> torch.Tensor:
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, mask, kv_cache)
        return h + self.mlp(self.post_attention_layernorm(h))


class LlamaModel(nn.Module):
    """Embedding, ``num_hidden_layers`` decoder blocks and the final RMSNorm (no LM head)."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(config, i) for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.reset_parameters()

    def reset_parameters(self, std: float = 0.02) -> None:
        """Llama's initialisation: weights ``N(0, std^2)``, biases 0, norm scales 1."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=std)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, RMSNorm):
                nn.init.ones_(m.weight)

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
            inputs_embeds = self.embed_tokens(input_ids)
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
        cos, sin = rope_cos_sin(
            position_ids, int(self.config.head_dim), self.config.rope_theta, inputs_embeds.dtype
        )
        h = inputs_embeds
        for layer in self.layers:
            h = layer(h, cos, sin, attn_mask, kv_cache)
        return self.norm(h)
