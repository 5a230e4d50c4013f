"""The ShapesWorld infill benchmark: replace one object of a test scene through a mask.

Item ``i`` (deterministic in ``seed``): test scene ``i`` of :class:`ShapesWorld`; one of its
objects, drawn uniformly; a replacement at the same cell, drawn uniformly among the objects
that differ from it in colour or shape (size is drawn freely); the *target* scene is the source
with that object replaced. The source is rendered, its cell (:func:`cell_bounds`) is the mask,
and the pipeline's ``infill`` is asked for the replacement. The prompt is either the target's
canonical caption (``prompt="caption"``, the text the models were trained on: every object,
the new one included) or the new object's phrase alone (``prompt="object"``, e.g. "a small
green square at the center"). An item is right when the detector reads the *whole* infilled
picture as the target scene: the new object and every untouched object (none lost, none
added). The detector is the judge only: nothing of it reaches the model.

Accuracy comes with a percentile-bootstrap 95 % interval over items
(:func:`kineflow.eval.stats.bootstrap_ci`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from kineflow.data.shapes.language import caption, describe
from kineflow.data.shapes.render import cell_bounds, render_image
from kineflow.data.shapes.scene import COLOURS, SHAPES, SIZES, Obj, Scene, ShapesWorld
from kineflow.data.shapes.scene import with_objects as _with
from kineflow.eval.detector import detect
from kineflow.eval.stats import bootstrap_ci

__all__ = ["InfillItem", "infill_items", "run_infill_benchmark"]

PROMPTS = ("caption", "object")


@dataclass(frozen=True)
class InfillItem:
    """One benchmark item: ``source`` and ``target`` scenes, the replaced ``old`` and ``new``
    objects (same cell) and the pixel ``mask`` Bool[S, S] of that cell."""

    source: Scene
    target: Scene
    old: Obj
    new: Obj
    mask: np.ndarray


def infill_items(n: int, image_size: int = 32, seed: int = 0) -> list[InfillItem]:
    """The first ``n`` items (module docstring)."""
    world, rng = ShapesWorld(), np.random.default_rng(seed)
    bounds = cell_bounds(image_size)
    items = []
    for scene in world.scenes("test", n):
        old = scene.objects[int(rng.integers(len(scene)))]
        choices = [(s, c) for s in SHAPES for c in COLOURS if (s, c) != (old.shape, old.colour)]
        shape, colour = choices[int(rng.integers(len(choices)))]
        new = Obj(old.row, old.col, shape, colour, SIZES[int(rng.integers(len(SIZES)))])
        target = _with(scene, [new if o == old else o for o in scene])
        mask = np.zeros((image_size, image_size), bool)
        mask[bounds[old.row] : bounds[old.row + 1], bounds[old.col] : bounds[old.col + 1]] = True
        items.append(InfillItem(scene, target, old, new, mask))
    return items


def run_infill_benchmark(
    pipe: Any,
    n: int = 100,
    *,
    prompt: str = "caption",
    batch_size: int = 25,
    seed: int = 0,
    image_size: int = 32,
) -> dict[str, Any]:
    """Infill the first ``n`` items with ``pipe`` (any pipeline that ``supports("infill")``)
    and judge them with the detector. Returns ``accuracy`` with ``low`` / ``high`` (95 %),
    ``new_object`` (the replaced cell read right), ``kept`` (every other cell read as in the
    source), ``detector_on_source`` (the sources read right: the judge's ceiling),
    ``seconds_per_item`` and per-item ``rows``."""
    if prompt not in PROMPTS:
        raise ValueError(f"prompt must be one of {PROMPTS}, got {prompt!r}")
    items = infill_items(n, image_size, seed)
    pictures = [render_image(item.source, image_size) for item in items]
    texts = [caption(i.target) if prompt == "caption" else describe(i.new) for i in items]
    outputs, start = [], time.perf_counter()
    for lo in range(0, n, batch_size):
        hi = min(lo + batch_size, n)
        result = pipe.infill(pictures[lo:hi], [i.mask for i in items[lo:hi]], texts[lo:hi],
                             seed=seed + lo)  # fmt: skip
        outputs += result.images
    seconds = (time.perf_counter() - start) / n
    read, sources = detect(outputs), detect(pictures)
    rows = []
    for item, text, got, src in zip(items, texts, read, sources, strict=True):
        others = [o for o in item.target if o.cell != item.new.cell]
        got_others = [o for o in got if o.cell != item.new.cell]
        rows.append({
            "prompt": text, "source": item.source.key(), "target": item.target.key(),
            "read": got.key(), "correct": got == item.target,
            "new_object": got.at(*item.new.cell) == item.new, "kept": got_others == others,
            "source_read": src == item.source,
        })  # fmt: skip
    acc, low, high = bootstrap_ci([r["correct"] for r in rows], seed=seed)
    return {
        "model": pipe.display_name, "prompt": prompt, "n": n, "accuracy": acc, "low": low,
        "high": high, "new_object": float(np.mean([r["new_object"] for r in rows])),
        "kept": float(np.mean([r["kept"] for r in rows])),
        "detector_on_source": float(np.mean([r["source_read"] for r in rows])),
        "seconds_per_item": seconds, "rows": rows,
    }  # fmt: skip
