"""The ShapesWorld infill benchmark (:mod:`kineflow.eval.infill`) for the shipped checkpoints:
accuracy with bootstrap 95 % intervals, as a markdown table (and JSON with ``--json``).

    python bench/infill_shapes.py --n 100 --prompt caption object
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import kineflow
from kineflow.eval.infill import PROMPTS, run_infill_benchmark

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", nargs="+", default=["fudoki-shapes", "unifluid-shapes"])
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--prompt", nargs="+", choices=PROMPTS, default=["caption"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    reports = []
    print("| model | prompt | n | scene right (95 % CI) | new object right | others kept | "
          "detector on sources | s / item |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for name in args.models:
        pipe = kineflow.load(ROOT / "checkpoints" / name, device=args.device)
        for prompt in args.prompt:
            r = run_infill_benchmark(pipe, args.n, prompt=prompt)
            reports.append(r)
            print(
                f"| {r['model']} | {prompt} | {r['n']} | {r['accuracy']:.1%} "
                f"[{r['low']:.1%}, {r['high']:.1%}] | {r['new_object']:.1%} | {r['kept']:.1%} "
                f"| {r['detector_on_source']:.1%} | {r['seconds_per_item']:.2f} |",
                flush=True,
            )
    if args.json is not None:
        args.json.write_text(json.dumps(reports, indent=1))


if __name__ == "__main__":
    main()
