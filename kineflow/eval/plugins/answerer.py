"""One question-answering front for the benchmark harnesses' model classes.

VLMEvalKit and lmms-eval both hand a model a picture (a path or a PIL image, or none) and a
question, and want a string back. :class:`Answerer` does that with any kineflow pipeline
through its interface: ``answer`` when there is a picture, ``generate_text`` (a chat reply)
for text-only items where the family has it. FUDOKI's evaluation settings are its options:
``steps`` (solver steps; None: the checkpoint's), ``answer_tokens`` (None: the checkpoint's,
i.e. the official layout whose answer fills the text budget) and ``seed`` (the source noise).
An option the family has no use for (``steps`` for UniFluid, ``beams`` for FUDOKI) is refused
when the answerer is built, not silently ignored.

Harnesses pass options as strings (``steps=16``, ``answer_tokens=None``):
:func:`optional_int` reads both forms.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from kineflow.pipelines.base import Pipeline

__all__ = ["Answerer", "cut_at", "optional_int"]


def optional_int(value: Any, name: str) -> int | None:
    """``value`` as an int, or None for None / ``"none"`` / ``"null"`` / ``""``.

    Raises:
        ValueError: anything else that is not an integer (naming the option).
    """
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none", "null")):
        return None
    if isinstance(value, bool):
        raise ValueError(f"{name} must be an integer or None, got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be an integer or None, got {value!r}") from None
    if not number.is_integer():
        raise ValueError(f"{name} must be an integer or None, got {value!r}")
    return int(number)


def cut_at(text: str, stops: Sequence[str]) -> str:
    """``text`` up to the first occurrence of any non-empty string in ``stops``."""
    end = len(text)
    for stop in stops:
        if stop:
            found = text.find(stop)
            if found != -1:
                end = min(end, found)
    return text[:end]


class Answerer:
    """A pipeline answering ``(picture or None, question)`` items (see the module docstring).

    Args:
        model: a loaded pipeline, or what :func:`kineflow.load` reads (folder or hub id).
        device, dtype: where and in which precision to load ``model`` (a name: ``"float32"``,
            ``"bfloat16"``); ignored for a loaded pipeline.
        steps, answer_tokens, seed, beams: ``answer``'s options (None: the family's default).
        batch_size: items answered in one pipeline call (1: each alone, so an answer never
            depends on its batch neighbours).

    Raises:
        ValueError: an option the family does not use, or not an integer.
    """

    def __init__(
        self,
        model: str | os.PathLike[str] | Pipeline,
        *,
        device: str = "cpu",
        dtype: str = "float32",
        steps: Any = None,
        answer_tokens: Any = None,
        seed: Any = 0,
        beams: Any = None,
        batch_size: Any = 1,
    ) -> None:
        if isinstance(model, Pipeline):
            self.pipe = model
        else:
            import torch

            import kineflow

            if not isinstance(getattr(torch, str(dtype), None), torch.dtype):
                raise ValueError(f"dtype must be a torch dtype name such as float32, got {dtype!r}")
            self.pipe = kineflow.load(model, device=device, dtype=getattr(torch, str(dtype)))
        self.settings = {
            "steps": optional_int(steps, "steps"),
            "answer_tokens": optional_int(answer_tokens, "answer_tokens"),
            "seed": optional_int(seed, "seed"),
            "beams": optional_int(beams, "beams"),
        }
        self.pipe.refuse_options("answer", {"steps": self.settings["steps"],
                                            "beams": self.settings["beams"]})  # fmt: skip
        # None means the family's default: such options are left out of the calls.
        self.settings = {k: v for k, v in self.settings.items() if v is not None}
        self.batch_size = optional_int(batch_size, "batch_size") or 1
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")

    @property
    def name(self) -> str:
        """The family's name, for harness logs."""
        return self.pipe.display_name

    def answer(self, items: Sequence[tuple[Any, str]]) -> list[str]:
        """One answer per ``(picture, question)``; a None picture asks the text alone.

        Raises:
            ValueError: a text-only item for a family that only answers about pictures, or
                what the pipeline raises (an empty or too long question, a bad picture).
        """
        answers: list[str | None] = [None] * len(items)
        with_picture = [i for i, (image, _) in enumerate(items) if image is not None]
        text_only = [i for i, (image, _) in enumerate(items) if image is None]
        if text_only and not self.pipe.supports("generate_text"):
            raise ValueError(f"{self.pipe.display_name} models answer questions about a picture; "
                             f"item {text_only[0]} has none")  # fmt: skip
        for task, indices in (("answer", with_picture), ("generate_text", text_only)):
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start : start + self.batch_size]
                questions = [items[i][1] for i in chunk]
                if task == "answer":
                    options = self.pipe.select_options(task, self.settings)
                    result = self.pipe.answer([items[i][0] for i in chunk], questions, **options)
                else:
                    given = dict(self.settings)
                    if "answer_tokens" in given:
                        given["max_tokens"] = given.pop("answer_tokens")
                    options = self.pipe.select_options(task, given)
                    result = self.pipe.generate_text(questions, **options)
                for i, text in zip(chunk, result.texts, strict=True):
                    answers[i] = text
        return [a or "" for a in answers]
