"""Safe files: atomic writes, checked JSON reads and kineflow's pretrained folders.

Every writer here goes through :func:`atomic_write`: the bytes go to a temporary file in the
target's folder, are flushed to disk, and only then replace the target (``os.replace``), so a
reader sees the old file or the new one, never half of one, and a failure leaves no temporary
file behind.

A *pretrained folder* holds ``model.safetensors`` (the state dict) and ``config.json`` (a JSON
object: the model's config plus ``"kineflow_type"``, which says which model class reads it).
It is written whole beside its place and swapped in (:mod:`kineflow.folders`), so a save is
atomic as a folder, not only file by file.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from kineflow.folders import recover_interrupted_save, replace_folder

#: File names in a pretrained folder.
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
#: The ``config.json`` field naming the kind of model a pretrained folder holds.
TYPE_FIELD = "kineflow_type"
#: What JSON readers say of a value nested past Python's recursion limit (a hostile file:
#: ``json`` recurses once per ``[`` / ``{``, and ~1000 levels raise RecursionError).
NESTING_PROBLEM = "arrays / objects nested too deeply"

M = TypeVar("M", bound=nn.Module)

__all__ = [
    "CONFIG_NAME",
    "NESTING_PROBLEM",
    "TYPE_FIELD",
    "WEIGHTS_NAME",
    "atomic_save_safetensors",
    "atomic_write",
    "atomic_write_json",
    "atomic_write_text",
    "check_state_dict",
    "dtype_name",
    "load_pretrained",
    "load_pretrained_folder",
    "read_json_object",
    "read_jsonl",
    "save_pretrained_folder",
]


# -- writing --------------------------------------------------------------------------------------
def atomic_write(path: str | os.PathLike[str], write: Callable[[Path], None]) -> Path:
    """Create ``path`` atomically: ``write(temp)`` fills a temporary file, which replaces it.

    ``temp`` is a new, empty file in the same folder (a unique hidden name) that ``write``
    opens and fills by its path. Once it returns, the file is synced to disk and renamed over
    ``path``. If anything raises (``write`` itself, the sync, the rename, or an interrupt), the
    temporary file is removed and an existing ``path`` is left untouched.

    The new file gets the permissions a plain ``open(path, "w")`` would give a new file
    (``0o666`` less the umask), not the private ``0o600`` of :mod:`tempfile`'s files.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    path = Path(path)
    temp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    # O_EXCL: the name is ours alone. Mode 0o666 lets the umask decide, as open() would;
    # ``write`` reopening the file keeps the mode it was created with.
    os.close(os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        write(temp)
        with open(temp, "rb+") as f:  # on disk before the rename makes it visible
            os.fsync(f.fileno())
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike[str], text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_write`), newlines as given."""

    def write(temp: Path) -> None:
        with open(temp, "w", encoding=encoding, newline="") as f:
            f.write(text)

    return atomic_write(path, write)


def atomic_write_json(path: str | os.PathLike[str], data: Any, *, sort_keys: bool = False) -> Path:
    """Write ``data`` as indented JSON (UTF-8, non-ASCII kept as is, final newline) to
    ``path`` atomically (see :func:`atomic_write`)."""
    text = json.dumps(data, indent=2, sort_keys=sort_keys, ensure_ascii=False) + "\n"
    return atomic_write_text(path, text)


def atomic_save_safetensors(
    path: str | os.PathLike[str],
    tensors: Mapping[str, Tensor],
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Save ``tensors`` (detached CPU copies, dtypes kept) as a safetensors file at ``path``
    atomically (see :func:`atomic_write`). Tensors sharing storage must be cloned first.
    ``metadata`` goes into the file's header."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    meta = dict(metadata) if metadata is not None else None
    return atomic_write(path, lambda temp: save_file(tensors, str(temp), metadata=meta))


# -- reading --------------------------------------------------------------------------------------
def read_json_object(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The JSON object in the UTF-8 file ``path``.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: the file is not UTF-8 JSON, or holds another value than an object.
        Each message names ``path``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
    except RecursionError:  # json's decoder recurses once per nesting level
        raise ValueError(f"{path} is not valid JSON: {NESTING_PROBLEM}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def read_jsonl(path: str | os.PathLike[str]) -> list[tuple[int, Any]]:
    """``(line number, value)`` of every non-blank line of the JSON-lines file ``path``.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: ``"{path}:{line}: bad JSON (...)"`` for the first line that does not parse.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                rows.append((n, json.loads(line)))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: bad JSON ({e.msg})") from None
            except RecursionError:
                raise ValueError(f"{path}:{n}: bad JSON ({NESTING_PROBLEM})") from None
    return rows


# -- state dicts ----------------------------------------------------------------------------------
def check_state_dict(
    own: Mapping[str, Tensor], loaded: Mapping[str, Tensor], source: str, *, prefix: str = ""
) -> None:
    """Check that ``loaded`` has exactly the keys and shapes of ``own`` (a model's state dict),
    and a floating-point tensor wherever ``own`` has one.

    ``source`` says where ``loaded`` comes from (a file, "the checkpoint", …). Keys are named
    as ``prefix + key``, i.e. as they appear in the source when the caller stripped a prefix.

    Raises:
        ValueError: one error naming every missing, unexpected, mis-shaped and
            non-floating key, mis-shaped ones with both shapes (``key: expected <model's>,
            got <loaded>``), non-floating ones with the stored dtype (``key is int64, expected
            a floating-point tensor``).
    """
    missing = sorted(set(own) - set(loaded))
    unexpected = sorted(set(loaded) - set(own))
    mis_shaped = [
        f"{prefix}{k}: expected {tuple(own[k].shape)}, got {tuple(loaded[k].shape)}"
        for k in sorted(set(own) & set(loaded))
        if tuple(loaded[k].shape) != tuple(own[k].shape)
    ]
    # A float parameter stored as integers or bools would be cast silently by copy_ (its
    # values truncated, typically to zeros): refuse it by name.
    not_float = [
        f"{prefix}{k} is {dtype_name(loaded[k].dtype)}, expected a floating-point tensor"
        for k in sorted(set(own) & set(loaded))
        if own[k].is_floating_point() and not loaded[k].is_floating_point()
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing: " + ", ".join(prefix + k for k in missing))
    if unexpected:
        problems.append(
            f"{len(unexpected)} unexpected: " + ", ".join(prefix + k for k in unexpected)
        )
    if mis_shaped:
        problems.append(f"{len(mis_shaped)} mis-shaped: " + "; ".join(mis_shaped))
    if not_float:
        problems.append(f"{len(not_float)} not floating-point: " + "; ".join(not_float))
    if problems:
        raise ValueError(f"{source} does not match the model:\n  " + "\n  ".join(problems))


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.int64`` -> ``"int64"``, for messages."""
    return str(dtype).removeprefix("torch.")


# -- pretrained folders ---------------------------------------------------------------------------
def save_pretrained_folder(
    folder: str | os.PathLike[str],
    state_dict: Mapping[str, Tensor],
    config: Mapping[str, Any],
    kind: str,
    *,
    extra: Callable[[Path], None] | None = None,
) -> Path:
    """Write a pretrained folder: ``model.safetensors`` with ``state_dict`` (detached CPU
    copies, dtypes kept), ``config.json`` with ``{"kineflow_type": kind, **config}``, and
    whatever ``extra(folder)`` writes first (a pipeline's tokenizer, say). Returns the folder.

    The whole folder is written beside ``folder`` and swapped in only when complete
    (:func:`kineflow.folders.replace_folder`): an interrupted save leaves the previous folder
    as it was, never old files mixed with new ones.

    Raises:
        ValueError: ``config`` has its own ``kineflow_type``; ``folder`` is a file, or holds
            files a kineflow save does not write (which a save would delete).
    """
    if TYPE_FIELD in config:
        raise ValueError(f"config must not hold {TYPE_FIELD!r}: it is written from kind")
    with replace_folder(folder) as temp:
        if extra is not None:
            extra(temp)
        atomic_save_safetensors(temp / WEIGHTS_NAME, state_dict, {"format": "pt", TYPE_FIELD: kind})
        atomic_write_json(temp / CONFIG_NAME, {TYPE_FIELD: kind, **config})
    return Path(folder)


def load_pretrained_folder(
    folder: str | os.PathLike[str],
    kind: str,
    what: str,
    *,
    diffusers_hints: Mapping[str, str] | None = None,
) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """Read a pretrained folder written by :func:`save_pretrained_folder` for ``kind``.

    ``what`` names the model for messages ("VQ tokenizer"). When ``config.json`` looks like a
    diffusers one (a ``_class_name``, no ``kineflow_type``) the error says so, with the advice
    ``diffusers_hints`` gives for that class, e.g. which loader reads such folders.

    Returns:
        ``(config, weights)``: ``config.json``'s object without ``kineflow_type``, and the
        tensors of ``model.safetensors`` on the CPU. Checking them against a model is the
        caller's (:func:`check_state_dict`).

    Raises:
        FileNotFoundError: no folder, or no ``config.json`` or ``model.safetensors`` in it.
        ValueError: ``config.json`` is not a JSON object, or is not of type ``kind``.
    """
    folder = Path(folder)
    if not folder.is_dir():
        with contextlib.suppress(OSError):  # a read-only place: report the folder as missing
            recover_interrupted_save(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"no {what} folder at {folder} (no such folder)")
    config_path, weights_path = folder / CONFIG_NAME, folder / WEIGHTS_NAME

    def require(path: Path) -> None:
        if not path.is_file():
            raise FileNotFoundError(
                f"{folder} has no {path.name}; a {what} folder holds {CONFIG_NAME} and "
                f"{WEIGHTS_NAME}"
            )

    # The config first: a folder of another kind should say so, not miss our weights file.
    require(config_path)
    config = read_json_object(config_path)
    found = config.pop(TYPE_FIELD, None)
    if found != kind:
        problem = f"has no {TYPE_FIELD} field" if found is None else f"is of type {found!r}"
        hint = ""
        if found is None and "_class_name" in config:
            name = config["_class_name"]
            hint = f"; it looks like a diffusers {name} folder"
            advice = (diffusers_hints or {}).get(name) if isinstance(name, str) else None
            hint += f": {advice}" if advice else ""
        raise ValueError(
            f"{config_path} {problem}; expected a {what} ({TYPE_FIELD} {kind!r}){hint}"
        )
    require(weights_path)
    return config, load_file(str(weights_path), device="cpu")


def load_pretrained(
    folder: str | os.PathLike[str],
    kind: str,
    what: str,
    build: Callable[[dict[str, Any]], M],
    *,
    dtype: torch.dtype | None = None,
    diffusers_hints: Mapping[str, str] | None = None,
) -> M:
    """A model from a pretrained folder: :func:`load_pretrained_folder`, ``build(config)``,
    :func:`check_state_dict`, then ``load_state_dict(strict=True)`` (on the CPU).

    The model is cast to ``dtype``; by default to the weights' floating dtype when they all
    share one (a bfloat16 save loads as bfloat16), else it keeps the dtype it was built with.

    Raises:
        FileNotFoundError, ValueError: as :func:`load_pretrained_folder`; ValueError, naming
            ``config.json``, for a TypeError or ValueError of ``build`` (a config it rejects);
            ValueError from :func:`check_state_dict` for weights that do not fit the model.
    """
    config, weights = load_pretrained_folder(folder, kind, what, diffusers_hints=diffusers_hints)
    try:
        model = build(config)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{Path(folder) / CONFIG_NAME}: {e}") from e
    check_state_dict(model.state_dict(), weights, str(Path(folder) / WEIGHTS_NAME))
    if dtype is None:
        dtypes = {t.dtype for t in weights.values() if t.is_floating_point()}
        dtype = dtypes.pop() if len(dtypes) == 1 else None
    if dtype is not None:
        model.to(dtype=dtype)
    model.load_state_dict(weights, strict=True)
    return model
