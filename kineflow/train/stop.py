"""When a training run stops early or checkpoints between its ``ckpt_every`` steps.

Ctrl-C (SIGINT) or a scheduler's SIGTERM must not lose up to ``ckpt_every − 1`` steps, nor
print a traceback: while :class:`StopSignals` is active the first such signal only sets a
flag, the loop finishes the step it is in, writes a checkpoint and raises
:class:`TrainingInterrupted`, whose :attr:`~TrainingInterrupted.exit_code` is the shell's
``128 + signal`` (130 for SIGINT, 143 for SIGTERM). A second Ctrl-C stops at once
(``KeyboardInterrupt``; the previous checkpoint is intact, saves being atomic).

:class:`CheckpointClock` adds checkpoints by wall-clock time (``ckpt_minutes``). Under
``torch.distributed`` each rank sees its own signals and its own clock: the loop sums both
flags over the ranks (with the losses, in the step's one all-reduce) so that every rank stops,
or saves, after the same step.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any

__all__ = ["CheckpointClock", "StopSignals", "TrainingInterrupted"]

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class TrainingInterrupted(KeyboardInterrupt):
    """A run stopped by a signal after ``step`` steps, with a checkpoint at that step.

    A ``KeyboardInterrupt``, so that code catching ``Exception`` lets it through as it would
    a plain Ctrl-C."""

    def __init__(self, signum: int, step: int, checkpoint: Path) -> None:
        self.signum = signum
        self.step = step
        self.checkpoint = checkpoint
        name = signal.Signals(signum).name
        super().__init__(
            f"stopped by {name} at step {step}; checkpoint saved in {checkpoint} (run the "
            "same command again to continue)"
        )

    @property
    def exit_code(self) -> int:
        """The shell's status of a process killed by the signal: 130 (SIGINT), 143 (SIGTERM)."""
        return 128 + self.signum


class StopSignals:
    """Context manager: while active, SIGINT and SIGTERM request a stop (:attr:`signum`)
    instead of killing the process; a second SIGINT raises ``KeyboardInterrupt`` at once.

    Only the main thread can install signal handlers: elsewhere (a training run in a worker
    thread) it does nothing and signals keep their usual effect. The previous handlers come
    back on exit.
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt  # asked twice: stop now, without a checkpoint
            return  # e.g. torchrun's SIGTERM after the terminal's SIGINT: already stopping
        self.signum = signum
        # os.write, not print: a handler interrupting a print to the same stream would raise.
        name = signal.Signals(signum).name
        os.write(
            2,
            f"\n{name}: stopping after this step and saving a checkpoint (Ctrl-C again to "
            "stop at once, without it)\n".encode(),
        )


class CheckpointClock:
    """``due()`` once ``minutes`` have passed since the start or the last :meth:`reset`
    (never when ``minutes`` is None)."""

    def __init__(self, minutes: float | None) -> None:
        self.seconds = None if minutes is None else 60.0 * minutes
        self.reset()

    def reset(self) -> None:
        self.since = time.monotonic()

    def due(self) -> bool:
        return self.seconds is not None and time.monotonic() - self.since >= self.seconds
