"""SigLIP tower weights in foreign layouts: inside a Janus / FUDOKI checkpoint, and under
``transformers``' ``SiglipVisionModel`` names.

Janus stores the tower (:class:`~kineflow.models.siglip.SiglipVisionModel`, timm's names) under
:data:`JANUS_PREFIX`, with an attention-pool head (``attn_pool.*``) and, for ``select_layer``
< 0, blocks past the used depth that Janus never runs: :func:`siglip_from_janus` skips both and
checks everything else strictly. ``transformers`` splits the fused ``qkv`` into ``q/k/v_proj``,
stores the position embedding as an ``nn.Embedding`` of shape [N, D] and calls the final norm
``post_layernorm``: :func:`hf_to_janus_state_dict` and :func:`janus_to_hf_state_dict` convert
between the two exactly (``tests/models/test_siglip.py`` checks the outputs against
``transformers`` with the same weights).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
from torch import Tensor

from kineflow.io import check_state_dict
from kineflow.models.siglip import SiglipConfig, SiglipVisionModel

__all__ = [
    "JANUS_PREFIX",
    "hf_to_janus_state_dict",
    "janus_to_hf_state_dict",
    "load_siglip_from_janus",
    "siglip_from_janus",
]

#: Where the vision tower's weights live in a Janus / FUDOKI checkpoint.
JANUS_PREFIX = "vision_model.vision_tower."


def siglip_from_janus(
    state_dict: Mapping[str, Tensor],
    config: SiglipConfig | None = None,
    prefix: str = JANUS_PREFIX,
) -> SiglipVisionModel:
    """Build a tower (Janus's L/16-384 when ``config`` is None) and load the keys under
    ``prefix`` from a Janus / FUDOKI state dict; other keys are ignored.

    Under the prefix, the attention-pool head (``attn_pool.*``) and blocks beyond
    :attr:`SiglipConfig.num_used_layers` are skipped (Janus never runs them); everything
    else must match the model exactly.

    Raises:
        ValueError: naming every missing, unexpected and mis-shaped key (with ``prefix``).
    """
    config = SiglipConfig.janus_siglip_l16_384() if config is None else config
    model = SiglipVisionModel(config)
    load_siglip_from_janus(model, state_dict, prefix=prefix)
    return model


def load_siglip_from_janus(
    model: SiglipVisionModel, state_dict: Mapping[str, Tensor], prefix: str = JANUS_PREFIX
) -> None:
    """Load ``model`` in place; see :func:`siglip_from_janus` for which keys count."""
    own = model.state_dict()
    loaded: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        if not key.startswith(prefix):
            continue
        name = key[len(prefix) :]
        if name.startswith("attn_pool."):
            continue
        m = re.match(r"blocks\.(\d+)\.", name)
        if m and int(m.group(1)) >= model.config.num_used_layers:
            continue
        loaded[name] = value
    check_state_dict(own, loaded, "the Janus vision-tower state dict", prefix=prefix)
    model.load_state_dict(loaded)


# -- transformers' SiglipVisionModel names --------------------------------------------------------
_HF = "vision_model."
# Janus suffix <-> HF suffix for names that map one to one (everything but pos_embed and qkv).
_PLAIN = [
    ("patch_embed.proj.", "embeddings.patch_embedding."),
    ("norm.", "post_layernorm."),
]
_BLOCK_PLAIN = [
    ("norm1.", "layer_norm1."),
    ("attn.proj.", "self_attn.out_proj."),
    ("norm2.", "layer_norm2."),
    ("mlp.fc1.", "mlp.fc1."),
    ("mlp.fc2.", "mlp.fc2."),
]


def _unknown(keys: list[str], source: str) -> ValueError:
    return ValueError(f"{source} has {len(keys)} key(s) with no counterpart: {', '.join(keys)}")


def hf_to_janus_state_dict(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``transformers.SiglipVisionModel`` state dict -> kineflow (timm) names.

    ``q/k/v_proj`` are concatenated (in that order) into the fused ``qkv``; the position
    embedding [N, D] becomes ``pos_embed`` [1, N, D]. The pooling head (``head.*``, present
    when ``vision_use_head=True``) is dropped, as Janus never uses one. Keys may carry the
    ``vision_model.`` prefix (hub checkpoints, transformers 4) or not (the state dict of a
    transformers 5 ``SiglipVisionModel``).

    Raises:
        ValueError: naming any other key that does not convert, or a block missing part of
            its q/k/v.
    """
    out: dict[str, Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, Tensor]] = {}
    unknown = []
    for key, value in state_dict.items():
        name = key.removeprefix(_HF)
        if name.startswith("head."):
            continue
        if name == "embeddings.position_embedding.weight":
            out["pos_embed"] = value.unsqueeze(0)
            continue
        for ours, theirs in _PLAIN:
            if name.startswith(theirs):
                out[ours + name[len(theirs) :]] = value
                break
        else:
            m = re.fullmatch(r"encoder\.layers\.(\d+)\.(.+)", name)
            if m is None:
                unknown.append(key)
                continue
            i, rest = m.groups()
            m_qkv = re.fullmatch(r"self_attn\.([qkv])_proj\.(weight|bias)", rest)
            if m_qkv:
                qkv.setdefault((i, m_qkv.group(2)), {})[m_qkv.group(1)] = value
                continue
            for ours, theirs in _BLOCK_PLAIN:
                if rest.startswith(theirs):
                    out[f"blocks.{i}.{ours}{rest[len(theirs) :]}"] = value
                    break
            else:
                unknown.append(key)
    if unknown:
        raise _unknown(sorted(unknown), "the transformers SigLIP state dict")
    for (i, kind), parts in sorted(qkv.items()):
        missing = [p for p in "qkv" if p not in parts]
        if missing:
            raise ValueError(
                f"block {i} lacks self_attn.{{{','.join(missing)}}}_proj.{kind}; "
                f"q, k and v are needed to build the fused qkv"
            )
        out[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return out


def janus_to_hf_state_dict(
    state_dict: Mapping[str, Tensor], prefix: str = _HF
) -> dict[str, Tensor]:
    """kineflow (timm) state dict -> ``transformers.SiglipVisionModel`` names.

    The inverse of :func:`hf_to_janus_state_dict`: the fused ``qkv`` is split into thirds
    (q, k, v) and ``pos_embed`` [1, N, D] becomes the embedding table [N, D]. The result has
    no pooling head, so load it into a model built with ``vision_use_head=False``. ``prefix``
    starts every key: ``"vision_model."`` as in hub checkpoints and transformers 4, ``""`` for
    the state dict of a transformers 5 ``SiglipVisionModel``.

    Raises:
        ValueError: naming any key that does not convert, or a ``qkv`` whose first dimension
            is not divisible by 3.
    """
    out: dict[str, Tensor] = {}
    unknown = []
    for name, value in state_dict.items():
        if name == "pos_embed":
            out[prefix + "embeddings.position_embedding.weight"] = value.squeeze(0)
            continue
        for ours, theirs in _PLAIN:
            if name.startswith(ours):
                out[prefix + theirs + name[len(ours) :]] = value
                break
        else:
            m = re.fullmatch(r"blocks\.(\d+)\.(.+)", name)
            if m is None:
                unknown.append(name)
                continue
            i, rest = m.groups()
            layer = f"{prefix}encoder.layers.{i}."
            m_qkv = re.fullmatch(r"attn\.qkv\.(weight|bias)", rest)
            if m_qkv:
                if value.shape[0] % 3:
                    raise ValueError(
                        f"{name} has {value.shape[0]} rows, not divisible by 3 (q, k, v)"
                    )
                for p, part in zip("qkv", value.chunk(3), strict=True):
                    out[f"{layer}self_attn.{p}_proj.{m_qkv.group(1)}"] = part
                continue
            for ours, theirs in _BLOCK_PLAIN:
                if rest.startswith(ours):
                    out[layer + theirs + rest[len(ours) :]] = value
                    break
            else:
                unknown.append(name)
    if unknown:
        raise _unknown(sorted(unknown), "the SigLIP state dict")
    return out
