"""Text-to-image scores of one model against its sampling settings: guidance, steps, temperature.

Question: how much of a model's generation score is the sampler's? Every setting of the grid
(``--grid``: a JSON list of ``text_to_image`` options, e.g. ``[{"cfg_scale": 1}, {"cfg_scale":
3, "steps": 64}]``) samples the same ShapesWorld test prompts (``--prompts`` per category,
``--pictures`` each, seed 0, as the reproduction's evaluation), the detector reads the
pictures back, and :func:`kineflow.eval.scores.score_t2i` gives the GenEval-style score and the
strict-scene one (no extra objects), each with its 95 % bootstrap interval, and per category
(the benchmark's own generation and summary: :mod:`kineflow.eval.benchmark`), and
``surplus_objects``: how many objects a picture holds beyond the ones its prompt names.

Usage: ``python bench/guidance_sweep.py --model checkpoints/fudoki-shapes --out FILE``.
Output: one JSON object on stdout (and ``--out``), progress on stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

#: The default grid: guidance off / the reproduction's w = 3 / stronger, more steps, colder.
GRID = [{"cfg_scale": 1.0}, {"cfg_scale": 2.0}, {"cfg_scale": 3.0}, {"cfg_scale": 6.0},
        {"cfg_scale": 3.0, "steps": 64}, {"cfg_scale": 1.0, "steps": 64},
        {"cfg_scale": 3.0, "temperature": 0.5}]  # fmt: skip


#: What ``--items`` keeps of each picture's row (:func:`kineflow.eval.scores.score_t2i`).
ITEM_FIELDS = ("id", "sample", "category", "prompt", "passed", "strict", "failures", "detected")


def sweep_setting(
    pipe: Any, prompts: list[Any], pictures: int, options: dict[str, Any], items: bool = False
) -> dict:
    """The scores of ``pipe`` on ``prompts`` with ``text_to_image`` ``options``, generated and
    summarised as the benchmark does (:func:`kineflow.eval.benchmark.text_to_image_report`,
    :func:`~kineflow.eval.benchmark.summary`); with ``items``, each picture's row too (its
    prompt, the scene the detector read back, and why it failed)."""
    from kineflow.eval.benchmark import summary, text_to_image_report

    report = text_to_image_report(pipe, prompts, images_per_prompt=pictures, **options)
    row = {"options": options, **summary({"t2i_test": report})["t2i_test"]}
    if items:
        row["items"] = [{k: it[k] for k in ITEM_FIELDS} for it in report["items"]]
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--model", default="checkpoints/fudoki-shapes")
    p.add_argument("--grid", default=None, help="JSON list of text_to_image options")
    p.add_argument("--prompts", type=int, default=24, help="test prompts per category")
    p.add_argument("--pictures", type=int, default=2, help="pictures per prompt")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--dtype", choices=("float32", "float64"), default=None,
        help="the model's precision (default: the folder's); float64 samples the same pictures "
        "on every CPU",
    )  # fmt: skip
    p.add_argument(
        "--items",
        action="store_true",
        help="keep every picture's row: prompt, detected scene, failures",
    )
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    grid = json.loads(args.grid) if args.grid else GRID
    if not isinstance(grid, list) or not all(isinstance(g, dict) for g in grid):
        p.error("--grid wants a JSON list of objects, e.g. '[{\"cfg_scale\": 1}]'")
    import torch

    import kineflow
    from kineflow.data.shapes.prompts import prompt_set

    torch.set_num_threads(args.threads)
    pipe = kineflow.load(args.model, dtype=args.dtype and getattr(torch, args.dtype))
    prompts = prompt_set("test", max_per_category=args.prompts, seed=0)
    rows = []
    for options in grid:
        started = time.perf_counter()
        row = sweep_setting(pipe, prompts, args.pictures, options, items=args.items)
        row["seconds"] = round(time.perf_counter() - started, 1)
        print(f"[guidance_sweep] {options}: {row['overall']:.3f} GenEval-style, "
              f"{row['strict']:.3f} strict", file=sys.stderr, flush=True)  # fmt: skip
        rows.append(row)
    report = {"model": args.model, "dtype": args.dtype or "the folder's own",
              "prompts_per_category": args.prompts,
              "pictures_per_prompt": args.pictures, "settings": rows}  # fmt: skip
    text = json.dumps(report, indent=1)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
