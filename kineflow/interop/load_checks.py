"""Checks :func:`kineflow.load` runs on a checkpoint's weights before trusting them.

``load_state_dict`` copies a stored tensor into a parameter with ``copy_``, which casts: a
float weight stored as int64 loads as its truncated values (mostly zeros), without a word. And
NaN or inf weights load fine and only surface later as NaN logits. So:

- :func:`check_floating`: every floating-point parameter of the model must be stored as a
  floating-point tensor, checked by name against the model built on the meta device (which
  allocates nothing), before any weight is copied;
- :func:`check_finite`: weights (and metric tables) must hold no NaN or inf; cheap next to
  the load itself, it runs by default for checkpoints under :data:`FINITE_CHECK_BYTES`
  (:func:`wants_finite_check`).

Every message names the file holding the tensor and the tensor.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from kineflow.io import dtype_name

__all__ = [
    "FINITE_CHECK_BYTES",
    "check_finite",
    "check_floating",
    "expected_state",
    "wants_finite_check",
]

#: ``check_finite=None`` checks every weight for NaN / inf when the weight files take less
#: than this many bytes, and skips the pass above.
FINITE_CHECK_BYTES = 2 * 2**30

#: Names the file holding a tensor, given the tensor's name.
Locator = Callable[[str], "str | os.PathLike[str]"]


def wants_finite_check(check: bool | None, files: Iterable[Path]) -> bool:
    """``check`` when given, else whether ``files`` (the weights) take less than
    :data:`FINITE_CHECK_BYTES` on disk (missing files count as empty)."""
    if check is not None:
        return bool(check)
    size = sum(f.stat().st_size for f in files if f.is_file())
    return size < FINITE_CHECK_BYTES


def expected_state(model_class: Callable[[Any], nn.Module], config: Any) -> dict[str, Tensor]:
    """The state dict of ``model_class(config)`` built on the meta device: names, shapes and
    dtypes, no memory."""
    with torch.device("meta"):
        return model_class(config).state_dict()


def check_floating(
    expected: Mapping[str, Tensor], stored: Mapping[str, torch.dtype], locate: Locator
) -> None:
    """Refuse an integer or bool tensor stored (``stored``: name -> dtype) for a parameter
    that is floating-point in ``expected``.

    Raises:
        ValueError: ``"{file}: {name} is int64, expected a floating-point tensor"`` for the
            first such tensor, in the model's order.
    """
    for key, want in expected.items():
        got = stored.get(key)
        if got is not None and want.is_floating_point() and not got.is_floating_point:
            raise ValueError(
                f"{locate(key)}: {key} is {dtype_name(got)}, expected a floating-point tensor"
            )


def check_finite(tensors: Iterable[tuple[str, Tensor]]) -> None:
    """Refuse NaN / inf in any floating-point tensor of ``tensors`` (``(what, tensor)`` pairs,
    ``what`` naming the file and the tensor).

    Raises:
        ValueError: naming the first tensor with a non-finite value and how many it holds.
    """
    for what, tensor in tensors:
        if not tensor.is_floating_point():
            continue
        bad = int((~torch.isfinite(tensor)).sum())
        if bad:
            raise ValueError(
                f"{what} holds {bad:,} non-finite value(s) (NaN or inf) of {tensor.numel():,}: "
                "the checkpoint is damaged (kineflow.load(..., check_finite=False) loads it "
                "anyway)"
            )
