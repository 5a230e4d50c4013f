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
    without running any other pickled code, see :mod:`kineflow.checkpoint_files`).

The metric tables: the text table is the language model's input embedding
``language_model.model.embed_tokens.weight`` [V, D] and the image table the VQ codebook
``gen_vision_model.quantize.embedding.weight`` [K, d]. When a release ships the ``.pt`` files
they are used as they are, and :attr:`FudokiPipeline.provenance` records which model tensor
each one equals (or that it equals none); when it does not, the tables are taken from those
two tensors and the provenance says so. Which tensors the official files hold is not
documented upstream: the provenance check answers it for any release loaded.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from kineflow.checkpoint_files import (
    load_embedding_table,
    read_weights,
    safetensors_dtypes,
    tensor_file,
)
from kineflow.folders import recover_interrupted_save
from kineflow.io import CONFIG_NAME, TYPE_FIELD, WEIGHTS_NAME, dtype_name, read_json_object
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
#: ``check_finite=None`` checks every weight for NaN / inf below this many bytes of weights (a
#: pass over them costs far less than the load itself), and skips it above.
FINITE_CHECK_BYTES = 2 * 2**30


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
    (:func:`kineflow.models.size.check_model_size`) and a config too large for the limit is
    refused; before the weights are copied in, every floating-point parameter must be stored
    as a floating-point tensor (integers would be truncated silently). After loading, with
    ``check_finite``, every weight and metric table must be free of NaN and inf.

    Args:
        name: a folder, or a hub id fetched when no such folder exists.
        device, dtype: where and in which precision to put the model (default: CPU, the
            weights' dtype for kineflow folders, float32 for Janus releases).
        max_bytes: the size limit (default: the ``KINEFLOW_MAX_MODEL_BYTES`` environment
            variable, else the smaller of the machine's RAM and 64 GiB).
        check_finite: check the weights for NaN / inf; None (default) does so when they take
            less than :data:`FINITE_CHECK_BYTES`.

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
    pipeline: FudokiPipeline | UnifluidPipeline
    locate = _the_file(folder / WEIGHTS_NAME)  # kineflow folders: one weights file
    tables: dict[str, str] = {}
    if config.get(TYPE_FIELD) == FUDOKI_KIND:
        model_config = _parsed(lambda: FudokiConfig.from_dict(config["model"]))
        _check_kineflow_weights(folder, model_config, FudokiModel, max_bytes)
        pipeline = FudokiPipeline.from_kineflow_folder(folder)
        tables = {name: f"{folder / METRIC_FILE}[{name}]" for name in ("text", "image")}
    elif config.get(TYPE_FIELD) == UNIFLUID_KIND:
        model_config = _parsed(lambda: UnifluidConfig(**config["model"]))
        _check_kineflow_weights(folder, model_config, UnifluidModel, max_bytes)
        pipeline = UnifluidPipeline.from_pretrained(folder)
    elif config.get("model_type") == "multi_modality":
        pipeline = load_janus_folder(folder, config, max_bytes=max_bytes)
        locate = tensor_file(folder)
        tables = {name: f"the {name} metric table ({where})"
                  for name, where in pipeline.provenance.items()}  # fmt: skip
        dtype = dtype or torch.float32
    else:
        found = config.get(TYPE_FIELD) or config.get("model_type")
        raise ValueError(
            f"{config_path} describes {found!r}; kineflow.load reads kineflow FUDOKI and UniFluid "
            f"folders ({TYPE_FIELD} {FUDOKI_KIND!r} / {UNIFLUID_KIND!r}) and Janus / FUDOKI "
            "releases (model_type 'multi_modality')"
        )
    _check_finite(pipeline, locate, tables, check_finite)
    return pipeline.to(device=device, dtype=dtype)


def _the_file(path: Path) -> Callable[[str], Path]:
    """A locator (tensor name -> file) for a folder whose weights are all in ``path``."""
    return lambda key: path


def _parsed(parse: Callable[[], Any]) -> Any:
    """``parse()``, or None where it fails: the loader that follows reports a bad config
    with its own message, so the checks before it only skip."""
    try:
        return parse()
    except (TypeError, ValueError, KeyError, AttributeError):
        return None


def _check_kineflow_weights(
    folder: Path,
    model_config: FudokiConfig | UnifluidConfig | None,
    model_class: Callable[[Any], nn.Module],
    max_bytes: int | None,
) -> None:
    """The checks before a kineflow folder's model is built: its size, then the dtypes of
    ``model.safetensors`` (from its header) against the model's parameters, and those of a
    FUDOKI folder's metric tables (which the pipeline would cast to float silently)."""
    if model_config is None:
        return
    check_model_size(model_config, str(folder / CONFIG_NAME), max_bytes)
    weights_path, tables_path = folder / WEIGHTS_NAME, folder / METRIC_FILE
    stored = _header_dtypes(weights_path)
    if stored is not None:
        _check_floating(model_class, model_config, stored, _the_file(weights_path))
    tables = _header_dtypes(tables_path) if model_class is FudokiModel else None
    for name, got in (tables or {}).items():
        if not got.is_floating_point:
            raise ValueError(
                f"{tables_path}: {name} is {dtype_name(got)}, expected a floating-point tensor"
            )


def _header_dtypes(path: Path) -> dict[str, torch.dtype] | None:
    """The dtypes in a safetensors file's header; None for a missing or damaged file, which
    the loader then reports."""
    if not path.is_file():
        return None
    try:
        return safetensors_dtypes(path)
    except ValueError:
        return None


def _check_floating(
    model_class: Callable[[Any], nn.Module],
    model_config: Any,
    stored: Mapping[str, torch.dtype],
    locate: Callable[[str], Path],
) -> None:
    """Refuse an integer or bool tensor stored for a floating-point parameter (by name): the
    copy into the model would cast it silently, truncating the values (mostly to zeros).

    The model is built on the meta device, which allocates nothing, to learn its dtypes.
    """
    with torch.device("meta"):
        expected = model_class(model_config).state_dict()
    for key, want in expected.items():
        got = stored.get(key)
        if got is not None and want.is_floating_point() and not got.is_floating_point:
            raise ValueError(
                f"{locate(key)}: {key} is {dtype_name(got)}, expected a floating-point tensor"
            )


def _check_finite(
    pipeline: FudokiPipeline | UnifluidPipeline,
    locate: Callable[[str], Path],
    tables: Mapping[str, str],
    check: bool | None,
) -> None:
    """Refuse NaN / inf in the model's weights (named by ``locate``) and a FUDOKI pipeline's
    metric tables (named by ``tables``): they would only surface later as NaN logits."""
    state = pipeline.model.state_dict()
    if check is None:
        check = sum(t.numel() * t.element_size() for t in state.values()) < FINITE_CHECK_BYTES
    if not check:
        return
    named = [(str(locate(key)), key, t) for key, t in state.items()]
    for name, where in tables.items():
        named.append((where, "", getattr(pipeline, f"{name}_embeddings")))
    for where, key, tensor in named:
        if not tensor.is_floating_point():
            continue
        bad = int((~torch.isfinite(tensor)).sum())
        if bad:
            what = f"{where}: {key}" if key else where
            raise ValueError(
                f"{what} holds {bad:,} non-finite value(s) (NaN or inf) of {tensor.numel():,}: "
                "the weights are damaged (kineflow.load(..., check_finite=False) loads them "
                "anyway)"
            )


def load_janus_folder(
    folder: str | os.PathLike[str],
    config: Mapping[str, Any] | None = None,
    *,
    max_bytes: int | None = None,
) -> FudokiPipeline:
    """A Janus / FUDOKI release folder (see the module docstring) as a pipeline, on the CPU.

    The config's model must fit the size limit (``max_bytes``, see :func:`load`). Every
    weight must be consumed (Janus's unused buffers and vision blocks aside), fit the config
    and be floating-point where the model's parameter is; the tokenizer must fit the model's
    text vocabulary; processor settings must agree with the model (image size, image tokens,
    chat format).
    """
    folder = Path(folder)
    if config is None:
        config = read_json_object(folder / CONFIG_NAME)
    try:
        model_config = FudokiConfig.from_janus_config(config)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{folder / CONFIG_NAME}: {e}") from e
    check_model_size(model_config, str(folder / CONFIG_NAME), max_bytes)
    tokenizer_file = folder / "tokenizer.json"
    if not tokenizer_file.is_file():
        raise FileNotFoundError(f"{folder} has no tokenizer.json (the text tokenizer)")
    tokenizer = TextTokenizer.load(folder)
    pipeline_config = _janus_processor_config(folder, model_config)
    weights = read_weights(folder)
    stored = {key: t.dtype for key, t in weights.items()}
    _check_floating(FudokiModel, model_config, stored, tensor_file(folder))
    try:
        model = FudokiModel.from_janus_state_dict(weights, model_config)
    except ValueError as e:
        raise ValueError(f"{folder}: {e}") from e
    tables, provenance = _metric_tables(folder, weights)
    del weights
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
