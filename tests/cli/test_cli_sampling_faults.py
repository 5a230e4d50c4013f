"""``kineflow generate / answer / edit`` where users met faults (issue 14, points 2, 3, 4, 7,
12, 16, 20): exit status 2, one ``error:`` line naming the file, option or prompt, no traceback.
In-process through :func:`kineflow.cli.main` with the shipped tiny checkpoints, plus one real
subprocess for argv bytes that are not UTF-8."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from kineflow.cli import main

ROOT = Path(__file__).resolve().parents[2]
FUDOKI = str(ROOT / "checkpoints" / "fudoki-shapes")
UNIFLUID = str(ROOT / "checkpoints" / "unifluid-shapes")
LONG = "red circle " * 300  # ~600 tokens: past the shipped models' 256 positions

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def picture(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("pic") / "white.png"
    Image.new("RGB", (32, 32), "white").save(path)
    return str(path)


def fails(capsys, argv: list[str], message: str) -> None:
    """``main(argv)`` returns 2 after printing exactly one ``error:`` line containing
    ``message``."""
    assert main(argv) == 2
    out, err = capsys.readouterr()
    lines = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and message in lines[0], out
    assert "Traceback" not in out + err


def refused_by_argparse(capsys, argv: list[str], message: str) -> None:
    """argparse's exit: status 2, the usage, then ``kineflow <cmd>: error: argument ...``."""
    with pytest.raises(SystemExit) as caught:
        main(argv)
    assert caught.value.code == 2
    err = capsys.readouterr().err
    assert message in err and err.count("error:") == 1 and "Traceback" not in err


# -- point 2 ---------------------------------------------------------------------------------------
def test_readme_text_reply_works_with_defaults(capsys) -> None:
    argv = ["answer", "--model", FUDOKI, "Write a haiku", "--steps", "2", "--no-progress"]
    assert main(argv) == 0
    assert "Q: Write a haiku\nA: " in capsys.readouterr().out


def test_text_reply_beyond_the_budget_says_which_option_to_lower(capsys) -> None:
    argv = ["answer", "--model", FUDOKI, "Write a haiku", "--answer-tokens", "64"]
    fails(capsys, argv, "--answer-tokens")


# -- point 3 ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["generate", "--model", UNIFLUID, LONG], "prompt 0 has"),
        (["generate", "--model", FUDOKI, LONG], "prompt 0 needs"),
        (["edit", "--model", UNIFLUID, "--image", "{pic}", "x" * 50_000], "instruction 0 has"),
        (["answer", "--model", UNIFLUID, "--image", "{pic}", "how many?",
          "--answer-tokens", "1000"], "lower answer_tokens= (--answer-tokens)"),
    ],
)  # fmt: skip
def test_over_long_prompts_are_refused_before_sampling(
    capsys, tmp_path, picture, argv, message
) -> None:
    argv = [picture if a == "{pic}" else a for a in argv]
    fails(capsys, [*argv, "--out", str(tmp_path / "out"), "--no-progress"], message)
    assert not (tmp_path / "out").exists()  # nothing was sampled or written


def test_every_prompt_is_checked_before_the_first_batch(capsys, tmp_path) -> None:
    argv = ["generate", "--model", UNIFLUID, "a red circle", "a blue square", LONG,
            "--batch-size", "1", "--out", str(tmp_path), "--no-progress"]  # fmt: skip
    fails(capsys, argv, "prompt 2 has")  # its index in the whole list, not in its batch
    assert not list(tmp_path.iterdir())


# -- point 4 and options one family does not use ------------------------------------------------
@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["answer", "--model", UNIFLUID, "--image", "{pic}", "how many?", "--trajectory"],
         "error: --trajectory is not supported by UniFluid models (they decode left to right)"),
        (["generate", "--model", UNIFLUID, "a red circle", "--steps", "3"],
         "--steps is not supported by UniFluid models"),
        (["generate", "--model", UNIFLUID, "a red circle", "--top-k", "3"],
         "--top-k is not supported by UniFluid models"),
        (["answer", "--model", FUDOKI, "--image", "{pic}", "how many?", "--beams", "2"],
         "--beams is not supported by FUDOKI models"),
        (["showcase", "--model", UNIFLUID, "--steps", "3"],
         "steps (--steps) applies to FUDOKI models only"),
    ],
)  # fmt: skip
def test_options_a_family_lacks_are_refused(capsys, tmp_path, picture, argv, message) -> None:
    argv = [picture if a == "{pic}" else a for a in argv]
    fails(capsys, [*argv, "--out", str(tmp_path / "out")], message)


# -- point 16 --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["generate", "--model", FUDOKI, "a", "--temperature", "nan"],
         "argument --temperature: must be a finite number, got 'nan'"),
        (["generate", "--model", UNIFLUID, "a", "--cfg", "nan"],
         "argument --cfg: must be a finite number"),
        (["generate", "--model", UNIFLUID, "a", "--temperature", "inf"],
         "argument --temperature: must be a finite number"),
        (["generate", "--model", FUDOKI, "a", "--cfg", "-1"], "argument --cfg: must be >= 0"),
        (["edit", "--model", UNIFLUID, "--image", "p.png", "a", "--temperature=-inf"],
         "argument --temperature: must be a finite number"),
    ],
)  # fmt: skip
def test_non_finite_numbers_are_refused_by_the_parser(capsys, argv, message) -> None:
    refused_by_argparse(capsys, argv, message)


# -- point 20 --------------------------------------------------------------------------------------
@pytest.mark.parametrize("command", ["generate", "showcase"])
def test_bad_device_is_refused_by_the_parser(capsys, command) -> None:
    argv = [command, "--model", FUDOKI, "--device", "potato"] + (["a"] * (command == "generate"))
    refused_by_argparse(capsys, argv, "argument --device: expected cpu, cuda, cuda:N")


def test_non_utf8_prompt_in_process(capsys, tmp_path) -> None:
    # What Python makes of the argv bytes b"\xff\xfe": lone surrogates.
    argv = ["generate", "--model", FUDOKI, os.fsdecode(b"a red \xff circle"),
            "--out", str(tmp_path), "--no-progress"]  # fmt: skip
    fails(capsys, argv, "prompt 0 is not valid UTF-8 (the byte 0xff)")


def test_non_utf8_argv_bytes_exit_2_without_a_traceback(tmp_path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "LC_ALL": "C.UTF-8"}
    argv = [sys.executable, "-m", "kineflow", "answer", "--model", FUDOKI.encode(),
            b"how \xe9 many?", "--no-progress"]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, env=env, cwd=tmp_path, timeout=120)
    assert done.returncode == 2, done.stderr.decode(errors="replace")
    assert done.stdout.decode().strip() == (
        "error: prompt 0 is not valid UTF-8 (the byte 0xe9) at character 4: give the text in UTF-8"
    )
    assert b"Traceback" not in done.stderr


# -- points 7 and 12 -----------------------------------------------------------------------------
def test_unifluid_generate_shows_progress_and_writes_4x_pictures(capsys, tmp_path) -> None:
    argv = ["generate", "--model", UNIFLUID, "a red circle", "--out", str(tmp_path), "--no-gif"]
    assert main(argv) == 0
    assert "UniFluid tokens" in capsys.readouterr().err  # on unless --no-progress
    assert Image.open(tmp_path / "sample_0.png").size == (128, 128)  # --scale 4 by default
    assert main([*argv, "--no-progress"]) == 0
    assert "UniFluid tokens" not in capsys.readouterr().err


def test_fudoki_generate_writes_4x_pictures_by_default(tmp_path) -> None:
    argv = ["generate", "--model", FUDOKI, "a red circle", "--steps", "1", "--no-gif",
            "--no-progress", "--out", str(tmp_path)]  # fmt: skip
    assert main(argv) == 0
    assert Image.open(tmp_path / "sample_0.png").size == (128, 128)  # as edit's pictures
