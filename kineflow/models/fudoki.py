"""FUDOKI's unified model in Janus's layout: one bidirectional Llama over text and image tokens.

A sequence of ``N`` positions mixes three kinds of inputs, each embedded to width ``D``:

    text id t              -> language_model.model.embed_tokens(t)
    generation image id k  -> gen_aligner(gen_embed(k))          (VQ code, k in [0, K))
    understanding image    -> aligner(vision_tower(pixels))      (one row per SigLIP patch,
                              [+ understanding_pos_embed]          replacing the placeholders)

with ``gen_embed`` an ``[K, d]`` table (Janus: 16384 x 8), ``gen_aligner`` and ``aligner`` MLPs
``Linear, GELU, Linear`` (``d -> D -> D`` and ``D_vision -> D -> D``). The Llama backbone runs
with **full** (bidirectional) attention over the real tokens by default (FUDOKI has no time
input: the noisy sequence itself tells the model how far along it is) and returns
``h [B, N, D]``. Two heads read it:

    text head   lm_head                             D -> V      (untied from embed_tokens)
    image head  gen_head = vision_head(GELU(output_mlp_projector(h)))   D -> D_g -> K

**Shifted logits** (docs/design.md §1.5): the prediction for position ``i`` is read from the
hidden state at ``i - 1``, exactly as in autoregressive training, so the AR-pretrained Janus
heads keep their meaning:

    logits[:, 0] = 0,      logits[:, i] = head(h[:, i - 1])   for 1 <= i < N.

Checkpoints: submodule names are Janus's (prefixes ``language_model.model.*``,
``language_model.lm_head.*``, ``vision_model.vision_tower.*``, ``aligner.layers.{0,2}.*``,
``gen_vision_model.*``, ``gen_aligner.layers.{0,2}.*``,
``gen_head.{output_mlp_projector,vision_head}.*``, ``gen_embed.weight``), so a Janus / FUDOKI
state dict loads strictly; :mod:`kineflow.interop.janus` reads Janus's ``config.json`` and
weights.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import Tensor, nn

from kineflow.config import check_config_keys
from kineflow.models.llama import LlamaConfig, LlamaModel
from kineflow.models.masking import KVCache
from kineflow.models.siglip import SiglipConfig, SiglipVisionModel
from kineflow.tokenizers.vq import VQConfig, VQModel

__all__ = ["FudokiConfig", "FudokiModel", "MlpAligner", "VisionHead"]


def _positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


@dataclass
class FudokiConfig:
    """Shape of a :class:`FudokiModel`.

    ``vision`` is None for a generation-only model (no ``vision_model`` / ``aligner``).
    ``aligner_hidden`` and ``gen_aligner_hidden`` are the MLP widths (Janus's ``n_embed``); as
    the aligners feed the language model they must equal ``language.hidden_size``.
    ``*_depth`` counts Linear layers (Janus: 2, so the state-dict keys are ``layers.0`` and
    ``layers.2``). ``gen_head_hidden`` is Janus's ``image_token_embed``.
    ``image_mask_token`` adds one input-only image id ``K`` (a row of ``gen_embed``, never
    predicted by ``gen_head``) for the masked-path baseline; Janus has none.
    ``understanding_positions`` adds a learnt ``[P, D]`` table, one row per SigLIP patch, to
    the aligner's output (zeros at first; Janus has none). Why: the backbone's rotary
    positions tell attention how far apart two tokens are, not which patch a token is, and the
    aligner, trained only through the language model, keeps little of the tower's position
    (a linear probe reads a token's own cell from 0.90 of tower outputs, 0.56 of aligner
    outputs; docs/understanding.md, relations).
    """

    language: LlamaConfig
    gen_vision: VQConfig
    vision: SiglipConfig | None = None
    aligner_hidden: int = 2048
    aligner_depth: int = 2
    gen_aligner_hidden: int = 2048
    gen_aligner_depth: int = 2
    gen_head_hidden: int = 2048
    image_mask_token: bool = False
    understanding_positions: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.language, Mapping):
            self.language = LlamaConfig.from_dict(dict(self.language))
        if isinstance(self.gen_vision, Mapping):
            self.gen_vision = VQConfig.from_dict(self.gen_vision)
        if isinstance(self.vision, Mapping):
            self.vision = SiglipConfig.from_dict(self.vision)
        for name in (
            "aligner_hidden",
            "aligner_depth",
            "gen_aligner_hidden",
            "gen_aligner_depth",
            "gen_head_hidden",
        ):
            _positive_int(name, getattr(self, name))
        D = self.language.hidden_size
        widths = [("gen_aligner_hidden", self.gen_aligner_hidden)]
        if self.vision is not None:
            widths.append(("aligner_hidden", self.aligner_hidden))
        for name, width in widths:
            if width != D:
                raise ValueError(
                    f"{name}={width} must equal language.hidden_size={D} (its output is an "
                    "input embedding)"
                )

    @property
    def image_token_count(self) -> int:
        """Generation tokens per image, ``(image_size / 16)^2`` (576 for Janus at 384 px)."""
        size = self.gen_vision.image_size
        if size is None:
            raise ValueError("gen_vision.image_size is None: the token count is not fixed")
        return (size // self.gen_vision.downsample) ** 2

    @property
    def understanding_token_count(self) -> int:
        """Placeholder positions one understanding image fills (SigLIP patches, 576 for Janus)."""
        if self.vision is None:
            raise ValueError("this config has no understanding encoder (vision=None)")
        return self.vision.num_patches

    @classmethod
    def janus_1_3b(cls) -> FudokiConfig:
        """FUDOKI / Janus-1.3B (docs/design.md §1.5)."""
        return cls(
            language=LlamaConfig.janus_1_3b(),
            gen_vision=VQConfig.janus(),
            vision=SiglipConfig.janus_siglip_l16_384(),
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types: nested dicts for the sub-configs (``vision`` may be None)."""
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["language"] = self.language.to_dict()
        d["gen_vision"] = self.gen_vision.to_dict()
        d["vision"] = None if self.vision is None else self.vision.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> FudokiConfig:
        """Inverse of :meth:`to_dict`; unknown keys raise."""
        check_config_keys(d, cls, "FUDOKI config")
        return cls(**d)


# -- modules --------------------------------------------------------------------------------------
class MlpAligner(nn.Module):
    """Janus's ``MlpProjector`` (``mlp_gelu``): ``layers = [Linear(i, h), (GELU, Linear(h, h))
    x (depth - 1)]``, so depth 2 gives state-dict keys ``layers.0`` and ``layers.2``."""

    def __init__(self, input_dim: int, hidden: int, depth: int) -> None:
        super().__init__()
        modules: list[nn.Module] = [nn.Linear(input_dim, hidden)]
        for _ in range(depth - 1):
            modules += [nn.GELU(), nn.Linear(hidden, hidden)]
        self.layers = nn.Sequential(*modules)

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)


class VisionHead(nn.Module):
    """Janus's image head: ``vision_head(GELU(output_mlp_projector(h)))``, ``D -> D_g -> K``."""

    def __init__(self, hidden: int, embed: int, codebook_size: int) -> None:
        super().__init__()
        self.output_mlp_projector = nn.Linear(hidden, embed)
        self.vision_activation = nn.GELU()
        self.vision_head = nn.Linear(embed, codebook_size)

    def forward(self, h: Tensor) -> Tensor:
        return self.vision_head(self.vision_activation(self.output_mlp_projector(h)))


class _LanguageModel(nn.Module):
    """Container matching Janus's ``LlamaForCausalLM`` names: ``model`` and ``lm_head``."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.model = LlamaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)


class _VisionModel(nn.Module):
    """Container matching Janus's ``CLIPVisionTower``: the ViT lives under ``vision_tower``."""

    def __init__(self, config: SiglipConfig) -> None:
        super().__init__()
        self.vision_tower = SiglipVisionModel(config)


def shift_logits(logits: Tensor) -> Tensor:
    """``out[:, 0] = 0`` and ``out[:, i] = logits[:, i - 1]`` for ``logits [B, N, C]``."""
    return torch.cat([torch.zeros_like(logits[:, :1]), logits[:, :-1]], dim=1)


class FudokiModel(nn.Module):
    """FUDOKI / Janus: see the module docstring for the maths and the state-dict layout."""

    def __init__(self, config: FudokiConfig) -> None:
        super().__init__()
        self.config = config
        D = config.language.hidden_size
        K, d = config.gen_vision.codebook_size, config.gen_vision.codebook_dim
        self.language_model = _LanguageModel(config.language)
        self.vision_model: _VisionModel | None = None
        self.aligner: MlpAligner | None = None
        if config.vision is not None:
            self.vision_model = _VisionModel(config.vision)
            self.aligner = MlpAligner(
                config.vision.hidden_size, config.aligner_hidden, config.aligner_depth
            )
        self.understanding_pos_embed: nn.Parameter | None = None
        if config.vision is not None and config.understanding_positions:
            self.understanding_pos_embed = nn.Parameter(torch.zeros(config.vision.num_patches, D))
        self.gen_vision_model = VQModel(config.gen_vision)
        self.gen_aligner = MlpAligner(d, config.gen_aligner_hidden, config.gen_aligner_depth)
        self.gen_head = VisionHead(D, config.gen_head_hidden, K)
        # The mask id K (masked baseline only) is an input, never a prediction of gen_head.
        self.gen_embed = nn.Embedding(K + int(config.image_mask_token), d)

    # -- inputs ---------------------------------------------------------------------------------
    def embed(
        self,
        input_ids: Tensor,
        image_ids: Tensor | None = None,
        image_mask: Tensor | None = None,
        pixel_values: Tensor | None = None,
        understanding_mask: Tensor | None = None,
        understanding_features: Tensor | None = None,
    ) -> Tensor:
        """Input embeddings ``[B, N, D]``.

        ``input_ids [B, N]`` are text ids; whatever they hold at image positions is ignored.
        ``image_mask [B, N]`` (bool) marks generation-image positions, which get
        ``gen_aligner(gen_embed(k))`` with the VQ code ``k`` read from ``image_ids`` ([B, N],
        read at the marked positions, or [M] with one code per marked position in row-major
        order) or, when ``image_ids`` is None, from ``input_ids`` at those positions.
        ``understanding_mask [B, N]`` marks placeholder positions; they are filled, in
        row-major order, with ``aligner(vision_tower(pixel_values))`` rows, ``pixel_values``
        being ``[I, 3, S, S]`` or Janus's ``[B, n, 3, S, S]`` (flattened to ``B * n`` images),
        so the mask must hold exactly ``I * num_patches`` positions. ``understanding_features``
        (``[I, P, D]``, from :meth:`encode_images`) may replace ``pixel_values`` so that a
        sampler encodes its images once, not at every step.
        """
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be [B, N], got shape {tuple(input_ids.shape)}")
        shape = tuple(input_ids.shape)
        image_mask = self._check_mask("image_mask", image_mask, shape)
        understanding_mask = self._check_mask("understanding_mask", understanding_mask, shape)
        both = image_mask is not None and understanding_mask is not None
        if both and bool((image_mask & understanding_mask).any()):
            raise ValueError("image_mask and understanding_mask overlap")
        if image_mask is None and image_ids is not None:
            raise ValueError("image_ids needs image_mask (which positions hold image tokens)")
        if pixel_values is not None and understanding_features is not None:
            raise ValueError("pass pixel_values or understanding_features, not both")
        has_images = pixel_values is not None or understanding_features is not None
        if (understanding_mask is None) == has_images:
            raise ValueError(
                "pass understanding_mask together with pixel_values (or understanding_features)"
            )

        # Image positions may hold codes or negative placeholders: embed a harmless 0 there.
        non_text = torch.zeros_like(input_ids, dtype=torch.bool)
        for m in (image_mask, understanding_mask):
            if m is not None:
                non_text = non_text | m
        text_ids = input_ids.masked_fill(non_text, 0)
        embeds = self.language_model.model.embed_tokens(text_ids)

        if image_mask is not None:
            codes = self._image_codes(input_ids, image_ids, image_mask)
            gen = self.gen_aligner(self.gen_embed(codes)).to(embeds.dtype)
            embeds = embeds.masked_scatter(image_mask[..., None], gen)
        if understanding_mask is not None:
            feats = understanding_features
            if feats is None:
                feats = self.encode_images(pixel_values)
            feats = feats.to(embeds.dtype)  # [I, P, D]
            n_pos = int(understanding_mask.sum())
            if n_pos != feats.shape[0] * feats.shape[1]:
                raise ValueError(
                    f"understanding_mask marks {n_pos} positions but the {feats.shape[0]} "
                    f"image(s) give {feats.shape[0]} x {feats.shape[1]} features"
                )
            embeds = embeds.masked_scatter(understanding_mask[..., None], feats.flatten(0, 1))
        return embeds

    def encode_images(self, pixel_values: Tensor) -> Tensor:
        """Understanding features ``aligner(vision_tower(x))`` (``+ understanding_pos_embed``
        with ``understanding_positions``): [I, 3, S, S] (or [B, n, 3, S, S]) -> [I, P, D]."""
        if self.vision_model is None or self.aligner is None:
            raise ValueError("this model has no understanding encoder (config.vision is None)")
        if pixel_values.ndim == 5:
            pixel_values = pixel_values.flatten(0, 1)
        feats = self.aligner(self.vision_model.vision_tower(pixel_values))
        if self.understanding_pos_embed is not None:
            feats = feats + self.understanding_pos_embed.to(feats.dtype)
        return feats

    @staticmethod
    def _check_mask(name: str, mask: Tensor | None, shape: tuple[int, ...]) -> Tensor | None:
        if mask is None:
            return None
        if tuple(mask.shape) != shape:
            raise ValueError(
                f"{name} must have the shape of input_ids {shape}, got {tuple(mask.shape)}"
            )
        return mask.bool()

    def _image_codes(self, input_ids: Tensor, image_ids: Tensor | None, mask: Tensor) -> Tensor:
        if image_ids is None:
            codes = input_ids[mask]
        elif tuple(image_ids.shape) == tuple(mask.shape):
            codes = image_ids[mask]
        elif image_ids.ndim == 1 and image_ids.shape[0] == int(mask.sum()):
            codes = image_ids
        else:
            raise ValueError(
                f"image_ids must be [B, N] like input_ids or [{int(mask.sum())}] (one per "
                f"image_mask position), got shape {tuple(image_ids.shape)}"
            )
        K = self.config.gen_vision.codebook_size + int(self.config.image_mask_token)
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= K):
            raise ValueError(
                f"image ids must lie in [0, {K}), got [{int(codes.min())}, {int(codes.max())}]"
            )
        return codes

    # -- backbone and heads ---------------------------------------------------------------------
    def forward(
        self,
        input_ids: Tensor,
        image_ids: Tensor | None = None,
        image_mask: Tensor | None = None,
        pixel_values: Tensor | None = None,
        understanding_mask: Tensor | None = None,
        attention_mask: Tensor | None = None,
        understanding_features: Tensor | None = None,
        mask: str = "full",
        prefix_lengths: Tensor | None = None,
        position_ids: Tensor | None = None,
        kv_cache: KVCache | None = None,
        heads: tuple[Tensor, Tensor] | None = None,
        segment_ids: Tensor | None = None,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Final hidden states ``[B, N, D]`` of the backbone over :meth:`embed`'s inputs.

        ``attention_mask [B, N]`` marks real tokens; ``mask`` is ``"full"`` (FUDOKI,
        bidirectional), ``"causal"`` (Janus AR) or ``"prefix"`` (with ``prefix_lengths``).
        Feed the result to :meth:`text_logits` / :meth:`image_logits`. With ``kv_cache`` the
        inputs are the tokens after the cached ones (incremental AR decoding).
        ``segment_ids [B, N]`` packs several sequences per row (training,
        :mod:`kineflow.inputs.packing`): attention stays inside a segment.

        ``heads=(text_at, image_at)`` (bool ``[B, N]``) returns the heads' shifted logits at
        the marked positions instead: ``(text_logits(h, at=text_at) [M_t, V],
        image_logits(h, at=image_at) [M_i, K])``, what the training loss reads
        (:func:`kineflow.flow.loss.region_cross_entropy`). The heads run inside ``forward`` so
        that a DDP / FSDP wrapper sees them (a submodule called outside it bypasses its hooks).
        """
        embeds = self.embed(
            input_ids,
            image_ids,
            image_mask,
            pixel_values,
            understanding_mask,
            understanding_features,
        )
        hidden = self.language_model.model(
            inputs_embeds=embeds,
            attention_mask=attention_mask,
            mask=mask,
            prefix_lengths=prefix_lengths,
            position_ids=position_ids,
            kv_cache=kv_cache,
            segment_ids=segment_ids,
        )
        if heads is None:
            return hidden
        text_at, image_at = heads
        return self.text_logits(hidden, at=text_at), self.image_logits(hidden, at=image_at)

    def text_logits(self, hidden: Tensor, shift: bool = True, at: Tensor | None = None) -> Tensor:
        """``[B, N, V]``: ``lm_head`` over ``hidden``, shifted one position right (position 0
        is all zeros) unless ``shift=False``. With ``at`` (bool ``[B, N]``) only the marked
        positions, row-major: ``[M, V]``, row ``m`` = ``lm_head(h[b, i − 1])`` for the ``m``-th
        marked ``(b, i)`` (``h[b, i]`` unshifted); with no marked position the head does not
        run (``[0, V]``: its weights get no gradient, as if the batch had no text)."""
        V = self.config.language.vocab_size
        return self._head(self.language_model.lm_head, V, hidden, shift, at)

    def image_logits(self, hidden: Tensor, shift: bool = True, at: Tensor | None = None) -> Tensor:
        """``[B, N, K]``: ``gen_head`` over ``hidden``, shifted like :meth:`text_logits`;
        ``[M, K]`` with ``at``."""
        K = self.config.gen_vision.codebook_size
        return self._head(self.gen_head, K, hidden, shift, at)

    @staticmethod
    def _head(
        head: nn.Module, classes: int, hidden: Tensor, shift: bool, at: Tensor | None
    ) -> Tensor:
        if at is None:
            logits = head(hidden)
            return shift_logits(logits) if shift else logits
        if tuple(at.shape) != tuple(hidden.shape[:2]):
            raise ValueError(
                f"at must be [B, N] = {tuple(hidden.shape[:2])}, got {tuple(at.shape)}"
            )
        rows, cols = at.nonzero(as_tuple=True)
        if shift and bool(at[:, 0].any()):
            raise ValueError("at marks position 0, which has no hidden state to its left")
        if rows.numel() == 0:
            return hidden.new_zeros((0, classes))
        return head(hidden[rows, cols - int(shift)])
