"""Argument types of the CLI: each names the rule it enforces, argparse adds the argument's
name and exits with status 2 (``kineflow generate: error: argument --cfg: ...``).

They run before any model is loaded, so a typo costs nothing; they import nothing heavy (no
torch), so ``kineflow --help`` stays fast. The pipelines check the same rules again at their
API boundary (:mod:`kineflow.inputs.checks`) for callers that are not the CLI.
"""

from __future__ import annotations

import argparse
import math
import re
from collections.abc import Callable
from pathlib import Path

__all__ = ["DEVICE_FORMS", "device_name", "finite_float", "int_in_range", "output_dir"]

#: The devices ``--device`` accepts (torch would also parse e.g. ``meta``, useless here).
DEVICE_FORMS = "cpu, cuda, cuda:N (N = 0, 1, ...) or mps"
_DEVICE = re.compile(r"cpu|cuda(:\d+)?|mps")


def int_in_range(lo: int, hi: int) -> Callable[[str], int]:
    """An argparse ``type`` accepting integers in ``[lo, hi]``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if not lo <= value <= hi:
            raise argparse.ArgumentTypeError(f"must be between {lo} and {hi}, got {value}")
        return value

    return parse


def finite_float(lo: float) -> Callable[[str], float]:
    """An argparse ``type`` accepting finite numbers ``>= lo``: ``nan`` and ``inf`` parse as
    floats, and reached the samplers as black pictures or index errors."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
        if value < lo:
            raise argparse.ArgumentTypeError(f"must be >= {lo:g}, got {text!r}")
        return value

    return parse


def device_name(text: str) -> str:
    """An argparse ``type`` for ``--device``: one of :data:`DEVICE_FORMS` (whether the device
    is present is checked when the model moves there)."""
    if not _DEVICE.fullmatch(text):
        raise argparse.ArgumentTypeError(f"expected {DEVICE_FORMS}, got {text!r}")
    return text


def output_dir(text: str) -> Path:
    """An argparse ``type`` for a folder to write into: created later if missing, but an
    existing non-folder is rejected now rather than after the work is done."""
    if not text:
        raise argparse.ArgumentTypeError("must be a folder path, got an empty string")
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} exists and is not a folder")
    return path
