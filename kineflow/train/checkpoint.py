"""Atomic training checkpoints: weights (safetensors), optimizer and RNG state, step.

A checkpoint is a folder::

    model.safetensors   the model's state dict
    config.json         the run's full config (so the folder alone says what it is)
    trainer.pt          optimizer / scheduler state, step, RNG states (tensors and plain
                        Python values only: loaded with ``torch.load(weights_only=True)``)

It is written to a temporary sibling folder and renamed into place, so a crash mid-write
leaves the previous checkpoint intact and never a half-written one under the final name.
"""

from __future__ import annotations

import os
import random
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn

from kineflow.io import (
    atomic_save_safetensors,
    atomic_write,
    atomic_write_json,
    check_state_dict,
    read_json_object,
)


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


def save_checkpoint(
    folder: str | os.PathLike[str],
    model: nn.Module | Mapping[str, torch.Tensor],
    config: dict,
    trainer_state: dict[str, Any],
) -> Path:
    """Write a checkpoint folder atomically (see the module docstring); returns its path.
    ``model`` is the module or its (e.g. gathered FSDP) state dict."""
    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    # Each file is synced to disk before the folder rename makes the checkpoint visible.
    atomic_save_safetensors(tmp / "model.safetensors", _state_dict(model))
    atomic_write_json(tmp / "config.json", config)
    atomic_write(tmp / "trainer.pt", lambda temp: torch.save(trainer_state, temp))
    old = folder.with_name(folder.name + ".old")
    if folder.exists():
        if old.exists():
            shutil.rmtree(old)
        folder.rename(old)
    tmp.rename(folder)
    if old.exists():
        shutil.rmtree(old)
    return folder


def load_checkpoint(folder: str | os.PathLike[str], model: nn.Module) -> tuple[dict, dict]:
    """Load weights into ``model``; returns ``(config, trainer_state)``. Errors name the folder
    and, for weights that do not fit the model, the keys."""
    folder = Path(folder)
    for name in ("model.safetensors", "config.json", "trainer.pt"):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder}: not a checkpoint, {name} is missing")
    weights = load_file(folder / "model.safetensors")
    check_state_dict(model.state_dict(), weights, str(folder / "model.safetensors"))
    model.load_state_dict(weights)
    config = read_json_object(folder / "config.json")
    state = torch.load(folder / "trainer.pt", weights_only=True, map_location="cpu")
    return config, state
