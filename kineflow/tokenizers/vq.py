"""The discrete image tokenizer of Janus and FUDOKI: LlamaGen's VQ-16.

An image becomes a grid of codebook indices and back:

    x [B, 3, H, W] in [-1, 1] -> encoder -> quant_conv (1x1)     z  [B, d, h, w]   (h = H / f)
                              -> nearest codebook row           id [B, h, w] in [0, K)
    id -> codebook row -> post_quant_conv (1x1) -> decoder      x̂  [B, 3, H, W]

with ``f = 2^(L-1)`` the downsample factor of the shared encoder / decoder
(:mod:`kineflow.tokenizers.autoencoder`), ``K`` codes of dimension ``d``.

Quantisation (:mod:`kineflow.tokenizers.quantizer`): with ``l2_norm`` (LlamaGen, Janus) the
latents and codebook rows are compared on the unit sphere, ``id = argmin_k ||ẑ − ê_k||²``;
training passes gradients straight through and adds the codebook, commitment and (optional)
entropy terms ``L_codebook``, ``L_commit``, ``L_entropy`` defined there. The pixel term is
``mean |x̂ − x|`` (or its square); the training loss is the sum of all four.

Janus's tokenizer (:meth:`VQConfig.janus`): channels 128 x (1, 1, 2, 2, 4), 2 residual blocks
per encoder level (3 per decoder level), z 256, attention at the lowest resolution,
K = 16384 codes of d = 8, f = 16, so a 384 px image is 24 x 24 = 576 tokens.

Checkpoints. The state-dict keys of :class:`VQModel` are Janus's ``gen_vision_model.*`` keys
without the prefix, so :func:`kineflow.interop.janus.vq_model_from_janus` loads a Janus /
FUDOKI state dict strictly. The one Janus tensor with no counterpart is LlamaGen's
training-time history buffer ``quantize.codebook_used`` (never updated in Janus): it is
skipped. Two deliberate departures from the official code: every op keeps the module dtype
(its upsampler casts non-float32 inputs to float16, which breaks bfloat16), and the
nearest-code search always runs in float32 so that ids do not flip with the compute dtype.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from kineflow.config import check_config_keys
from kineflow.io import CONFIG_NAME as CONFIG_NAME
from kineflow.io import WEIGHTS_NAME as WEIGHTS_NAME
from kineflow.io import load_pretrained, save_pretrained_folder
from kineflow.tokenizers.autoencoder import AutoencoderConfig, Decoder, Encoder
from kineflow.tokenizers.quantizer import (
    QuantizerOutput,
    VectorQuantizer,
    check_code_range,
    check_positive_int,
)

#: Value of the ``kineflow_type`` field in a saved tokenizer's ``config.json``.
KINEFLOW_TYPE = "vq"

RECON_LOSSES = ("l1", "l2")


def _autoencoder_from_dict(d: Mapping[str, Any]) -> AutoencoderConfig:
    check_config_keys(d, AutoencoderConfig, "autoencoder config")
    return AutoencoderConfig(**d)


@dataclass
class VQConfig:
    """Everything that fixes a :class:`VQModel`'s parameters and losses.

    The defaults are Janus's VQ-16 (see :meth:`janus`). ``image_size`` is the side of the
    square images the tokenizer expects (``None``: any size divisible by :attr:`downsample`);
    ``entropy_temperature`` is LlamaGen's ``τ`` of the entropy regulariser.
    """

    autoencoder: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    codebook_size: int = 16384
    codebook_dim: int = 8
    l2_norm: bool = True
    commit_beta: float = 0.25
    entropy_loss_ratio: float = 0.0
    entropy_temperature: float = 0.01
    recon_loss: str = "l1"
    image_size: int | None = 384

    def __post_init__(self) -> None:
        if isinstance(self.autoencoder, Mapping):
            self.autoencoder = _autoencoder_from_dict(self.autoencoder)
        if not isinstance(self.autoencoder, AutoencoderConfig):
            raise TypeError(
                "autoencoder must be an AutoencoderConfig or a dict, got "
                f"{type(self.autoencoder).__name__}"
            )
        if self.autoencoder.double_z:
            # double_z is the KL-VAE's mean / log-variance split; a VQ encoder outputs z itself.
            raise ValueError("a VQ tokenizer needs autoencoder.double_z = False")
        check_positive_int("codebook_size", self.codebook_size)
        check_positive_int("codebook_dim", self.codebook_dim)
        for name in ("commit_beta", "entropy_loss_ratio"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be a number >= 0, got {value!r}")
        if (
            not isinstance(self.entropy_temperature, (int, float))
            or isinstance(self.entropy_temperature, bool)
            or not self.entropy_temperature > 0
        ):
            raise ValueError(f"entropy_temperature must be > 0, got {self.entropy_temperature!r}")
        if self.recon_loss not in RECON_LOSSES:
            raise ValueError(f"recon_loss must be one of {RECON_LOSSES}, got {self.recon_loss!r}")
        if self.image_size is not None:
            check_positive_int("image_size", self.image_size)
            if self.image_size % self.downsample:
                raise ValueError(
                    f"image_size {self.image_size} is not divisible by the downsample factor "
                    f"{self.downsample} (2^(len(channel_mult) - 1))"
                )

    @classmethod
    def janus(cls) -> VQConfig:
        """Janus / FUDOKI's VQ-16: 384 px images -> 24 x 24 ids over 16384 codes of dim 8."""
        return cls(
            autoencoder=AutoencoderConfig(
                in_channels=3,
                out_channels=3,
                channels=128,
                channel_mult=(1, 1, 2, 2, 4),
                num_res_blocks=2,
                z_channels=256,
                double_z=False,
                attn_resolutions="lowest",
                norm_groups=32,
                dropout=0.0,
            ),
            codebook_size=16384,
            codebook_dim=8,
            l2_norm=True,
            image_size=384,
        )

    @property
    def downsample(self) -> int:
        """Pixels per token side, ``2^(len(channel_mult) - 1)``."""
        return self.autoencoder.downsample

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON / YAML types only (the autoencoder as a nested dict, lists not tuples)."""
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["autoencoder"] = self.autoencoder.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> VQConfig:
        """Inverse of :meth:`to_dict`; unknown keys (here or under ``autoencoder``) raise."""
        check_config_keys(d, cls, "VQ config")
        d = dict(d)
        if isinstance(d.get("autoencoder"), Mapping):
            d["autoencoder"] = _autoencoder_from_dict(d["autoencoder"])
        return cls(**d)


# -- the model --------------------------------------------------------------------------------


class VQModel(nn.Module):
    """LlamaGen's VQ-16 tokenizer: images Float[B, 3, H, W] in [-1, 1] <-> ids Long[B, h, w].

    Submodules (and so state-dict keys) are Janus's: ``encoder``, ``decoder``, ``quantize``
    (``quantize.embedding.weight [K, d]``), ``quant_conv`` (1x1, z -> d) and
    ``post_quant_conv`` (1x1, d -> z). Images of another floating dtype than the module are
    cast to it; outputs are in the module dtype. ``VQModel()`` is Janus's full-size tokenizer.
    The config is read once, at construction: later edits to ``model.config`` change nothing.
    """

    def __init__(self, config: VQConfig | None = None) -> None:
        super().__init__()
        self.config = VQConfig.janus() if config is None else config
        ae, c = self.config.autoencoder, self.config
        self.encoder = Encoder(ae)
        self.decoder = Decoder(ae)
        self.quantize = VectorQuantizer(
            c.codebook_size,
            c.codebook_dim,
            l2_norm=c.l2_norm,
            commit_beta=c.commit_beta,
            entropy_loss_ratio=c.entropy_loss_ratio,
            entropy_temperature=c.entropy_temperature,
        )
        self.quant_conv = nn.Conv2d(ae.z_channels, c.codebook_dim, 1)
        self.post_quant_conv = nn.Conv2d(c.codebook_dim, ae.z_channels, 1)

    # -- shapes -------------------------------------------------------------------------------
    @property
    def downsample(self) -> int:
        """Pixels per token side (16 for Janus)."""
        return self.config.downsample

    @property
    def codebook_size(self) -> int:
        return self.config.codebook_size

    def tokens_shape(self, image_size: int | tuple[int, int] | None = None) -> tuple[int, int]:
        """Token grid ``(h, w)`` of an image of side ``image_size`` (or ``(H, W)``); defaults to
        the configured size. 384 -> (24, 24) for Janus."""
        size = self.config.image_size if image_size is None else image_size
        if size is None:
            raise ValueError("this VQConfig has image_size=None; pass the image size explicitly")
        H, W = (size, size) if isinstance(size, int) else tuple(size)
        f = self.downsample
        if H < 1 or W < 1 or H % f or W % f:
            raise ValueError(
                f"image size {H}x{W} is not a positive multiple of the downsample factor {f}"
            )
        return H // f, W // f

    # -- validation ---------------------------------------------------------------------------
    def _check_images(self, images: Tensor) -> None:
        C = self.config.autoencoder.in_channels
        if not isinstance(images, Tensor):
            raise TypeError(f"images must be a torch.Tensor, got {type(images).__name__}")
        if images.ndim != 4:
            raise ValueError(f"images must be 4-D [B, {C}, H, W], got shape {tuple(images.shape)}")
        if images.shape[1] != C:
            raise ValueError(
                f"images must have {C} channels (dim 1 of [B, C, H, W]), got shape "
                f"{tuple(images.shape)}"
            )
        if not images.is_floating_point():
            raise ValueError(
                f"images must be floating point in [-1, 1], got dtype {images.dtype} "
                "(see kineflow.data.example.image_to_tensor)"
            )
        H, W = images.shape[-2:]
        S, f = self.config.image_size, self.downsample
        if S is not None and (H, W) != (S, S):
            raise ValueError(
                f"images must be {S}x{S} (VQConfig.image_size), got {H}x{W}; resize them first "
                "or build the tokenizer with image_size=None"
            )
        if H % f or W % f:
            raise ValueError(
                f"image height and width must be multiples of the downsample factor {f}, got "
                f"{H}x{W}"
            )

    def _check_ids(self, ids: Tensor) -> Tensor:
        """Validate token ids; returns them as [B, h, w]."""
        if not isinstance(ids, Tensor):
            raise TypeError(f"ids must be a torch.Tensor, got {type(ids).__name__}")
        if ids.dtype != torch.long:
            raise ValueError(f"ids must have dtype torch.long (int64), got {ids.dtype}")
        if ids.ndim == 2:
            N = ids.shape[1]
            n = math.isqrt(N)
            if n * n != N:
                raise ValueError(
                    f"ids of shape [B, N] = {tuple(ids.shape)} need a square token grid, but "
                    f"N = {N} is not a perfect square; pass [B, h, w]"
                )
            ids = ids.reshape(ids.shape[0], n, n)
        elif ids.ndim != 3:
            raise ValueError(
                f"ids must be [B, h, w] (or [B, h*w] for a square grid), got shape "
                f"{tuple(ids.shape)}"
            )
        if self.config.image_size is not None:
            grid = self.tokens_shape()
            if tuple(ids.shape[1:]) != grid:
                raise ValueError(
                    f"ids must form a {grid[0]}x{grid[1]} grid (image_size "
                    f"{self.config.image_size} / {self.downsample}), got shape {tuple(ids.shape)}"
                )
        check_code_range("ids", ids, self.codebook_size)
        return ids

    # -- encode / decode ------------------------------------------------------------------------
    def latents(self, images: Tensor) -> Tensor:
        """Continuous pre-quantisation latents: Float[B, 3, H, W] -> Float[B, d, h, w]."""
        self._check_images(images)
        x = images.to(self.quant_conv.weight.dtype)
        return self.quant_conv(self.encoder(x))

    @torch.no_grad()
    def encode(self, images: Tensor) -> Tensor:
        """Images Float[B, 3, H, W] in [-1, 1] -> ids Long[B, h, w]. Runs without gradient
        (ids have none); the distances and argmin are float32 whatever the module dtype."""
        return self.quantize.encode(self.latents(images))

    def decode_latents(self, z_q: Tensor) -> Tensor:
        """Quantised latents Float[B, d, h, w] -> images Float[B, 3, H, W]."""
        return self.decoder(self.post_quant_conv(z_q))

    def decode(self, ids: Tensor) -> Tensor:
        """Ids Long[B, h, w] (or [B, h*w] for a square grid) -> images Float[B, 3, H, W].

        The output is nominally in [-1, 1] but is not clamped: the decoder can overshoot
        slightly, and clamping here would hide that from losses; clamp (or use
        :func:`kineflow.data.example.tensor_to_image`, which clips) when making pictures.
        Differentiable in the decoder's parameters.
        """
        return self.decode_latents(self.quantize.lookup(self._check_ids(ids)))

    def _run(self, images: Tensor) -> tuple[Tensor, QuantizerOutput]:
        out = self.quantize(self.latents(images))
        return self.decode_latents(out.z_q), out

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """Images -> ``(recon Float[B, 3, H, W], ids Long[B, h, w], losses)``, gradients
        straight through the quantizer; ``losses`` are the quantizer's (see
        :class:`QuantizerOutput`)."""
        recon, out = self._run(images)
        return recon, out.ids, out.losses

    def training_losses(self, images: Tensor) -> dict[str, Tensor]:
        """Float32 scalars: ``loss`` = ``recon`` + ``codebook`` + ``commitment`` + ``entropy``,
        those parts, and ``usage`` / ``perplexity`` of the batch (detached).

        ``recon`` is ``mean |x̂ − x|`` (``recon_loss="l1"``) or ``mean (x̂ − x)²`` (``"l2"``),
        computed in float32. LlamaGen's perceptual and GAN terms are not included."""
        recon, out = self._run(images)
        diff = recon.float() - images.float()
        recon_loss = diff.abs().mean() if self.config.recon_loss == "l1" else diff.square().mean()
        losses = {"recon": recon_loss, **out.losses}
        return {
            "loss": sum(losses.values()),
            **losses,
            "usage": out.usage.detach(),
            "perplexity": out.perplexity.detach(),
        }

    @torch.no_grad()
    def reconstruct(self, images: Tensor) -> Tensor:
        """``decode(encode(images))`` without gradient (not clamped, see :meth:`decode`)."""
        return self.decode(self.encode(images))

    # -- checkpoints ----------------------------------------------------------------------------
    def save_pretrained(self, folder: str | os.PathLike) -> Path:
        """Write ``model.safetensors`` and ``config.json`` (with ``"kineflow_type": "vq"``) into
        ``folder`` (created if needed), each atomically. Returns the folder."""
        return save_pretrained_folder(
            folder, self.state_dict(), self.config.to_dict(), KINEFLOW_TYPE
        )

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike) -> VQModel:
        """Load a folder written by :meth:`save_pretrained` (on the CPU).

        Raises FileNotFoundError for a missing folder or file, ValueError for a config that
        is not a VQ tokenizer's or has unknown keys, and for weights that do not match the
        config (naming every offending key). The model takes the weights' dtype when all
        floating tensors share one (a bfloat16 save loads as bfloat16).
        """
        return load_pretrained(
            folder, KINEFLOW_TYPE, "VQ tokenizer", lambda d: cls(VQConfig.from_dict(d))
        )
