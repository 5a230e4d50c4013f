"""``kineflow generate`` and ``kineflow answer`` on a tiny checkpoint folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from janus_fixture import write_janus_checkpoint
from PIL import Image

import kineflow
from kineflow.cli import main


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cli")
    folder, _, _ = write_janus_checkpoint(root / "janus")
    pipe = kineflow.load(folder)
    pipe.config.text_budget = 48
    pipe.config.system_prompt = ""
    pipe.config.steps = 3
    return pipe.save_pretrained(root / "tiny")


pytestmark = pytest.mark.usefixtures("one_thread")


def test_generate_writes_pictures_and_gifs(checkpoint: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "gen"
    base = ["generate", "--model", str(checkpoint), "a red circle", "two blue squares",
            "a green triangle", "--batch-size", "2", "--scale", "2", "--no-progress"]  # fmt: skip
    assert main([*base, "--out", str(out)]) == 0
    for i in range(3):
        assert Image.open(out / f"sample_{i}.png").size == (16, 16)
        gif = Image.open(out / f"sample_{i}_refine.gif")
        assert gif.n_frames == 4  # steps + 1: the checkpoint's default of 3 steps
    prompts = json.loads((out / "prompts.json").read_text())
    assert [p["prompt"] for p in prompts] == [
        "a red circle",
        "two blue squares",
        "a green triangle",
    ]
    assert str(out / "sample_2.png") in capsys.readouterr().out
    # Same seed, same pictures.
    again = tmp_path / "again"
    assert main([*base, "--out", str(again), "--no-gif"]) == 0
    assert (
        Image.open(again / "sample_1.png").tobytes() == Image.open(out / "sample_1.png").tobytes()
    )
    assert not (again / "sample_0_refine.gif").exists()


def test_answer_with_and_without_image(checkpoint: Path, tmp_path: Path, capsys) -> None:
    picture = tmp_path / "p.png"
    Image.new("RGB", (30, 20), (200, 10, 10)).save(picture)
    argv = ["answer", "--model", str(checkpoint), "--image", str(picture), "how many?",
            "what colour?", "--answer-tokens", "4", "--trajectory", "--out", str(tmp_path),
            "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "Q: how many?" in printed and "step   3:" in printed
    records = json.loads((tmp_path / "answers.json").read_text())
    assert len(records) == 2 and len(records[0]["trajectory"]) == 4
    assert main(["answer", "--model", str(checkpoint), "hello", "--answer-tokens", "3",
                 "--no-progress"]) == 0  # fmt: skip


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["generate", "--model", "{missing}", "x"], "no checkpoint folder"),
        (["generate", "--model", "{ckpt}", ""], "prompt 0 is empty"),
        (["generate", "--model", "{ckpt}", "x", "--device", "cuda"], "no CUDA device"),
        (["answer", "--model", "{ckpt}", "--image", "{bad}", "what?"], "cannot read image"),
        (
            ["answer", "--model", "{ckpt}", "--image", "{bad}", "--image", "{bad}", "a", "b", "c"],
            "2 --image for 3 questions",
        ),
    ],
)
def test_errors_exit_2_with_a_message(checkpoint, tmp_path, capsys, argv, message) -> None:
    if message == "no CUDA device" and torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    bad = tmp_path / "bad.png"
    bad.write_text("not a picture")
    fill = {"{ckpt}": str(checkpoint), "{missing}": str(tmp_path / "nope"), "{bad}": str(bad)}
    assert main([fill.get(a, a) for a in argv] + ["--no-progress"]) == 2
    assert message in capsys.readouterr().out
