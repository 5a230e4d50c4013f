"""Janus / FUDOKI checkpoints <-> kineflow's FUDOKI model and VQ tokenizer.

A Janus release (``deepseek-ai/Janus-1.3B``, ``LucasJinWang/FUDOKI``) is a ``config.json`` with
``model_type: multi_modality`` and one state dict. The config maps to a
:class:`~kineflow.models.fudoki.FudokiConfig` (:func:`fudoki_config_from_janus`) and back
(:func:`janus_config_from_fudoki`). :class:`~kineflow.models.fudoki.FudokiModel`'s submodule
names are Janus's, so the state dict loads strictly (:func:`fudoki_model_from_janus`) under the
prefixes ``language_model.model.*``, ``language_model.lm_head.*``,
``vision_model.vision_tower.*``, ``aligner.layers.{0,2}.*``, ``gen_vision_model.*``,
``gen_aligner.layers.{0,2}.*``, ``gen_head.{output_mlp_projector,vision_head}.*`` and
``gen_embed.weight``; only Janus's never-used tensors (:data:`JANUS_SKIPPED_PREFIXES`) and the
vision-tower blocks past the configured depth are skipped. The generation tokenizer alone
(``gen_vision_model.*``, LlamaGen's VQ-16) loads into a
:class:`~kineflow.tokenizers.vq.VQModel` with :func:`vq_model_from_janus`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from torch import Tensor

from kineflow.interop.siglip import JANUS_PREFIX as SIGLIP_JANUS_PREFIX
from kineflow.io import check_state_dict
from kineflow.models.fudoki import FudokiConfig, FudokiModel
from kineflow.models.llama import LlamaConfig
from kineflow.models.siglip import SiglipConfig
from kineflow.tokenizers.vq import VQConfig, VQModel

__all__ = [
    "JANUS_SKIPPED_PREFIXES",
    "JANUS_VQ_PREFIX",
    "JANUS_VQ_SKIPPED_KEYS",
    "fudoki_config_from_janus",
    "fudoki_model_from_janus",
    "janus_config_from_fudoki",
    "vq_model_from_janus",
]

#: Janus tensors with no counterpart here (never used at inference); loading skips them.
#: Vision-tower blocks beyond ``SiglipConfig.num_used_layers`` are skipped as well.
JANUS_SKIPPED_PREFIXES: tuple[str, ...] = (
    "gen_vision_model.quantize.codebook_used",
    "vision_model.vision_tower.attn_pool.",
)
#: Where the generation tokenizer lives in a Janus / FUDOKI state dict.
JANUS_VQ_PREFIX = "gen_vision_model."
#: Janus tensors (after :data:`JANUS_VQ_PREFIX`) with no counterpart in
#: :class:`~kineflow.tokenizers.vq.VQModel`: LlamaGen's training-time history buffer, never
#: updated in Janus.
JANUS_VQ_SKIPPED_KEYS: tuple[str, ...] = ("quantize.codebook_used",)

# Defaults of transformers' LlamaConfig for fields Janus's language_config may leave out.
_HF_LLAMA_DEFAULTS: dict[str, Any] = {
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "max_position_embeddings": 2048,
    "attention_bias": False,
}
_REQUIRED_LLAMA = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
)


# -- config.json ----------------------------------------------------------------------------------
def fudoki_config_from_janus(config: Mapping[str, Any]) -> FudokiConfig:
    """Parse a Janus / FUDOKI ``config.json`` (``model_type: multi_modality``).

    Read fields (``P`` = ``params``): ``language_config.{vocab_size, hidden_size,
    intermediate_size, num_hidden_layers, num_attention_heads}`` (required; the optional
    ``num_key_value_heads, head_dim, rms_norm_eps, rope_theta, max_position_embeddings,
    attention_bias`` take transformers' defaults), ``vision_config.cls = CLIPVisionTower``
    with ``P.model_name = siglip_large_patch16_384``, ``P.image_size``, ``P.select_layer``
    (default -2, as in Janus's ``CLIPVisionTower``), ``aligner_config`` and
    ``gen_aligner_config`` (``cls = MlpProjector``, ``P.projector_type = mlp_gelu``,
    ``P.input_dim``, ``P.n_embed``, ``P.depth`` default 1), ``gen_vision_config``
    (``cls = VQ-16``, ``P.image_token_size`` = codebook size, ``P.n_embed`` = code
    dimension) and ``gen_head_config`` (``cls = vision_head``, ``P.n_embed``,
    ``P.image_token_embed``, ``P.image_token_size``). Janus fixes the SigLIP and VQ-16
    architectures by name; a ``P.kineflow_config`` object in ``vision_config`` or
    ``gen_vision_config`` (written by :func:`janus_config_from_fudoki` for other sizes) replaces
    the fixed architecture with a full :class:`SiglipConfig` / :class:`VQConfig`.

    Raises:
        ValueError: naming every missing field (dotted path) at once, or an unsupported
            ``cls`` / model / projector, or widths that do not fit together.
    """
    if not isinstance(config, Mapping):
        raise TypeError(f"a Janus config must be a mapping, got {type(config).__name__}")
    if config.get("model_type") != "multi_modality":
        raise ValueError(
            f"not a Janus config: model_type must be 'multi_modality', got "
            f"{config.get('model_type')!r}"
        )
    reader = _Reader(config)
    lang = reader.section("language_config")
    vis = reader.section("vision_config")
    ali = reader.section("aligner_config")
    gv = reader.section("gen_vision_config")
    gal = reader.section("gen_aligner_config")
    gh = reader.section("gen_head_config")

    lang_kwargs = {k: reader.get(lang, "language_config", k) for k in _REQUIRED_LLAMA}
    for key, default in _HF_LLAMA_DEFAULTS.items():
        lang_kwargs[key] = lang.get(key, default) if lang is not None else default
    for key in ("num_key_value_heads", "head_dim"):
        if lang is not None and lang.get(key) is not None:
            lang_kwargs[key] = lang[key]

    vp = reader.params(vis, "vision_config")
    vision_cls = reader.get(vis, "vision_config", "cls")
    model_name = reader.get(vp, "vision_config.params", "model_name")
    image_size = reader.get(vp, "vision_config.params", "image_size")
    ap = reader.params(ali, "aligner_config")
    a_in, a_hidden = (reader.get(ap, "aligner_config.params", k) for k in ("input_dim", "n_embed"))
    gvp = reader.params(gv, "gen_vision_config")
    codebook = reader.get(gvp, "gen_vision_config.params", "image_token_size")
    code_dim = reader.get(gvp, "gen_vision_config.params", "n_embed")
    gap = reader.params(gal, "gen_aligner_config")
    g_in = reader.get(gap, "gen_aligner_config.params", "input_dim")
    g_hidden = reader.get(gap, "gen_aligner_config.params", "n_embed")
    ghp = reader.params(gh, "gen_head_config")
    h_in, h_hidden, h_out = (
        reader.get(ghp, "gen_head_config.params", k)
        for k in ("n_embed", "image_token_embed", "image_token_size")
    )
    reader.raise_missing()

    _expect(vision_cls, "CLIPVisionTower", "vision_config.cls")
    vision_override = _override(vp, "vision_config.params")
    if vision_override is None:
        _expect(model_name, "siglip_large_patch16_384", "vision_config.params.model_name")
    if vp.get("pixel_mean") is not None or vp.get("pixel_std") is not None:
        # Janus would normalise the pixels once more inside the tower; not reproduced here.
        raise ValueError("vision_config.params.pixel_mean / pixel_std are not supported")
    _expect(ali.get("cls"), "MlpProjector", "aligner_config.cls")
    _expect(gal.get("cls"), "MlpProjector", "gen_aligner_config.cls")
    for section, params in (("aligner_config", ap), ("gen_aligner_config", gap)):
        _expect(params.get("projector_type"), "mlp_gelu", f"{section}.params.projector_type")
    _expect(gv.get("cls"), "VQ-16", "gen_vision_config.cls")
    _expect(gh.get("cls"), "vision_head", "gen_head_config.cls")

    language = LlamaConfig(**lang_kwargs)
    vision_base = vision_override or SiglipConfig.janus_siglip_l16_384().to_dict()
    vision = SiglipConfig.from_dict(
        {
            **vision_base,
            "image_size": image_size,
            "select_layer": vp.get("select_layer", -2),
        }
    )
    gen_override = _override(gvp, "gen_vision_config.params")
    gen_vision = VQConfig.from_dict(
        {
            **(gen_override or VQConfig.janus().to_dict()),
            "codebook_size": codebook,
            "codebook_dim": code_dim,
        }
    )
    checks = [
        ("aligner_config.params.input_dim", a_in, "the vision width", vision.hidden_size),
        ("gen_aligner_config.params.input_dim", g_in, "gen_vision n_embed", code_dim),
        ("gen_head_config.params.n_embed", h_in, "language hidden_size", language.hidden_size),
        ("gen_head_config.params.image_token_size", h_out, "the codebook size", codebook),
    ]
    for name, got, what, want in checks:
        if got != want:
            raise ValueError(f"{name}={got} must equal {what} ({want})")
    return FudokiConfig(
        language=language,
        gen_vision=gen_vision,
        vision=vision,
        aligner_hidden=a_hidden,
        aligner_depth=ap.get("depth", 1),
        gen_aligner_hidden=g_hidden,
        gen_aligner_depth=gap.get("depth", 1),
        gen_head_hidden=h_hidden,
    )


def janus_config_from_fudoki(config: FudokiConfig) -> dict[str, Any]:
    """``config`` as a Janus ``config.json`` object (:func:`fudoki_config_from_janus`'s inverse).

    Janus fixes the SigLIP and VQ-16 architectures by name; when ``config``'s differ from
    Janus-1.3B's (a tiny test model, say) their full kineflow configs are written under
    ``params.kineflow_config``, a field Janus itself does not have.
    """
    if config.vision is None:
        raise ValueError("a Janus config needs an understanding encoder (vision is None)")
    if config.image_mask_token:
        raise ValueError("Janus has no image mask token (image_mask_token=True)")
    if config.understanding_positions:
        raise ValueError("Janus has no understanding position table (understanding_positions=True)")
    lang = config.language.to_dict()
    language_config = {k: lang[k] for k in (*_REQUIRED_LLAMA, *_HF_LLAMA_DEFAULTS)}
    language_config["num_key_value_heads"] = lang["num_key_value_heads"]
    if lang.get("head_dim") is not None:
        language_config["head_dim"] = lang["head_dim"]
    vision_params: dict[str, Any] = {
        "model_name": "siglip_large_patch16_384",
        "image_size": config.vision.image_size,
        "select_feature": "same",
        "select_layer": config.vision.select_layer,
    }
    janus_vision = SiglipConfig.janus_siglip_l16_384().to_dict()
    mine = {**config.vision.to_dict(), "image_size": 384, "select_layer": -1}
    if mine != {**janus_vision, "select_layer": -1}:
        vision_params["kineflow_config"] = config.vision.to_dict()
    K, d = config.gen_vision.codebook_size, config.gen_vision.codebook_dim
    gen_params: dict[str, Any] = {"image_token_size": K, "n_embed": d}
    janus_vq = {**VQConfig.janus().to_dict(), "codebook_size": K, "codebook_dim": d}
    if config.gen_vision.to_dict() != janus_vq:
        gen_params["kineflow_config"] = config.gen_vision.to_dict()
    D = config.language.hidden_size

    def mlp(input_dim: int, hidden: int, depth: int) -> dict[str, Any]:
        return {
            "cls": "MlpProjector",
            "model_type": "aligner",
            "params": {
                "depth": depth,
                "input_dim": input_dim,
                "n_embed": hidden,
                "projector_type": "mlp_gelu",
            },
        }

    aligner = mlp(config.vision.hidden_size, config.aligner_hidden, config.aligner_depth)
    gen_aligner = mlp(d, config.gen_aligner_hidden, config.gen_aligner_depth)
    gen_aligner["model_type"] = "gen_aligner"
    return {
        "model_type": "multi_modality",
        "architectures": ["MultiModalityCausalLM"],
        "language_config": language_config,
        "vision_config": {
            "cls": "CLIPVisionTower",
            "model_type": "vision",
            "params": vision_params,
        },
        "aligner_config": aligner,
        "gen_vision_config": {"cls": "VQ-16", "model_type": "gen_vision", "params": gen_params},
        "gen_aligner_config": gen_aligner,
        "gen_head_config": {
            "cls": "vision_head",
            "model_type": "gen_head",
            "params": {
                "image_token_embed": config.gen_head_hidden,
                "image_token_size": K,
                "n_embed": D,
            },
        },
    }


def _override(params: Mapping[str, Any], path: str) -> dict[str, Any] | None:
    """``params.kineflow_config``: a full kineflow sub-config replacing Janus's fixed one."""
    value = params.get("kineflow_config")
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise ValueError(f"{path}.kineflow_config must be an object, got {type(value).__name__}")
    return dict(value)


class _Reader:
    """Collects every missing Janus config field so one error can name them all."""

    def __init__(self, config: Mapping[str, Any]) -> None:
        self.config = config
        self.missing: list[str] = []

    def section(self, name: str) -> Mapping[str, Any]:
        value = self.config.get(name)
        if not isinstance(value, Mapping):
            self.missing.append(name)
            return {}
        return value

    def params(self, section: Mapping[str, Any], name: str) -> Mapping[str, Any]:
        if name in self.missing:
            return {}
        value = section.get("params")
        if not isinstance(value, Mapping):
            self.missing.append(f"{name}.params")
            return {}
        return value

    def get(self, mapping: Mapping[str, Any], path: str, key: str) -> Any:
        parent = path.split(".")
        # A missing section / params block is reported once, not once per field.
        if any(".".join(parent[: i + 1]) in self.missing for i in range(len(parent))):
            return None
        if key not in mapping:
            self.missing.append(f"{path}.{key}")
            return None
        return mapping[key]

    def raise_missing(self) -> None:
        if self.missing:
            raise ValueError(f"the Janus config lacks required field(s): {', '.join(self.missing)}")


def _expect(got: Any, want: str, name: str) -> None:
    if got != want:
        raise ValueError(f"{name} must be {want!r} (the only kind supported), got {got!r}")


# -- state dicts ---------------------------------------------------------------------------------
def fudoki_model_from_janus(state_dict: Mapping[str, Tensor], config: FudokiConfig) -> FudokiModel:
    """Build a :class:`~kineflow.models.fudoki.FudokiModel` from a whole Janus / FUDOKI state
    dict, strictly.

    Every key must be consumed except :data:`JANUS_SKIPPED_PREFIXES` and the vision-tower
    blocks past the configured depth (the same keys
    :func:`~kineflow.interop.siglip.siglip_from_janus` and
    :func:`vq_model_from_janus` skip).

    Raises:
        ValueError: one error naming every missing, unexpected and mis-shaped key.
    """
    model = FudokiModel(config)
    used = config.vision.num_used_layers if config.vision is not None else None
    loaded: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        if any(key.startswith(p) for p in JANUS_SKIPPED_PREFIXES):
            continue
        if used is not None and key.startswith(SIGLIP_JANUS_PREFIX):
            m = re.match(r"blocks\.(\d+)\.", key[len(SIGLIP_JANUS_PREFIX) :])
            if m and int(m.group(1)) >= used:
                continue
        loaded[key] = value
    check_state_dict(model.state_dict(), loaded, "the Janus / FUDOKI state dict")
    model.load_state_dict(loaded, strict=True)
    return model


def vq_model_from_janus(
    state_dict: Mapping[str, Tensor],
    config: VQConfig | None = None,
    prefix: str = JANUS_VQ_PREFIX,
) -> VQModel:
    """A :class:`~kineflow.tokenizers.vq.VQModel` from a Janus / FUDOKI state dict (``config``
    defaults to :meth:`VQConfig.janus`).

    Only the keys under ``prefix`` are used (pass ``""`` for a bare tokenizer state dict);
    :data:`JANUS_VQ_SKIPPED_KEYS` are dropped. The rest must match the model exactly: any
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
    for key in JANUS_VQ_SKIPPED_KEYS:
        sub.pop(key, None)
    model = VQModel(config)
    check_state_dict(
        model.state_dict(), sub, f"the {prefix!r} tensors of the state dict", prefix=prefix
    )
    model.load_state_dict(sub, strict=True)
    return model
