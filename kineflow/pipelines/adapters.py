"""Reading LoRA adapter folders: base pipeline + adapter, unmerged or merged.

An adapter folder (written by a training run with a ``lora`` section, see
:mod:`kineflow.train.lora`) holds

``adapter_config.json``  ``{"format": "kineflow-lora", "kineflow_type", "rank", "alpha",
    "dropout", "targets", "also_train", "modules", "base", "base_weights_sha256", ...}``: the
    wrapped linears' paths, the base folder and the sha256 of its ``model.safetensors``;
``adapter_model.safetensors``  ``{module}.lora_A`` [r, in] and ``{module}.lora_B`` [out, r]
    for every wrapped linear, and the ``also_train`` and ``swapped`` modules' whole weights
    (their own key names);
``metric.safetensors``  (FUDOKI runs that swapped the base's VQ for their own) the metric
    tables the run trained with: the base's text table and the new VQ's codebook.

:func:`load_adapter` rebuilds base + adapter: the base folder is loaded
(:func:`~kineflow.pipelines.checkpoints.open_checkpoint`) in float32, its weights' sha256 is
compared with the recorded one, the same linears are wrapped
(:func:`~kineflow.models.lora.apply_lora`) and the adapter's tensors copied in; with ``merge``
the update is folded into the weights (``W ← W + (α / r) B A``, in float32) and the model
is an ordinary one again. :func:`kineflow.load` reads an adapter folder this way, merged (an
ordinary pipeline: it saves, casts and compiles like any other, and costs nothing extra per
call).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from kineflow.data.shards import file_digest
from kineflow.io import CONFIG_NAME
from kineflow.models.lora import apply_lora, load_lora_state_dict, merge_lora
from kineflow.pipelines.base import Pipeline
from kineflow.pipelines.checkpoints import open_checkpoint

__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_FORMAT",
    "ADAPTER_WEIGHTS",
    "base_digest",
    "is_adapter_folder",
    "load_adapter",
    "merge_adapter",
    "read_adapter_config",
]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_FORMAT = "kineflow-lora"


def base_digest(base: str | os.PathLike[str]) -> str:
    """sha256 of the base folder's ``model.safetensors`` (what an adapter records).

    Raises:
        FileNotFoundError: the base folder has no ``model.safetensors`` (naming it).
    """
    weights = Path(base) / "model.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"{weights}: no such file (the adapter's base model folder)")
    return file_digest([weights])


def is_adapter_folder(folder: str | os.PathLike[str]) -> bool:
    """True for a folder holding ``adapter_config.json`` and no ``config.json``."""
    path = Path(folder).expanduser()
    return (path / ADAPTER_CONFIG).is_file() and not (path / CONFIG_NAME).is_file()


def read_adapter_config(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """``adapter_config.json`` of ``folder``, checked.

    Raises:
        FileNotFoundError: no adapter there.
        ValueError: not a kineflow adapter config.
    """
    path = Path(folder) / ADAPTER_CONFIG
    if not path.is_file() or not (Path(folder) / ADAPTER_WEIGHTS).is_file():
        raise FileNotFoundError(
            f"{folder}: no {ADAPTER_CONFIG} + {ADAPTER_WEIGHTS} (an adapter "
            "folder is written by a training run with a lora section)"
        )
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(config, dict) or config.get("format") != ADAPTER_FORMAT:
        raise ValueError(f"{path}: not a kineflow LoRA adapter (format must be {ADAPTER_FORMAT!r})")
    missing = [k for k in ("rank", "alpha", "targets") if k not in config]
    if missing:
        raise ValueError(f"{path}: lacks {missing}")
    return config


def load_adapter(
    adapter: str | os.PathLike[str],
    base: str | os.PathLike[str] | None = None,
    *,
    merge: bool = False,
    check_base: bool = True,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    max_bytes: int | None = None,
    check_finite: bool | None = None,
) -> Pipeline:
    """The base pipeline (``base``, else the folder the adapter records) with the adapter
    applied (module docstring); ``merge=True`` folds it into the weights. ``check_base``
    compares the base's ``model.safetensors`` with the recorded sha256. The model is built
    and merged in float32, then moved to ``device`` / ``dtype``; ``max_bytes`` /
    ``check_finite`` apply to the base as in :func:`kineflow.load`.

    Raises:
        FileNotFoundError / ValueError: no adapter, no base, a base of another family or
            whose weights differ from the recorded ones (naming the base and the adapter), an
            adapter that does not fit the base (naming the tensor).
    """
    config = read_adapter_config(adapter)
    base = base if base is not None else config.get("base")
    if base is None:
        raise ValueError(f"{adapter}: the adapter records no base folder: pass one")
    recorded = config.get("base_weights_sha256")
    if check_base and recorded is not None and base_digest(base) != recorded:
        raise ValueError(
            f"{base}: its model.safetensors is not the base the adapter {adapter} was "
            "trained on (sha256 differs)"
        )
    pipe = open_checkpoint(base, dtype=torch.float32, max_bytes=max_bytes,
                           check_finite=check_finite)  # fmt: skip
    kind = config.get("kineflow_type")
    if kind is not None and kind != pipe.kineflow_type:
        raise ValueError(f"{adapter} is a {kind} adapter but its base {base} holds a "
                         f"{pipe.kineflow_type} model")  # fmt: skip
    wrapped = apply_lora(pipe.model, config["targets"], config["rank"], config["alpha"])
    if sorted(wrapped) != sorted(config.get("modules", wrapped)):
        raise ValueError(f"{adapter}: its targets wrap other modules in {base} than in training")
    weights = load_file(str(Path(adapter) / ADAPTER_WEIGHTS))
    lora = {k: v for k, v in weights.items() if k.rsplit(".", 1)[-1] in ("lora_A", "lora_B")}
    try:
        load_lora_state_dict(pipe.model, lora)
    except ValueError as e:
        raise ValueError(f"{adapter}: {e}") from None
    rest = {k: v for k, v in weights.items() if k not in lora}
    own = pipe.model.state_dict()
    bad = [k for k, v in rest.items() if k not in own or own[k].shape != v.shape]
    if bad:
        raise ValueError(f"{adapter}: tensors that do not fit the base {base}: {bad[:4]}")
    pipe.model.load_state_dict(rest, strict=False)
    tables = Path(adapter) / "metric.safetensors"
    if config.get("swapped") and tables.is_file():
        pipe = _with_metric_tables(pipe, tables)
    if merge:
        merge_lora(pipe.model)
    pipe.model.eval()
    return pipe.to(device=device, dtype=dtype)


def _with_metric_tables(pipe: Pipeline, tables: Path) -> Pipeline:
    """``pipe`` with the metric tables of ``tables`` (a run that swapped the base's VQ trained
    on its own codebook's path). Only FUDOKI pipelines have metric tables."""
    if not hasattr(pipe, "provenance"):
        raise ValueError(f"{tables}: metric tables for a {pipe.display_name} model")
    t = load_file(str(tables))
    return type(pipe)(pipe.model, pipe.tokenizer, t["text"], t["image"], pipe.config,
                      {**pipe.provenance, "image": str(tables)})  # fmt: skip


def merge_adapter(
    adapter: str | os.PathLike[str],
    out: str | os.PathLike[str],
    base: str | os.PathLike[str] | None = None,
) -> Path:
    """Fold the adapter into its base and save the result as an ordinary pipeline folder."""
    pipe = load_adapter(adapter, base, merge=True)
    pipe.save_pretrained(out)
    return Path(out)
