"""``kineflow.load``: one entry point for every checkpoint folder kineflow can read.

A *checkpoint* is a local folder (or a Hugging Face hub id, fetched when a hub is reachable)
whose ``config.json`` says what it holds:

``{"kineflow_type": "fudoki", ...}``  a folder written by :meth:`FudokiPipeline.save_pretrained`:
    ``model.safetensors`` (Janus key names), ``metric.safetensors``, ``tokenizer.json``.

``{"model_type": "multi_modality", ...}``  a Janus / FUDOKI release (``LucasJinWang/FUDOKI``):
    weights as ``model.safetensors``, sharded safetensors with an index, or ``pytorch_model.bin``
    (read with ``weights_only=True``); ``tokenizer.json``; optionally ``preprocessor_config.json``
    (``image_size``, ``image_mean``, ``image_std``, ``background_color``) and
    ``processor_config.json`` (``num_image_tokens``, ``sft_format``); and the metric tables
    ``text_embedding.pt`` / ``image_embedding.pt`` (pickled ``nn.Embedding`` modules, read
    without running any other pickled code, see :mod:`kineflow.interop.checkpoint_files`).

The metric tables: the text table is the language model's input embedding
``language_model.model.embed_tokens.weight`` [V, D] and the image table the VQ codebook
``gen_vision_model.quantize.embedding.weight`` [K, d]. When a release ships the ``.pt`` files
they are used as they are, and :attr:`FudokiPipeline.provenance` records which model tensor
each one equals (or that it equals none); when it does not, the tables are taken from those
two tensors and the provenance says so. Which tensors the official files hold is not
documented upstream: the provenance check answers it for any release loaded.

Every load is checked before it is trusted: the model's size is estimated from
``config.json`` and refused above a limit before anything is built
(:mod:`kineflow.models.size`); integer-typed weights for float parameters and (by default,
for checkpoints under 2 GiB) NaN / inf weights are refused by file and tensor name
(:mod:`kineflow.interop.load_checks`); and a folder whose save was killed mid-swap is restored first
(:mod:`kineflow.folders`).
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from kineflow.folders import recover_interrupted_save
from kineflow.interop.checkpoint_files import (
    load_embedding_table,
    read_weights,
    safetensors_dtypes,
    tensor_file,
    weight_files,
)
from kineflow.interop.janus import fudoki_config_from_janus, fudoki_model_from_janus
from kineflow.interop.load_checks import check_finite as check_finite_tensors
from kineflow.interop.load_checks import check_floating, expected_state, wants_finite_check
from kineflow.io import CONFIG_NAME, TYPE_FIELD, WEIGHTS_NAME, read_json_object
from kineflow.models.fudoki import FudokiConfig, FudokiModel
from kineflow.models.size import check_model_size
from kineflow.models.unifluid import UnifluidConfig, UnifluidModel
from kineflow.pipelines.fudoki import KIND as FUDOKI_KIND
from kineflow.pipelines.fudoki import METRIC_FILE, FudokiPipeline, FudokiPipelineConfig
from kineflow.pipelines.unifluid import KIND as UNIFLUID_KIND
from kineflow.pipelines.unifluid import UnifluidPipeline
from kineflow.tokenizers.text import TextTokenizer

__all__ = ["load", "load_janus_folder", "resolve_checkpoint"]

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
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _snapshot_download(repo_id: str) -> str:
    """Fetch a hub repository (a seam for tests); raises whatever huggingface_hub raises."""
    from huggingface_hub import snapshot_download

    return snapshot_download(repo_id)


def resolve_checkpoint(name: str | os.PathLike[str]) -> Path:
    """A local checkpoint folder for ``name``: the path itself when it exists, else, for a
    hub id like ``LucasJinWang/FUDOKI``, a download through ``huggingface_hub``.

    Raises:
        FileNotFoundError: naming the local path that is missing, and why the hub could not
            help (no ``huggingface_hub``, no network, no such repository).
        NotADirectoryError: the path is a file.
    """
    path = Path(name).expanduser()
    if not path.exists():
        with contextlib.suppress(OSError):  # read-only place: the folder stays missing
            recover_interrupted_save(path)  # a save killed mid-swap left the old one aside
    if path.exists():
        if not path.is_dir():
            raise NotADirectoryError(f"{path} is a file; a checkpoint is a folder")
        return path
    text = os.fspath(name)
    if not _HUB_ID.match(text) or text.startswith((".", "/", "~")):
        raise FileNotFoundError(f"no checkpoint folder at {path.resolve()}")
    try:
        return Path(_snapshot_download(text))
    except ImportError:
        why = "huggingface_hub is not installed (pip install huggingface_hub)"
    except Exception as e:  # offline, unknown repo, auth: all mean "not available here"
        why = f"fetching it from the Hugging Face hub failed ({type(e).__name__}: {_first_line(e)})"
    raise FileNotFoundError(
        f"no local checkpoint folder {path.resolve()}, and {text!r} could not be fetched: {why}. "
        f"Download it where the hub is reachable (huggingface-cli download {text} --local-dir "
        "DIR) and pass DIR."
    )


def _first_line(error: Exception) -> str:
    lines = str(error).strip().splitlines()
    return lines[0][:200] if lines else ""


def load(
    name: str | os.PathLike[str],
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    max_bytes: int | None = None,
    check_finite: bool | None = None,
) -> FudokiPipeline | UnifluidPipeline:
    """Load a checkpoint folder or hub id (see the module docstring) as a ready pipeline.

    Before the model is built, its size is estimated from ``config.json``
    (:func:`kineflow.models.size.check_model_size`) and a model above the limit is refused;
    before weights are copied in, every floating-point parameter must be stored as a
    floating-point tensor; with ``check_finite``, every weight and metric table must be free
    of NaN and inf (:mod:`kineflow.interop.load_checks`).

    Args:
        name: a folder, or a hub id fetched when no such folder exists.
        device, dtype: where and in which precision to put the model (default: CPU, the
            weights' dtype for kineflow folders, float32 for Janus releases).
        max_bytes: the size limit (default: the ``KINEFLOW_MAX_MODEL_BYTES`` environment
            variable, else the smaller of the machine's RAM and 64 GiB).
        check_finite: check for NaN / inf; None (default): when the weight files take less
            than :data:`~kineflow.interop.load_checks.FINITE_CHECK_BYTES` (2 GiB).

    Raises:
        FileNotFoundError: no such folder / hub repository, or a required file is missing.
        ValueError: a config that is neither kind or describes a model above the size limit,
            or weights (integer-typed, non-finite, mis-fitting), tokenizer, processor settings
            or metric tables that do not fit the model (each names the file and the problem).
    """
    folder = resolve_checkpoint(name)
    config_path = folder / CONFIG_NAME
    if not config_path.is_file():
        raise FileNotFoundError(f"{folder} has no {CONFIG_NAME}; it is not a checkpoint folder")
    config = read_json_object(config_path)
    kind = config.get(TYPE_FIELD)
    if kind not in (FUDOKI_KIND, UNIFLUID_KIND) and config.get("model_type") == "multi_modality":
        janus = load_janus_folder(folder, config, max_bytes=max_bytes, check_finite=check_finite)
        return janus.to(device=device, dtype=dtype or torch.float32)
    if kind not in (FUDOKI_KIND, UNIFLUID_KIND):
        found = kind or config.get("model_type")
        raise ValueError(
            f"{config_path} describes {found!r}; kineflow.load reads kineflow FUDOKI and UniFluid "
            f"folders ({TYPE_FIELD} {FUDOKI_KIND!r} / {UNIFLUID_KIND!r}) and Janus / FUDOKI "
            "releases (model_type 'multi_modality')"
        )
    weights_path = folder / WEIGHTS_NAME
    check = wants_finite_check(check_finite, [weights_path])
    pipeline: FudokiPipeline | UnifluidPipeline
    if kind == FUDOKI_KIND:
        model_config = _parsed(lambda: FudokiConfig.from_dict(config["model"]))
        _check_kineflow_folder(folder, model_config, FudokiModel, max_bytes, check)
        pipeline = FudokiPipeline.from_kineflow_folder(folder)
    else:
        model_config = _parsed(lambda: UnifluidConfig(**config["model"]))
        _check_kineflow_folder(folder, model_config, UnifluidModel, max_bytes, check)
        pipeline = UnifluidPipeline.from_pretrained(folder)
    if check:  # the weights are in the model now; their names are the file's
        state = pipeline.model.state_dict()
        check_finite_tensors((f"{weights_path}: {key}", t) for key, t in state.items())
    return pipeline.to(device=device, dtype=dtype)


def _parsed(parse: Callable[[], Any]) -> Any:
    """``parse()``, or None where it fails: the loader that follows reports a bad config
    with its own message, so the checks before it only skip."""
    try:
        return parse()
    except (TypeError, ValueError, KeyError, AttributeError):
        return None


def _check_kineflow_folder(
    folder: Path,
    model_config: FudokiConfig | UnifluidConfig | None,
    model_class: Callable[[Any], nn.Module],
    max_bytes: int | None,
    check: bool,
) -> None:
    """What is checked before a kineflow folder's model is built: its size, the dtypes in
    ``model.safetensors``'s header against the model's parameters, and a FUDOKI folder's
    metric tables (floating-point, and finite when ``check``: the pipeline casts and uses
    them as they are)."""
    if model_config is None:
        return
    check_model_size(model_config, str(folder / CONFIG_NAME), max_bytes)
    weights_path = folder / WEIGHTS_NAME
    stored = _header_dtypes(weights_path)
    if stored is not None:
        expected = expected_state(model_class, model_config)
        check_floating(expected, stored, lambda key: weights_path)
    tables_path = folder / METRIC_FILE
    tables = _header_dtypes(tables_path) if model_class is FudokiModel else None
    if tables is None:
        return
    floats = {name: torch.empty(0) for name in ("text", "image")}  # both tables are floats
    check_floating(floats, tables, lambda key: tables_path)
    if check:
        loaded = load_file(str(tables_path), device="cpu")
        check_finite_tensors((f"{tables_path}: {name}", t) for name, t in loaded.items())


def _header_dtypes(path: Path) -> dict[str, torch.dtype] | None:
    """The dtypes in a safetensors file's header; None for a missing or damaged file, which
    the loader then reports."""
    if not path.is_file():
        return None
    try:
        return safetensors_dtypes(path)
    except ValueError:
        return None


def load_janus_folder(
    folder: str | os.PathLike[str],
    config: Mapping[str, Any] | None = None,
    *,
    max_bytes: int | None = None,
    check_finite: bool | None = None,
) -> FudokiPipeline:
    """A Janus / FUDOKI release folder (see the module docstring) as a pipeline, on the CPU.

    The config's model must fit the size limit (``max_bytes``, see :func:`load`). Every
    weight must be consumed (Janus's unused buffers and vision blocks aside), fit the config,
    be floating-point where the model's parameter is, and (with ``check_finite``, as in
    :func:`load`) be free of NaN / inf, as must the metric tables; the tokenizer must fit the
    model's text vocabulary; processor settings must agree with the model (image size, image
    tokens, chat format).
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
    try:
        return FudokiPipeline(
            model, tokenizer, tables["text"], tables["image"], pipeline_config, provenance
        )
    except ValueError as e:
        sources = "; ".join(f"{k}: {v}" for k, v in provenance.items())
        raise ValueError(f"{folder}: {e} (metric tables: {sources})") from e


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
