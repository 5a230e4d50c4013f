"""Atomic training checkpoints: weights (safetensors), optimizer and RNG state, step.

A checkpoint is a folder::

    model.safetensors   the model's state dict
    config.json         the run's full config (so the folder alone says what it is)
    trainer.pt          optimizer / scheduler state, step, RNG states (tensors and plain
                        Python values only: loaded with ``torch.load(weights_only=True)``)
    complete.json       written last: the step and every file's size (a truncated file is
                        told by its size, and the step is known without loading anything)

:func:`save_checkpoint` writes ``checkpoint.tmp``, then renames ``checkpoint`` to
``checkpoint.old``, ``checkpoint.tmp`` to ``checkpoint``, and deletes ``checkpoint.old``
(deleting = renaming to ``checkpoint.trash``, then removing it, so a half-deleted folder never
carries a checkpoint's name). A process killed at any point leaves at least one complete
checkpoint, the newest one under one of the three names, and :func:`resume_checkpoint` (the
training loop's first step) finds it, puts it back under ``checkpoint`` and clears the rest.
"""

from __future__ import annotations

import os
import random
import shutil
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn

from kineflow.folders import fsync_dir
from kineflow.io import (
    atomic_save_safetensors,
    atomic_write,
    atomic_write_json,
    check_state_dict,
    read_json_object,
)

__all__ = [
    "CheckpointError",
    "has_checkpoint",
    "load_checkpoint",
    "resume_checkpoint",
    "rng_state",
    "save_checkpoint",
    "set_rng_state",
]

FILES = ("model.safetensors", "config.json", "trainer.pt")
MARKER = "complete.json"
_ANY = object()  # load_checkpoint: no model config to compare with


class CheckpointError(ValueError):
    """A checkpoint file that is truncated, damaged or unreadable (the message names it)."""


def rng_state() -> dict[str, Any]:
    """Every RNG a training step may draw from (Python, NumPy, torch CPU and CUDA)."""
    state: dict[str, Any] = {
        "python": list(random.getstate()[1]),
        "python_pos": random.getstate()[2],
        "numpy": torch.from_numpy(np.random.get_state()[1].astype(np.int64)),
        "numpy_pos": int(np.random.get_state()[2]),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate((3, tuple(state["python"]), state["python_pos"]))
    np.random.set_state(
        ("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"], 0, 0.0)
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _state_dict(weights: nn.Module | Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if isinstance(weights, nn.Module):
        weights = weights.state_dict()
    # safetensors refuses shared storage; checkpoints hold plain contiguous copies.
    return {k: v.detach().contiguous().clone() for k, v in weights.items()}


def _sibling(folder: Path, suffix: str) -> Path:
    return folder.with_name(f"{folder.name}.{suffix}")


def _discard(path: Path, folder: Path) -> None:
    """Remove ``path`` (``folder`` or a sibling): renamed to ``folder.trash`` first, so that
    a kill mid-removal never leaves a partial folder under a name that recovery reads."""
    trash = _sibling(folder, "trash")
    if trash.exists():
        shutil.rmtree(trash)
    path.rename(trash)
    shutil.rmtree(trash)


def save_checkpoint(
    folder: str | os.PathLike[str],
    model: nn.Module | Mapping[str, torch.Tensor],
    config: dict,
    trainer_state: dict[str, Any],
) -> Path:
    """Write a checkpoint folder atomically (see the module docstring); returns its path.
    ``model`` is the module or its (e.g. gathered FSDP) state dict; ``trainer_state`` must
    hold the ``"step"``."""
    folder = Path(folder)
    tmp, old = _sibling(folder, "tmp"), _sibling(folder, "old")
    if tmp.exists() or old.exists() or _sibling(folder, "trash").exists():
        _settle(folder)  # an earlier save was killed: never clear the one good checkpoint
    if tmp.exists():
        _discard(tmp, folder)
    tmp.mkdir(parents=True)
    # Each file is synced to disk before the folder rename makes the checkpoint visible.
    atomic_save_safetensors(tmp / "model.safetensors", _state_dict(model))
    atomic_write_json(tmp / "config.json", config)
    atomic_write(tmp / "trainer.pt", lambda temp: torch.save(trainer_state, temp))
    sizes = {name: (tmp / name).stat().st_size for name in FILES}
    atomic_write_json(tmp / MARKER, {"step": int(trainer_state["step"]), "files": sizes})
    if folder.exists():
        folder.rename(old)
    tmp.rename(folder)
    if old.exists():
        _discard(old, folder)
    fsync_dir(folder.parent)
    return folder


def _read_trainer(folder: Path, mmap: bool = False) -> dict[str, Any]:
    path = folder / "trainer.pt"
    try:
        state = torch.load(path, weights_only=True, map_location="cpu", mmap=mmap)
    except Exception as err:  # any failure to read means the file is unusable
        raise CheckpointError(f"{path} is unreadable ({_why(err)})") from None
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise CheckpointError(f"{path} holds no training state (no integer 'step')")
    return state


def _why(err: BaseException) -> str:
    """``truncated or damaged: <error>``, the error cut to its first sentence (torch's
    explanations run to several, and the message must stay one line)."""
    text = str(err).strip()
    first = text.splitlines()[0].split(". ")[0].rstrip(".") if text else ""
    return f"truncated or damaged: {type(err).__name__}{': ' + first if first else ''}"


def _check_sizes(folder: Path) -> int | None:
    """The step ``complete.json`` records (None without one: a checkpoint written before
    it existed); raises CheckpointError for a file that is missing or of another size."""
    marker = folder / MARKER
    if not marker.is_file():
        return None
    try:
        info = read_json_object(marker)
        step, sizes = int(info["step"]), dict(info["files"])
    except (ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{marker} is unreadable ({err})") from None
    for name, size in sizes.items():
        path = folder / name
        if not path.is_file():
            raise CheckpointError(f"{path} is missing")
        if path.stat().st_size != size:
            raise CheckpointError(
                f"{path} is {path.stat().st_size} bytes, the checkpoint recorded {size} "
                "(truncated or damaged)"
            )
    return step


def load_checkpoint(
    folder: str | os.PathLike[str],
    model: nn.Module,
    *,
    model_config: Any = _ANY,
    mmap: bool = False,
) -> tuple[dict, dict]:
    """Load weights into ``model``; returns ``(config, trainer_state)``.

    ``mmap`` maps ``trainer.pt``'s tensors (copy-on-write) instead of reading them: a tensor
    costs memory only once it is touched, and the file's pages are shared by every process
    of the machine. FSDP ranks other than 0 resume this way: they never read the optimizer
    state (rank 0 scatters it), so the full state is held once, not on every rank.

    Every file is read before ``model`` changes. With ``model_config``, the checkpoint's
    ``config["model"]`` must equal it (a run resumed with another model is refused).

    Raises:
        FileNotFoundError: a file is missing (naming it).
        CheckpointError: a file is truncated or unreadable (naming it).
        ValueError: another model config, or weights that do not fit ``model`` (the keys).
    """
    folder = Path(folder)
    for name in FILES:
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder}: not a checkpoint, {name} is missing")
    _check_sizes(folder)
    try:
        config = read_json_object(folder / "config.json")
    except ValueError as err:
        raise CheckpointError(str(err)) from None
    if model_config is not _ANY and config.get("model") != model_config:
        raise ValueError(
            f"{folder}: checkpoint was trained with another model config; use a new 'out' "
            "folder or delete the checkpoint"
        )
    try:
        weights = load_file(folder / "model.safetensors")
    except Exception as err:  # any failure to read means the file is unusable
        raise CheckpointError(
            f"{folder / 'model.safetensors'} is unreadable ({_why(err)})"
        ) from None
    state = _read_trainer(folder, mmap)
    check_state_dict(model.state_dict(), weights, str(folder / "model.safetensors"))
    model.load_state_dict(weights)
    return config, state


# -- recovery -------------------------------------------------------------------------------------
def _candidates(folder: Path) -> tuple[list[tuple[Path, int]], list[tuple[Path, str]]]:
    """``(complete, broken)``: the checkpoints under the three names that look complete, as
    ``(path, step)`` newest first (``checkpoint`` first among equals), and those that claim to
    be complete but are not, as ``(path, problem)``. A ``.tmp`` / ``.old`` folder with
    missing files and no ``complete.json`` is a write or removal that never finished: neither.
    """
    complete, broken = [], []
    for path in (folder, _sibling(folder, "tmp"), _sibling(folder, "old")):
        if not path.is_dir():
            continue
        missing = [n for n in FILES if not (path / n).is_file()]
        try:
            step = _check_sizes(path)
            if step is None and missing:
                if path != folder:
                    continue  # unfinished: never complete
                raise FileNotFoundError(f"{path / missing[0]} is missing")
            if step is None:  # written before complete.json existed: the step is in trainer.pt
                step = _read_trainer(path)["step"]
        except (CheckpointError, FileNotFoundError) as err:
            broken.append((path, str(err)))
            continue
        complete.append((path, step))
    complete.sort(key=lambda c: -c[1])  # stable: checkpoint, .tmp, .old among equal steps
    return complete, broken


def _promote(folder: Path, best: Path | None, broken: list[Path]) -> None:
    """Leave only ``best`` (renamed to ``folder``) and ``folder.broken`` (the last of
    ``broken``, for inspection); every step is a rename or the removal of a folder that is
    neither ``best`` nor the only copy of anything complete."""
    trash, tmp, old = (_sibling(folder, s) for s in ("trash", "tmp", "old"))
    if trash.exists():
        shutil.rmtree(trash)

    def clear(path: Path) -> None:
        if path in broken:
            aside = _sibling(folder, "broken")
            if aside.exists():
                _discard(aside, folder)
            path.rename(aside)
        else:
            _discard(path, folder)

    if best is not None and best != folder:
        for other in (tmp, old):
            if other != best and other.exists():
                clear(other)
        if folder.exists():
            if folder in broken:
                clear(folder)
            else:  # older: the save's own order (old, then rename), then remove it
                folder.rename(tmp if best == old else old)
        best.rename(folder)
    for other in (tmp, old):
        if other.exists():
            clear(other)
    fsync_dir(folder.parent)


def _settle(folder: Path) -> None:
    """Finish what a killed save left: the newest complete checkpoint (by its files' sizes,
    without loading it) becomes ``folder``."""
    complete, broken = _candidates(folder)
    _promote(folder, complete[0][0] if complete else None, [p for p, _ in broken])


def has_checkpoint(folder: str | os.PathLike[str]) -> bool:
    """Whether a run folder's ``folder`` (``out/checkpoint``) or what a killed save left of
    it holds a checkpoint a run would resume from."""
    complete, broken = _candidates(Path(folder))
    return bool(complete or broken)


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def resume_checkpoint(
    folder: str | os.PathLike[str],
    model: nn.Module,
    model_config: Any,
    warn: Callable[[str], None] = _warn,
) -> dict[str, Any] | None:
    """Load the newest complete checkpoint of ``folder`` (``out/checkpoint``, ``.tmp`` or
    ``.old``: see the module docstring) into ``model`` and return its trainer state; None
    when there is none. The one loaded ends up as ``folder``; what else the three names held
    is removed, except a damaged checkpoint, kept as ``folder.broken`` with a ``warn`` line
    when an older complete one is resumed instead.

    Raises:
        CheckpointError: every checkpoint there is damaged (the message names the file and
            says to delete the folder to start over).
        ValueError: the checkpoint was trained with another ``model_config``, or its
            weights do not fit ``model``.
    """
    folder = Path(folder)
    complete, broken = _candidates(folder)
    problems = [problem for _, problem in broken]
    damaged = [path for path, _ in broken]
    for path, _ in complete:
        try:
            _, state = load_checkpoint(path, model, model_config=model_config)
        except (CheckpointError, FileNotFoundError) as err:
            damaged.append(path)
            problems.append(str(err))
            continue
        if problems:
            warn(
                f"{problems[0]}; resuming from the older complete checkpoint (step "
                f"{state['step']}); the damaged one is kept as {_sibling(folder, 'broken')}"
            )
        _promote(folder, path, damaged)
        return state
    if problems:
        raise CheckpointError(
            f"{problems[0]}, and there is no older complete checkpoint to resume from: delete "
            f"{folder} to train from scratch"
        )
    _promote(folder, None, [])  # unfinished writes only: nothing to resume
    return None
