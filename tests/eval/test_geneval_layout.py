"""``kineflow generate --layout geneval``: GenEval's folder tree, verbatim metadata, the run
card, resuming, and the pictures equal to the pipeline's own with the documented seeds."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import kineflow
from kineflow.cli import main
from kineflow.eval.geneval_layout import read_geneval_prompts, write_geneval

FUDOKI, UNIFLUID = "checkpoints/fudoki-shapes", "checkpoints/unifluid-shapes"
# GenEval's own format (its prompts carry more fields than the scorer needs: all are kept).
LINES = [
    '{"tag": "single_object", "include": [{"class": "circle", "count": 1}], '
    '"prompt": "a red circle"}',
    '{"tag": "two_object", "include": [{"class": "square", "count": 1}, {"class": "circle", '
    '"count": 1}], "prompt": "a blue square and a green circle", "extra":  [1, 2.50]}',
    '{"tag": "counting", "include": [{"class": "triangle", "count": 2}], '
    '"exclude": [{"class": "triangle", "count": 3}], "prompt": "two yellow triangles"}',
]


@pytest.fixture(scope="module")
def fudoki():
    return kineflow.load(FUDOKI)


def _prompts_file(tmp_path: Path, lines: list[str] = LINES) -> Path:
    path = tmp_path / "evaluation_metadata.jsonl"
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def _pixels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def test_tree_metadata_pictures_and_run_card(tmp_path, fudoki):
    prompts = read_geneval_prompts(_prompts_file(tmp_path))
    out = tmp_path / "geneval"
    run = write_geneval(fudoki, prompts, out, n_samples=2, batch_size=2, seed=7,
                        options={"steps": 2, "cfg_scale": 1.5}, card={"model": FUDOKI})  # fmt: skip
    assert sorted(p.name for p in out.iterdir()) == ["00000", "00001", "00002", "run.json"]
    size = fudoki.model.config.gen_vision.image_size
    for i, line in enumerate(LINES):
        folder = out / f"{i:05d}"
        assert sorted(p.name for p in folder.iterdir()) == ["grid.png", "metadata.jsonl", "samples"]
        # Verbatim (the doubled space and 2.50 survive), and one JSON object as GenEval reads it.
        assert (folder / "metadata.jsonl").read_bytes() == (line + "\n").encode()
        assert json.loads((folder / "metadata.jsonl").read_text()) == json.loads(line)
        assert sorted(p.name for p in (folder / "samples").iterdir()) == ["0000.png", "0001.png"]
        for k in range(2):
            with Image.open(folder / "samples" / f"{k:04d}.png") as im:
                assert im.size == (size, size)
        assert _pixels(folder / "grid.png").shape == (size, 2 * size, 3)
    # The seed scheme: chunks of batch_size prompts, each repeated N times, seed + first index.
    chunks = [([LINES[0], LINES[1]], 7), ([LINES[2]], 9)]
    for c, (lines, seed) in enumerate(chunks):
        rows = [json.loads(line)["prompt"] for line in lines for _ in range(2)]
        ref = fudoki.text_to_image(rows, steps=2, cfg_scale=1.5, seed=seed).images
        for j, image in enumerate(ref):
            i, k = 2 * c + j // 2, j % 2
            got = _pixels(out / f"{i:05d}" / "samples" / f"{k:04d}.png")
            np.testing.assert_array_equal(got, np.asarray(image.convert("RGB")))
    card = json.loads((out / "run.json").read_text())
    assert card["model"] == FUDOKI and card["kineflow_type"] == "fudoki"
    assert card["kineflow_version"] == kineflow.__version__
    assert (card["n_samples"], card["batch_size"], card["seed"], card["prompts"]) == (2, 2, 7, 3)
    assert card["options"] == {"steps": 2, "cfg_scale": 1.5}
    assert card["pipeline_config"] == fudoki.config.to_dict()
    assert "seed + " in card["seed_scheme"] and card["date"]
    assert (run["written"], run["skipped"]) == (3, 0)


def test_cli_resumes_only_missing_folders_with_the_same_pictures(tmp_path, capsys):
    prompts, out = _prompts_file(tmp_path), tmp_path / "g"
    argv = ["generate", "--model", FUDOKI, "--layout", "geneval", "--prompts-file", str(prompts),
            "--out", str(out), "--n-samples", "2", "--steps", "2", "--batch-size", "2",
            "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    assert "3 prompt folders written, 0 already complete" in capsys.readouterr().out
    before = {p: p.read_bytes() for p in out.rglob("*.png")}
    kept = (out / "00000" / "samples" / "0000.png").stat().st_mtime_ns
    # An interrupted run: folder 1 missing, folder 2 half written (one sample of two).
    for p in (out / "00001").rglob("*"):
        if p.is_file():
            p.unlink()
    (out / "00002" / "samples" / "0001.png").unlink()
    assert main(argv) == 0
    assert "2 prompt folders written, 1 already complete" in capsys.readouterr().out
    assert (out / "00000" / "samples" / "0000.png").stat().st_mtime_ns == kept  # not rewritten
    assert {p: p.read_bytes() for p in out.rglob("*.png")} == before  # same seeds, same pictures
    assert not list(out.glob(".*"))  # no partial folders left behind
    # Resuming with other settings would mix two runs in one folder.
    assert main([*argv[:-1], "--seed", "3"]) == 2
    assert "error: " in capsys.readouterr().out


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{bad", ":2: not JSON"),
        ('["a list"]', ":2: a line must be a JSON object"),
        ('{"tag": "x"}', ":2: 'prompt' must be a non-empty string"),
        ('{"prompt": "a red circle"}', ":2: 'tag' must be a string"),
    ],
)
def test_bad_line_is_named_by_file_and_line(tmp_path, capsys, line, message):
    path = _prompts_file(tmp_path, [LINES[0], line])
    argv = ["generate", "--model", FUDOKI, "--layout", "geneval", "--prompts-file", str(path),
            "--out", str(tmp_path / "g")]  # fmt: skip
    assert main(argv) == 2
    out = capsys.readouterr().out
    assert out.startswith(f"error: {path}{message}") and out.count("\n") == 1
    assert not (tmp_path / "g").exists()  # nothing written before the file is checked


def test_option_mistakes_are_one_line_errors(tmp_path, capsys):
    base = ["generate", "--model", FUDOKI, "--out", str(tmp_path / "g")]
    assert main([*base, "a red circle", "--n-samples", "2"]) == 2  # needs --layout geneval
    assert main([*base, "--layout", "geneval"]) == 2  # needs --prompts-file
    assert main([*base, "--layout", "geneval", "--prompts-file", str(tmp_path / "none")]) == 2
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3 and all(line.startswith("error: ") for line in lines)


def test_unifluid_through_the_same_interface(tmp_path, capsys):
    prompts, out = _prompts_file(tmp_path, LINES[:2]), tmp_path / "u"
    argv = ["generate", "--model", UNIFLUID, "--layout", "geneval", "--prompts-file", str(prompts),
            "--out", str(out), "--n-samples", "2", "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    card = json.loads((out / "run.json").read_text())
    assert card["kineflow_type"] == "unifluid" and "steps" not in card["options"]
    for i in range(2):
        for k in range(2):
            with Image.open(out / f"{i:05d}" / "samples" / f"{k:04d}.png") as im:
                assert im.size == (32, 32)
    assert main([*argv, "--steps", "4"]) == 2  # UniFluid has no solver steps
    assert "--steps is not supported by UniFluid" in capsys.readouterr().out
