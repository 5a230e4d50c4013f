"""The discrete image tokenizer of Janus and FUDOKI: LlamaGen's VQ-16.

An image becomes a grid of codebook indices and back:

    x [B, 3, H, W] in [-1, 1] -> encoder -> quant_conv (1x1)     z  [B, d, h, w]   (h = H / f)
                              -> nearest codebook row           id [B, h, w] in [0, K)
    id -> codebook row -> post_quant_conv (1x1) -> decoder      x̂  [B, 3, H, W]

with ``f = 2^(L-1)`` the downsample factor of the shared encoder / decoder
(:mod:`kineflow.tokenizers.autoencoder`), ``K`` codes of dimension ``d``.

Quantisation. With ``l2_norm`` (LlamaGen, Janus) only directions matter: the latent and every
codebook row ``e_k`` are put on the unit sphere before comparing them,

    ẑ = z / ||z||,   ê_k = e_k / ||e_k||,   id = argmin_k ||ẑ − ê_k||²  (= argmax_k ⟨ẑ, ê_k⟩),

and decoding looks up ``ê_id``. Training passes gradients through the non-differentiable
argmin with the straight-through estimator ``z_q = ẑ + sg(ê_id − ẑ)`` (forward value ``ê_id``,
identity Jacobian to ``ẑ``) and adds the VQ-VAE terms, ``sg`` = stop-gradient,

    L_codebook = mean ||sg(ẑ) − ê_id||²          (moves the codes towards the latents)
    L_commit   = β · mean ||ẑ − sg(ê_id)||²      (keeps the latents near their codes)

and, optionally, LlamaGen's entropy regulariser on the soft assignment
``p_n = softmax(−||ẑ_n − ê||² / τ)`` over the codes,

    L_entropy = λ · (mean_n H(p_n) − H(mean_n p_n)),

low when each latent picks one code confidently while the batch as a whole spreads over the
codebook (a remedy against dead codes). The pixel term is ``mean |x̂ − x|`` (or its square);
the training loss is the sum of all four.

Janus's tokenizer (:meth:`VQConfig.janus`): channels 128 x (1, 1, 2, 2, 4), 2 residual blocks
per encoder level (3 per decoder level), z 256, attention at the lowest resolution,
K = 16384 codes of d = 8, f = 16, so a 384 px image is 24 x 24 = 576 tokens.

Checkpoints. The state-dict keys of :class:`VQModel` are Janus's ``gen_vision_model.*`` keys
without the prefix, so :meth:`VQModel.from_janus_state_dict` loads a Janus / FUDOKI state dict
strictly. The one Janus tensor with no counterpart is LlamaGen's training-time history buffer
``quantize.codebook_used`` (never updated in Janus): it is skipped. Two deliberate departures
from the official code: every op keeps the module dtype (its upsampler casts non-float32
inputs to float16, which breaks bfloat16), and the nearest-code search always runs in float32
so that ids do not flip with the compute dtype.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kineflow.config import check_config_keys
from kineflow.io import CONFIG_NAME as CONFIG_NAME
from kineflow.io import WEIGHTS_NAME as WEIGHTS_NAME
from kineflow.io import check_state_dict, load_pretrained, save_pretrained_folder
from kineflow.tokenizers.autoencoder import AutoencoderConfig, Decoder, Encoder

#: Value of the ``kineflow_type`` field in a saved tokenizer's ``config.json``.
KINEFLOW_TYPE = "vq"
#: Where the generation tokenizer lives in a Janus / FUDOKI state dict.
JANUS_PREFIX = "gen_vision_model."
#: Janus tensors (after the prefix) with no counterpart here; loading skips them.
JANUS_SKIPPED_KEYS: tuple[str, ...] = ("quantize.codebook_used",)

RECON_LOSSES = ("l1", "l2")


def _check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


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
        _check_positive_int("codebook_size", self.codebook_size)
        _check_positive_int("codebook_dim", self.codebook_dim)
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
            _check_positive_int("image_size", self.image_size)
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


# -- the quantizer -----------------------------------------------------------------------------


class QuantizerOutput(NamedTuple):
    """What :meth:`VectorQuantizer.forward` returns.

    ``z_q`` Float[B, d, h, w] (value: the chosen normalised codes, gradient: straight-through
    to the latents, input dtype); ``ids`` Long[B, h, w]; ``losses`` float32 scalars
    ``codebook``, ``commitment`` (already times β) and ``entropy`` (already times λ, zero when
    λ = 0); ``usage`` the fraction of the K codes used in this batch and ``perplexity``
    ``exp(H)`` of the batch's code histogram (both float32 scalars, no gradient).
    """

    z_q: Tensor
    ids: Tensor
    losses: dict[str, Tensor]
    usage: Tensor
    perplexity: Tensor


def _check_code_range(name: str, ids: Tensor, codebook_size: int) -> None:
    """Raise a ValueError naming the first id outside ``[0, codebook_size)`` and its index."""
    if ids.numel() == 0:
        return
    bad = (ids < 0) | (ids >= codebook_size)
    if bad.any():
        where = tuple(torch.nonzero(bad)[0].tolist())
        raise ValueError(
            f"{name} must lie in [0, {codebook_size}); found {int(ids[where])} at index "
            f"{list(where)} ({int(bad.sum())} id(s) out of range, min {int(ids.min())}, "
            f"max {int(ids.max())})"
        )


def usage_stats(ids: Tensor, codebook_size: int) -> tuple[Tensor, Tensor]:
    """Fraction of codes that occur in ``ids`` and ``exp`` of the entropy of their histogram
    (the perplexity: 1 when one code is used, K when all are used equally often)."""
    counts = torch.bincount(ids.detach().flatten(), minlength=codebook_size).float()
    p = counts / counts.sum().clamp_min(1.0)
    return (counts > 0).float().mean(), torch.exp(-torch.special.xlogy(p, p).sum())


class VectorQuantizer(nn.Module):
    """Nearest-neighbour quantisation against a learned codebook ``embedding.weight [K, d]``.

    See the module docstring for the maths. The nearest-code search runs without gradient in
    float32, over blocks of at most :attr:`chunk_elements` distances, so memory stays
    ``O(rows * K)`` and never ``O(N * K * d)``; the entropy regulariser (only when its ratio is
    positive) does need the full differentiable ``[N, K]`` distance matrix.
    """

    #: Largest ``[rows, K]`` block of distances the nearest-code search materialises at once.
    chunk_elements: int = 1 << 22

    def __init__(
        self,
        codebook_size: int,
        codebook_dim: int,
        *,
        l2_norm: bool = True,
        commit_beta: float = 0.25,
        entropy_loss_ratio: float = 0.0,
        entropy_temperature: float = 0.01,
    ) -> None:
        super().__init__()
        _check_positive_int("codebook_size", codebook_size)
        _check_positive_int("codebook_dim", codebook_dim)
        self.codebook_size = codebook_size
        self.codebook_dim = codebook_dim
        self.l2_norm = l2_norm
        self.commit_beta = float(commit_beta)
        self.entropy_loss_ratio = float(entropy_loss_ratio)
        self.entropy_temperature = float(entropy_temperature)
        self.embedding = nn.Embedding(codebook_size, codebook_dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """LlamaGen's initialisation: ``U(-1/K, 1/K)``, rows then normalised if ``l2_norm``."""
        with torch.no_grad():
            w = self.embedding.weight
            w.uniform_(-1.0 / self.codebook_size, 1.0 / self.codebook_size)
            if self.l2_norm:
                w.copy_(F.normalize(w, dim=-1))

    def extra_repr(self) -> str:
        return (
            f"codebook_size={self.codebook_size}, codebook_dim={self.codebook_dim}, "
            f"l2_norm={self.l2_norm}, commit_beta={self.commit_beta}, "
            f"entropy_loss_ratio={self.entropy_loss_ratio}"
        )

    def codebook(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """Float[K, d]: the vectors latents are compared with and decoded from (unit rows when
        ``l2_norm``). Normalised in float32 whatever the parameter dtype, then cast."""
        w = self.embedding.weight.float()
        if self.l2_norm:
            w = F.normalize(w, dim=-1)
        return w.to(dtype)

    def _flat_latents(self, z: Tensor) -> Tensor:
        """Float[B, d, h, w] -> float32 [B h w, d], normalised when ``l2_norm``."""
        if not isinstance(z, Tensor) or z.ndim != 4 or z.shape[1] != self.codebook_dim:
            shape = tuple(z.shape) if isinstance(z, Tensor) else type(z).__name__
            raise ValueError(f"latents must be [B, {self.codebook_dim}, h, w], got {shape}")
        if not z.is_floating_point():
            raise ValueError(f"latents must be floating point, got dtype {z.dtype}")
        flat = z.permute(0, 2, 3, 1).reshape(-1, self.codebook_dim).float()
        return F.normalize(flat, dim=-1) if self.l2_norm else flat

    @staticmethod
    def _sq_distances(z: Tensor, e: Tensor) -> Tensor:
        """``||z_n − e_k||²`` for all pairs, expanded as ``|z|² + |e|² − 2 z·e`` so that only a
        ``[N, K]`` matrix is formed: [N, d], [K, d] -> [N, K]."""
        return z.square().sum(-1, keepdim=True) + e.square().sum(-1) - 2.0 * (z @ e.T)

    @torch.no_grad()
    def nearest(self, flat: Tensor) -> Tensor:
        """Float32 [N, d] (already normalised if ``l2_norm``) -> Long[N], the nearest code.

        Ties go to the lowest index (``argmin``). On GPUs, enabling TF32 matmuls
        (``torch.backends.cuda.matmul.allow_tf32``) would make this search less precise."""
        e = self.codebook()
        rows = max(1, self.chunk_elements // self.codebook_size)
        ids = torch.empty(flat.shape[0], dtype=torch.long, device=flat.device)
        for start in range(0, flat.shape[0], rows):
            ids[start : start + rows] = self._sq_distances(flat[start : start + rows], e).argmin(-1)
        return ids

    def encode(self, z: Tensor) -> Tensor:
        """Latents Float[B, d, h, w] -> ids Long[B, h, w] (no gradient, no losses)."""
        B, _, h, w = z.shape
        return self.nearest(self._flat_latents(z).detach()).view(B, h, w)

    def entropy_loss(self, flat: Tensor, codebook: Tensor) -> Tensor:
        """``mean_n H(p_n) − H(mean_n p_n)`` with ``p_n = softmax(−||z_n − e||² / τ)``, unscaled.

        This is the exact entropy. LlamaGen adds ``1e-5`` inside the log of the average, which
        lowers that term by up to ``K · 1e-5`` nats (a near-constant offset, so gradients
        barely differ); its per-sample term is the same."""
        logp = torch.log_softmax(-self._sq_distances(flat, codebook) / self.entropy_temperature, -1)
        p = logp.exp()
        per_sample = -(p * logp).sum(-1).mean()
        avg = p.mean(0)
        # Clamped log: an average probability can underflow to exactly 0 (logits span 4 / τ).
        return per_sample + (avg * avg.clamp_min(1e-30).log()).sum()

    def forward(self, z: Tensor) -> QuantizerOutput:
        """Quantise latents ``z`` Float[B, d, h, w]; see :class:`QuantizerOutput`."""
        B, _, h, w = z.shape
        flat = self._flat_latents(z)
        ids = self.nearest(flat.detach())
        codebook = self.codebook()
        q = codebook[ids]  # differentiable in embedding.weight: the codebook loss trains it
        losses = {
            "codebook": F.mse_loss(q, flat.detach()),
            "commitment": self.commit_beta * F.mse_loss(flat, q.detach()),
            "entropy": (
                self.entropy_loss_ratio * self.entropy_loss(flat, codebook)
                if self.entropy_loss_ratio > 0
                else flat.new_zeros(())
            ),
        }
        z_q = flat + (q - flat).detach()
        z_q = z_q.view(B, h, w, self.codebook_dim).permute(0, 3, 1, 2).contiguous().to(z.dtype)
        usage, perplexity = usage_stats(ids, self.codebook_size)
        return QuantizerOutput(z_q, ids.view(B, h, w), losses, usage, perplexity)

    def lookup(self, ids: Tensor) -> Tensor:
        """Ids Long[B, h, w] -> codebook vectors Float[B, d, h, w] (normalised when ``l2_norm``)
        in the parameter dtype."""
        if not isinstance(ids, Tensor) or ids.dtype != torch.long or ids.ndim != 3:
            got = f"{ids.dtype} {tuple(ids.shape)}" if isinstance(ids, Tensor) else type(ids)
            raise ValueError(f"ids must be a torch.long tensor [B, h, w], got {got}")
        _check_code_range("ids", ids, self.codebook_size)
        return F.embedding(ids, self.codebook(self.embedding.weight.dtype)).permute(0, 3, 1, 2)


class CodebookUsage:
    """Code counts accumulated over many batches, for reporting usage and dead codes.

    ``usage = CodebookUsage(K); for x in loader: usage.update(model.encode(x))``, then
    :meth:`summary`. Counts live on the CPU as int64.
    """

    def __init__(self, codebook_size: int) -> None:
        _check_positive_int("codebook_size", codebook_size)
        self.codebook_size = codebook_size
        self.counts = torch.zeros(codebook_size, dtype=torch.long)

    def reset(self) -> None:
        self.counts.zero_()

    def update(self, ids: Tensor) -> None:
        """Add the codes of an id tensor of any shape (Long, values in ``[0, K)``)."""
        if not isinstance(ids, Tensor) or ids.dtype != torch.long:
            got = ids.dtype if isinstance(ids, Tensor) else type(ids).__name__
            raise ValueError(f"ids must be a torch.long tensor, got {got}")
        _check_code_range("ids", ids, self.codebook_size)
        self.counts += torch.bincount(ids.detach().flatten(), minlength=self.codebook_size).cpu()

    @property
    def total(self) -> int:
        """Number of ids counted so far."""
        return int(self.counts.sum())

    def used_fraction(self) -> float:
        return float((self.counts > 0).float().mean())

    def perplexity(self) -> float:
        p = self.counts.double() / max(self.total, 1)
        return float(torch.exp(-torch.special.xlogy(p, p).sum()))

    def dead_codes(self) -> Tensor:
        """Long[M]: the codes never seen, ascending."""
        return torch.nonzero(self.counts == 0).flatten()

    def summary(self) -> dict[str, float | int]:
        return {
            "tokens": self.total,
            "used_fraction": self.used_fraction(),
            "perplexity": self.perplexity(),
            "dead_codes": int((self.counts == 0).sum()),
        }


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
        _check_code_range("ids", ids, self.codebook_size)
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
    @classmethod
    def from_janus_state_dict(
        cls,
        state_dict: Mapping[str, Tensor],
        config: VQConfig | None = None,
        prefix: str = JANUS_PREFIX,
    ) -> VQModel:
        """Build from a Janus / FUDOKI state dict (``config`` defaults to :meth:`VQConfig.janus`).

        Only the keys under ``prefix`` are used (pass ``""`` for a bare tokenizer state dict);
        :data:`JANUS_SKIPPED_KEYS` are dropped. The rest must match the model exactly: any
        missing, unexpected or mis-shaped key raises one ValueError naming all of them.
        Weights are copied into the model's float32 parameters.
        """
        sub = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
        if not sub:
            sample = ", ".join(list(state_dict)[:5])
            raise ValueError(
                f"no key of the state dict starts with {prefix!r} ({len(state_dict)} keys, "
                f"e.g. {sample})"
            )
        for key in JANUS_SKIPPED_KEYS:
            sub.pop(key, None)
        model = cls(config)
        check_state_dict(
            model.state_dict(), sub, f"the {prefix!r} tensors of the state dict", prefix=prefix
        )
        model.load_state_dict(sub, strict=True)
        return model

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
