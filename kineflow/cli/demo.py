"""``kineflow demo``: the flow-core demo, FUDOKI's metric path against the uniform and masked
paths on a tiny image world (:mod:`kineflow.apps.demo` does the work, imported lazily)."""

from __future__ import annotations

import argparse
from pathlib import Path

from kineflow.cli.args import int_in_range, output_dir
from kineflow.cli.command import Command

__all__ = ["COMMANDS", "MAX_STEPS"]

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


COMMANDS: list[Command] = [
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
]
