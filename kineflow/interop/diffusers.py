"""diffusers ``AutoencoderKL`` folders <-> kineflow's KL autoencoder
(:class:`~kineflow.tokenizers.kl_vae.AutoencoderKL`).

Weights load from the ``diffusers`` layout (:func:`kl_vae_from_diffusers`) and export back to it
(:func:`diffusers_state_dict_from_kl`, :func:`save_diffusers`). The parameter names differ only
by the renames below (diffusers' attention projections are ``Linear`` layers, ours 1x1 convs,
so their weights are reshaped ``[C, C] ↔ [C, C, 1, 1]``):

    diffusers                                      kineflow
    {enc}.down_blocks.{i}.resnets.{j}              encoder.conv_blocks.{i}.res.{j}
    {enc}.down_blocks.{i}.downsamplers.0.conv      encoder.conv_blocks.{i}.downsample.conv
    {dec}.up_blocks.{i}.resnets.{j}                decoder.conv_blocks.{i}.res.{j}
    {dec}.up_blocks.{i}.upsamplers.0.conv          decoder.conv_blocks.{i}.upsample.conv
    *.mid_block.resnets.{0,1}                      *.mid.{0,2}
    *.mid_block.attentions.0.group_norm            *.mid.1.norm
    *.mid_block.attentions.0.to_{q,k,v}            *.mid.1.{q,k,v}      (legacy: query/key/value)
    *.mid_block.attentions.0.to_out.0              *.mid.1.proj_out     (legacy: proj_attn)
    *.conv_norm_out                                *.norm_out
    *.resnets.{j}.conv_shortcut                    *.res.{j}.nin_shortcut

The config maps field by field (:func:`kl_config_from_diffusers`,
:func:`diffusers_config_from_kl`); a diffusers field kineflow cannot express raises.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import Tensor

from kineflow.io import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    atomic_save_safetensors,
    atomic_write_json,
    read_json_object,
)
from kineflow.tokenizers.kl_vae import AutoencoderKL, KLConfig

__all__ = [
    "DIFFUSERS_WEIGHTS_NAME",
    "diffusers_config_from_kl",
    "diffusers_state_dict_from_kl",
    "kl_config_from_diffusers",
    "kl_state_dict_from_diffusers",
    "kl_vae_from_diffusers",
    "save_diffusers",
]

DIFFUSERS_WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"


# -- names and configs -----------------------------------------------------------------------------
# kineflow name -> diffusers name, applied in order to full state-dict keys. The forward
# direction (loading) is the inverse of this table on our own keys, which makes it bijective by
# construction and lets "every key consumed" be a set comparison.
_TO_DIFFUSERS: tuple[tuple[str, str], ...] = (
    (r"^(encoder|decoder)\.norm_out\.", r"\1.conv_norm_out."),
    (r"^encoder\.conv_blocks\.(\d+)\.res\.", r"encoder.down_blocks.\1.resnets."),
    (r"^encoder\.conv_blocks\.(\d+)\.downsample\.", r"encoder.down_blocks.\1.downsamplers.0."),
    (r"^decoder\.conv_blocks\.(\d+)\.res\.", r"decoder.up_blocks.\1.resnets."),
    (r"^decoder\.conv_blocks\.(\d+)\.upsample\.", r"decoder.up_blocks.\1.upsamplers.0."),
    (r"^(encoder|decoder)\.mid\.0\.", r"\1.mid_block.resnets.0."),
    (r"^(encoder|decoder)\.mid\.2\.", r"\1.mid_block.resnets.1."),
    (r"^(encoder|decoder)\.mid\.1\.norm\.", r"\1.mid_block.attentions.0.group_norm."),
    (r"^(encoder|decoder)\.mid\.1\.(q|k|v)\.", r"\1.mid_block.attentions.0.to_\2."),
    (r"^(encoder|decoder)\.mid\.1\.proj_out\.", r"\1.mid_block.attentions.0.to_out.0."),
    (r"\.nin_shortcut\.", r".conv_shortcut."),
)  # fmt: skip
# Attention names of older diffusers checkpoints, accepted when loading.
_LEGACY_ATTENTION = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
# Our 1x1-conv attention weights, which diffusers stores as Linear [C, C].
_ATTN_WEIGHT = re.compile(r"^(encoder|decoder)\.mid\.1\.(q|k|v|proj_out)\.weight$")
_BLOCK_TYPES = {"down_block_types": "DownEncoderBlock2D", "up_block_types": "UpDecoderBlock2D"}
# diffusers config keys that do not change the computation of the networks.
_DIFFUSERS_IGNORED = {"force_upcast"}


def _diffusers_name(name: str) -> str:
    for pattern, repl in _TO_DIFFUSERS:
        name = re.sub(pattern, repl, name)
    if ".conv_blocks." in name or ".mid." in name:  # a module this table does not know
        raise RuntimeError(f"no diffusers name for parameter {name!r}")
    return name


def _listing(names: Iterable[str], limit: int = 8) -> str:
    names = sorted(names)
    more = f" (and {len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def kl_config_from_diffusers(
    d: Mapping[str, Any], overrides: Mapping[str, Any] | None = None
) -> KLConfig:
    """Translate a diffusers ``AutoencoderKL`` config; anything we cannot express raises.

    ``overrides`` set :class:`KLConfig` fields diffusers does not store (``patch_size``, ...).
    """
    cls = d.get("_class_name", "AutoencoderKL")
    if cls != "AutoencoderKL":
        raise ValueError(f"_class_name is {cls!r}; only diffusers AutoencoderKL is supported")
    known = {
        "in_channels", "out_channels", "down_block_types", "up_block_types",
        "block_out_channels", "layers_per_block", "act_fn", "latent_channels",
        "norm_num_groups", "sample_size", "scaling_factor", "shift_factor", "latents_mean",
        "latents_std", "use_quant_conv", "use_post_quant_conv", "mid_block_add_attention",
    } | _DIFFUSERS_IGNORED  # fmt: skip
    unknown = sorted(k for k in d if not k.startswith("_") and k not in known)
    if unknown:
        raise ValueError(f"unsupported diffusers config field(s): {', '.join(unknown)}")
    widths = [int(c) for c in d.get("block_out_channels", (64,))]
    for key, block in _BLOCK_TYPES.items():
        types = list(d.get(key, (block,)))
        if len(types) != len(widths):
            raise ValueError(
                f"{key} has {len(types)} entries but block_out_channels has {len(widths)}"
            )
        if any(t != block for t in types):
            raise ValueError(f"{key} must all be {block!r}, got {types}")
    if not widths or widths[0] < 1 or any(w % widths[0] for w in widths):
        raise ValueError(
            f"block_out_channels {widths} must be multiples of the first width (kineflow writes "
            f"them as channels * channel_mult)"
        )
    if d.get("act_fn", "silu") != "silu":
        raise ValueError(f"act_fn {d['act_fn']!r} is not supported (only 'silu')")
    if not d.get("mid_block_add_attention", True):
        raise ValueError("mid_block_add_attention=False is not supported (the mid block attends)")
    for key in ("latents_mean", "latents_std"):
        if d.get(key) is not None:
            raise ValueError(
                f"{key} (per-channel latent normalisation) is not supported; kineflow "
                f"normalises with the scalar scaling_factor / shift_factor"
            )
    size = d.get("sample_size", 32)  # diffusers' defaults throughout
    if isinstance(size, (list, tuple)):
        if len(set(size)) != 1:
            raise ValueError(f"sample_size {list(size)} is not square")
        size = size[0]
    values: dict[str, Any] = {
        "in_channels": int(d.get("in_channels", 3)),
        "out_channels": int(d.get("out_channels", 3)),
        "channels": widths[0],
        "channel_mult": tuple(w // widths[0] for w in widths),
        "num_res_blocks": int(d.get("layers_per_block", 1)),
        "z_channels": int(d.get("latent_channels", 4)),
        "norm_groups": int(d.get("norm_num_groups", 32)),
        "image_size": int(size),
        "scaling_factor": float(d.get("scaling_factor", 0.18215)),
        "shift_factor": float(d.get("shift_factor") or 0.0),
        "use_quant_conv": bool(d.get("use_quant_conv", True)),
        "use_post_quant_conv": bool(d.get("use_post_quant_conv", True)),
    }
    values.update(overrides or {})
    try:
        return KLConfig.from_dict(values)
    except ValueError as e:
        raise ValueError(
            f"the diffusers config does not make a valid KLConfig: {e} (image_size comes from "
            f"sample_size, channels / channel_mult from block_out_channels, norm_groups from "
            f"norm_num_groups, z_channels from latent_channels; pass overrides to change "
            f"kineflow-only fields)"
        ) from e


def _resolve_diffusers_folder(folder: Path, variant: str | None) -> tuple[Path, Path]:
    """``(config.json, weights)`` in ``folder`` or its ``vae/`` subfolder."""
    if not folder.is_dir():
        raise FileNotFoundError(f"no such folder: {folder}")
    if not (folder / CONFIG_NAME).is_file() and (folder / "vae" / CONFIG_NAME).is_file():
        folder = folder / "vae"  # a pipeline folder
    config = folder / CONFIG_NAME
    if not config.is_file():
        raise FileNotFoundError(f"no {CONFIG_NAME} in {folder} (nor in {folder / 'vae'})")
    names = [DIFFUSERS_WEIGHTS_NAME, WEIGHTS_NAME]
    if variant is not None:
        names = [n.replace(".safetensors", f".{variant}.safetensors") for n in names]
    for name in names:
        if (folder / name).is_file():
            return config, folder / name
    present = sorted(p.name for p in folder.iterdir() if p.is_file())
    hint = ""
    if any(n.endswith((".bin", ".pt", ".pth", ".ckpt")) for n in present):
        hint = " (only safetensors weights are read; convert pickled checkpoints first)"
    raise FileNotFoundError(
        f"no {' or '.join(names)} in {folder}{hint}; files there: {_listing(present) or 'none'}"
    )


# -- weights --------------------------------------------------------------------------------------
def kl_vae_from_diffusers(
    folder: str | os.PathLike[str],
    *,
    variant: str | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    **overrides: Any,
) -> AutoencoderKL:
    """Load a local diffusers ``AutoencoderKL`` folder (or a pipeline folder with ``vae/``).

    Reads ``config.json`` and ``diffusion_pytorch_model.safetensors`` (or
    ``model.safetensors``; ``variant="fp16"`` reads ``*.fp16.safetensors``). ``overrides``
    set :class:`KLConfig` fields diffusers does not store (``patch_size``, ``kl_weight``,
    ``recon_loss``, …). Every checkpoint key must be consumed.

    Raises:
        FileNotFoundError: no folder, config or safetensors weights.
        ValueError: a config field kineflow cannot express (named), or weights that do not
            fit (missing / unexpected / duplicated / mis-shaped keys, named).
    """
    config_path, weights_path = _resolve_diffusers_folder(Path(folder), variant)
    config = kl_config_from_diffusers(read_json_object(config_path), overrides)
    model = AutoencoderKL(config)
    state = kl_state_dict_from_diffusers(
        model, load_file(str(weights_path), device="cpu"), source=str(weights_path)
    )
    model.to(dtype=dtype)
    model.load_state_dict(state, strict=True)
    return model.to(device) if device is not None else model


def kl_state_dict_from_diffusers(
    model: AutoencoderKL,
    diffusers_state: Mapping[str, Tensor],
    source: str = "the diffusers state dict",
) -> dict[str, Tensor]:
    """Rename (and reshape) a diffusers state dict into ``model``'s names, strictly."""
    ours = {k: v.shape for k, v in model.state_dict().items()}
    table: dict[str, str] = {}
    for name in ours:
        theirs = _diffusers_name(name)
        table[theirs] = name
        for new, old in _LEGACY_ATTENTION.items():
            legacy = theirs.replace(f".attentions.0.{new}.", f".attentions.0.{old}.")
            if legacy != theirs:
                table[legacy] = name
    renamed: dict[str, Tensor] = {}
    sources: dict[str, str] = {}
    unexpected, duplicated = [], []
    for key, tensor in diffusers_state.items():
        name = table.get(key)
        if name is None:
            unexpected.append(key)
        elif name in renamed:
            duplicated.append(f"{sources[name]} / {key}")
        else:
            if _ATTN_WEIGHT.match(name) and tensor.ndim == 2:
                tensor = tensor[:, :, None, None]  # Linear [C, C] -> 1x1 conv [C, C, 1, 1]
            renamed[name], sources[name] = tensor, key
    # Report in the checkpoint's (diffusers) names: those are what the user can look up.
    problems = []
    missing = [_diffusers_name(k) for k in set(ours) - set(renamed)]
    if missing:
        problems.append(f"missing keys: {_listing(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_listing(unexpected)}")
    if duplicated:
        problems.append(f"keys naming the same parameter twice: {_listing(duplicated)}")
    shaped = [
        f"{sources[k]} {tuple(v.shape)} (expected {tuple(ours[k])})"
        for k, v in renamed.items()
        if v.shape != ours[k]
    ]
    if shaped:
        problems.append(f"mis-shaped keys: {_listing(shaped)}")
    if problems:
        raise ValueError(f"weights in {source} do not fit the model: " + "; ".join(problems))
    return renamed


def diffusers_state_dict_from_kl(model: AutoencoderKL) -> dict[str, Tensor]:
    """``model``'s weights under diffusers' names and shapes (detached, sharing memory
    with the parameters); ``diffusers.AutoencoderKL.load_state_dict`` takes it strictly."""
    out = {}
    for name, tensor in model.state_dict().items():
        if _ATTN_WEIGHT.match(name):
            tensor = tensor.flatten(1)  # 1x1 conv [C, C, 1, 1] -> Linear [C, C]
        out[_diffusers_name(name)] = tensor.detach()
    return out


def diffusers_config_from_kl(cfg: KLConfig) -> dict[str, Any]:
    """The diffusers ``AutoencoderKL`` config of a :class:`KLConfig` (kineflow-only fields such
    as ``patch_size`` have no diffusers counterpart and are left out)."""
    L = len(cfg.channel_mult)
    return {
        "_class_name": "AutoencoderKL",
        "in_channels": cfg.in_channels,
        "out_channels": cfg.out_channels,
        "down_block_types": [_BLOCK_TYPES["down_block_types"]] * L,
        "up_block_types": [_BLOCK_TYPES["up_block_types"]] * L,
        "block_out_channels": [cfg.channels * m for m in cfg.channel_mult],
        "layers_per_block": cfg.num_res_blocks,
        "act_fn": "silu",
        "latent_channels": cfg.z_channels,
        "norm_num_groups": cfg.norm_groups,
        "sample_size": cfg.image_size,
        "scaling_factor": cfg.scaling_factor,
        "shift_factor": cfg.shift_factor,
        "use_quant_conv": cfg.use_quant_conv,
        "use_post_quant_conv": cfg.use_post_quant_conv,
        "mid_block_add_attention": True,
    }


def save_diffusers(model: AutoencoderKL, folder: str | os.PathLike[str]) -> Path:
    """Write ``model`` as a diffusers ``AutoencoderKL`` folder (``config.json`` and
    ``diffusion_pytorch_model.safetensors``) that ``diffusers`` and
    :func:`kl_vae_from_diffusers` both load; returns the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_save_safetensors(
        folder / DIFFUSERS_WEIGHTS_NAME, diffusers_state_dict_from_kl(model), {"format": "pt"}
    )
    atomic_write_json(folder / CONFIG_NAME, diffusers_config_from_kl(model.config), sort_keys=True)
    return folder
