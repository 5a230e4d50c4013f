"""A kineflow checkpoint as a VLMEvalKit model.

VLMEvalKit (github.com/open-compass/VLMEvalKit; not on PyPI) drives a model through the
attributes of its ``vlmeval.vlm.base.BaseModel``: ``INTERLEAVE`` (False: one picture and the
joined texts per item), ``allowed_types``, ``is_api``, ``use_custom_prompt(dataset)`` (False:
the dataset builds the prompt), ``build_prompt``, ``set_dump_image`` / ``dump_image`` and
``generate(message, dataset=None) -> str`` with ``message`` a list of
``{"type": "image" | "text", "value": path or text}`` (a plain string, one dict or a list of
strings is accepted too, as BaseModel does). :class:`KineflowVLM` provides them without
importing VLMEvalKit, so it is registered there with a partial in ``vlmeval/config.py``::

    from functools import partial
    from kineflow.eval.plugins.vlmevalkit import KineflowVLM
    supported_VLM["kineflow-fudoki-shapes"] = partial(
        KineflowVLM, model_path="checkpoints/fudoki-shapes", steps=16, answer_tokens=None)
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

from kineflow.eval.plugins.answerer import Answerer
from kineflow.pipelines.base import Pipeline

__all__ = ["KineflowVLM", "message_parts"]

_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def message_parts(message: Any) -> tuple[Any, str]:
    """The first picture (or None) and the texts joined by newlines of a VLMEvalKit message:
    a list of ``{"type", "value"}`` dicts, one such dict, a string, or a list of strings
    (strings naming an existing picture file are pictures, as VLMEvalKit reads them).

    Raises:
        ValueError: another form, a dict without ``type`` / ``value``, or a type other than
            ``"image"`` / ``"text"``.
    """
    if isinstance(message, (str, Mapping)):
        message = [message]
    if not isinstance(message, Sequence):
        raise ValueError(f"a message is a list of {{'type', 'value'}} dicts, got "
                         f"{type(message).__name__}")  # fmt: skip
    images, texts = [], []
    for k, part in enumerate(message):
        if isinstance(part, str):
            is_file = part.lower().endswith(_IMAGE_SUFFIXES) and os.path.isfile(part)
            part = {"type": "image" if is_file else "text", "value": part}
        if not isinstance(part, Mapping) or not {"type", "value"} <= set(part):
            raise ValueError(f"message part {k} must be a dict with 'type' and 'value', "
                             f"got {part!r}")  # fmt: skip
        if part["type"] == "image":
            images.append(part["value"])
        elif part["type"] == "text":
            texts.append(str(part["value"]))
        else:
            raise ValueError(f"message part {k} has type {part['type']!r}; kineflow models "
                             "read 'image' and 'text'")  # fmt: skip
    return (images[0] if images else None), "\n".join(texts)


class KineflowVLM:
    """A FUDOKI or UniFluid checkpoint answering VLMEvalKit items (module docstring).

    Args:
        model_path: a checkpoint folder or hub id (or a loaded pipeline).
        steps, answer_tokens, seed, beams, batch_size, device, dtype: see
            :class:`~kineflow.eval.plugins.answerer.Answerer` (FUDOKI's evaluation
            settings: ``steps``, ``answer_tokens=None`` = the full text budget).
    """

    INTERLEAVE: ClassVar[bool] = False
    allowed_types: ClassVar[list[str]] = ["text", "image"]
    is_api: ClassVar[bool] = False

    def __init__(self, model_path: str | os.PathLike[str] | Pipeline, **options: Any) -> None:
        self.answerer = Answerer(model_path, **options)
        self.dump_image_func: Callable[[Any], Any] | None = None

    def use_custom_prompt(self, dataset: str | None) -> bool:
        """False: every dataset builds its own prompt (``dataset.build_prompt``)."""
        return False

    def build_prompt(self, line: Any, dataset: str | None = None) -> list[dict[str, str]]:
        """Not used (:meth:`use_custom_prompt` is False)."""
        raise NotImplementedError("kineflow models use the datasets' own prompts")

    def set_dump_image(self, dump_image_func: Callable[[Any], Any]) -> None:
        """VLMEvalKit hands over the dataset's picture writer before inference."""
        self.dump_image_func = dump_image_func

    def dump_image(self, line: Any, dataset: str | None = None) -> Any:
        """The picture paths of a dataset row, by the dataset's own writer."""
        if self.dump_image_func is None:
            raise ValueError("set_dump_image was not called: no dataset picture writer")
        return self.dump_image_func(line)

    def generate(self, message: Any, dataset: str | None = None) -> str:
        """The answer to one VLMEvalKit message (its first picture and its joined texts)."""
        image, text = message_parts(message)
        return self.answerer.answer([(image, text)])[0]

    def generate_inner(self, message: Any, dataset: str | None = None) -> str:
        """BaseModel's name for :meth:`generate` after its input checks."""
        return self.generate(message, dataset)
