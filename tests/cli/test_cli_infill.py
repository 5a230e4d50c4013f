"""``kineflow infill`` on the shipped checkpoints: the files it writes and its error lines."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from kineflow.cli import main

CHECKPOINTS = Path(__file__).resolve().parents[2] / "checkpoints"
FUDOKI, UNIFLUID = str(CHECKPOINTS / "fudoki-shapes"), str(CHECKPOINTS / "unifluid-shapes")
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def files(tmp_path: Path) -> dict[str, str]:
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(tmp_path / "p.png")
    mask = np.zeros((32, 32), np.uint8)
    mask[11:21, 11:21] = 255
    Image.fromarray(mask).save(tmp_path / "m.png")
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(tmp_path / "empty.png")
    Image.fromarray(np.full((16, 16), 255, np.uint8)).save(tmp_path / "small.png")
    return {k: str(tmp_path / f"{k}.png") for k in ("p", "m", "empty", "small")}


@pytest.mark.parametrize(("model", "gif_frames"), [(FUDOKI, 3), (UNIFLUID, None)])
def test_infill_writes_the_picture_and_its_gif(files, tmp_path, capsys, model, gif_frames):
    out = tmp_path / "out"
    steps = ["--steps", "2"] if model == FUDOKI else []
    args = [
        "infill",
        "--model",
        model,
        "--image",
        files["p"],
        "--mask",
        files["m"],
        "a green square in the middle",
        "--out",
        str(out),
        "--scale",
        "2",
        "--no-progress",
    ]
    assert main([*args, *steps]) == 0  # fmt: skip
    assert Image.open(out / "infill_0.png").size == (64, 64)
    gif = Image.open(out / "infill_0_refine.gif")
    if gif_frames is not None:
        assert gif.n_frames == gif_frames  # steps + 1
    assert str(out / "infill_0.png") in capsys.readouterr().out


def test_a_box_is_a_mask(files, tmp_path) -> None:
    from kineflow.cli.infill import _box

    box = _box("11,0,21,11", 32, 32)
    assert box.sum() == 110 and box[0, 11] and box[10, 20] and not box[11, 11]
    assert _box(files["m"], 32, 32) is None
    out = tmp_path / "box"
    args = ["infill", "--model", FUDOKI, "--image", files["p"], "--mask", "11,0,21,11", "a",
            "--out", str(out), "--steps", "1", "--no-gif", "--no-progress"]  # fmt: skip
    assert main(args) == 0 and (out / "infill_0.png").exists()


@pytest.mark.parametrize(
    ("mask", "extra", "message"),
    [
        ("empty", [], "is empty (no white pixel): nothing to regenerate"),
        ("small", [], "the mask is 16x16 but the picture is 32x32"),
        ("missing", [], "--mask {missing}: no such file"),
        ("box0", [], "is empty (no white pixel)"),
        ("m", ["--steps", "2", "--model", UNIFLUID], "--steps is not supported by UniFluid"),
    ],
)
def test_infill_errors_are_one_line(files, tmp_path, capsys, mask, extra, message) -> None:
    files["missing"], files["box0"] = str(tmp_path / "nope.png"), "4,4,4,9"
    args = ["infill", "--model", FUDOKI, "--image", files["p"], "--mask", files[mask], "a",
            "--out", str(tmp_path / "o"), *extra]  # fmt: skip
    assert main(args) == 2
    out = capsys.readouterr().out
    assert out.startswith("error: ") and message.format(**files) in out
    assert out.count("\n") == 1
    assert not (tmp_path / "o").exists()
