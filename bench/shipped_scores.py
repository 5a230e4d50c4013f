"""Score model folders with the reproduction's evaluation settings; JSON plus Markdown tables.

``docs/reproduction/shipped_scores.json`` and the "Shipped models" tables of
``docs/reproduction/results.md`` come from this: every folder of ``--models NAME=PATH`` is
scored on the ShapesWorld test split (and the held-out compositions) by
:func:`kineflow.eval.benchmark.evaluate_model` with the settings of ``configs/reproduce.yaml``
(24 prompts per category, 2 pictures each, 16 solver steps where the family has them, CFG
w = 3, 300 VQA questions, 100 captions, 200 edits where the family edits, seed 0), and
:func:`~kineflow.eval.benchmark.summary` keeps every score with its 95 % bootstrap interval.
``--tables`` prints the Markdown tables instead of the JSON.

Usage: ``python bench/shipped_scores.py --models fudoki=checkpoints/fudoki-shapes
unifluid=checkpoints/unifluid-shapes --out docs/reproduction/shipped_scores.json``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
#: The evaluation settings this reads from ``configs/reproduce.yaml`` (its ``eval`` section).
EVAL_FIELDS = ("steps", "cfg_scale", "max_prompts_per_category", "images_per_prompt",
               "vqa_items", "caption_items", "edit_items", "seed")  # fmt: skip
CATEGORIES = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
TYPES = ("colour", "count", "exist", "relation", "shape")


def eval_settings() -> Any:
    """The reproduction's evaluation settings (``configs/reproduce.yaml``, ``eval``)."""
    from kineflow.apps.reproduce.config import ReproduceConfig

    return ReproduceConfig.from_yaml(REPO / "configs" / "reproduce.yaml").eval


def score(
    path: str, threads: int, settings: Any, dtype: str | None = None, heldout: int | None = None
) -> dict[str, Any]:
    """The benchmark's numbers for the folder at ``path`` (``dtype``: e.g. ``"float64"``,
    whose samples do not depend on the CPU; default: the folder's own precision). ``heldout``:
    pictures per held-out prompt instead of the settings' (the split has 28 prompts; two of its
    three categories have two each, so 2 pictures per prompt leave 4 pictures a category)."""
    import torch

    import kineflow
    from kineflow.apps.reproduce.evaluate import benchmark_report
    from kineflow.eval.benchmark import summary

    torch.set_num_threads(threads)
    pipe = kineflow.load(path, dtype=None if dtype is None else getattr(torch, dtype))
    started = time.perf_counter()
    report = benchmark_report(pipe, settings, heldout_images_per_prompt=heldout)
    out = {"checkpoint": path, **summary(report)}
    out["eval_seconds"] = round(time.perf_counter() - started, 1)
    return out


def _cell(value: float | None, ci: list[float] | None) -> str:
    if value is None:
        return "–"
    return f"{value:.3f}" if ci is None else f"{value:.3f} [{ci[0]:.2f}, {ci[1]:.2f}]"


def tables(runs: dict[str, dict[str, Any]]) -> str:
    """The Markdown tables of ``runs``: overall, strict by category, VQA by type and, for runs
    whose edits were judged against their sources, editing by kind."""
    from kineflow.eval.scores import EDIT_JUDGEMENTS

    head = ["model", "gen overall", "strict", *CATEGORIES, "held-out", "VQA", "caption exact",
            "caption parse", "edit"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in runs.values():
        t, h, v, c, e = (r.get(k, {}) for k in ("t2i_test", "t2i_heldout", "vqa", "caption",
                                                 "edit"))  # fmt: skip
        cells = [f"`{Path(r['checkpoint']).name}`", _cell(t["overall"], t["overall_ci"]),
                 _cell(t["strict"], t["strict_ci"]),
                 *(_cell(t["by_category"][k], t["by_category_ci"][k]) for k in CATEGORIES),
                 _cell(h["overall"], h["overall_ci"]), _cell(v["accuracy"], v["accuracy_ci"]),
                 _cell(c["accuracy"], c["accuracy_ci"]),
                 _cell(c["parse_rate"], c["parse_rate_ci"]),
                 _cell(e.get("accuracy"), e.get("accuracy_ci"))]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    head = ["model", "strict overall", *CATEGORIES, "pictures passing (GenEval-style)",
            "pictures passing (strict)", "held-out strict"]  # fmt: skip
    lines += ["", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in runs.values():
        t, h = r["t2i_test"], r["t2i_heldout"]
        cells = [f"`{Path(r['checkpoint']).name}`", _cell(t["strict"], t["strict_ci"]),
                 *(_cell(t["strict_by_category"][k], t["strict_by_category_ci"][k])
                   for k in CATEGORIES),
                 _cell(t["image_accuracy"], t["image_accuracy_ci"]),
                 _cell(t["strict_image_accuracy"], t["strict_image_accuracy_ci"]),
                 _cell(h["strict"], h["strict_ci"])]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "| model | " + " | ".join(TYPES) + " |", "|" + "---|" * (len(TYPES) + 1)]
    for r in runs.values():
        v = r["vqa"]
        cells = [_cell(v["by_type"].get(k), v["by_type_ci"].get(k)) for k in TYPES]
        lines.append(f"| `{Path(r['checkpoint']).name}` | " + " | ".join(cells) + " |")
    editors = [r for r in runs.values() if "applied" in r.get("edit", {})]
    if editors:  # each edit judged against its source (kineflow.eval.scores.score_edits)
        head = ["model", "edit kind", "passed", *EDIT_JUDGEMENTS]
        lines += ["", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in editors:
        e = r["edit"]
        name = f"`{Path(r['checkpoint']).name}`"
        cells = [_cell(e[k], e[f"{k}_ci"]) for k in ("accuracy", *EDIT_JUDGEMENTS)]
        lines.append(f"| {name} | all | " + " | ".join(cells) + " |")
        for kind, passed in e["by_kind"].items():  # per kind, intervals on the pass rate only
            cells = [_cell(passed, e["by_kind_ci"][kind]),
                     *(_cell(e[f"{k}_by_kind"][kind], None) for k in EDIT_JUDGEMENTS)]  # fmt: skip
            lines.append(f"| {name} | {kind} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--models", nargs="+", metavar="NAME=PATH", default=[
        "fudoki=checkpoints/fudoki-shapes", "unifluid=checkpoints/unifluid-shapes"])  # fmt: skip
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--dtype", choices=("float32", "float64"), default=None,
        help="the models' precision (default: each folder's); float64 samples the same "
        "pictures on every CPU, float32 sampling differs between instruction sets",
    )  # fmt: skip
    p.add_argument("--heldout-pictures", type=int, default=None, metavar="K",
                   help="pictures per held-out prompt (default: the eval's, 2)")  # fmt: skip
    p.add_argument("--out", default=None, help="write the JSON here too")
    p.add_argument("--tables", metavar="JSON", default=None,
                   help="print the Markdown tables of a JSON this wrote, and stop")  # fmt: skip
    args = p.parse_args(argv)
    if args.tables:
        print(tables(json.loads(Path(args.tables).read_text())["runs"]), end="")
        return 0
    settings = eval_settings()
    runs = {}
    for item in args.models:
        name, eq, path = item.partition("=")
        if not eq or not name or not Path(path).is_dir():
            p.error(f"--models wants NAME=FOLDER with an existing folder, got {item!r}")
        print(f"[shipped_scores] {name}: {path}", file=sys.stderr, flush=True)
        runs[name] = score(path, args.threads, settings, args.dtype, args.heldout_pictures)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO,
                            capture_output=True, text=True).stdout.strip()  # fmt: skip
    report = {"about": "model folders scored on the test split with the reproduction's eval "
              "settings (configs/reproduce.yaml eval) and the current detector; 95 % "
              "percentile-bootstrap intervals (kineflow.eval.stats, seed 0); made by "
              "bench/shipped_scores.py", "commit": commit,
              "eval": {name: getattr(settings, name) for name in EVAL_FIELDS},
              "dtype": args.dtype or "the folders' own",
              "heldout_pictures_per_prompt": args.heldout_pictures or settings.images_per_prompt,
              "runs": runs}  # fmt: skip
    text = json.dumps(report, indent=1)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
