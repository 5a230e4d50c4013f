"""The convolutional encoder / decoder shared by the VQ and KL image tokenizers.

Both LlamaGen's VQ-16 (Janus, FUDOKI) and Stable Diffusion's KL-VAE use the same design, from
VQGAN: a stack of resolution levels, each with ``num_res_blocks`` residual blocks (GroupNorm,
SiLU, 3x3 conv, twice) and a stride-2 resampling between levels, then a middle block
(res, self-attention, res). With ``L = len(channel_mult)`` levels the spatial size shrinks by
``2^(L-1)``:

    encoder  x [B, 3, H, W] -> conv_in -> levels (ch * channel_mult[i]) -> mid -> norm, SiLU,
             conv_out -> [B, z_out, H / 2^(L-1), W / 2^(L-1)]
    decoder  z [B, z, h, w] -> conv_in -> mid -> levels in reverse (num_res_blocks + 1 blocks
             each, nearest-neighbour x2 upsampling + 3x3 conv) -> norm, SiLU, conv_out
             -> [B, 3, h 2^(L-1), w 2^(L-1)]

LlamaGen additionally attends after every residual block of the lowest-resolution level
(``attn_resolutions="lowest"``); SD's VAE attends only in the middle (``"mid"``).

Parameter names follow LlamaGen / Janus (``conv_blocks.{i}.res.{j}``, ``mid.{0,1,2}``,
``conv_blocks.{i}.attn.{j}``, ``downsample.conv`` / ``upsample.conv``), so a Janus
``gen_vision_model.*`` state dict loads as is; :mod:`kineflow.tokenizers.kl_vae` maps the
``diffusers`` names onto them. Every op keeps the input dtype, so bf16 runs end to end
(LlamaGen's upsampler hard-codes float16 for non-float32 inputs).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class AutoencoderConfig:
    """Shape of an encoder / decoder pair (see the module docstring)."""

    in_channels: int = 3
    out_channels: int = 3
    channels: int = 128
    channel_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    z_channels: int = 256
    double_z: bool = False  # encoder outputs 2 * z_channels (mean and log-variance)
    attn_resolutions: str = "lowest"  # "lowest" (LlamaGen) or "mid" (SD VAE)
    norm_groups: int = 32
    dropout: float = 0.0

    def __post_init__(self) -> None:
        self.channel_mult = tuple(int(m) for m in self.channel_mult)
        if not self.channel_mult or min(self.channel_mult) < 1:
            raise ValueError(f"channel_mult must be positive integers, got {self.channel_mult}")
        if self.attn_resolutions not in ("lowest", "mid"):
            raise ValueError(
                f"attn_resolutions must be 'lowest' or 'mid', got {self.attn_resolutions!r}"
            )
        widths = {self.channels * m for m in self.channel_mult}
        bad = sorted(w for w in widths if w % self.norm_groups)
        if bad:
            raise ValueError(
                f"GroupNorm with {self.norm_groups} groups needs channel counts divisible by it; "
                f"got {bad} (channels={self.channels}, channel_mult={self.channel_mult})"
            )
        if self.num_res_blocks < 1 or self.z_channels < 1:
            raise ValueError("num_res_blocks and z_channels must be >= 1")

    @property
    def downsample(self) -> int:
        """Spatial reduction factor ``2^(L-1)``."""
        return 2 ** (len(self.channel_mult) - 1)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["channel_mult"] = list(self.channel_mult)
        return d


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """``x + conv2(drop(SiLU(norm2(conv1(SiLU(norm1(x)))))))``, a 1x1 shortcut when the width
    changes."""

    def __init__(self, c_in: int, c_out: int, groups: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm1 = _norm(c_in, groups)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2 = _norm(c_out, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return (x if self.nin_shortcut is None else self.nin_shortcut(x)) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the ``h * w`` positions, 1x1-conv projections:
    ``x + proj_out(softmax(q k^T / sqrt(C)) v)`` with ``q, k, v`` from ``norm(x)``."""

    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        self.norm = _norm(channels, groups)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        h = self.norm(x)
        q, k, v = (m(h).flatten(2).transpose(1, 2)[:, None] for m in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v)  # [B, 1, HW, C]
        return x + self.proj_out(out[:, 0].transpose(1, 2).reshape(B, C, H, W))


class Downsample(nn.Module):
    """Stride-2 3x3 conv after padding one pixel right and bottom (VQGAN's asymmetric pad)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour x2, then a 3x3 conv."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Level(nn.Module):
    """One resolution level: residual blocks, optional attention after each, a resampler."""

    def __init__(
        self,
        c_in: int,
        c_out: int,
        n: int,
        attn: bool,
        cfg: AutoencoderConfig,
        resample: type[nn.Module] | None,
    ) -> None:
        super().__init__()
        g, d = cfg.norm_groups, cfg.dropout
        self.res = nn.ModuleList(
            ResnetBlock(c_in if j == 0 else c_out, c_out, g, d) for j in range(n)
        )
        self.attn = nn.ModuleList(AttnBlock(c_out, g) for _ in range(n if attn else 0))
        if resample is Downsample:
            self.downsample = Downsample(c_out)
        elif resample is Upsample:
            self.upsample = Upsample(c_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for j, block in enumerate(self.res):
            x = block(x)
            if len(self.attn):
                x = self.attn[j](x)
        if hasattr(self, "downsample"):
            x = self.downsample(x)
        if hasattr(self, "upsample"):
            x = self.upsample(x)
        return x


def _mid(channels: int, cfg: AutoencoderConfig) -> nn.ModuleList:
    g, d = cfg.norm_groups, cfg.dropout
    return nn.ModuleList(
        [
            ResnetBlock(channels, channels, g, d),
            AttnBlock(channels, g),
            ResnetBlock(channels, channels, g, d),
        ]
    )


class Encoder(nn.Module):
    """Pictures ``[B, in_channels, H, W]`` -> latents ``[B, z_out, H/f, W/f]``, ``f`` =
    :attr:`AutoencoderConfig.downsample`, ``z_out = z_channels * (2 if double_z else 1)``."""

    def __init__(self, cfg: AutoencoderConfig) -> None:
        super().__init__()
        widths = [cfg.channels * m for m in cfg.channel_mult]
        L = len(widths)
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.channels, 3, padding=1)
        self.conv_blocks = nn.ModuleList(
            _Level(
                cfg.channels if i == 0 else widths[i - 1],
                widths[i],
                cfg.num_res_blocks,
                attn=cfg.attn_resolutions == "lowest" and i == L - 1,
                cfg=cfg,
                resample=Downsample if i < L - 1 else None,
            )
            for i in range(L)
        )
        self.mid = _mid(widths[-1], cfg)
        self.norm_out = _norm(widths[-1], cfg.norm_groups)
        z_out = cfg.z_channels * (2 if cfg.double_z else 1)
        self.conv_out = nn.Conv2d(widths[-1], z_out, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.conv_blocks:
            h = level(h)
        for block in self.mid:
            h = block(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """Latents ``[B, z_channels, h, w]`` -> pictures ``[B, out_channels, h f, w f]``."""

    def __init__(self, cfg: AutoencoderConfig) -> None:
        super().__init__()
        widths = [cfg.channels * m for m in cfg.channel_mult]
        L = len(widths)
        self.conv_in = nn.Conv2d(cfg.z_channels, widths[-1], 3, padding=1)
        self.mid = _mid(widths[-1], cfg)
        # conv_blocks[0] is the lowest resolution (LlamaGen's and diffusers' order).
        levels = []
        for k, i in enumerate(reversed(range(L))):
            c_in = widths[-1] if k == 0 else widths[i + 1]
            levels.append(
                _Level(
                    c_in,
                    widths[i],
                    cfg.num_res_blocks + 1,
                    attn=cfg.attn_resolutions == "lowest" and i == L - 1,
                    cfg=cfg,
                    resample=Upsample if i > 0 else None,
                )
            )
        self.conv_blocks = nn.ModuleList(levels)
        self.norm_out = _norm(widths[0], cfg.norm_groups)
        self.conv_out = nn.Conv2d(widths[0], cfg.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)
        for block in self.mid:
            h = block(h)
        for level in self.conv_blocks:
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))

    @property
    def last_layer(self) -> torch.Tensor:
        """Weight of the final conv (adaptive GAN-loss weighting differentiates against it)."""
        return self.conv_out.weight
