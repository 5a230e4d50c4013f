"""``kineflow generate --best-of N`` on the shipped checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from kineflow.cli import main

CHECKPOINTS = Path(__file__).resolve().parents[2] / "checkpoints"
FUDOKI, UNIFLUID = str(CHECKPOINTS / "fudoki-shapes"), str(CHECKPOINTS / "unifluid-shapes")
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("model", [FUDOKI, UNIFLUID])
def test_generate_best_of_writes_the_kept_pictures(model, tmp_path, capsys) -> None:
    out = tmp_path / "out"
    steps = ["--steps", "2"] if model == FUDOKI else []
    argv = ["generate", "--model", model, "a red circle", "two blue squares", "--best-of", "3",
            "--out", str(out), "--no-gif", "--no-progress", "--scale", "1", *steps]  # fmt: skip
    assert main(argv) == 0
    for i in range(2):
        assert Image.open(out / f"sample_{i}.png").size == (32, 32)
    assert not (out / "sample_2.png").exists()  # one kept picture per prompt
    records = json.loads((out / "prompts.json").read_text())
    assert [r["prompt"] for r in records] == ["a red circle", "two blue squares"]
    assert all(0 <= r["candidate"] < 3 and isinstance(r["score"], float) for r in records)
    assert str(out / "sample_1.png") in capsys.readouterr().out


def test_generate_best_of_one_writes_no_scores(tmp_path) -> None:
    out = tmp_path / "out"
    argv = ["generate", "--model", FUDOKI, "a red circle", "--best-of", "1", "--steps", "2",
            "--out", str(out), "--no-gif", "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    assert "score" not in json.loads((out / "prompts.json").read_text())[0]


@pytest.mark.parametrize("value", ["0", "x", "65"])
def test_a_bad_best_of_is_an_argument_error(value, tmp_path, capsys) -> None:
    argv = ["generate", "--model", FUDOKI, "a red circle", "--best-of", value,
            "--out", str(tmp_path)]  # fmt: skip
    with pytest.raises(SystemExit) as caught:
        main(argv)
    assert caught.value.code == 2
    assert "--best-of" in capsys.readouterr().err
