"""Command-line interface: ``kineflow <command> [options]``, also ``python -m kineflow``.

Every command is a :class:`~kineflow.cli.command.Command`: a name, help texts, a function adding
its options and a handler of the parsed arguments returning the exit status. Each command group
is one module exposing ``COMMANDS``, and :data:`COMMANDS` here puts them in the order
``kineflow --help`` lists them:

- :mod:`kineflow.cli.sampling`: ``showcase``, ``generate``, ``answer``, ``edit``;
- :mod:`kineflow.cli.infill`: ``infill``;
- :mod:`kineflow.cli.demo`: ``demo``;
- :mod:`kineflow.cli.data`: ``data shapes / validate / tokenizer / reference``;
- :mod:`kineflow.cli.train`: ``train tokenizer / siglip / fudoki / unifluid``;
- :mod:`kineflow.cli.evaluate`: ``reproduce``, ``plot``, ``eval shapes``;
- :mod:`kineflow.cli.serve`: ``serve`` (the web app).

A new command is one more ``Command`` in its group's ``COMMANDS`` and its name in
:data:`ORDER`. Handlers import their heavy modules themselves, so ``kineflow --help`` and
argument errors do not wait for torch. The argument types live in :mod:`kineflow.cli.args`.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from kineflow import __version__
from kineflow.cli import data, demo, evaluate, infill, merge, sampling, serve, train
from kineflow.cli.command import Command, add_commands

__all__ = ["COMMANDS", "ORDER", "Command", "build_parser", "main"]

#: The command names in the order ``kineflow --help`` lists them.
ORDER = (
    "showcase", "demo", "generate", "answer", "edit", "infill", "data", "train", "merge",
    "reproduce", "plot", "eval", "serve",
)  # fmt: skip


def _in_order(groups: Sequence[Sequence[Command]]) -> tuple[Command, ...]:
    """The commands of ``groups`` sorted by :data:`ORDER`; a command missing from ORDER (or a
    name in ORDER no group defines) is a programming error caught at import."""
    by_name = {command.name: command for commands in groups for command in commands}
    if sorted(by_name) != sorted(ORDER):
        raise RuntimeError(f"kineflow.cli.ORDER {ORDER} does not match the commands {by_name}")
    return tuple(by_name[name] for name in ORDER)


#: The subcommands, in the order ``--help`` lists them.
COMMANDS: tuple[Command, ...] = _in_order(
    (
        sampling.COMMANDS,
        infill.COMMANDS,
        demo.COMMANDS,
        data.COMMANDS,
        train.COMMANDS,
        merge.COMMANDS,
        evaluate.COMMANDS,
        serve.COMMANDS,
    )
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
    add_commands(parser, COMMANDS, "command")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` (default: ``sys.argv[1:]``), run the command, return its exit status.

    Bad arguments exit through argparse: status 2 and a message naming the argument.
    """
    args = build_parser().parse_args(argv)
    return args.handler(args)
