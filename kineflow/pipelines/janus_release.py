"""Reading a Janus / FUDOKI release folder (``LucasJinWang/FUDOKI``): the parts of a FUDOKI
pipeline, checked (see :mod:`kineflow.pipelines.loading` for the folder's files).

:func:`read_janus_release` returns the model, tokenizer, metric tables, pipeline config and
the tables' provenance; :meth:`FudokiPipeline.from_janus_release
<kineflow.pipelines.fudoki_checkpoints.FudokiCheckpoints.from_janus_release>` builds the
pipeline from them.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor

from kineflow.interop.checkpoint_files import (
    load_embedding_table,
    read_weights,
    tensor_file,
    weight_files,
)
from kineflow.interop.janus import fudoki_config_from_janus, fudoki_model_from_janus
from kineflow.interop.load_checks import check_finite as check_finite_tensors
from kineflow.interop.load_checks import check_floating, expected_state, wants_finite_check
from kineflow.io import CONFIG_NAME, read_json_object
from kineflow.models.fudoki import FudokiConfig, FudokiModel
from kineflow.models.size import check_model_size
from kineflow.pipelines.fudoki_config import FudokiPipelineConfig
from kineflow.tokenizers.text import TextTokenizer

__all__ = ["METRIC_FILES", "JanusRelease", "read_janus_release"]

#: Metric-table files of the official FUDOKI release, and the model tensors they stand for.
METRIC_FILES: dict[str, tuple[str, tuple[str, ...]]] = {
    "text": ("text_embedding.pt", ("language_model.model.embed_tokens.weight",)),
    "image": (
        "image_embedding.pt",
        ("gen_vision_model.quantize.embedding.weight", "gen_embed.weight"),
    ),
}
#: Chat formats that render like Janus's "deepseek" template (FUDOKI calls its copy "fudoki").
_DEEPSEEK_FORMATS = ("deepseek", "deepseek_old", "fudoki")


class JanusRelease(NamedTuple):
    """The checked parts of a release: ``tables`` maps ``"text"`` / ``"image"`` to the
    metric tables, ``provenance`` to where each came from."""

    model: FudokiModel
    tokenizer: TextTokenizer
    tables: dict[str, Tensor]
    config: FudokiPipelineConfig
    provenance: dict[str, str]


def read_janus_release(
    folder: str | os.PathLike[str],
    config: Mapping[str, Any] | None = None,
    *,
    max_bytes: int | None = None,
    check_finite: bool | None = None,
) -> JanusRelease:
    """A Janus / FUDOKI release folder's parts, on the CPU.

    The config's model must fit the size limit (``max_bytes``, see :func:`kineflow.load`).
    Every weight must be consumed (Janus's unused buffers and vision blocks aside), fit the
    config, be floating-point where the model's parameter is, and (with ``check_finite``, as
    in :func:`kineflow.load`) be free of NaN / inf, as must the metric tables; the tokenizer
    must fit the model's text vocabulary; processor settings must agree with the model (image
    size, image tokens, chat format).
    """
    folder = Path(folder)
    if config is None:
        config = read_json_object(folder / CONFIG_NAME)
    try:
        model_config = fudoki_config_from_janus(config)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{folder / CONFIG_NAME}: {e}") from e
    check_model_size(model_config, str(folder / CONFIG_NAME), max_bytes)
    tokenizer_file = folder / "tokenizer.json"
    if not tokenizer_file.is_file():
        raise FileNotFoundError(f"{folder} has no tokenizer.json (the text tokenizer)")
    tokenizer = TextTokenizer.load(folder)
    pipeline_config = _janus_processor_config(folder, model_config)
    check = wants_finite_check(check_finite, weight_files(folder))
    weights = read_weights(folder)
    locate = tensor_file(folder)
    expected = expected_state(FudokiModel, model_config)
    check_floating(expected, {key: t.dtype for key, t in weights.items()}, locate)
    if check:  # the tensors the model uses (Janus's unused ones may hold anything)
        used = (key for key in expected if key in weights)
        check_finite_tensors((f"{locate(key)}: {key}", weights[key]) for key in used)
    try:
        model = fudoki_model_from_janus(weights, model_config)
    except ValueError as e:
        raise ValueError(f"{folder}: {e}") from e
    tables, provenance = _metric_tables(folder, weights)
    del weights
    if check:  # a table taken from the weights was checked with them
        files = {name: folder / file for name, (file, _) in METRIC_FILES.items()}
        from_files = [name for name in tables if files[name].is_file()]
        check_finite_tensors(
            (f"{files[name]}: the {name} metric table", tables[name]) for name in from_files
        )
    return JanusRelease(model, tokenizer, tables, pipeline_config, provenance)


def _janus_processor_config(folder: Path, model_config: FudokiConfig) -> FudokiPipelineConfig:
    """FUDOKI's sampling defaults with the folder's processor settings, checked against the
    model (Janus's processor files are optional; their other fields are not used)."""
    settings: dict[str, Any] = {}
    vision = model_config.vision
    pre = folder / "preprocessor_config.json"
    if pre.is_file():
        data = read_json_object(pre)
        if "image_size" in data and vision is not None and data["image_size"] != vision.image_size:
            raise ValueError(
                f"{pre}: image_size {data['image_size']} differs from the vision encoder's "
                f"{vision.image_size}"
            )
        for ours, theirs in (
            ("image_mean", "image_mean"),
            ("image_std", "image_std"),
            ("background", "background_color"),
        ):
            if theirs in data:
                settings[ours] = data[theirs]
    proc = folder / "processor_config.json"
    if proc.is_file():
        data = read_json_object(proc)
        tokens = data.get("num_image_tokens")
        if tokens is not None and vision is not None and tokens != vision.num_patches:
            raise ValueError(
                f"{proc}: num_image_tokens {tokens} differs from the vision encoder's "
                f"{vision.num_patches} patches"
            )
        fmt = data.get("sft_format")
        if fmt is not None and fmt not in _DEEPSEEK_FORMATS:
            raise ValueError(
                f"{proc}: sft_format {fmt!r} is not supported (kineflow renders Janus's "
                f"DeepSeek chat format: {', '.join(_DEEPSEEK_FORMATS)})"
            )
    try:
        return FudokiPipelineConfig(**settings)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{pre}: {e}") from e


def _metric_tables(
    folder: Path, weights: Mapping[str, Tensor]
) -> tuple[dict[str, Tensor], dict[str, str]]:
    tables, provenance = {}, {}
    for name, (file, candidates) in METRIC_FILES.items():
        path = folder / file
        if path.is_file():
            table = load_embedding_table(path)
            same = [
                key
                for key in candidates
                if key in weights
                and weights[key].shape == table.shape
                and torch.equal(weights[key].to(table.dtype), table)
            ]
            where = f"equals {same[0]}" if same else f"equals none of {', '.join(candidates)}"
            tables[name], provenance[name] = table, f"{path} ({where})"
        else:
            key = candidates[0]
            tables[name], provenance[name] = weights[key], f"derived: {key} (no {file})"
    return tables, provenance
