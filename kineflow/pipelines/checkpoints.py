"""Finding a checkpoint folder and checking a kineflow folder before its model is built.

:func:`open_checkpoint` is what :func:`kineflow.load` and ``FudokiPipeline.from_pretrained``
run: resolve the name to a local folder (:func:`resolve_checkpoint`), read its
``config.json``, pick the pipeline class from the registry
(:func:`kineflow.pipelines.base.pipeline_for_config`) and let that class load it
(:meth:`~kineflow.pipelines.base.Pipeline.load_checkpoint`). The classes' loaders share
:func:`load_checked` for kineflow folders: size and dtype checks before the model is built,
a NaN / inf check after.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn

from kineflow.folders import recover_interrupted_save
from kineflow.interop.checkpoint_files import safetensors_dtypes
from kineflow.interop.load_checks import check_finite as check_finite_tensors
from kineflow.interop.load_checks import check_floating, expected_state, wants_finite_check
from kineflow.io import CONFIG_NAME, WEIGHTS_NAME, read_json_object
from kineflow.models.size import check_model_size
from kineflow.pipelines.base import Pipeline, pipeline_for_config

__all__ = [
    "header_dtypes",
    "load_checked",
    "open_checkpoint",
    "read_checkpoint_config",
    "resolve_checkpoint",
]

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
P = TypeVar("P", bound=Pipeline)


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


def read_checkpoint_config(folder: Path) -> dict[str, Any]:
    """The JSON object in ``folder/config.json``.

    Raises:
        FileNotFoundError: there is none (the folder is not a checkpoint).
        ValueError: it is not a readable JSON object (see :func:`kineflow.io.read_json_object`).
    """
    config_path = folder / CONFIG_NAME
    if not config_path.is_file():
        raise FileNotFoundError(f"{folder} has no {CONFIG_NAME}; it is not a checkpoint folder")
    return read_json_object(config_path)


def open_checkpoint(
    name: str | os.PathLike[str],
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    max_bytes: int | None = None,
    check_finite: bool | None = None,
    expect: type[P] = Pipeline,  # type: ignore[assignment]
) -> P:
    """The pipeline in the checkpoint ``name`` (see :func:`kineflow.load`, which documents
    the arguments and errors), refused with a ValueError unless it is an ``expect``."""
    folder = resolve_checkpoint(name)
    config = read_checkpoint_config(folder)
    cls = pipeline_for_config(config, folder / CONFIG_NAME)
    if not issubclass(cls, expect):
        raise ValueError(f"{folder} holds a {cls.display_name} checkpoint, not a "
                         f"{expect.display_name} one (kineflow.load reads either)")  # fmt: skip
    pipeline = cls.load_checkpoint(folder, config, max_bytes=max_bytes, check_finite=check_finite)
    return pipeline.to(device=device, dtype=dtype)


def load_checked(
    folder: Path,
    parse: Callable[[], Any],
    model_class: Callable[[Any], nn.Module],
    build: Callable[[Path], P],
    *,
    max_bytes: int | None,
    check_finite: bool | None,
    also: Callable[[bool], None] | None = None,
) -> P:
    """``build(folder)``, a kineflow folder's pipeline, after and before its checks: the
    model config ``parse()`` returns must fit the size limit and ``model.safetensors``'s
    header must store every floating-point parameter of ``model_class(config)`` as floats;
    then ``also(check)`` runs the family's own checks (FUDOKI: its metric tables). With
    ``check``, i.e. ``check_finite`` (None: for weights under 2 GiB), the weights, once
    loaded, must be free of NaN and inf. A config ``parse`` cannot read skips the checks
    before the build, which then reports it with its own message."""
    weights_path = folder / WEIGHTS_NAME
    check = wants_finite_check(check_finite, [weights_path])
    model_config = _parsed(parse)
    if model_config is not None:
        check_model_size(model_config, str(folder / CONFIG_NAME), max_bytes)
        stored = header_dtypes(weights_path)
        if stored is not None:
            expected = expected_state(model_class, model_config)
            check_floating(expected, stored, lambda key: weights_path)
        if also is not None:
            also(check)
    pipeline = build(folder)
    if check:  # the weights are in the model now; their names are the file's
        state = pipeline.model.state_dict()
        check_finite_tensors((f"{weights_path}: {key}", t) for key, t in state.items())
    return pipeline


def _parsed(parse: Callable[[], Any]) -> Any:
    """``parse()``, or None where it fails: the loader that follows reports a bad config
    with its own message, so the checks before it only skip."""
    try:
        return parse()
    except (TypeError, ValueError, KeyError, AttributeError):
        return None


def header_dtypes(path: Path) -> dict[str, torch.dtype] | None:
    """The dtypes in a safetensors file's header; None for a missing or damaged file, which
    the loader then reports."""
    if not path.is_file():
        return None
    try:
        return safetensors_dtypes(path)
    except ValueError:
        return None
