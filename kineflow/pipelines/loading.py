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

``{adapter_config.json, adapter_model.safetensors}``, no ``config.json``  a LoRA adapter
    folder (``out/adapter`` of a run with a ``lora`` section): the base folder it records is
    loaded, checked against the sha256 of its weights the adapter records, and the adapter
    is merged into it on load (:mod:`kineflow.pipelines.adapters`), so the result is an
    ordinary pipeline of the base's family.

Which pipeline class reads a folder is the registry's answer
(:func:`kineflow.pipelines.base.pipeline_for_config`): the one registered for its
``kineflow_type``, or the one that reads its foreign ``model_type`` (FUDOKI: Janus releases).
Finding the folder and the checks live in :mod:`kineflow.pipelines.checkpoints`, reading a
Janus release in :mod:`kineflow.pipelines.janus_release`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch

from kineflow.pipelines.adapters import is_adapter_folder, load_adapter
from kineflow.pipelines.base import Pipeline
from kineflow.pipelines.checkpoints import open_checkpoint, resolve_checkpoint
from kineflow.pipelines.fudoki import FudokiPipeline

__all__ = ["load", "load_janus_folder", "resolve_checkpoint"]


def load(
    name: str | os.PathLike[str],
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    max_bytes: int | None = None,
    check_finite: bool | None = None,
) -> Pipeline:
    """Load a checkpoint folder or hub id (see the module docstring) as a ready pipeline.

    Before the model is built, its size is estimated from ``config.json``
    (:func:`kineflow.models.size.check_model_size`) and a model above the limit is refused;
    before weights are copied in, every floating-point parameter must be stored as a
    floating-point tensor; with ``check_finite``, every weight and metric table must be free
    of NaN and inf (:mod:`kineflow.interop.load_checks`).

    Args:
        name: a folder (a LoRA adapter folder: its base with the adapter merged in), or a
            hub id fetched when no such folder exists.
        device, dtype: where and in which precision to put the model (default: CPU, the
            weights' dtype for kineflow folders, float32 for Janus releases).
        max_bytes: the size limit (default: the ``KINEFLOW_MAX_MODEL_BYTES`` environment
            variable, else the smaller of the machine's RAM and 64 GiB).
        check_finite: check for NaN / inf; None (default): when the weight files take less
            than :data:`~kineflow.interop.load_checks.FINITE_CHECK_BYTES` (2 GiB).

    Raises:
        FileNotFoundError: no such folder / hub repository, or a required file is missing.
        ValueError: a config no registered pipeline reads (naming what it describes and what
            can be read) or that describes a model above the size limit, or weights
            (integer-typed, non-finite, mis-fitting), tokenizer, processor settings or metric
            tables that do not fit the model (each names the file and the problem); an
            adapter whose recorded base weights differ from its base folder's (naming both).
    """
    if is_adapter_folder(name):
        return load_adapter(name, merge=True, device=device, dtype=dtype, max_bytes=max_bytes,
                            check_finite=check_finite)  # fmt: skip
    return open_checkpoint(
        name, device=device, dtype=dtype, max_bytes=max_bytes, check_finite=check_finite
    )


def load_janus_folder(
    folder: str | os.PathLike[str],
    config: Mapping[str, Any] | None = None,
    *,
    max_bytes: int | None = None,
    check_finite: bool | None = None,
) -> FudokiPipeline:
    """A Janus / FUDOKI release folder (see the module docstring) as a pipeline, on the CPU:
    :meth:`FudokiPipeline.from_janus_release
    <kineflow.pipelines.fudoki_checkpoints.FudokiCheckpoints.from_janus_release>`, whose
    checks :func:`~kineflow.pipelines.janus_release.read_janus_release` documents."""
    return FudokiPipeline.from_janus_release(
        folder, config, max_bytes=max_bytes, check_finite=check_finite
    )
