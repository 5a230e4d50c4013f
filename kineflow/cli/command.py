"""The CLI's one registration scheme: a :class:`Command` per subcommand, added by
:func:`add_commands`.

Each command-group module of :mod:`kineflow.cli` (``sampling``, ``demo``, ``data``, ``train``,
``evaluate``) exposes ``COMMANDS: list[Command]``; :mod:`kineflow.cli` adds them to the
``kineflow`` parser. A command with sub-subcommands (``kineflow data shapes``) is a
:func:`group` of Commands, added by the same :func:`add_commands` one level down. Nothing here
imports torch, so ``kineflow --help`` stays fast.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from dataclasses import dataclass

__all__ = ["Command", "add_commands", "group"]


@dataclass(frozen=True)
class Command:
    """A subcommand: ``options`` adds its arguments, ``handler`` runs it.

    ``help`` is its line in the parent's ``--help``, ``description`` the text above its own
    options (None: the ``help`` line again).
    """

    name: str
    help: str
    options: Callable[[argparse.ArgumentParser], None]
    handler: Callable[[argparse.Namespace], int]
    description: str | None = None


def add_commands(parser: argparse.ArgumentParser, commands: Sequence[Command], dest: str) -> None:
    """Add ``commands`` as required subcommands of ``parser``, in order; the chosen one's name
    lands in ``args.<dest>`` and its handler in ``args.handler``."""
    sub = parser.add_subparsers(dest=dest, metavar=dest, required=True)
    for command in commands:
        p = sub.add_parser(
            command.name,
            help=command.help,
            description=command.help if command.description is None else command.description,
            formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        )
        command.options(p)
        p.set_defaults(handler=command.handler)


def _needs_subcommand(args: argparse.Namespace) -> int:
    """A group's own handler: argparse requires a subcommand, so this only guards (exit 2)."""
    return 2


def group(name: str, help: str, description: str, subcommands: Sequence[Command]) -> Command:
    """A command made of ``subcommands`` (``kineflow NAME SUBCOMMAND [options]``)."""
    return Command(
        name=name,
        help=help,
        description=description,
        options=lambda parser: add_commands(parser, subcommands, "subcommand"),
        handler=_needs_subcommand,
    )
