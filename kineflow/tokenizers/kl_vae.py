"""Continuous image tokenizer: the Stable-Diffusion-style KL autoencoder (UniFluid's tokenizer).

The encoder (:class:`~kineflow.tokenizers.autoencoder.Encoder` with ``double_z``, attention
only in the middle block) maps an image ``x ∈ [-1, 1]^{3×H×W}`` to the moments of a diagonal
Gaussian posterior over latents ``z ∈ R^{C×h×w}``, ``h = H/f``, ``w = W/f``,
``f = 2^(L-1)`` (SD's KL-f8: ``L = 4``, ``C = 4``):

    [μ, log σ²] = quant_conv(encoder(x)),      log σ² clamped to [-30, 20]
    z = μ + σ ⊙ ε,   ε ~ N(0, I)                (reparameterised sample; the mode is μ)
    x̂ = decoder(post_quant_conv(z))

Training minimises ``L = rec(x̂, x) + λ_KL · E_batch[KL(q(z|x) ‖ N(0, I))]`` with ``rec`` the
mean absolute (``l1``) or squared (``l2``) error per element and the closed form

    KL(N(μ, σ²) ‖ N(0, 1)) = ½ Σ_{c,i,j} (μ² + σ² − 1 − log σ²)      (per sample).

SD's VAE was trained with an additional LPIPS and patch-GAN term; those are not part of this
module (``decoder.last_layer`` is exposed for the usual adaptive GAN weighting).

Latents handed to a generative model are normalised, ``z̃ = (z − shift) · scale``
(SD 1.x/2.x: ``scale = 0.18215``, ``shift = 0``), and patchified ``p × p``
(UniFluid: ``p = 2``) into ``N = (h/p)(w/p)`` tokens of dimension ``D = C p²``: 256 px
→ 32×32×4 latents → 256 tokens of dim 16. Tokens run row-major over the patch grid, and
inside a token the channel is the slowest index (the order MAR uses):

    token[b, r·(w/p) + s, c·p² + i·p + j] = z̃[b, c, r·p + i, s·p + j]

Weights load from and export to the ``diffusers`` layout: see :mod:`kineflow.interop.diffusers`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from kineflow.config import check_config_keys
from kineflow.io import load_pretrained, save_pretrained_folder
from kineflow.tokenizers.autoencoder import AutoencoderConfig, Decoder, Encoder

KINEFLOW_TYPE = "kl_vae"

__all__ = [
    "AutoencoderKL",
    "DiagonalGaussian",
    "KLConfig",
    "patchify",
    "unpatchify",
]


# -- configuration -------------------------------------------------------------------------------
@dataclass
class KLConfig:
    """Shape and training settings of a KL autoencoder; the defaults are SD's KL-f8 at 256 px.

    The encoder / decoder fields mean what they mean in
    :class:`~kineflow.tokenizers.autoencoder.AutoencoderConfig` (level widths are
    ``channels * channel_mult[i]``; ``num_res_blocks`` per encoder level, one more per decoder
    level); ``z_channels`` is the latent channel count ``C``.
    """

    in_channels: int = 3
    out_channels: int = 3
    channels: int = 128
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 4
    norm_groups: int = 32
    dropout: float = 0.0
    image_size: int = 256  # the default token grid; any multiple of downsample * patch_size works
    patch_size: int = 2
    scaling_factor: float = 0.18215
    shift_factor: float = 0.0
    kl_weight: float = 1e-6
    recon_loss: str = "l1"  # "l1" or "l2"
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True

    def __post_init__(self) -> None:
        self.channel_mult = tuple(int(m) for m in self.channel_mult)
        self.autoencoder_config()  # validates the encoder / decoder fields
        if self.in_channels < 1 or self.out_channels < 1:
            raise ValueError(
                f"in_channels and out_channels must be >= 1, got {self.in_channels} and "
                f"{self.out_channels}"
            )
        if self.patch_size < 1:
            raise ValueError(f"patch_size must be >= 1, got {self.patch_size}")
        unit = self.downsample * self.patch_size
        if self.image_size < 1 or self.image_size % unit:
            raise ValueError(
                f"image_size must be a positive multiple of downsample * patch_size = "
                f"{self.downsample} * {self.patch_size} = {unit}, got {self.image_size}"
            )
        if not self.scaling_factor > 0:
            raise ValueError(f"scaling_factor must be > 0, got {self.scaling_factor}")
        if not self.kl_weight >= 0:
            raise ValueError(f"kl_weight must be >= 0, got {self.kl_weight}")
        if self.recon_loss not in ("l1", "l2"):
            raise ValueError(f"recon_loss must be 'l1' or 'l2', got {self.recon_loss!r}")

    def autoencoder_config(self) -> AutoencoderConfig:
        """The shared encoder / decoder configuration (``double_z``, mid-block attention)."""
        return AutoencoderConfig(
            in_channels=self.in_channels,
            out_channels=self.out_channels,
            channels=self.channels,
            channel_mult=self.channel_mult,
            num_res_blocks=self.num_res_blocks,
            z_channels=self.z_channels,
            double_z=True,
            attn_resolutions="mid",
            norm_groups=self.norm_groups,
            dropout=self.dropout,
        )

    @property
    def downsample(self) -> int:
        """Spatial reduction factor ``f = 2^(L-1)`` from pixels to latents."""
        return 2 ** (len(self.channel_mult) - 1)

    @property
    def token_dim(self) -> int:
        """Dimension of one token, ``z_channels * patch_size²`` (16 for KL-f8 with 2x2)."""
        return self.z_channels * self.patch_size**2

    @property
    def latent_size(self) -> int:
        """Latent side ``image_size / f`` at the configured image size."""
        return self.image_size // self.downsample

    @property
    def grid_size(self) -> int:
        """Token grid side ``image_size / (f p)`` at the configured image size."""
        return self.latent_size // self.patch_size

    @property
    def num_tokens(self) -> int:
        """Tokens per image at the configured size (256 for KL-f8, 256 px, 2x2 patches)."""
        return self.grid_size**2

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["channel_mult"] = list(self.channel_mult)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> KLConfig:
        """Inverse of :meth:`to_dict`; unknown keys raise ``ValueError`` naming them."""
        check_config_keys(d, cls, "KLConfig")
        return cls(**d)


# -- posterior ------------------------------------------------------------------------------------
class DiagonalGaussian:
    """The posterior ``N(μ, diag σ²)`` given encoder moments ``[B, 2C, h, w]``.

    The first ``C`` channels are ``μ``, the last ``C`` are ``log σ²``, clamped to ``[-30, 20]``
    so that ``σ²`` neither underflows to 0 nor overflows (the same clamp as SD / diffusers).
    """

    def __init__(self, moments: Tensor) -> None:
        if not isinstance(moments, Tensor) or moments.ndim < 2 or moments.shape[1] % 2:
            shape = tuple(moments.shape) if isinstance(moments, Tensor) else type(moments)
            raise ValueError(f"moments must be a tensor [B, 2C, ...], got {shape}")
        self.moments = moments
        self.mean, logvar = moments.chunk(2, dim=1)
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def mode(self) -> Tensor:
        """The posterior mode (= mean) ``μ``: ``[B, C, h, w]``."""
        return self.mean

    def sample(self, generator: torch.Generator | None = None) -> Tensor:
        """A reparameterised draw ``μ + σ ε`` (differentiable in μ and σ): ``[B, C, h, w]``.

        ``ε`` is drawn in float32 on the generator's device and then cast, so a seeded
        generator gives the same noise whatever the model's dtype or device.
        """
        device = generator.device if generator is not None else self.mean.device
        eps = torch.randn(self.mean.shape, generator=generator, device=device)
        return self.mean + self.std * eps.to(device=self.mean.device, dtype=self.mean.dtype)

    def kl(self) -> Tensor:
        """``KL(q ‖ N(0, I)) = ½ Σ (μ² + σ² − 1 − log σ²)`` summed over all but the batch dim:
        Float32[B] (accumulated in float32 so bf16 latents do not lose the sum)."""
        mean, var, logvar = self.mean.float(), self.var.float(), self.logvar.float()
        return 0.5 * (mean.square() + var - 1.0 - logvar).flatten(1).sum(1)


# -- patchify -------------------------------------------------------------------------------------
def patchify(latents: Tensor, patch_size: int) -> Tensor:
    """``[B, C, h, w]`` -> ``[B, (h/p)(w/p), C p²]``; order in the module docstring.

    ``h`` and ``w`` must be divisible by ``p``.
    """
    B, C, h, w = latents.shape
    p = patch_size
    if h % p or w % p:
        raise ValueError(
            f"latent height and width must be divisible by patch_size {p}, got {h}x{w}"
        )
    x = latents.reshape(B, C, h // p, p, w // p, p)
    x = x.permute(0, 2, 4, 1, 3, 5)  # [B, h/p, w/p, C, p, p]: channel slowest inside a token
    return x.reshape(B, (h // p) * (w // p), C * p * p)


def unpatchify(tokens: Tensor, height: int, width: int, patch_size: int) -> Tensor:
    """Exact inverse of :func:`patchify`: ``[B, (h/p)(w/p), C p²]`` -> ``[B, C, h, w]`` with
    ``h, w = height, width`` (latent size, divisible by ``p``)."""
    B, N, D = tokens.shape
    p = patch_size
    if height % p or width % p:
        raise ValueError(
            f"latent height and width must be divisible by patch_size {p}, got {height}x{width}"
        )
    gh, gw = height // p, width // p
    if gh * gw != N:
        raise ValueError(
            f"got {N} tokens but a {height}x{width} latent in {p}x{p} patches has "
            f"{gh}x{gw} = {gh * gw}"
        )
    if D % (p * p):
        raise ValueError(f"token dim {D} is not a multiple of patch_size² = {p * p}")
    x = tokens.reshape(B, gh, gw, D // (p * p), p, p).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(B, D // (p * p), height, width)


# -- the model ------------------------------------------------------------------------------------
class AutoencoderKL(nn.Module):
    """SD-style KL autoencoder and UniFluid's continuous image tokenizer.

    Shapes (``f`` = :attr:`KLConfig.downsample`, ``C`` = ``z_channels``, ``p`` = ``patch_size``):
    images Float[B, 3, H, W] in [-1, 1] with ``H, W`` multiples of ``f`` (of ``f p`` for tokens);
    latents Float[B, C, H/f, W/f]; tokens Float[B, (H/fp)(W/fp), C p²].

    Inputs are cast to the parameters' dtype (so float32 images feed a bf16 model); outputs have
    the parameters' dtype, except losses and KL, which are float32.
    """

    def __init__(self, config: KLConfig | None = None) -> None:
        super().__init__()
        self.config = config if config is not None else KLConfig()
        cfg = self.config
        ae = cfg.autoencoder_config()
        z = cfg.z_channels
        self.encoder = Encoder(ae)
        self.quant_conv = nn.Conv2d(2 * z, 2 * z, 1) if cfg.use_quant_conv else None
        self.post_quant_conv = nn.Conv2d(z, z, 1) if cfg.use_post_quant_conv else None
        self.decoder = Decoder(ae)

    @property
    def dtype(self) -> torch.dtype:
        return self.encoder.conv_in.weight.dtype

    # -- validation -------------------------------------------------------------------------
    def _check_images(self, images: Tensor, multiple: int, why: str) -> Tensor:
        c = self.config.in_channels
        if not isinstance(images, Tensor):
            raise ValueError(f"images must be a torch.Tensor, got {type(images).__name__}")
        if images.ndim != 4 or images.shape[1] != c:
            raise ValueError(f"images must have shape [B, {c}, H, W], got {tuple(images.shape)}")
        if not images.is_floating_point():
            raise ValueError(f"images must be floating point (in [-1, 1]), got {images.dtype}")
        H, W = images.shape[-2:]
        if H == 0 or W == 0 or H % multiple or W % multiple:
            raise ValueError(
                f"image height and width must be positive multiples of {multiple} ({why}), "
                f"got {H}x{W}"
            )
        return images.to(self.dtype)

    def _check_latents(self, latents: Tensor, multiple: int = 1) -> Tensor:
        C = self.config.z_channels
        if not isinstance(latents, Tensor):
            raise ValueError(f"latents must be a torch.Tensor, got {type(latents).__name__}")
        if latents.ndim != 4 or latents.shape[1] != C:
            raise ValueError(
                f"latents must have shape [B, {C}, h, w] (z_channels = {C}), "
                f"got {tuple(latents.shape)}"
            )
        if not latents.is_floating_point():
            raise ValueError(f"latents must be floating point, got {latents.dtype}")
        h, w = latents.shape[-2:]
        if h == 0 or w == 0 or h % multiple or w % multiple:
            raise ValueError(
                f"latent height and width must be positive multiples of patch_size {multiple}, "
                f"got {h}x{w}"
            )
        return latents

    def _check_tokens(self, tokens: Tensor, h: int, w: int) -> None:
        D, p = self.config.token_dim, self.config.patch_size
        if not isinstance(tokens, Tensor):
            raise ValueError(f"tokens must be a torch.Tensor, got {type(tokens).__name__}")
        if tokens.ndim != 3 or tokens.shape[-1] != D:
            raise ValueError(
                f"tokens must have shape [B, N, {D}] (token_dim = z_channels * patch_size² = "
                f"{self.config.z_channels} * {p}²), got {tuple(tokens.shape)}"
            )
        if not tokens.is_floating_point():
            raise ValueError(f"tokens must be floating point, got {tokens.dtype}")
        if h < 1 or w < 1 or h % p or w % p:
            raise ValueError(
                f"latent height and width must be positive multiples of patch_size {p}, got {h}x{w}"
            )
        if tokens.shape[1] != (h // p) * (w // p):
            raise ValueError(
                f"got {tokens.shape[1]} tokens but a {h}x{w} latent in {p}x{p} patches has "
                f"{h // p}x{w // p} = {(h // p) * (w // p)}"
            )

    # -- autoencoding -----------------------------------------------------------------------
    def encode(self, images: Tensor) -> DiagonalGaussian:
        """Images [B, 3, H, W] -> posterior over latents [B, C, H/f, W/f]."""
        f = self.config.downsample
        x = self._check_images(images, f, f"the downsampling factor {f}")
        moments = self.encoder(x)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        return DiagonalGaussian(moments)

    def decode(self, latents: Tensor) -> Tensor:
        """Latents [B, C, h, w] (unscaled) -> images [B, 3, h f, w f]."""
        z = self._check_latents(latents).to(self.dtype)
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def forward(
        self, images: Tensor, sample: bool = True, generator: torch.Generator | None = None
    ) -> tuple[Tensor, DiagonalGaussian]:
        """Reconstruct through a posterior sample (``sample=True``) or the mode; returns
        ``(reconstructions [B, 3, H, W], posterior)``."""
        posterior = self.encode(images)
        z = posterior.sample(generator) if sample else posterior.mode()
        return self.decode(z), posterior

    def training_losses(
        self, images: Tensor, generator: torch.Generator | None = None
    ) -> dict[str, Tensor]:
        """``{"loss": rec + kl_weight * kl, "recon": rec, "kl": kl}`` (float32 scalars; only
        ``loss`` carries gradients). ``rec`` is the per-element mean L1 / L2 error of a
        reconstruction through a posterior sample, ``kl`` the batch mean of
        :meth:`DiagonalGaussian.kl`."""
        reconstructions, posterior = self(images, sample=True, generator=generator)
        diff = reconstructions.float() - images.to(reconstructions.dtype).float()
        recon = diff.abs().mean() if self.config.recon_loss == "l1" else diff.square().mean()
        kl = posterior.kl().mean()
        loss = recon + self.config.kl_weight * kl
        return {"loss": loss, "recon": recon.detach(), "kl": kl.detach()}

    def reconstruct(self, images: Tensor) -> Tensor:
        """Decode the posterior mode: the deterministic reconstruction [B, 3, H, W]. Autograd
        is left to the caller (wrap in ``torch.no_grad()`` for evaluation)."""
        return self.decode(self.encode(images).mode())

    # -- latent normalisation and tokens ----------------------------------------------------
    def scale(self, latents: Tensor) -> Tensor:
        """``(z − shift_factor) · scaling_factor``: latents at roughly unit variance."""
        return (latents - self.config.shift_factor) * self.config.scaling_factor

    def unscale(self, latents: Tensor) -> Tensor:
        """Inverse of :meth:`scale`: ``z̃ / scaling_factor + shift_factor``."""
        return latents / self.config.scaling_factor + self.config.shift_factor

    def latents_to_tokens(self, latents: Tensor) -> Tensor:
        """Latents [B, C, h, w] -> tokens [B, (h/p)(w/p), C p²] (order: module docstring)."""
        p = self.config.patch_size
        return patchify(self._check_latents(latents, p), p)

    def tokens_to_latents(self, tokens: Tensor, h: int, w: int) -> Tensor:
        """Exact inverse of :meth:`latents_to_tokens` for a latent of height ``h`` and width
        ``w`` (latent pixels, not patches): tokens [B, (h/p)(w/p), C p²] -> [B, C, h, w]."""
        self._check_tokens(tokens, h, w)
        return unpatchify(tokens, h, w, self.config.patch_size)

    def images_to_tokens(
        self, images: Tensor, sample: bool = False, generator: torch.Generator | None = None
    ) -> Tensor:
        """Encode (mode, or a posterior sample), scale, patchify: images [B, 3, H, W] ->
        tokens [B, (H/fp)(W/fp), C p²] (256 x 16 for KL-f8 at 256 px)."""
        fp = self.config.downsample * self.config.patch_size
        self._check_images(images, fp, f"downsampling factor x patch_size = {fp}")
        posterior = self.encode(images)
        z = posterior.sample(generator) if sample else posterior.mode()
        return patchify(self.scale(z), self.config.patch_size)

    def tokens_to_images(self, tokens: Tensor, grid: int | tuple[int, int] | None = None) -> Tensor:
        """Unpatchify, unscale, decode: tokens [B, gh gw, C p²] -> images [B, 3, gh f p, gw f p].

        ``grid`` is the token grid ``(gh, gw)`` (an int for square), by default the configured
        ``image_size`` grid.
        """
        if grid is None:
            grid = self.config.grid_size
        grid = (grid, grid) if isinstance(grid, int) else tuple(grid)
        if len(grid) != 2 or not all(isinstance(g, int) for g in grid):
            raise ValueError(f"grid must be an int or a pair (rows, cols) of ints, got {grid}")
        gh, gw = grid
        p = self.config.patch_size
        latents = self.tokens_to_latents(tokens, gh * p, gw * p)
        return self.decode(self.unscale(latents))

    # -- kineflow files ---------------------------------------------------------------------
    def save_pretrained(self, folder: str | os.PathLike[str]) -> Path:
        """Write ``model.safetensors`` and ``config.json`` (``"kineflow_type": "kl_vae"`` plus
        the :class:`KLConfig` fields) into ``folder`` (created if needed), each atomically;
        returns the folder. Weights keep the model's dtype."""
        return save_pretrained_folder(
            folder, self.state_dict(), self.config.to_dict(), KINEFLOW_TYPE
        )

    @classmethod
    def from_pretrained(
        cls,
        folder: str | os.PathLike[str],
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> AutoencoderKL:
        """Load what :meth:`save_pretrained` wrote. ``dtype`` defaults to the stored one.

        Raises:
            FileNotFoundError: no folder, ``config.json`` or ``model.safetensors``.
            ValueError: the folder holds another model type, a config :class:`KLConfig`
                rejects, or weights that do not match the configuration (names the missing /
                unexpected / mis-shaped keys).
        """
        model = load_pretrained(
            folder,
            KINEFLOW_TYPE,
            "KL autoencoder",
            lambda d: cls(KLConfig.from_dict(d)),
            dtype=dtype,
            diffusers_hints={
                "AutoencoderKL": "use kineflow.interop.diffusers.kl_vae_from_diffusers"
            },
        )
        return model.to(device) if device is not None else model
