"""What the buttons of ``kineflow serve`` do, as plain functions of their inputs: no gradio.

A :class:`Session` holds the loaded pipeline and answers each request with an
:class:`Outcome` (pictures, refinement GIFs, texts) and the :class:`~.run_card.RunCard` of
exactly what ran. User mistakes (an empty prompt, a fraction where a whole number is needed, no
picture, an option out of range, a card from another model) raise ``ValueError`` /
``TypeError`` with a one-line message that the page shows as it is.

Options reach the pipeline through the interface: only those the task uses
(:meth:`~kineflow.pipelines.base.Pipeline.select_options`), the ones left empty resolved to the
pipeline's default (:func:`~.controls.default_value`) so the card states every number.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from kineflow import __version__
from kineflow.apps.serve.controls import CONTROLS, checked_value, default_value
from kineflow.apps.serve.run_card import RunCard, model_fingerprint, pixel_hash
from kineflow.inputs.images import save_gif
from kineflow.io import atomic_write_text
from kineflow.pipelines.base import Pipeline

__all__ = ["MAX_PROMPTS", "Outcome", "Session", "parse_box", "parse_prompts"]

#: Prompts one request may hold: they are sampled as one batch, and the queue serves one
#: request at a time, so this bounds the memory a request can take.
MAX_PROMPTS = 16
#: Refinement GIFs are enlarged (nearest neighbour) to about this many pixels across.
GIF_WIDTH = 256


@dataclass
class Outcome:
    """One request's result: ``images`` (at the model's size), ``gifs`` (one refinement GIF
    per picture, when the pipeline returns its trajectory), ``texts`` (answers), the ``card``,
    its file ``card_path``, and ``note`` (the replay's verdict; empty otherwise)."""

    card: RunCard
    card_path: Path
    images: list[Image.Image] = field(default_factory=list)
    gifs: list[Path] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    note: str = ""


def parse_prompts(text: str | None) -> list[str]:
    """One prompt per non-blank line (surrounding spaces dropped).

    Raises:
        ValueError: no prompt, or more than :data:`MAX_PROMPTS`.
    """
    prompts = [line.strip() for line in (text or "").splitlines() if line.strip()]
    if not prompts:
        raise ValueError("enter at least one prompt (one per line)")
    if len(prompts) > MAX_PROMPTS:
        raise ValueError(f"{len(prompts)} prompts: at most {MAX_PROMPTS} at a time")
    return prompts


def parse_box(text: str | None, width: int, height: int) -> list[int]:
    """``"X0,Y0,X1,Y1"`` (pixels, end exclusive) -> ``[x0, y0, x1, y1]`` inside a
    ``width`` × ``height`` picture, not empty.

    Raises:
        ValueError: not four whole numbers, or a box empty or outside the picture.
    """
    parts = (text or "").replace(" ", "").split(",")
    if len(parts) != 4 or not all(p.isdigit() for p in parts):
        raise ValueError(f"the infill box must be X0,Y0,X1,Y1 in pixels, got {text!r}")
    x0, y0, x1, y1 = map(int, parts)
    if not (x0 < x1 <= width and y0 < y1 <= height):
        raise ValueError(f"the infill box {x0},{y0},{x1},{y1} must be non-empty and inside the "
                         f"{width}x{height} picture")  # fmt: skip
    return [x0, y0, x1, y1]


def _picture(picture: Any) -> Image.Image:
    if picture is None:
        raise ValueError("upload a picture first")
    if isinstance(picture, np.ndarray):
        picture = Image.fromarray(picture)
    if not isinstance(picture, Image.Image):
        raise TypeError(f"expected a picture, got {type(picture).__name__}")
    return picture.convert("RGB")


def _text(text: str | None, what: str) -> str:
    if not (text or "").strip():
        raise ValueError(f"enter {what}")
    return text.strip()


class Session:
    """The web app's state: one pipeline, where it came from, and a folder for the files the
    page serves (GIFs, run cards).

    Args:
        pipeline: the loaded pipeline.
        model: the checkpoint as the user named it (recorded in every card).
        workdir: where GIFs and cards are written (created).
        device, dtype: as the pipeline was loaded (recorded in every card).
    """

    def __init__(
        self, pipeline: Pipeline, model: str, workdir: str | Path, device: str, dtype: str
    ) -> None:
        self.pipe, self.model, self.device, self.dtype = pipeline, model, device, dtype
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.fingerprint = model_fingerprint(model)
        self._ids = itertools.count()

    # -- the tasks -------------------------------------------------------------------------------
    def text_to_image(
        self, prompts: str | None, options: Mapping[str, Any], progress: bool = False
    ) -> Outcome:
        """A picture per prompt line, sampled as one batch, with its refinement GIF."""
        lines = parse_prompts(prompts)
        self.pipe.check_prompts(lines)
        return self._run("text_to_image", {"prompts": lines}, options, None, progress)

    def answer(
        self, picture: Any, question: str | None, options: Mapping[str, Any], progress: bool = False
    ) -> Outcome:
        """The answer to ``question`` about ``picture``."""
        picture = _picture(picture)
        inputs = {"question": _text(question, "a question"), "image_sha256": pixel_hash(picture)}
        return self._run("answer", inputs, options, picture, progress)

    def caption(self, picture: Any, options: Mapping[str, Any], progress: bool = False) -> Outcome:
        """A caption of ``picture`` (families with a ``caption`` task)."""
        picture = _picture(picture)
        return self._run("caption", {"image_sha256": pixel_hash(picture)}, options, picture,
                         progress)  # fmt: skip

    def edit(
        self,
        picture: Any,
        instruction: str | None,
        options: Mapping[str, Any],
        progress: bool = False,
    ) -> Outcome:
        """``picture`` changed as ``instruction`` says (families with an ``edit`` task)."""
        picture = _picture(picture)
        inputs = {"instruction": _text(instruction, "an instruction"),
                  "image_sha256": pixel_hash(picture)}  # fmt: skip
        return self._run("edit", inputs, options, picture, progress)

    def infill(
        self,
        picture: Any,
        box: str | None,
        prompt: str | None,
        options: Mapping[str, Any],
        progress: bool = False,
    ) -> Outcome:
        """``picture`` with the tokens under ``box`` (``"X0,Y0,X1,Y1"``) regenerated for
        ``prompt`` (families with an ``infill`` task)."""
        picture = _picture(picture)
        inputs = {"prompt": _text(prompt, "a prompt for the region"),
                  "box": parse_box(box, picture.width, picture.height),
                  "image_sha256": pixel_hash(picture)}  # fmt: skip
        return self._run("infill", inputs, options, picture, progress)

    def replay(self, card_text: str | None, picture: Any = None, progress: bool = False) -> Outcome:
        """Run a run card again with this session's model, and say in ``note`` whether the
        outputs equal the card's.

        Raises:
            ValueError: a bad card, one made with another model or for a task this family
                lacks, or (tasks on a picture) no picture or not the card's picture.
        """
        card = RunCard.from_json(_text(card_text, "a run card (paste it or upload its file)"))
        if card.model_type != self.pipe.kineflow_type:
            raise ValueError(f"the run card is for a {card.model_type!r} model; this server "
                             f"serves {self.model} ({self.pipe.kineflow_type!r})")  # fmt: skip
        if None not in (card.model_fingerprint, self.fingerprint) and (
            card.model_fingerprint != self.fingerprint
        ):
            raise ValueError(f"the run card was made with {card.model} (fingerprint "
                             f"{card.model_fingerprint}); this server serves {self.model} "
                             f"(fingerprint {self.fingerprint})")  # fmt: skip
        if not self.pipe.supports(card.task):
            raise ValueError(f"{self.pipe.display_name} models have no {card.task} task")
        source = None
        if "image_sha256" in card.inputs:
            source = _picture(picture)
            if pixel_hash(source) != card.inputs["image_sha256"]:
                raise ValueError("this picture is not the run card's (its pixel hash is "
                                 f"{pixel_hash(source)}, the card's "
                                 f"{card.inputs['image_sha256']})")  # fmt: skip
        out = self._run(card.task, dict(card.inputs), card.options, source, progress)
        if card.outputs and out.card.outputs == card.outputs:
            out.note = "reproduced: the same outputs as the run card"
        elif card.outputs:
            out.note = "differs from the run card's outputs (another device or dtype?)"
        return out

    # -- one run ---------------------------------------------------------------------------------
    def _options(self, task: str, given: Mapping[str, Any]) -> dict[str, Any]:
        """The options of ``task`` from ``given`` (names of :data:`CONTROLS`): only those the
        task uses, checked (:func:`~.controls.checked_value`), empty ones resolved to the
        pipeline's defaults."""
        options = {}
        for name in CONTROLS:
            if not self.pipe.uses_option(task, name):
                continue
            value = checked_value(name, given.get(name))
            options[name] = default_value(self.pipe, task, name) if value is None else value
        return options

    def _run(
        self,
        task: str,
        inputs: dict[str, Any],
        given: Mapping[str, Any],
        picture: Image.Image | None,
        progress: bool,
    ) -> Outcome:
        options = self._options(task, given)
        extra = self.pipe.select_options(task, {"return_trajectory": True, "progress": progress})
        method = getattr(self.pipe, task)
        if task == "text_to_image":
            result = method(inputs["prompts"], **options, **extra)
        elif task == "caption":
            result = method(picture, **options)
        elif task == "infill":
            x0, y0, x1, y1 = inputs["box"]
            mask = np.zeros((picture.height, picture.width), bool)
            mask[y0:y1, x0:x1] = True
            result = method(picture, mask, inputs["prompt"], **options, **extra)
        else:  # answer / edit: a picture and one text
            text = inputs["question" if task == "answer" else "instruction"]
            result = method(picture, text, **options, **extra)
        run_id = f"{next(self._ids):05d}"
        out = Outcome(card=None, card_path=self.workdir / f"run_{run_id}.json")  # type: ignore[arg-type]
        if hasattr(result, "images"):
            out.images = list(result.images)
            outputs: dict[str, Any] = {"image_sha256": [pixel_hash(im) for im in out.images]}
            for i, frames in enumerate(result.trajectory or []):
                scale = max(1, GIF_WIDTH // frames[0].width)
                path = self.workdir / f"run_{run_id}_refine_{i}.gif"
                out.gifs.append(save_gif(frames, path, scale=scale))
        else:
            out.texts = list(result.texts)
            outputs = {"texts": out.texts}
        out.card = RunCard(
            model=self.model, model_type=self.pipe.kineflow_type,
            model_fingerprint=self.fingerprint, kineflow_version=__version__,
            device=self.device, dtype=self.dtype, task=task, inputs=inputs, options=options,
            outputs=outputs,
        )  # fmt: skip
        atomic_write_text(out.card_path, out.card.to_json())
        return out
