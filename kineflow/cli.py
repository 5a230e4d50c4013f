"""Command-line interface: ``kineflow <command> [options]``, also ``python -m kineflow``.

Every command is a :class:`Command`: a name, help texts, a function adding its options and a
handler of the parsed arguments returning the exit status. A new command (``train``,
``generate``, ``eval``) is one more entry of :data:`COMMANDS`. Handlers import their heavy
modules themselves, so ``kineflow --help`` and argument errors do not wait for torch.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from kineflow import __version__


# -- argument types: each names the rule it enforces, argparse adds the argument's name --------
def int_in_range(lo: int, hi: int) -> Callable[[str], int]:
    """An argparse ``type`` accepting integers in ``[lo, hi]``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if not lo <= value <= hi:
            raise argparse.ArgumentTypeError(f"must be between {lo} and {hi}, got {value}")
        return value

    return parse


def output_dir(text: str) -> Path:
    """An argparse ``type`` for a folder to write into: created later if missing, but an
    existing non-folder is rejected now rather than after the work is done."""
    if not text:
        raise argparse.ArgumentTypeError("must be a folder path, got an empty string")
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} exists and is not a folder")
    return path


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
    from kineflow.demo import format_report, run_demo

    summary = run_demo(
        args.out, steps=args.steps, seed=args.seed, samples=args.samples, images=args.images
    )
    print(format_report(summary))
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
)


def build_parser() -> argparse.ArgumentParser:
    """The ``kineflow`` argument parser with every command of :data:`COMMANDS`."""
    parser = argparse.ArgumentParser(
        prog="kineflow",
        description="kineflow: discrete flow matching (FUDOKI) and multimodal generation.",
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
