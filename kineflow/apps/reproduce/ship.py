"""Copying trained models into the shipped checkpoints folder (UniFluid and its KL-VAE
re-saved in float16)."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["save_half", "save_half_vae", "ship"]


def ship(
    model: Path, dest: Path, write: Callable[[Path, Path], Any] | None = None
) -> dict[str, Any]:
    """Copy a trained model folder to ``dest`` (replacing it whole; ``write(model, folder)``
    makes the copy, a plain copy by default); returns its size."""
    tmp = dest.with_name(dest.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    (write or shutil.copytree)(model, tmp)
    if dest.exists():
        shutil.rmtree(dest)
    tmp.rename(dest)
    size = sum(f.stat().st_size for f in dest.rglob("*") if f.is_file())
    return {"path": str(dest), "bytes": size}


def save_half(model: Path, folder: Path) -> None:
    """A UniFluid folder re-saved with float16 weights: half the bytes; the pipeline loads
    them into its float32 model."""
    import torch

    from kineflow.pipelines.unifluid import UnifluidPipeline

    UnifluidPipeline.from_pretrained(model).save_pretrained(folder, dtype=torch.float16)


def save_half_vae(model: Path, folder: Path) -> None:
    """A KL-VAE folder re-saved with float16 weights (as the shipped UniFluid stores it)."""
    import torch

    from kineflow.tokenizers.kl_vae import AutoencoderKL

    AutoencoderKL.from_pretrained(model).to(torch.float16).save_pretrained(folder)
