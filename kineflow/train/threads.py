"""Elastic CPU threads: a training process that follows a file naming its thread count.

A scheduler that runs several training processes on one CPU (``kineflow reproduce``) should
give a process every core while it runs alone and its share while another runs beside it. The
share changes while a process runs: a stage that started beside another job finishes alone.
``torch.set_num_threads`` may change the intra-op pool between steps, so the scheduler writes
the count to the file that ``$KINEFLOW_THREADS_FILE`` names and the trainer reads it after every
optimizer step (:func:`follow_threads`; a read costs tens of microseconds against a step of
tenths of a second). Without the variable nothing changes.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch

from kineflow.io import atomic_write

__all__ = ["THREADS_FILE", "follow_threads", "read_threads", "write_threads"]

THREADS_FILE = "KINEFLOW_THREADS_FILE"


def read_threads(path: str | os.PathLike[str]) -> int | None:
    """The positive thread count in ``path``; None when it is missing, being replaced or not
    a positive integer (the caller keeps its threads)."""
    try:
        n = int(Path(path).read_text().strip())
    except (OSError, ValueError):
        return None
    return n if n > 0 else None


def write_threads(path: str | os.PathLike[str], threads: int) -> None:
    """Write ``threads`` to ``path`` atomically (a reader never sees half a number)."""
    atomic_write(Path(path), lambda tmp: tmp.write_text(str(int(threads))))


def follow_threads(
    on_step: Callable[[int], None] | None = None, path: str | os.PathLike[str] | None = None
) -> Callable[[int], None] | None:
    """``on_step`` preceded by a check of the thread file (``path``, else
    ``$KINEFLOW_THREADS_FILE``): when it names a count other than ``torch.get_num_threads()``,
    the process switches to it. Without a file to follow, ``on_step`` itself."""
    path = path if path is not None else os.environ.get(THREADS_FILE)
    if not path:
        return on_step

    def step(done: int) -> None:
        n = read_threads(path)
        if n is not None and n != torch.get_num_threads():
            torch.set_num_threads(n)
        if on_step is not None:
            on_step(done)

    return step
