"""Relation questions only: a model's accuracy on ``--questions`` test relation questions.

The benchmark's 300 VQA questions hold about 49 relation questions ("is the red circle left
of the blue square?"), too few to tell 0.88 from 0.92. This draws test-split VQA items past
the benchmark's (indices from 100 000, the benchmark's uniform draw of a question type) and
keeps the relation ones, then answers them as the benchmark answers its questions
(:func:`kineflow.eval.benchmark.answer_items`: 16 solver steps, batches of 64, batch ``k``
seeded ``k``; float64, one thread) and scores them with their 95 % bootstrap
interval (:func:`kineflow.eval.scores.score_vqa`).

    python bench/relation_questions.py --models shipped=checkpoints/fudoki-shapes --questions 300

Output: one JSON object on stdout (and ``--out``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    import torch

    import kineflow
    from kineflow.data.shapes.dataset import draw_item
    from kineflow.data.shapes.scene import ShapesWorld
    from kineflow.eval.benchmark import answer_items
    from kineflow.eval.scores import score_vqa

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", required=True, metavar="NAME=PATH")
    p.add_argument("--questions", type=int, default=300)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", help="write the JSON here too")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    world, items, index = ShapesWorld(), [], 100_000
    while len(items) < args.questions:
        item = draw_item(world, "vqa", "test", index)
        index += 1
        if item.kind == "relation":
            items.append(item)
    rows = [{"id": it.id, "type": it.kind, **it.texts} for it in items]
    report: dict = {"questions": args.questions, "dtype": "float64", "steps": 16, "models": {}}
    for name, folder in (m.split("=", 1) for m in args.models):
        pipe = kineflow.load(folder, dtype=torch.float64)
        scored = score_vqa(rows, answer_items(pipe, items, steps=16))
        report["models"][name] = {"folder": folder, "accuracy": scored["accuracy"],
                                  "accuracy_ci": scored["accuracy_ci"]}  # fmt: skip
        print(f"[relation_questions] {name}: {scored['accuracy']:.3f}", file=sys.stderr)
    text = json.dumps(report, indent=2)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
