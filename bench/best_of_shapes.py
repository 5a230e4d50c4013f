"""Best-of-N with the model judging itself (:mod:`kineflow.eval.best_of`) on the ShapesWorld
generation benchmark for the shipped checkpoints: accuracy for N = 1, 2, 4, 8 with bootstrap
95 % intervals, beside the oracle judge (the detector) and the time per prompt.

    python bench/best_of_shapes.py --per-category 16 --json bench/results/best_of_shapes.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import kineflow
from kineflow.eval.best_of import RULES, run_best_of_benchmark

ROOT = Path(__file__).resolve().parents[1]


def _ci(d: dict) -> str:
    return f"{d['accuracy']:.1%} [{d['low']:.1%}, {d['high']:.1%}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--models",
        nargs="+",
        default=["fudoki-shapes", "unifluid-shapes"],
        help="names in checkpoints/ or model folders",
    )
    parser.add_argument("--per-category", type=int, default=16)
    parser.add_argument("--ns", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=None, help="FUDOKI solver steps")
    parser.add_argument("--cfg-scale", type=float, default=None, help="guidance w")
    parser.add_argument(
        "--dtype",
        choices=("float32", "float64"),
        default=None,
        help="the models' precision (default: each folder's); float64 draws the same pictures "
        "on every CPU",
    )
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    given = (("steps", args.steps), ("cfg_scale", args.cfg_scale))
    options = {k: v for k, v in given if v is not None}  # cfg_scale 0 (no guidance) is an option
    reports = []
    print("| model | rule | N | self-judge (95 % CI) | self − N=1 (95 % CI) | "
          "overall: category mean "
          "(95 % CI) | oracle (95 % CI) | mean of the N | s / prompt |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    for name in args.models:
        folder = Path(name) if Path(name).is_dir() else ROOT / "checkpoints" / name
        dtype = args.dtype and getattr(torch, args.dtype)
        pipe = kineflow.load(folder, device=args.device, dtype=dtype)
        # Per model: UniFluid takes no solver steps, the FUDOKI model after it still does.
        ok = {k: v for k, v in options.items() if pipe.uses_option("text_to_image", k)}
        r = run_best_of_benchmark(pipe, ns=tuple(args.ns), per_category=args.per_category, **ok)
        reports.append(r)
        for rule in RULES:
            for n, by_rule in r["by_n"].items():
                row, g = by_rule[rule], by_rule[rule]["self_gain"]
                print(
                    f"| {r['model']} | {rule} | {n} | {_ci(row['self'])} | {g['mean']:+.1%} "
                    f"[{g['low']:+.1%}, {g['high']:+.1%}] | {_ci(row['self_overall'])} "
                    f"| {_ci(row['oracle'])} | {row['mean']['accuracy']:.1%} "
                    f"| {by_rule['seconds_per_prompt']:.2f} |",
                    flush=True,
                )
        auc = ", ".join(
            f"{rule} {a['auc']:.3f} over {a['pairs']} pairs" for rule, a in r["judge_auc"].items()
        )
        print(f"<!-- {r['model']}: {r['prompts']} prompts, judge AUC {auc}, API agrees: "
              f"{r['api_agrees']} -->", flush=True)  # fmt: skip
    if args.json is not None:
        args.json.write_text(json.dumps(reports, indent=1))


if __name__ == "__main__":
    main()
