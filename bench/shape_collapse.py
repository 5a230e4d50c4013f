"""Two named shapes, one drawn: how often a model gives both objects of a prompt the same shape.

Question: when "a circle and a square" fails, what went wrong? Every test prompt that names two
different shapes (the ``two_object``, ``position`` and ``color_attr`` categories, the
benchmark's 24 per category, seed 0) is drawn ``--pictures`` times per model, the detector
reads each picture back, and each picture is put in one of three classes:

- ``both``: both named shapes are among the drawn objects (colour, relation and count aside);
- ``collapsed``: two or more objects, all of one named shape: the model drew the right number
  of objects and gave them one shape;
- ``other``: anything else (one object, a shape the prompt does not name, nothing).

Each rate comes with its 95 % bootstrap interval over prompts (a prompt's pictures together,
:func:`kineflow.eval.stats.bootstrap_ci`). ``passed`` is the GenEval-style pass rate of the same
pictures. A model drawn as "pick each object's shape on its own" would collapse about half of
the time (two shapes named, each object picks one of them); one that binds "one of each" would
collapse never.

    python bench/shape_collapse.py --models shipped=checkpoints/fudoki-shapes --cfg-scales 1 3

``--given-one`` (FUDOKI models: ``infill``) asks whether the model binds once one object is
there: each prompt is drawn twice, once with its first-named and once with its second-named
object already drawn (small, the prompt's colour where it names one, at a random cell) and
kept, everything outside that object's grid cell regenerated for the prompt. ``kept``: the
given object still reads back at its cell. If the collapse came from both objects being
decided at once, a drawn and kept object would end it; if it stays, the model does not
condition one object's shape on the other's.

Sampling: ``text_to_image`` with each of ``--cfg-scales`` and, for the models that take it,
``--steps``
solver steps (AR and UniFluid decode one token per step); float64, one thread, batch ``k``
seeded ``k`` (:func:`kineflow.eval.benchmark.text_to_image_report`). Output: one JSON object on
stdout (and ``--out``), a row per model and guidance weight under ``"rows"``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

#: The picture classes, in the order of the JSON.
CLASSES = ("both", "collapsed", "other")


def classify(prompt_text: str, detected: str) -> str:
    """The class of one picture: ``prompt_text`` names two different shapes; ``detected`` is
    the scene key the detector read back (``"00circle-red-small;21square-blue-large"``)."""
    from kineflow.data.shapes.scene import SHAPES, Scene

    named = {w for w in prompt_text.split() if w in SHAPES}
    if len(named) != 2:
        raise ValueError(f"prompt {prompt_text!r} does not name two different shapes")
    drawn = [obj.shape for obj in Scene.from_key(detected).objects]
    if named <= set(drawn):
        return "both"
    if len(drawn) >= 2 and len(set(drawn)) == 1 and drawn[0] in named:
        return "collapsed"
    return "other"


def two_shape_prompts(per_category: int = 24) -> list[Any]:
    """The benchmark's test prompts (``per_category``, seed 0) that name two different shapes."""
    from kineflow.data.shapes.prompts import prompt_set

    prompts = prompt_set("test", max_per_category=per_category, seed=0)
    return [p for p in prompts if len({r.shape for r in p.requirements}) == 2]


def collapse_report(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Rates of :data:`CLASSES` and of GenEval-style passes over ``rows`` (one per picture:
    ``id``, ``prompt``, ``detected``, ``passed``), each with its interval over prompts."""
    from kineflow.eval.stats import bootstrap_ci, ci_pair

    marks: dict[str, list[dict[str, bool]]] = {}  # prompt id -> per picture: class -> bool
    for r in rows:
        kind = classify(r["prompt"], r["detected"])
        marks.setdefault(r["id"], []).append({c: kind == c for c in CLASSES} | {
            "passed": bool(r["passed"])})  # fmt: skip
    ids = sorted(marks)
    weights = [len(marks[i]) for i in ids]
    out: dict[str, Any] = {"prompts": len(ids), "pictures": len(rows)}
    for name in (*CLASSES, "passed"):
        hits = [sum(m[name] for m in marks[i]) / len(marks[i]) for i in ids]
        result = bootstrap_ci(hits, weights=weights)
        out[name], out[f"{name}_ci"] = result[0], ci_pair(result)
    return out


def given_one_items(pipe: Any, prompts: list[Any], seed: int = 0, **options: Any) -> list[dict]:
    """Rows as :func:`collapse_report` reads them (plus ``kept``) for ``pipe.infill`` of each
    prompt with one named object given: its first-named, then its second-named (module
    docstring); batches of 64, batch ``k`` seeded ``seed + k``."""
    import numpy as np

    from kineflow.data.shapes.prompts import check
    from kineflow.data.shapes.render import cell_bounds, render_image
    from kineflow.data.shapes.scene import CELLS, Scene, ShapesWorld
    from kineflow.eval.detector import detect

    world, rng = ShapesWorld(), np.random.default_rng(seed)
    edges = cell_bounds(32)
    jobs = []  # (prompt, given object, source picture, mask)
    for prompt in prompts:
        for req in prompt.requirements:
            cell = CELLS[rng.integers(len(CELLS))]
            obj = world.random_object(rng, cell, shape=req.shape, colour=req.colour,
                                      size="small")  # fmt: skip
            mask = np.full((32, 32), 255, np.uint8)
            (r, c) = cell
            mask[edges[r] : edges[r + 1], edges[c] : edges[c + 1]] = 0
            jobs.append((prompt, obj, render_image(Scene((obj,))), mask))
    pictures = []
    for k, start in enumerate(range(0, len(jobs), 64)):
        batch = jobs[start : start + 64]
        out = pipe.infill([j[2] for j in batch], [j[3] for j in batch],
                          [j[0].text for j in batch], seed=seed + k, **options)  # fmt: skip
        pictures += out.images
    scenes = detect(np.stack([np.asarray(im) for im in pictures]))
    return [
        {"id": prompt.id, "prompt": prompt.text, "detected": scene.key(),
         "passed": not check(prompt, scene),
         "kept": any(o.cell == obj.cell and o.shape == obj.shape for o in scene.objects)}
        for (prompt, obj, _, _), scene in zip(jobs, scenes, strict=True)
    ]  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", required=True, metavar="NAME=PATH")
    p.add_argument("--cfg-scales", type=float, nargs="+", default=[3.0])
    p.add_argument("--steps", type=int, default=16, help="solver steps, where a model has them")
    p.add_argument("--pictures", type=int, default=4, help="pictures per prompt")
    p.add_argument("--per-category", type=int, default=24)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument(
        "--given-one",
        action="store_true",
        help="infill with one named object drawn and kept (FUDOKI models)",
    )
    p.add_argument("--out", help="write the JSON here too")
    args = p.parse_args(argv)
    bad = [m for m in args.models if "=" not in m]
    if bad:
        p.error(f"--models wants NAME=PATH, got {bad[0]!r}")
    import torch

    import kineflow
    from kineflow.eval.benchmark import text_to_image_report

    torch.set_num_threads(args.threads)
    prompts = two_shape_prompts(args.per_category)
    report: dict[str, Any] = {
        "steps": args.steps, "dtype": "float64", "given_one": args.given_one,
        "pictures_per_prompt": 2 if args.given_one else args.pictures,
        "categories": sorted({q.category for q in prompts}), "rows": [],
    }  # fmt: skip
    for name, folder in (m.split("=", 1) for m in args.models):
        pipe = kineflow.load(folder, dtype=torch.float64)
        for w in args.cfg_scales:
            options = {"cfg_scale": w}
            if pipe.uses_option("text_to_image", "steps"):
                options["steps"] = args.steps
            if args.given_one:
                items = given_one_items(pipe, prompts, **options)
                kept = sum(r["kept"] for r in items) / len(items)
            else:
                items = text_to_image_report(pipe, prompts, images_per_prompt=args.pictures,
                                             **options)["items"]  # fmt: skip
                kept = None
            row = {"model": name, "folder": folder, "options": options,
                   **collapse_report(items)} | ({} if kept is None else {"kept": kept})  # fmt: skip
            report["rows"].append(row)
            print(f"[shape_collapse] {name}, w = {w:g}: both {row['both']:.3f}, collapsed "
                  f"{row['collapsed']:.3f}, passed {row['passed']:.3f}", file=sys.stderr,
                  flush=True)  # fmt: skip
    text = json.dumps(report, indent=2)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
