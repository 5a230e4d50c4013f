"""The help texts describe both model families the sampling commands serve (issue 14, point
6), and ``kineflow --help`` stays light (no torch import)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from kineflow.cli import main

ROOT = Path(__file__).resolve().parents[2]


def help_text(capsys, argv: list[str]) -> str:
    """``kineflow ARGV --help`` with its line wrapping undone."""
    with pytest.raises(SystemExit) as caught:
        main([*argv, "--help"])
    assert caught.value.code == 0
    return " ".join(capsys.readouterr().out.split())


@pytest.mark.parametrize("argv", [[], ["generate"], ["answer"], ["showcase"]])
def test_help_names_both_families(capsys, argv) -> None:
    text = help_text(capsys, argv)
    assert "FUDOKI" in text and "UniFluid" in text


def test_help_says_which_options_apply_to_which_family(capsys) -> None:
    generate = help_text(capsys, ["generate"])
    assert "--steps STEPS FUDOKI only" in generate
    assert "--top-k TOP_K FUDOKI only" in generate
    assert "UniFluid: the weight reached at the last token" in generate  # --cfg
    answer = help_text(capsys, ["answer"])
    assert "--trajectory FUDOKI only" in answer and "--beams BEAMS UniFluid only" in answer
    showcase = help_text(capsys, ["showcase"])
    assert "--edits EDITS UniFluid only" in showcase and "--steps STEPS FUDOKI only" in showcase
    scale = "enlarge the written pictures (nearest neighbour) (default: 4)"
    assert scale in generate and scale in help_text(capsys, ["edit"])


def test_cli_import_does_not_load_torch() -> None:
    code = "import sys, kineflow.cli; print('torch' in sys.modules)"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=env, timeout=60, check=True)  # fmt: skip
    assert done.stdout.strip() == "False"


def test_help_lists_the_commands_in_their_order(capsys) -> None:
    """Each command group is its own module; ``kineflow --help`` still lists them in this order."""
    with pytest.raises(SystemExit):
        main(["--help"])
    lines = capsys.readouterr().out.splitlines()
    listed = [line.split()[0] for line in lines if line.startswith("    ") and line[4] != " "]
    assert listed == ["showcase", "demo", "generate", "answer", "edit", "infill",
                      "data", "train", "merge", "reproduce", "plot", "eval", "serve"]  # fmt: skip


def test_cli_group_modules_do_not_load_torch() -> None:
    """The handlers import torch, not the modules holding them (``--help`` stays fast)."""
    modules = "command, args, sampling, infill, demo, data, train, merge, evaluate, serve"
    code = f"import sys; from kineflow.cli import {modules}; print('torch' in sys.modules)"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=env, timeout=60, check=True)  # fmt: skip
    assert done.stdout.strip() == "False"
