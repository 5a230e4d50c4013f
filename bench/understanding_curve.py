"""VQA accuracy against training steps: the shipped FUDOKI recipe vs an understanding-only run.

Issue 18's first question is whether the understanding ceiling (VQA ≈ 0.59 for every model
family, although linear probes read the scene from the language model's inputs: see
``docs/understanding.md``) comes from sharing the model with generation or from the training
budget. This trains two tiny models on ShapesWorld from ``--config`` (default
``configs/fudoki_shapes.yaml``; a UniFluid config such as ``configs/unifluid_shapes.yaml``
trains UniFluid, an ``objective: {kind: ar}`` config the AR baseline) with the same seeds,
batch and steps, differing only in ``data.understanding_ratio``:

* ``unified``: the shipped recipe (0.5: half the samples text-to-image);
* ``understanding_only``: 1.0 (VQA and captioning only: twice the unified run's understanding
  samples per step, the same model and compute).

Each run saves its weights at ``--checkpoints`` steps (``export_steps``) and every export is
asked ``--vqa`` test questions (:func:`kineflow.eval.probe.vqa_breakdown`: accuracy with a 95 %
bootstrap interval, by question type, with pictures shuffled between questions, the yes-rate
on existence questions). The two runs train at the same time, one thread each
(``--threads``). ``--text-t-max`` trains every run's answers at ``t ≤`` that value only
(``objective.text_t_max``). Output: one JSON object on stdout (and ``--out``/curve.json),
progress on stderr.
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
RUNS = {"unified": {}, "understanding_only": {"data.understanding_ratio": 1.0}}


def parse_variant(text: str) -> tuple[str, dict[str, Any]]:
    """``NAME:key=value,key=value`` -> (NAME, {dotted key: YAML value}) (``--variant``)."""
    import yaml

    name, _, rest = text.partition(":")
    if not name or ":" not in text:
        raise argparse.ArgumentTypeError(f"--variant wants NAME:key=value,..., got {text!r}")
    overrides: dict[str, Any] = {}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq:
            raise argparse.ArgumentTypeError(f"--variant {name}: {item!r} is not key=value")
        overrides[key.strip()] = yaml.safe_load(value)
    return name, overrides


def apply_overrides(raw: dict[str, Any], overrides: dict[str, Any]) -> None:
    """Set each dotted key of ``overrides`` in the config dictionary ``raw``."""
    for key, value in overrides.items():
        *parents, leaf = key.split(".")
        node = raw
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value


def train(name: str, args: argparse.Namespace) -> subprocess.Popen:
    """Start one training run in its own process (``kineflow train fudoki|unifluid``)."""
    import yaml

    from kineflow.apps.reproduce.recipes import trainer_of

    raw = yaml.safe_load(Path(args.config).read_text())
    trainer = trainer_of(Path(args.config), raw)  # before the overrides, as the file says
    for key in ("vq", "vae", "vision", "text_tokenizer", "init_from"):
        if raw.get(key) is not None:
            raw[key] = str(REPO / raw[key])
    raw["out"] = str(Path(args.out) / name)
    apply_overrides(raw, args.variants[name])
    raw["optim"].update(steps=args.steps, seed=args.seed)
    raw["data"]["seed"] = args.seed
    if args.text_t_max is not None:  # answers trained at t ~ U(t_min, text_t_max) only
        raw.setdefault("objective", {})["text_t_max"] = args.text_t_max
    raw.update(export_steps=args.checkpoints, threads=args.threads, log_every=100,
               ckpt_every=max(args.checkpoints))  # fmt: skip
    config = Path(args.out) / f"{name}.yaml"
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text(yaml.safe_dump(raw))
    cmd = [sys.executable, "-m", "kineflow", "train", trainer, "--config", str(config),
           "--no-progress"]  # fmt: skip
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL)


def evaluate(folder: Path, n: int, threads: int) -> dict[str, Any]:
    import torch

    import kineflow
    from kineflow.eval.probe import vqa_breakdown

    torch.set_num_threads(threads)
    report = vqa_breakdown(kineflow.load(str(folder)), n, steps=16)
    return {k: v for k, v in report.items() if k not in ("rows", "examples")}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--out", default="outputs/understanding_curve")
    p.add_argument(
        "--config",
        default=str(REPO / "configs/fudoki_shapes.yaml"),
        help="the run config every run starts from (FUDOKI, AR or UniFluid)",
    )
    p.add_argument("--steps", type=int, default=2400)
    p.add_argument("--checkpoints", type=int, nargs="+", default=[300, 600, 1200, 2400])
    p.add_argument("--vqa", type=int, default=300, help="test questions per checkpoint")
    p.add_argument("--threads", type=int, default=1, help="torch threads per training run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--runs",
        nargs="+",
        choices=sorted(RUNS),
        default=None,
        help="built-in runs (default: both, unless --variant is given)",
    )
    p.add_argument(
        "--variant",
        action="append",
        type=parse_variant,
        default=[],
        metavar="NAME:KEY=VALUE,...",
        help="an extra run: the shipped config with these dotted keys set "
        "(e.g. understand:data.understanding_ratio=1.0,train_vision=true)",
    )
    p.add_argument(
        "--text-t-max",
        type=float,
        default=None,
        help="objective.text_t_max of every run (default: the config's, unset)",
    )
    args = p.parse_args(argv)
    if args.runs is None:
        args.runs = [] if args.variant else list(RUNS)
    args.variants = {name: RUNS[name] for name in args.runs} | dict(args.variant)
    args.runs = list(args.variants)
    if not args.runs:
        p.error("no runs: give --runs or --variant")
    if max(args.checkpoints) != args.steps:
        args.checkpoints = sorted({*args.checkpoints, args.steps})
    started = time.perf_counter()
    procs = {name: train(name, args) for name in args.runs}
    failed = {name: proc.wait() for name, proc in procs.items()}
    if any(failed.values()):
        raise SystemExit(f"training failed: {failed}")
    train_s = time.perf_counter() - started
    curves: dict[str, Any] = {}
    for name in args.runs:
        curves[name] = {}
        for step in args.checkpoints:
            print(f"[understanding_curve] {name} step {step}", file=sys.stderr, flush=True)
            folder = Path(args.out) / name / f"model_step{step}"
            curves[name][str(step)] = evaluate(folder, args.vqa, max(1, args.threads))
    report = {"config": args.config,
              "steps": args.steps, "checkpoints": args.checkpoints, "vqa_items": args.vqa,
              "seed": args.seed, "overrides": args.variants,
              "text_t_max": args.text_t_max,
              "train_seconds": round(train_s, 1),
              "seconds": round(time.perf_counter() - started, 1), "curves": curves}  # fmt: skip
    (Path(args.out) / "curve.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
