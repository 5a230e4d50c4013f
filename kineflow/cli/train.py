"""``kineflow train``: the image tokenizer, the SigLIP encoder, FUDOKI and UniFluid from YAML
run configs (:mod:`kineflow.train`, imported by the handlers). Every run resumes from its
``out/`` folder; what stops a run becomes one line and the exit status
(:func:`_train_and_report`)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

from kineflow.cli.args import int_in_range, output_dir
from kineflow.cli.command import Command, group

__all__ = ["COMMANDS"]


def _train_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, required=True, help="YAML run config")
    parser.add_argument("--out", type=output_dir, default=None, help="override the config's out")
    parser.add_argument(
        "--steps", type=int_in_range(1, 10**8), default=None, help="override optim.steps"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _tokenizer_options(parser: argparse.ArgumentParser) -> None:
    _train_options(parser)
    parser.add_argument(
        "--eval-images", type=int_in_range(1, 10**6), default=None,
        help="pictures per split that eval.json's reconstruction scores read (override "
        "eval_images; fewer for a quick trial of a config)",
    )  # fmt: skip


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
    if args.eval_images is not None:
        config.eval_images = args.eval_images
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
    _train_options(parser)
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


COMMANDS: list[Command] = [
    group(
        "train",
        help="train models from YAML configs",
        description="Training, e.g. 'kineflow train tokenizer --config configs/vq_shapes.yaml'.",
        subcommands=(
            Command(
                "tokenizer",
                "train a VQ or KL-VAE image tokenizer from a YAML config (resumes from out/)",
                _tokenizer_options,
                _run_train_tokenizer,
            ),
            Command(
                "siglip",
                "pre-train a tiny SigLIP image encoder (sigmoid contrastive loss on ShapesWorld "
                "picture-caption pairs) for FUDOKI's understanding path",
                _train_siglip_options,
                _run_train_siglip,
            ),
            Command(
                "fudoki",
                "train FUDOKI (metric path), the masked baseline or the AR baseline on "
                "ShapesWorld from a YAML config (resumes from out/; torchrun for DDP/FSDP)",
                _train_options,
                _run_train_fudoki,
            ),
            Command(
                "unifluid",
                "train UniFluid (continuous image tokens, diffusion head) on ShapesWorld "
                "text-to-image, editing and understanding from a YAML config (resumes)",
                _train_options,
                _run_train_unifluid,
            ),
        ),
    ),
]
