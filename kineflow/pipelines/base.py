"""One interface for every pipeline family, and the registry ``kineflow.load`` dispatches by.

A pipeline class states what it is and what it can do as class attributes, so callers (the
CLI, the showcase, the benchmark) ask the interface instead of testing which class they hold:

``kineflow_type``  the ``"kineflow_type"`` of the ``config.json`` its ``save_pretrained``
                   writes (the registry key);
``display_name``   how messages name the family ("FUDOKI", "UniFluid");
``task_options``   per task (a method name: ``text_to_image``, ``answer``, ``caption``,
                   ``generate_text``, ``edit``), the keyword options that method uses;
                   ``capabilities`` are its keys;
``option_reasons`` why the family has no use for an option it does not take (for refusals);
``foreign_formats`` ``model_type`` values of other projects' ``config.json`` it reads too,
                   with what they are called (FUDOKI: Janus / FUDOKI releases).

An option a task does not use is refused by :meth:`Pipeline.refuse_options` with a
ValueError naming it and why, instead of being silently ignored.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import torch

from kineflow.io import TYPE_FIELD
from kineflow.pipelines.results import ImageResult, TextResult

__all__ = [
    "ImageResult",
    "Pipeline",
    "TextResult",
    "pipeline_class",
    "pipeline_for_config",
    "register",
    "registered",
]

P = TypeVar("P", bound="Pipeline")


class Pipeline(ABC):
    """What every kineflow pipeline provides (see the module docstring)."""

    kineflow_type: ClassVar[str]
    display_name: ClassVar[str]
    task_options: ClassVar[Mapping[str, frozenset[str]]]
    option_reasons: ClassVar[Mapping[str, str]] = {}
    foreign_formats: ClassVar[Mapping[str, str]] = {}
    #: The tasks this family has: the keys of :attr:`task_options` (set per subclass).
    capabilities: ClassVar[frozenset[str]] = frozenset()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "task_options" in cls.__dict__:
            cls.capabilities = frozenset(cls.task_options)

    # -- what the family can do ---------------------------------------------------------------

    @classmethod
    def supports(cls, task: str) -> bool:
        """Whether this family has ``task`` (e.g. ``"edit"``, ``"generate_text"``)."""
        return task in cls.capabilities

    @classmethod
    def uses_option(cls, task: str, option: str) -> bool:
        """Whether ``task`` (which the family must have) uses the keyword ``option``."""
        return option in cls._options(task)

    @classmethod
    def refuse_options(
        cls, task: str, given: Mapping[str, Any], spelled: Mapping[str, str] | None = None
    ) -> None:
        """Raise for the first option in ``given`` that is set (not None / False) and that
        ``task`` does not use: ``"{name} is not supported by {display_name} models ({why})"``,
        the name as ``spelled`` gives it (e.g. a CLI flag), else the keyword itself.

        Raises:
            ValueError: as above, or a task the family does not have.
        """
        used = cls._options(task)
        spelled = spelled or {}
        for name, value in given.items():
            if value is None or value is False or name in used:
                continue
            why = cls.option_reasons.get(name)
            reason = f" ({why})" if why else ""
            raise ValueError(
                f"{spelled.get(name, name)} is not supported by {cls.display_name} models{reason}"
            )

    @classmethod
    def select_options(cls, task: str, options: Mapping[str, Any]) -> dict[str, Any]:
        """The entries of ``options`` that ``task`` uses (call :meth:`refuse_options` first
        for the ones a user set explicitly)."""
        used = cls._options(task)
        return {name: value for name, value in options.items() if name in used}

    @classmethod
    def _options(cls, task: str) -> frozenset[str]:
        if task not in cls.task_options:
            raise ValueError(f"{cls.display_name} models have no {task!r} task")
        return cls.task_options[task]

    # -- what every pipeline implements --------------------------------------------------------
    @property
    @abstractmethod
    def device(self) -> torch.device:
        """Where the model's parameters are."""

    @abstractmethod
    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Any:
        """Move the model in place; returns self."""

    @abstractmethod
    def check_prompts(self, prompts: str | Sequence[str]) -> None:
        """Raise what ``text_to_image`` would raise for these prompts, without sampling."""

    @abstractmethod
    def text_to_image(self, prompts: str | Sequence[str], **options: Any) -> ImageResult:
        """One picture per prompt."""

    @abstractmethod
    def answer(self, images: Any, questions: str | Sequence[str], **options: Any) -> TextResult:
        """One answer per (picture, question) pair."""

    @abstractmethod
    def save_pretrained(self, folder: str | os.PathLike[str]) -> Path:
        """Write a folder whose ``config.json`` has ``kineflow_type`` = :attr:`kineflow_type`."""

    @classmethod
    @abstractmethod
    def load_checkpoint(
        cls,
        folder: Path,
        config: Mapping[str, Any],
        *,
        max_bytes: int | None = None,
        check_finite: bool | None = None,
    ) -> Pipeline:
        """The pipeline in a local checkpoint ``folder`` whose parsed ``config.json`` is
        ``config`` (this family's type, or one of its :attr:`foreign_formats`), on the CPU,
        after the size and weight checks :func:`kineflow.load` documents."""


_REGISTRY: dict[str, type[Pipeline]] = {}


def register(cls: type[P]) -> type[P]:
    """Class decorator: make ``cls`` the pipeline of its ``kineflow_type``.

    Raises:
        ValueError: another class already holds that type.
    """
    kind = cls.kineflow_type
    if kind in _REGISTRY and _REGISTRY[kind] is not cls:
        raise ValueError(f"kineflow_type {kind!r} is already registered by {_REGISTRY[kind]}")
    _REGISTRY[kind] = cls
    return cls


def registered() -> tuple[type[Pipeline], ...]:
    """The registered pipeline classes, in registration order."""
    return tuple(_REGISTRY.values())


def pipeline_class(kineflow_type: str) -> type[Pipeline]:
    """The pipeline class registered for ``kineflow_type``.

    Raises:
        ValueError: no class is registered for it (naming the known types).
    """
    if kineflow_type not in _REGISTRY:
        known = ", ".join(repr(k) for k in _REGISTRY)
        raise ValueError(f"no pipeline is registered for kineflow_type {kineflow_type!r} "
                         f"(known: {known})")  # fmt: skip
    return _REGISTRY[kineflow_type]


def pipeline_for_config(
    config: Mapping[str, Any], source: str | os.PathLike[str]
) -> type[Pipeline]:
    """The class that reads a checkpoint whose ``config.json`` (at ``source``) is ``config``:
    the one registered for its ``kineflow_type``, else the one listing its ``model_type``
    among its :attr:`~Pipeline.foreign_formats`.

    Raises:
        ValueError: neither, naming what the config describes and what can be read.
    """
    kind = config.get(TYPE_FIELD)
    if kind in _REGISTRY:
        return _REGISTRY[kind]
    model_type = config.get("model_type")
    for cls in _REGISTRY.values():
        if model_type in cls.foreign_formats:
            return cls
    names = " and ".join(cls.display_name for cls in _REGISTRY.values())
    kinds = " / ".join(repr(k) for k in _REGISTRY)
    foreign = " and ".join(
        f"{what} (model_type {t!r})" for cls in _REGISTRY.values()
        for t, what in cls.foreign_formats.items()
    )  # fmt: skip
    raise ValueError(
        f"{source} describes {kind or model_type!r}; kineflow.load reads kineflow {names} "
        f"folders ({TYPE_FIELD} {kinds}) and {foreign}"
    )
