"""The ``README.md`` model card every ``save_pretrained`` writes, as Hugging Face folders have.

The card opens with YAML front matter (the Hub reads ``license``, ``library_name``,
``pipeline_tag`` and ``tags``; ``kineflow`` holds the numbers below, machine-readable), then
says what the model is (family, parameter count, image size and tokens, the tasks it has),
how it was trained and on what (only when the saver passes the run's record), its scores with
their settings (only when passed: a card never invents them), the licence, and how to load it
with Python and the CLI. Every number comes from the model's config and weights or from what
the caller passes; the card is written inside the folder the save swaps in whole
(:func:`kineflow.io.save_pretrained_folder`), so it never describes other weights.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import yaml
from torch import Tensor

from kineflow.io import atomic_write_text
from kineflow.pipelines.base import Pipeline

__all__ = ["CARD_NAME", "SHAPESWORLD", "card_writer", "model_card", "parse_front_matter"]

CARD_NAME = "README.md"
#: The Hub's tag for each task a family may have (its capabilities).
_TASK_TAGS = {
    "text_to_image": "text-to-image",
    "answer": "visual-question-answering",
    "caption": "image-to-text",
    "edit": "image-to-image",
    "generate_text": "text-generation",
    "infill": "image-inpainting",
}
_FAMILIES = {
    "FUDOKI": "discrete flow matching over text ids and VQ image codes (a metric-induced "
    "probability path with kinetic-optimal velocities), one transformer that both "
    "understands and generates pictures",
    "UniFluid": "autoregression over continuous KL-VAE image tokens (random generation "
    "order) with a per-token diffusion head, and over text ids with the same transformer",
}


#: What the trainers record as the data of a ShapesWorld run.
SHAPESWORLD = (
    "ShapesWorld: synthetic 32 px pictures of coloured shapes (circles, squares, triangles, "
    "...) with captions, questions and edit instructions generated from each scene, in "
    "seeded train / val / test / held-out-composition splits"
)


def _block(data: Any) -> str:
    # Records hold paths and tuples: JSON's view of them (str, list) is what YAML can print.
    plain = json.loads(json.dumps(data, default=str))
    return "```yaml\n" + yaml.safe_dump(plain, sort_keys=False, allow_unicode=True) + "```\n"


def model_card(
    pipe: Pipeline,
    weights: Mapping[str, Tensor],
    facts: Mapping[str, int | float | str],
    *,
    training: Mapping[str, Any] | None = None,
    scores: Mapping[str, Any] | None = None,
    name: str | None = None,
) -> str:
    """The card's text for ``pipe`` saved with ``weights`` (parameters = their element count).

    ``facts``: the family's headline sizes (``image_size``, ``image_tokens``, ...), shown in
    a table and under ``kineflow`` in the front matter. ``training``: the run's record, e.g.
    ``{"data": ..., "config": ..., "summary": ...}``; ``scores``: ``{"settings": {...},
    "results": {...}}`` or any mapping; each section says "not recorded" without them.
    """
    # The package is loaded before any of its modules; importing it here would make an import
    # cycle (kineflow -> kineflow.load -> ... -> this module).
    version = sys.modules["kineflow"].__version__
    family = pipe.display_name
    parameters = int(sum(t.numel() for t in weights.values()))
    tasks = sorted(pipe.capabilities)
    tags = ["kineflow", family.lower(), *(_TASK_TAGS[t] for t in tasks if t in _TASK_TAGS)]
    front = {
        "license": "apache-2.0",
        "library_name": "kineflow",
        "pipeline_tag": "any-to-any",
        "tags": tags,
        "kineflow": {
            "kineflow_type": pipe.kineflow_type,
            "version": version,
            "parameters": parameters,
            **dict(facts),
            "tasks": tasks,
        },
    }
    title = name or f"kineflow {family} model"
    rows = [("parameters", f"{parameters:,}")]
    rows += [(k.replace("_", " "), v) for k, v in facts.items()]
    lines = [
        "---", yaml.safe_dump(front, sort_keys=False).rstrip(), "---", "", f"# {title}", "",
        f"A **{family}** model (`kineflow_type: {pipe.kineflow_type}`) saved by kineflow "
        f"{version}: {_FAMILIES.get(family, 'a kineflow pipeline')}.", "",
        "| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows), "",
        "Tasks: " + ", ".join(f"`{t}`" for t in tasks) + ". The full configuration is in "
        "`config.json`.", "", "## Training", "",
    ]  # fmt: skip
    if training:
        data = training.get("data")
        if isinstance(data, str):
            lines += [f"Data: {data}.", ""]
        elif data is not None:
            lines += ["Data:", "", _block(data)]
        rest = {k: v for k, v in training.items() if k != "data"}
        if rest:
            lines += ["Run:", "", _block(rest)]
    else:
        lines += ["Not recorded in this folder (it was not saved by a kineflow training run).", ""]
    lines += ["## Scores", ""]
    lines += [_block(dict(scores))] if scores else ["No scores are recorded with this folder.", ""]
    lines += [
        "## Licence", "", "Apache-2.0 (the kineflow code and these weights).", "",
        "## How to load", "", "```python", "import kineflow", "",
        'pipe = kineflow.load("path/to/this/folder")  # or a hub id',
        *(['pipe.text_to_image("a red circle above a blue square", seed=0).images[0]']
          if "text_to_image" in tasks else []),
        *(['pipe.answer("picture.png", "How many shapes are there?").texts[0]']
          if "answer" in tasks else []),
        "```", "", "```bash",
        *(['kineflow generate --model path/to/this/folder "a red circle above a blue square"']
          if "text_to_image" in tasks else []),
        *(['kineflow answer --model path/to/this/folder --image picture.png "How many shapes?"']
          if "answer" in tasks else []),
        "```", "",
    ]  # fmt: skip
    return "\n".join(lines)


def card_writer(
    pipe: Pipeline,
    weights: Mapping[str, Tensor],
    facts: Mapping[str, int | float | str],
    extra: Callable[[Path], None] | None = None,
    **card: Any,
) -> Callable[[Path], None]:
    """A ``save_pretrained_folder`` ``extra`` that runs ``extra`` and writes the card (the
    keywords of :func:`model_card`) into the folder being saved."""

    def write(folder: Path) -> None:
        if extra is not None:
            extra(folder)
        atomic_write_text(folder / CARD_NAME, model_card(pipe, weights, facts, **card))

    return write


def parse_front_matter(text: str) -> dict[str, Any]:
    """The YAML front matter of a card (between the first two ``---`` lines).

    Raises:
        ValueError: no front matter, or not a YAML mapping.
    """
    parts = text.split("---\n", 2)
    if len(parts) < 3 or parts[0]:
        raise ValueError("a model card starts with YAML front matter between '---' lines")
    data = yaml.safe_load(parts[1])
    if not isinstance(data, dict):
        raise ValueError("a model card's front matter must be a YAML mapping")
    return data
