"""A training run's output folder: one writer at a time, and its metrics file.

Two runs writing the same ``out`` would interleave their ``metrics.jsonl`` rows and replace
each other's checkpoints. :func:`hold_run_folder` takes an exclusive ``flock`` on
``out/.lock`` for as long as the run lasts and writes who holds it there, so a second run
stops at once with ``outputs/x is in use by pid 1234 on host h (started ...)``. The kernel
releases a ``flock`` when its process ends, however it ends (even SIGKILL): a stale lock
file never blocks a later run. Under ``torch.distributed`` only rank 0 takes it.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from kineflow.io import atomic_write_text

try:
    import fcntl
except ImportError:  # Windows: no flock; runs are not locked there
    fcntl = None

__all__ = [
    "LOCK_NAME",
    "RunFolderInUseError",
    "hold_run_folder",
    "last_metrics",
    "process_rank",
    "truncate_metrics",
]

LOCK_NAME = ".lock"
# Folders this process holds (resolved path -> [fd, depth]): a trainer holds its folder and
# calls run_training, which holds it again; a second flock of our own would block us.
_HELD: dict[Path, list[int]] = {}


class RunFolderInUseError(ValueError):
    """Another process holds the run folder (the message names it)."""


def process_rank() -> int:
    """This process's rank: the process group's when one is joined, else torchrun's ``RANK``
    (before the group exists, and after the training loop has left the group it made), else 0.
    Only rank 0 writes what every rank would write alike (the final model, the summary)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def _holder(fd: int) -> str:
    """Who holds the lock, from what it wrote into the lock file."""
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode())
        return f"pid {info['pid']} on host {info['host']} (started {info['started']})"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"  # it has the lock but has not written its details yet


@contextlib.contextmanager
def hold_run_folder(out: str | os.PathLike[str]) -> Iterator[None]:
    """Hold ``out`` (created if missing) for the duration of the ``with`` block; re-entrant
    within a process; a no-op on ranks other than 0.

    Raises:
        RunFolderInUseError: another process holds it (a ValueError naming the pid, the host and
            when it started).
    """
    out = Path(out)
    # Every rank: the others write into ``out`` too (e.g. FUDOKI's metric tables, each rank's
    # own atomic write of the same bytes) and may get there before rank 0 has created it.
    out.mkdir(parents=True, exist_ok=True)
    if fcntl is None or process_rank() != 0:
        yield
        return
    key = out.resolve()
    if key in _HELD:
        _HELD[key][1] += 1
        try:
            yield
        finally:
            _HELD[key][1] -= 1
        return
    fd = os.open(out / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _holder(fd)
        os.close(fd)
        raise RunFolderInUseError(
            f"{out} is in use by {holder}: wait for that run to end, stop it, or use another "
            "output folder"
        ) from None
    info = {"pid": os.getpid(), "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S")}  # fmt: skip
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
    _HELD[key] = [fd, 1]
    try:
        yield
    finally:
        del _HELD[key]
        os.close(fd)  # releases the flock


def _rows(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """``(line, row)`` of every row of a metrics file; a torn last line (the process was
    killed mid-write) is skipped."""
    rows = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            rows.append((line, row))
    return rows


def truncate_metrics(path: Path, step: int) -> None:
    """Drop rows logged after the checkpoint a run resumes from (they will be logged again),
    rewriting the file atomically."""
    if path.exists():
        keep = [line for line, row in _rows(path) if row.get("step", 0) <= step]
        atomic_write_text(path, "".join(line + "\n" for line in keep))


def last_metrics(path: Path, step: int) -> dict[str, float]:
    """The losses of the last row logged at or before ``step`` ({} if none): what a run that
    is already complete reports as its last values."""
    rows = [row for _, row in _rows(path) if row.get("step", 0) <= step] if path.exists() else []
    if not rows:
        return {}
    return {k: v for k, v in rows[-1].items() if k not in ("step", "lr", "seconds")}
