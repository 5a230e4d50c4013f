"""``kineflow merge``: fold a LoRA adapter (``out/adapter`` of a run with a ``lora`` section)
into its base model and write an ordinary pipeline folder (:mod:`kineflow.train.lora`).

User mistakes (no adapter, no base, a base whose weights are not the ones the adapter was
trained on, an adapter that does not fit) print one ``error: ...`` line and exit 2.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from kineflow.cli.args import output_dir
from kineflow.cli.command import Command
from kineflow.cli.sampling import CLI_ERRORS

__all__ = ["COMMANDS"]


def _merge_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--adapter",
        required=True,
        help="the adapter folder (adapter_config.json + adapter_model.safetensors)",
    )
    parser.add_argument(
        "--base", default=None, help="the base model folder; default: the one the adapter records"
    )
    parser.add_argument("--out", type=output_dir, required=True, help="the merged model folder")


def _run_merge(args: argparse.Namespace) -> int:
    from kineflow.train.lora import merge_adapter

    try:
        out = merge_adapter(args.adapter, args.out, args.base)
    except CLI_ERRORS as err:
        print(f"error: {err}")
        return 2
    print(f"merged {Path(args.adapter)} into {out}")
    return 0


COMMANDS = [
    Command(
        "merge",
        "fold a LoRA adapter into its base model (an ordinary model folder)",
        _merge_options,
        _run_merge,
    )
]
