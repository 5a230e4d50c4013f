"""Command-line interface: ``kineflow <command> [options]``, also ``python -m kineflow``.

Every command is a :class:`Command`: a name, help texts, a function adding its options and a
handler of the parsed arguments returning the exit status. A new command (``train``,
``generate``, ``eval``) is one more entry of :data:`COMMANDS`. Handlers import their heavy
modules themselves, so ``kineflow --help`` and argument errors do not wait for torch. The
argument types live in :mod:`kineflow.cli.args`, the sampling commands (``generate``,
``answer``, ``edit``, ``showcase``) in :mod:`kineflow.cli.sampling`.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from kineflow import __version__
from kineflow.cli.args import int_in_range, output_dir
from kineflow.cli.sampling import ANSWER, EDIT, GENERATE, SHOWCASE

# -- commands -----------------------------------------------------------------------------------
MAX_STEPS = 256  # the GIF holds one frame per step and the sweep runs 4x steps


def _demo_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--out", type=output_dir, default=Path("outputs/demo"), help="output folder"
    )
    parser.add_argument(
        "--steps",
        type=int_in_range(1, MAX_STEPS),
        default=32,
        help=f"solver steps (= model calls) per path, 1..{MAX_STEPS}",
    )
    parser.add_argument(
        "--seed", type=int_in_range(0, 2**32 - 1), default=0, help="seed of data and sampling"
    )
    parser.add_argument(
        "--samples", type=int_in_range(1, 256), default=16, help="samples drawn per path"
    )
    parser.add_argument(
        "--images", type=int_in_range(1, 64), default=12, help="images in the dataset"
    )


def _run_demo(args: argparse.Namespace) -> int:
    from kineflow.apps.demo import format_report, run_demo

    summary = run_demo(
        args.out, steps=args.steps, seed=args.seed, samples=args.samples, images=args.images
    )
    print(format_report(summary))
    return 0


def _subcommands(
    parser: argparse.ArgumentParser,
    entries: tuple[tuple[str, str, Callable[[argparse.ArgumentParser], None], Callable], ...],
) -> None:
    """Add ``(name, help, options, handler)`` sub-subcommands (``kineflow data shapes``)."""
    sub = parser.add_subparsers(dest="subcommand", metavar="subcommand", required=True)
    for name, help_text, options, handler in entries:
        p = sub.add_parser(
            name,
            help=help_text,
            description=help_text,
            formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        )
        options(p)
        p.set_defaults(handler=handler)


SPLITS = ("train", "val", "test", "heldout")
SHAPES_TASKS = ("t2i", "caption", "vqa", "edit")


def _world_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seed", type=int_in_range(0, 2**32 - 1), default=0, help="world seed")
    parser.add_argument("--size", type=int, choices=(32, 64), default=32, help="picture size")


def _data_shapes_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=output_dir, required=True, help="output folder")
    parser.add_argument("--n", type=int_in_range(1, 10**8), default=10_000, help="items per task")
    parser.add_argument("--split", choices=SPLITS, default="train")
    parser.add_argument("--tasks", nargs="+", choices=SHAPES_TASKS, default=list(SHAPES_TASKS))
    parser.add_argument(
        "--workers",
        type=int_in_range(1, 256),
        default=None,
        help="processes (default: the CPUs available, at most 8)",
    )
    _world_options(parser)


def _run_data_shapes(args: argparse.Namespace) -> int:
    import json

    from kineflow.data.shapes.materialise import materialise
    from kineflow.data.shapes.scene import WorldConfig

    summary = materialise(
        args.out,
        args.n,
        split=args.split,
        tasks=tuple(args.tasks),
        world=WorldConfig(seed=args.seed, image_size=args.size),
        workers=args.workers,
    )
    print(json.dumps(summary, indent=1))
    return 0


def _data_validate_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("manifest", type=Path, help="JSONL manifest to check")
    parser.add_argument(
        "--image-size",
        type=int_in_range(1, 8192),
        default=None,
        help="training resolution (then mixed picture sizes are fine)",
    )
    parser.add_argument("--max-errors", type=int_in_range(1, 10**6), default=50)


def _run_data_validate(args: argparse.Namespace) -> int:
    from kineflow.data.manifest import validate_manifest

    if not args.manifest.is_file():
        print(f"error: {args.manifest}: no such manifest file")
        return 2
    report = validate_manifest(
        args.manifest, image_size=args.image_size, max_errors=args.max_errors
    )
    print(report.format())
    return 0 if report.ok else 1


def _data_tokenizer_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=output_dir, required=True, help="tokenizer folder")
    parser.add_argument("--vocab-size", type=int_in_range(262, 1 << 20), default=512)
    parser.add_argument(
        "--n",
        type=int_in_range(1, 10**7),
        default=2000,
        help="training items per task in the corpus",
    )
    parser.add_argument(
        "--corpus",
        type=Path,
        default=None,
        help="train on this text file (one text per line) instead of ShapesWorld",
    )
    parser.add_argument("--seed", type=int_in_range(0, 2**32 - 1), default=0, help="world seed")


def _run_data_tokenizer(args: argparse.Namespace) -> int:
    from kineflow.tokenizers.text import train_text_tokenizer

    if args.corpus is not None:
        if not args.corpus.is_file():
            print(f"error: {args.corpus}: no such corpus file")
            return 2
        texts = [t for t in args.corpus.read_text().splitlines() if t.strip()]
    else:
        from kineflow.data.shapes.dataset import corpus
        from kineflow.data.shapes.scene import ShapesWorld, WorldConfig

        texts = corpus(ShapesWorld(WorldConfig(seed=args.seed)), args.n)
    tokenizer = train_text_tokenizer(texts, vocab_size=args.vocab_size)
    path = tokenizer.save(args.out)
    print(f"{path}: {tokenizer.vocab_size} tokens, trained on {len(texts)} texts")
    return 0


def _data_reference_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--task", choices=SHAPES_TASKS, required=True)
    parser.add_argument("--out", type=output_dir, required=True)
    parser.add_argument("--split", choices=SPLITS, default="test")
    parser.add_argument(
        "--n", type=int_in_range(1, 10**6), default=500, help="items (vqa, caption, edit)"
    )
    parser.add_argument("--samples-per-prompt", type=int_in_range(1, 64), default=4)


def _run_data_reference(args: argparse.Namespace) -> int:
    from kineflow.eval.score_files import write_reference

    path = write_reference(args.task, args.out, args.split, args.n, args.samples_per_prompt)
    print(f"ground-truth {args.task} outputs written to {path}")
    return 0


def _data_options(parser: argparse.ArgumentParser) -> None:
    _subcommands(
        parser,
        (
            (
                "shapes",
                "write ShapesWorld items as a JSONL manifest over PNG files",
                _data_shapes_options,
                _run_data_shapes,
            ),
            (
                "validate",
                "check a JSONL manifest (fields, paths, pictures) before training",
                _data_validate_options,
                _run_data_validate,
            ),
            (
                "tokenizer",
                "train a byte-level BPE text tokenizer (tokenizer.json)",
                _data_tokenizer_options,
                _run_data_tokenizer,
            ),
            (
                "reference",
                "write ground-truth outputs in the layout 'eval shapes' reads",
                _data_reference_options,
                _run_data_reference,
            ),
        ),
    )


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


def _eval_options(parser: argparse.ArgumentParser) -> None:
    _subcommands(
        parser,
        (
            (
                "shapes",
                "score outputs on the ShapesWorld benchmark (JSON report + contact sheet)",
                _eval_shapes_options,
                _run_eval_shapes,
            ),
        ),
    )


def _train_tokenizer_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, required=True, help="YAML run config")
    parser.add_argument("--out", type=output_dir, default=None, help="override the config's out")
    parser.add_argument(
        "--steps", type=int_in_range(1, 10**8), default=None, help="override optim.steps"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _train_config(args: argparse.Namespace, cls: type):
    """The run config of ``--config`` with ``--out`` / ``--steps`` applied; None (the error
    printed) when the file is missing or invalid."""
    try:
        config = cls.from_yaml(args.config)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}")
        return None
    if args.out is not None:
        config.out = str(args.out)
    if args.steps is not None:
        config.optim.steps = args.steps
    return config


def _train_and_report(out: str, train: Callable[[], dict]) -> int:
    """Run ``train()`` and print its report as JSON (exit 0); what can stop a run becomes one
    line and the exit status: a signal's checkpoint and the shell's ``128 + signal`` (130 for
    SIGINT, 143 for SIGTERM), ``error: ...`` and 2 for a bad config, data, checkpoint or a
    non-finite loss. A run that had already reached its steps says so on stderr."""
    import json
    import sys

    from kineflow.train.stop import TrainingInterrupted

    try:
        report = train()
    except TrainingInterrupted as stop:
        print(stop)
        return stop.exit_code
    except KeyboardInterrupt:  # a second Ctrl-C, or one outside the training loop
        print(f"interrupted; a run started again resumes from the last checkpoint in {out}")
        return 130
    except (ValueError, FileNotFoundError, FloatingPointError) as err:
        print(f"error: {err}")
        return 2
    step = report.get("already_complete_at")
    if step is not None:
        print(f"already complete at step {step}: nothing to train (raise --steps to train "
              "further)", file=sys.stderr)  # fmt: skip
    print(json.dumps(report, indent=1))
    return 0


def _run_train_tokenizer(args: argparse.Namespace) -> int:
    from kineflow.train.tokenizer import TokenizerTrainConfig, train_tokenizer

    config = _train_config(args, TokenizerTrainConfig)
    if config is None:
        return 2
    return _train_and_report(
        config.out, lambda: train_tokenizer(config, progress=not args.no_progress)
    )


def _run_train_model(args: argparse.Namespace, config_cls, train) -> int:
    """``kineflow train fudoki`` / ``unifluid``: read the config, train, print the summary."""
    config = _train_config(args, config_cls)
    if config is None:
        return 2
    return _train_and_report(config.out, lambda: train(config, progress=not args.no_progress))


def _run_train_fudoki(args: argparse.Namespace) -> int:
    from kineflow.train.fudoki import FudokiTrainConfig, train_fudoki

    return _run_train_model(args, FudokiTrainConfig, train_fudoki)


def _run_train_unifluid(args: argparse.Namespace) -> int:
    from kineflow.train.unifluid import UnifluidTrainConfig, train_unifluid

    return _run_train_model(args, UnifluidTrainConfig, train_unifluid)


def _train_siglip_options(parser: argparse.ArgumentParser) -> None:
    _train_tokenizer_options(parser)
    parser.add_argument(
        "--tokenizer",
        type=Path,
        default=None,
        help="text tokenizer folder for the captions (default: train one on ShapesWorld)",
    )


def _run_train_siglip(args: argparse.Namespace) -> int:
    from kineflow.tokenizers.text import TextTokenizer
    from kineflow.train.siglip import SiglipTrainConfig, shapes_text_tokenizer, train_siglip

    config = _train_config(args, SiglipTrainConfig)
    if config is None:
        return 2

    def train() -> dict:
        tokenizer = (
            TextTokenizer.load(args.tokenizer) if args.tokenizer else shapes_text_tokenizer()
        )
        return train_siglip(config, tokenizer, progress=not args.no_progress)

    return _train_and_report(config.out, train)


def _train_options(parser: argparse.ArgumentParser) -> None:
    _subcommands(
        parser,
        (
            (
                "tokenizer",
                "train a VQ or KL-VAE image tokenizer from a YAML config (resumes from out/)",
                _train_tokenizer_options,
                _run_train_tokenizer,
            ),
            (
                "siglip",
                "pre-train a tiny SigLIP image encoder (sigmoid contrastive loss on ShapesWorld "
                "picture-caption pairs) for FUDOKI's understanding path",
                _train_siglip_options,
                _run_train_siglip,
            ),
            (
                "fudoki",
                "train FUDOKI (metric path), the masked baseline or the AR baseline on "
                "ShapesWorld from a YAML config (resumes from out/; torchrun for DDP/FSDP)",
                _train_tokenizer_options,
                _run_train_fudoki,
            ),
            (
                "unifluid",
                "train UniFluid (continuous image tokens, diffusion head) on ShapesWorld "
                "text-to-image, editing and understanding from a YAML config (resumes)",
                _train_tokenizer_options,
                _run_train_unifluid,
            ),
        ),
    )


# -- sampling with a trained model: kineflow/cli/sampling.py -----------------------------------


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


@dataclass(frozen=True)
class Command:
    """A subcommand: ``options`` adds its arguments, ``handler`` runs it."""

    name: str
    help: str
    description: str
    options: Callable[[argparse.ArgumentParser], None]
    handler: Callable[[argparse.Namespace], int]


#: The subcommands, in the order ``--help`` lists them.
COMMANDS: tuple[Command, ...] = (
    Command(**SHOWCASE),
    Command(
        name="demo",
        help="sample a tiny image world with the metric, uniform and masked paths",
        description=(
            "Sample 16x16 palette images with FUDOKI's metric path, the uniform path and the "
            "masked path, driven by the exact posterior of a small procedural dataset. Writes "
            "refinement.gif, refinement_strip.png and summary.json, and prints a summary."
        ),
        options=_demo_options,
        handler=_run_demo,
    ),
    Command(**GENERATE),
    Command(**ANSWER),
    Command(**EDIT),
    Command(
        name="data",
        help="ShapesWorld datasets, manifest validation, text tokenizers",
        description="Data tools: materialise ShapesWorld, validate a JSONL manifest, train a "
        "text tokenizer, write ground-truth benchmark outputs.",
        options=_data_options,
        handler=lambda args: 2,
    ),
    Command(
        name="train",
        help="train models from YAML configs",
        description="Training, e.g. 'kineflow train tokenizer --config configs/vq_shapes.yaml'.",
        options=_train_options,
        handler=lambda args: 2,
    ),
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
    Command(
        name="eval",
        help="score generated pictures or answers on a benchmark",
        description="Evaluation: 'kineflow eval shapes --task t2i --samples DIR' scores a "
        "folder of generated pictures against the GenEval-style ShapesWorld prompts.",
        options=_eval_options,
        handler=lambda args: 2,
    ),
)


def build_parser() -> argparse.ArgumentParser:
    """The ``kineflow`` argument parser with every command of :data:`COMMANDS`."""
    parser = argparse.ArgumentParser(
        prog="kineflow",
        description="kineflow: unified multimodal models, FUDOKI (discrete flow matching) and "
        "UniFluid (continuous-token autoregression): text-to-image, image understanding, "
        "editing (UniFluid), training and evaluation. generate, answer and showcase take a "
        "checkpoint of either family.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="command", required=True)
    for command in COMMANDS:
        sub = subparsers.add_parser(
            command.name,
            help=command.help,
            description=command.description,
            formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        )
        command.options(sub)
        sub.set_defaults(handler=command.handler)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` (default: ``sys.argv[1:]``), run the command, return its exit status.

    Bad arguments exit through argparse: status 2 and a message naming the argument.
    """
    args = build_parser().parse_args(argv)
    return args.handler(args)
