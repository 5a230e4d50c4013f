"""The SigLIP vision transformer that encodes images for understanding (Janus / FUDOKI).

A plain pre-norm ViT without a class token. With patch size ``p``, ``N = (H / p) (W / p)``
patches and width ``D``:

    x [B, 3, H, W] in [-1, 1] -> patch_embed (p x p conv, stride p) -> [B, N, D] + pos_embed
    blocks, each:  x = x + attn(norm1(x));  x = x + mlp(norm2(x))
        attn  = proj(SDPA(q, k, v)),  [q | k | v] = qkv(x)  (one fused Linear D -> 3D, biased,
                ``num_attention_heads`` heads of ``D / heads``)
        mlp   = fc2(GELU(fc1(x)))  (D -> intermediate_size -> D)
    norm (LayerNorm) -> features [B, N, D]

Janus-1.3B (:meth:`SiglipConfig.janus_siglip_l16_384`) is SigLIP ViT-L/16 at 384 px: D = 1024,
24 blocks, 16 heads, MLP 4096, N = 24 x 24 = 576 tokens, LayerNorm eps 1e-6.

Facts about Janus's tower (``siglip_large_patch16_384`` in its ``siglip_vit.py`` /
``clip_encoder.py``) that this module reproduces:

* Parameter names are timm's (``patch_embed.proj``, ``pos_embed`` [1, N, D], ``blocks.{i}.
  {norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}``, ``norm``) under the checkpoint
  prefix ``vision_model.vision_tower.``.
* The MLP activation is ``nn.GELU()``, the exact (erf) GELU, while the original SigLIP and
  ``transformers`` use the tanh approximation; ``hidden_act`` picks either.
* ``select_layer`` truncates the *depth*: ``s <= 0`` keeps ``L + s + 1`` blocks, ``s > 0``
  keeps ``s`` blocks, and the final ``norm`` is applied to whatever the last kept block gives
  (it is not dropped for ``s = -2``). Janus-1.3B's config uses ``select_layer = -1``: all
  blocks, then the norm. Blocks beyond the kept depth exist in a checkpoint but are unused.
* The model is built with ``global_pool="map"``, so checkpoints hold an attention-pooling head
  (``attn_pool.*``), but Janus runs with ``ignore_head=True``: the head is never used and the
  output is the normalised patch sequence. This module has no head; loaders skip those keys.
* Pixels arrive already in [-1, 1] (Janus's processor normalises with mean = std = 0.5), and
  the tower itself does not normalise further.

:mod:`kineflow.interop.siglip` reads the tower out of a Janus checkpoint and converts between
these names and ``transformers``' ``SiglipVisionModel``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kineflow.config import check_config_keys

__all__ = ["SiglipConfig", "SiglipVisionModel"]
#: ``hidden_act`` values: the exact GELU (Janus) and the tanh approximation (SigLIP / HF).
_ACTIVATIONS = ("gelu", "gelu_tanh")


def _positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


@dataclass
class SiglipConfig:
    """Shape of a :class:`SiglipVisionModel` (see the module docstring).

    ``select_layer`` follows Janus: ``s <= 0`` runs the first ``num_hidden_layers + s + 1``
    blocks, ``s > 0`` the first ``s`` (so -1 is all of them); the final LayerNorm always
    follows. ``hidden_act`` is ``"gelu"`` (exact, Janus) or ``"gelu_tanh"`` (SigLIP / HF).
    """

    image_size: int
    patch_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_channels: int = 3
    layer_norm_eps: float = 1e-6
    select_layer: int = -1
    hidden_act: str = "gelu"

    def __post_init__(self) -> None:
        for name in (
            "image_size",
            "patch_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_channels",
        ):
            _positive_int(name, getattr(self, name))
        if self.image_size % self.patch_size:
            raise ValueError(
                f"image_size {self.image_size} is not divisible by patch_size {self.patch_size}"
            )
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                f"{self.num_attention_heads}"
            )
        if not self.layer_norm_eps > 0:
            raise ValueError(f"layer_norm_eps must be > 0, got {self.layer_norm_eps!r}")
        L, s = self.num_hidden_layers, self.select_layer
        if isinstance(s, bool) or not isinstance(s, int) or s == 0 or not -L <= s <= L:
            raise ValueError(
                f"select_layer must be a non-zero integer in [-{L}, {L}] "
                f"(num_hidden_layers={L}), got {s!r}"
            )
        if self.hidden_act not in _ACTIVATIONS:
            raise ValueError(f"hidden_act must be one of {_ACTIVATIONS}, got {self.hidden_act!r}")

    @property
    def num_patches(self) -> int:
        """Tokens per image, ``(image_size / patch_size)^2``."""
        return (self.image_size // self.patch_size) ** 2

    @property
    def num_used_layers(self) -> int:
        """How many blocks :attr:`select_layer` keeps (and the model builds)."""
        s = self.select_layer
        return self.num_hidden_layers + s + 1 if s < 0 else s

    @classmethod
    def janus_siglip_l16_384(cls) -> SiglipConfig:
        """Janus-1.3B's understanding encoder: SigLIP ViT-L/16 at 384 px, all 24 blocks."""
        return cls(
            image_size=384,
            patch_size=16,
            hidden_size=1024,
            intermediate_size=4096,
            num_hidden_layers=24,
            num_attention_heads=16,
            select_layer=-1,
            hidden_act="gelu",
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types, one entry per field."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SiglipConfig:
        """Inverse of :meth:`to_dict`; unknown keys raise."""
        check_config_keys(d, cls, "SigLIP config")
        return cls(**d)


# -- the model ------------------------------------------------------------------------------------
class PatchEmbed(nn.Module):
    """``p x p`` convolution with stride ``p``: [B, C, H, W] -> [B, (H/p)(W/p), D]."""

    def __init__(self, config: SiglipConfig) -> None:
        super().__init__()
        p = config.patch_size
        self.proj = nn.Conv2d(config.num_channels, config.hidden_size, p, stride=p)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """Multi-head self-attention with one fused, biased ``qkv`` projection; no mask."""

    def __init__(self, config: SiglipConfig) -> None:
        super().__init__()
        D = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.qkv = nn.Linear(D, 3 * D, bias=True)
        self.proj = nn.Linear(D, D)

    def forward(self, x: Tensor) -> Tensor:
        B, N, D = x.shape
        # [B, N, 3, H, Dh] -> 3 x [B, H, N, Dh]; the fused rows are ordered q, k, v, head-major.
        q, k, v = self.qkv(x).view(B, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v)  # default scale 1 / sqrt(Dh)
        return self.proj(out.transpose(1, 2).reshape(B, N, D))


class Mlp(nn.Module):
    """``fc2(GELU(fc1(x)))``."""

    def __init__(self, config: SiglipConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)
        self.approximate = "tanh" if config.hidden_act == "gelu_tanh" else "none"

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate=self.approximate))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))``."""

    def __init__(self, config: SiglipConfig) -> None:
        super().__init__()
        D, eps = config.hidden_size, config.layer_norm_eps
        self.norm1 = nn.LayerNorm(D, eps=eps)
        self.attn = Attention(config)
        self.norm2 = nn.LayerNorm(D, eps=eps)
        self.mlp = Mlp(config)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class SiglipVisionModel(nn.Module):
    """SigLIP ViT: ``pixel_values`` [B, C, S, S] in [-1, 1] -> features [B, N, D].

    Only the :attr:`SiglipConfig.num_used_layers` selected blocks are built, so the state dict
    has ``blocks.0 … blocks.{num_used_layers - 1}``. Every op keeps the input dtype (the
    parameters must match it, e.g. ``model.to(torch.bfloat16)`` for bf16 pixels).
    """

    def __init__(self, config: SiglipConfig) -> None:
        super().__init__()
        self.config = config
        D = config.hidden_size
        self.patch_embed = PatchEmbed(config)
        # Zeros, not random: real values always come from a checkpoint (or a training init).
        self.pos_embed = nn.Parameter(torch.zeros(1, config.num_patches, D))
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.num_used_layers))
        self.norm = nn.LayerNorm(D, eps=config.layer_norm_eps)

    def _check_pixels(self, pixel_values: Tensor) -> None:
        c = self.config
        if not isinstance(pixel_values, Tensor):
            raise ValueError(f"pixel_values must be a tensor, got {type(pixel_values).__name__}")
        if not pixel_values.is_floating_point():
            raise ValueError(
                f"pixel_values must be a floating-point tensor scaled to [-1, 1], "
                f"got dtype {pixel_values.dtype}"
            )
        expected = (c.num_channels, c.image_size, c.image_size)
        if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != expected:
            raise ValueError(
                f"pixel_values must have shape [B, {c.num_channels}, {c.image_size}, "
                f"{c.image_size}], got {list(pixel_values.shape)}"
            )

    def forward(self, pixel_values: Tensor) -> Tensor:
        """Encode images; returns [B, num_patches, hidden_size] after the final LayerNorm.

        Raises:
            ValueError: ``pixel_values`` is not a float tensor of shape [B, C, S, S] with the
                configured channel count and image size.
        """
        self._check_pixels(pixel_values)
        x = self.patch_embed(pixel_values) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.norm(x)
