"""What every training-run config shares beyond :class:`~kineflow.config.RunConfig`.

The four trainers (tokenizer, SigLIP, FUDOKI, UniFluid) each read ``log_every``,
``ckpt_every``, ``ckpt_minutes`` and ``threads`` and a free-form ``model`` section that only
becomes a model config once the model is built, minutes later (after the VQ / VAE folders
are read). :class:`TrainRunConfig` checks all of them when the YAML file is read, so that a
mistake is reported with the file's name before anything is trained, not as a
``ZeroDivisionError`` after the first step or a string-formatting error inside the model.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, ClassVar

from kineflow.config import RunConfig, check_types

__all__ = ["TrainRunConfig", "check_intervals"]


def check_intervals(log_every: Any, ckpt_every: Any, ckpt_minutes: Any = None) -> None:
    """Raise ValueError unless ``log_every`` and ``ckpt_every`` are integers >= 1 and
    ``ckpt_minutes`` is None or a finite number > 0 (the loop divides by the first two)."""
    for name, value in (("log_every", log_every), ("ckpt_every", ckpt_every)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if ckpt_minutes is not None and (
        isinstance(ckpt_minutes, bool)
        or not isinstance(ckpt_minutes, (int, float))
        or not (math.isfinite(ckpt_minutes) and ckpt_minutes > 0)
    ):
        raise ValueError(
            f"ckpt_minutes must be a number > 0 (or null: no time-based checkpoints), got "
            f"{ckpt_minutes!r}"
        )


class TrainRunConfig(RunConfig):
    """Base of the training-run configs (dataclasses with ``model``, ``log_every``,
    ``ckpt_every``, ``ckpt_minutes`` and ``threads`` fields; ``export_steps`` is checked
    against ``optim.steps`` where a config has it).

    ``MODEL_TYPES``: the model-config dataclasses whose field annotations the ``model``
    section's values are checked against (:func:`~kineflow.config.check_types`; nested
    sections such as ``model.language`` too); override :meth:`model_types` when they depend
    on the section itself. Subclasses with a ``__post_init__`` call this one first.
    """

    MODEL_TYPES: ClassVar[tuple[type, ...]] = ()

    def __post_init__(self) -> None:
        check_intervals(self.log_every, self.ckpt_every, self.ckpt_minutes)
        threads = self.threads
        if threads is not None and (
            isinstance(threads, bool) or not isinstance(threads, int) or threads < 1
        ):
            raise ValueError(f"threads must be an integer >= 1 or null, got {threads!r}")
        export = getattr(self, "export_steps", None)
        if export:  # out/model_step{s} (FUDOKI, UniFluid); from_dict checked they are ints
            steps = self.optim.steps
            if bad := [s for s in export if not 0 < s <= steps]:
                raise ValueError(
                    f"export_steps must be steps in [1, optim.steps={steps}], got {bad}"
                )
        if isinstance(self.model, Mapping):
            for cls in self.model_types():
                check_types(self.model, cls, "model.")

    def model_types(self) -> tuple[type, ...]:
        """The dataclasses the ``model`` section is type-checked against."""
        return self.MODEL_TYPES
