"""The batches of a training run, in order: built in the training process or by loader workers.

A run of ``S`` steps, global batch ``B``, ``W`` processes and ``A`` accumulation pieces makes
``S·A`` *pieces* on each rank. Piece ``p`` (step ``s = p // A``, piece ``k = p mod A``) of rank
``r`` holds the global sample indices::

    first = s·B + r·(B / W) + k·(B / (W·A)),   indices = [first, first + B / (W·A))

and its batch is ``task.batch(indices)``. :func:`step_batches` yields the batches of pieces
``start·A … S·A − 1``; resuming at step ``k`` starts there (no earlier batch is built again).

``workers = 0`` builds each batch in the training process when the loop asks for it (the
original path). ``workers > 0`` hands the same index lists, in the same order, to a
``torch.utils.data.DataLoader`` whose worker processes build the batches ahead of the loop
(``prefetch_factor`` batches each), pinned in page-locked memory when the training device is
CUDA (so the copy to it can be asynchronous). Since a batch depends only on its indices (every
draw is seeded per sample, :func:`~kineflow.train.loop.sample_generator`), the batches, and so
the run, are the same with any number of workers.

Workers are forked from the training process and never touch CUDA themselves (``task.batch``
is CPU work by the :class:`~kineflow.train.loop.Task` contract); they ignore SIGINT / SIGTERM,
so that a Ctrl-C reaching the whole process group stops the run through the training
process's own handler (:mod:`kineflow.train.stop`: finish the step, checkpoint, exit), which
then shuts the workers down.
"""

from __future__ import annotations

import multiprocessing
import signal
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from torch.utils.data import DataLoader, Dataset

__all__ = ["Batches", "PieceLayout", "step_batches"]


@dataclass(frozen=True)
class PieceLayout:
    """Where a rank's pieces sit in the global sample order (see the module docstring).

    ``batch_size``: the global batch ``B``; ``share``: one rank's samples per step (``B / W``);
    ``piece``: samples per accumulation piece (``share / A``); ``rank``: ``r``.
    """

    batch_size: int
    share: int
    piece: int
    rank: int

    @property
    def accum(self) -> int:
        return self.share // self.piece

    def indices(self, p: int) -> list[int]:
        """The global sample indices of piece ``p`` of this rank."""
        step, k = divmod(p, self.accum)
        first = step * self.batch_size + self.rank * self.share + k * self.piece
        return list(range(first, first + self.piece))


class _Pieces(Dataset):
    """Map-style dataset: item ``p`` is ``build(layout.indices(p))``."""

    def __init__(self, build: Callable[[list[int]], Any], layout: PieceLayout) -> None:
        self.build = build
        self.layout = layout

    def __getitem__(self, p: int) -> Any:
        return self.build(self.layout.indices(p))


def _as_built(batch: Any) -> Any:
    """The batch as ``task.batch`` built it (DataLoader's default would turn tuples into
    lists and NumPy arrays into tensors)."""
    return batch


def _quiet_worker(worker_id: int) -> None:
    """Loader workers leave SIGINT / SIGTERM to the training process (which stops them)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


class Batches:
    """An iterator over a run's batches that :meth:`close` ends, stopping the loader workers
    at once: not when the iterator is garbage-collected, which an exception's traceback can
    put off, while a forked worker keeps the run folder's lock (an inherited file
    descriptor) held."""

    def __init__(self, batches: Iterable[Any]) -> None:
        self._it = iter(batches)

    def __iter__(self) -> Batches:
        return self

    def __next__(self) -> Any:
        return next(self._it)

    def close(self) -> None:
        shutdown = getattr(self._it, "_shutdown_workers", None)  # DataLoader's iterator
        if shutdown is not None:
            shutdown()
        self._it = iter(())


def step_batches(
    build: Callable[[list[int]], Any],
    layout: PieceLayout,
    start: int,
    steps: int,
    *,
    workers: int = 0,
    prefetch_factor: int = 2,
    pin_memory: bool = False,
) -> Batches:
    """The batches ``build(layout.indices(p))`` of pieces ``p = start·A … steps·A − 1``, in
    order (``A = layout.accum``); ``workers`` loader processes build them ahead (0: built here,
    one at a time, when asked for). Close it when done."""
    pieces = range(start * layout.accum, steps * layout.accum)
    if workers == 0:
        return Batches(build(layout.indices(p)) for p in pieces)
    # fork: the workers share the task (and its frozen encoders) without pickling them; the
    # model's parameters may sit on CUDA but a worker never uses them. Elsewhere the
    # platform's default method is used (the task must then pickle).
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork") if "fork" in methods else None
    loader = DataLoader(
        _Pieces(build, layout),
        batch_size=None,  # each item already is a batch: no collation
        collate_fn=_as_built,
        sampler=pieces,  # in order, from the resume step
        num_workers=workers,
        prefetch_factor=prefetch_factor,
        pin_memory=pin_memory,
        persistent_workers=False,  # one pass over the run's pieces: nothing to persist for
        worker_init_fn=_quiet_worker,
        multiprocessing_context=context,
    )
    return Batches(loader)
