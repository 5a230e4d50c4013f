"""The README's code runs as written, in a fresh clone's working directory.

* Every ```python block is executed (each in its own namespace), unless the line before it
  is ``<!-- fragment -->``, the README's mark for an illustration that is not meant to run.
* Every ``kineflow …`` line of the ```bash blocks parses with the real argument parser, and
  is run, in README order, from a directory holding only ``configs/`` and ``checkpoints/``
  (later commands read what earlier ones wrote, as a reader following along would).
  ``kineflow train`` lines get ``--steps 2`` appended (the real runs take minutes to hours);
  ``make`` and ``torchrun`` lines are only parsed.
"""

from __future__ import annotations

import contextlib
import io
import re
import shlex
import shutil
from pathlib import Path

import pytest

from kineflow.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
FRAGMENT = "<!-- fragment -->"


def code_blocks(language: str) -> list[tuple[int, str]]:
    """``(line number, code)`` of each fenced block in ``language`` not marked a fragment."""
    blocks = []
    for match in re.finditer(rf"^```{language}\n(.*?)^```$", README, re.S | re.M):
        before = README[: match.start()].rstrip("\n").rsplit("\n", 1)[-1]
        if before.strip() != FRAGMENT:
            blocks.append((README[: match.start()].count("\n") + 1, match.group(1)))
    return blocks


def shell_commands() -> list[list[str]]:
    """The commands of the bash blocks: continuation lines joined, comments dropped."""
    commands = []
    for _, code in code_blocks("bash"):
        for line in code.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words:
                commands.append(words)
    return commands


def kineflow_args(words: list[str]) -> list[str] | None:
    """The arguments of a ``kineflow`` command (directly or under torchrun), else None."""
    if words[0] == "kineflow":
        return words[1:]
    if words[0] == "torchrun" and "kineflow" in words:
        return words[words.index("kineflow") + 1 :]
    return None


@pytest.fixture
def fresh_clone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for name in ("configs", "checkpoints"):
        shutil.copytree(ROOT / name, tmp_path / name)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_the_readme_has_runnable_code() -> None:
    assert len(code_blocks("python")) >= 3
    assert sum(kineflow_args(w) is not None for w in shell_commands()) >= 15


@pytest.mark.parametrize("line", [line for line, _ in code_blocks("python")])
def test_python_snippet_runs(line: int, fresh_clone: Path) -> None:
    code = dict(code_blocks("python"))[line]
    exec(compile(code, f"README.md:{line}", "exec"), {"__name__": "__readme__"})


def test_every_command_parses() -> None:
    parser = build_parser()
    for words in shell_commands():
        args = kineflow_args(words)
        if args is not None:
            parser.parse_args(args)  # exits (SystemExit) on an unknown command or option
        else:
            assert words[0] == "make", words
            assert words[1] in (ROOT / "Makefile").read_text(), words


@pytest.mark.slow
def test_every_command_runs_in_order(fresh_clone: Path) -> None:
    done = set()
    for words in shell_commands():
        if words[0] != "kineflow" or tuple(words) in done:
            continue  # make targets run in CI themselves; torchrun is tested in test_distributed
        done.add(tuple(words))
        args = smaller(words[1:]) + (["--steps", "2", "--no-progress"]
                                     if args_is_training(words) else [])  # fmt: skip
        args += ["--eval-images", "32"] if words[1:3] == ["train", "tokenizer"] else []
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            status = main(args)
        assert status == 0, f"{shlex.join(words)}\n{printed.getvalue()[-2000:]}"


def args_is_training(words: list[str]) -> bool:
    return words[1] == "train"


# Per command, options that only set how much work it does, cut down as training is cut to 2
# steps: the README's `data encode --samples 96000` alone took minutes of the suite.
SMALLER = {("data", "encode"): {"--samples": "512"}}


def smaller(args: list[str]) -> list[str]:
    """``args`` with the value after each of its command's :data:`SMALLER` options replaced."""
    sizes = SMALLER.get(tuple(args[:2]), {})
    return [sizes.get(args[i - 1], a) if i else a for i, a in enumerate(args)]


def test_data_shapes_n_counts_items_per_task(tmp_path: Path) -> None:
    """README (ShapesWorld): ``--n`` is items *per task*; all four tasks by default."""
    for tasks, expected in (([], 4 * 3), (["--tasks", "t2i"], 3)):
        out = tmp_path / f"shapes{expected}"
        with contextlib.redirect_stdout(io.StringIO()):
            status = main(["data", "shapes", "--out", str(out), "--n", "3", "--workers", "1",
                           *tasks])  # fmt: skip
        assert status == 0
        lines = (out / "manifest.jsonl").read_text().splitlines()
        assert len(lines) == expected
    assert "items per task" in README
