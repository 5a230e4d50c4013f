"""``kineflow reproduce``, ``plot`` and ``eval``: the whole ShapesWorld reproduction
(:mod:`kineflow.apps.reproduce`), training curves from ``metrics.jsonl`` files
(:mod:`kineflow.eval.plot`) and benchmark scores of generated outputs
(:mod:`kineflow.eval.score_files`). Handlers import those modules themselves, so ``--help``
stays fast."""

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
        ),
    ),
]
