"""``kineflow reproduce``, ``plot`` and ``eval``: the whole ShapesWorld reproduction
(:mod:`kineflow.apps.reproduce`), training curves from ``metrics.jsonl`` files
(:mod:`kineflow.eval.plot`), benchmark scores of generated outputs
(:mod:`kineflow.eval.score_files`) and the understanding diagnosis
(:mod:`kineflow.eval.probe`). Handlers import those modules themselves, so ``--help`` stays
fast."""

from __future__ import annotations

import argparse
from pathlib import Path

from kineflow.cli.args import int_in_range, output_dir
from kineflow.cli.command import Command, group
from kineflow.cli.data import SHAPES_TASKS

__all__ = ["COMMANDS"]


def _reproduce_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", type=Path, default=Path("configs/reproduce.yaml"), help="reproduction YAML"
    )
    parser.add_argument("--out", type=output_dir, default=None, help="override the config's out")
    parser.add_argument(
        "--steps", type=int_in_range(2, 10**9), default=None, help="override N (steps per model)"
    )
    parser.add_argument(
        "--ship", type=Path, default=None,
        help="copy the shipped checkpoints (FUDOKI, UniFluid, VQ, SigLIP) to this folder",
    )  # fmt: skip


def _run_reproduce(args: argparse.Namespace) -> int:
    from kineflow.apps.reproduce import ReproduceConfig, reproduce

    try:
        config = ReproduceConfig.from_yaml(args.config)
        if args.out is not None:
            config.out = str(args.out)
        if args.steps is not None:
            config.steps = args.steps
        if args.ship is not None:
            config.ship = str(args.ship)
        reproduce(config)
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        print(f"error: {err}")
        return 2
    return 0


def _plot_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "runs", nargs="+", type=Path, help="metrics.jsonl files or the run folders holding them"
    )
    parser.add_argument(
        "--keys", nargs="+", default=["loss"], help="metrics to plot, one panel each"
    )
    parser.add_argument("--out", type=Path, default=Path("loss.png"), help="PNG to write")


def _run_plot(args: argparse.Namespace) -> int:
    from kineflow.eval.plot import plot_metrics, read_metrics

    runs = {}
    try:
        for path in args.runs:
            file = path / "metrics.jsonl" if path.is_dir() else path
            name = str(file.parent) if file.name == "metrics.jsonl" else str(path)
            runs[name] = read_metrics(file)
        written = plot_metrics(runs, args.keys, args.out)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}")
        return 2
    print(written)
    return 0


def _eval_shapes_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--task", choices=SHAPES_TASKS, required=True)
    parser.add_argument(
        "--samples",
        type=Path,
        required=True,
        help="t2i / edit: folder of pictures; vqa / caption: JSONL of outputs",
    )
    parser.add_argument(
        "--prompts",
        type=Path,
        default=None,
        help="t2i prompt set (prompts.jsonl); default: the built-in set",
    )
    parser.add_argument(
        "--bench",
        type=Path,
        default=None,
        help="benchmark manifest (vqa, caption, edit); default: redrawn by id",
    )
    parser.add_argument(
        "--split", choices=("test", "heldout"), default="test", help="built-in t2i prompt set"
    )
    parser.add_argument(
        "--out", type=output_dir, default=None, help="report folder (default: next to the samples)"
    )


def _run_eval_shapes(args: argparse.Namespace) -> int:
    from kineflow.eval.score_files import evaluate
    from kineflow.eval.scores import format_report

    out = args.out or (args.samples if args.samples.is_dir() else args.samples.parent)
    try:
        report, paths = evaluate(args.task, args.samples, out, args.prompts, args.bench, args.split)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}")
        return 2
    print(format_report(report))
    for name, path in paths.items():
        print(f"{name}: {path}")
    return 0


def _eval_probe_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, required=True, help="checkpoint folder")
    parser.add_argument("--out", type=output_dir, required=True, help="folder for probe.json")
    parser.add_argument(
        "--train",
        type=int_in_range(10, 10**7),
        default=3000,
        help="training scenes (the last 20 %% pick the weight decay)",
    )
    parser.add_argument("--test", type=int_in_range(1, 10**7), default=1000, help="test scenes")
    parser.add_argument(
        "--vqa",
        type=int_in_range(0, 10**6),
        default=300,
        help="test questions for the VQA breakdown (0: none)",
    )
    parser.add_argument(
        "--iterations", type=int_in_range(1, 10**5), default=60, help="L-BFGS iterations per probe"
    )
    parser.add_argument(
        "--steps",
        type=int_in_range(1, 10**5),
        default=16,
        help="solver steps per answer, where the model family has them",
    )
    parser.add_argument("--seed", type=int, default=0)  # fmt: skip


def _run_eval_probe(args: argparse.Namespace) -> int:
    import json

    import kineflow
    from kineflow.eval.probe import ProbeConfig, probe_model
    from kineflow.io import atomic_write_json

    try:
        config = ProbeConfig(train=args.train, test=args.test, vqa_items=args.vqa,
                             iterations=args.iterations, seed=args.seed)  # fmt: skip
        args.out.mkdir(parents=True, exist_ok=True)  # fail before the work, not after
        pipe = kineflow.load(args.model)
        if not pipe.supports("answer"):
            raise ValueError(f"--model {args.model}: {pipe.display_name} does not answer")
        result = probe_model(pipe, config, steps=args.steps)
    except (ValueError, FileNotFoundError, OSError) as err:
        print(f"error: {err}")
        return 2
    path = args.out / "probe.json"
    atomic_write_json(path, result)
    table = {f: {t: round(v["accuracy"], 3) for t, v in p.items()}
             for f, p in result["probes"].items()}  # fmt: skip
    print(json.dumps(table))
    print(f"probe: {path}")
    return 0


COMMANDS: list[Command] = [
    Command(
        name="reproduce",
        help="the whole ShapesWorld reproduction: tokenizers, encoders, 4 models, results",
        description="Train the VQ tokenizer, text tokenizer and SigLIP encoder, then the AR "
        "baseline, FUDOKI from scratch, FUDOKI from AR and the masked baseline at equal "
        "compute, evaluate them and write results.md / results.json with figures. Re-running "
        "continues an interrupted run.",
        options=_reproduce_options,
        handler=_run_reproduce,
    ),
    Command(
        name="plot",
        help="plot training curves from metrics.jsonl files",
        description="'kineflow plot outputs/run_a outputs/run_b --keys loss loss_gen' draws "
        "one panel per metric, one line per run.",
        options=_plot_options,
        handler=_run_plot,
    ),
    group(
        "eval",
        help="score generated pictures or answers on a benchmark",
        description="Evaluation: 'kineflow eval shapes --task t2i --samples DIR' scores a "
        "folder of generated pictures against the GenEval-style ShapesWorld prompts.",
        subcommands=(
            Command(
                "shapes",
                "score outputs on the ShapesWorld benchmark (JSON report + contact sheet)",
                _eval_shapes_options,
                _run_eval_shapes,
            ),
            Command(
                "probe",
                "where understanding is lost: linear probes of a model's picture features "
                "and a VQA breakdown (JSON)",
                _eval_probe_options,
                _run_eval_probe,
                description="'kineflow eval probe --model checkpoints/fudoki-shapes --out DIR' "
                "probes raw pixels, the vision tower's output and the aligner's output for "
                "per-cell occupancy, colour, shape and the object count (linear probes), then "
                "asks test questions about their own and shuffled pictures; writes "
                "DIR/probe.json.",
            ),
        ),
    ),
]
