"""The main job on the checkpoint shipped in the repository (``make demo``)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from kineflow.cli import main

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ROOT / "checkpoints"

GOLDEN = Path(__file__).resolve().parents[1] / "golden"

pytestmark = pytest.mark.usefixtures("one_thread")


def _golden_module():
    """``tests/golden/record.py``: the golden showcase's command line and readers."""
    spec = importlib.util.spec_from_file_location("golden_record", GOLDEN / "record.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


record = _golden_module()


def _same_as_recorded(out: Path, model: str) -> None:
    """The float64 showcase draws the recorded pictures, answers and counts
    (``tests/golden/{model}.npz`` and ``showcase.json``, made by ``tests/golden/record.py``,
    whose docstring says why float64): every picture within one unit of the recorded
    pixels (a value at a rounding boundary may land on either side), the same answers and
    the same number of passing pictures, right answers and edits."""
    golden = json.loads((GOLDEN / "showcase.json").read_text())[model]
    with np.load(GOLDEN / f"{model}.npz") as recorded:
        want = {name: recorded[name] for name in recorded.files}
    got = record.shown_pictures(out)
    assert sorted(got) == sorted(want)
    changed = sorted(
        name for name in want
        if np.abs(got[name].astype(int) - want[name].astype(int)).max() > 1
    )  # fmt: skip
    assert not changed, f"pictures differ from the recorded ones: {changed}"
    answers = [a["answer"] for a in json.loads((out / "answers.json").read_text())]
    assert answers == golden["answers"]
    assert record.counts(out) == golden["counts"]


def test_shipped_checkpoints_are_small_and_complete() -> None:
    files = [f for f in SHIPPED.rglob("*") if f.is_file()]
    # 21.3 MiB with the KL-VAE the configs read (checkpoints/kl-shapes, 1.9 MiB, float16).
    assert sum(f.stat().st_size for f in files) <= 24 * 2**20
    for name in ("fudoki-shapes", "vq-shapes", "siglip-shapes", "unifluid-shapes", "kl-shapes"):
        assert (SHIPPED / name / "config.json").is_file()
        assert (SHIPPED / name / "model.safetensors").is_file()
    for name in ("fudoki-shapes", "unifluid-shapes"):
        assert (SHIPPED / name / "tokenizer.json").is_file()


def test_showcase_generates_and_answers(tmp_path, capsys) -> None:
    out = tmp_path / "show"
    assert main(record.showcase_argv("fudoki-shapes", out)) == 0  # --seeds 2 --vqa 16, float64
    report = capsys.readouterr().out
    assert "pictures pass their prompt" in report
    summary = json.loads((out / "summary.json").read_text())
    records = json.loads((out / "t2i.json").read_text())
    answers = json.loads((out / "answers.json").read_text())
    assert summary["t2i"]["pictures"] == len(records) == 2 * 7
    assert all(r["passes"] is not None for r in records)  # every prompt is a benchmark prompt
    gif = Image.open(out / "refine_0.gif")
    assert gif.n_frames == 17  # the checkpoint's 16 solver steps + the source draw
    assert Image.open(out / "samples.png").size[0] > 0
    assert len(answers) == 16 + 7 and all(isinstance(a["answer"], str) for a in answers)
    _same_as_recorded(out, "fudoki-shapes")


def test_showcase_unifluid_generates_answers_and_edits(tmp_path, capsys) -> None:
    out = tmp_path / "uf"
    assert main(record.showcase_argv("unifluid-shapes", out)) == 0  # 4 seeds, 24 edits, float64
    report = capsys.readouterr().out
    assert "pictures pass their prompt" in report and "editing (detector verdict)" in report
    summary = json.loads((out / "summary.json").read_text())
    edits = json.loads((out / "edits.json").read_text())
    assert summary["t2i"]["pictures"] == 4 * 7 and summary["edit"]["edits"] == len(edits) == 24
    assert all(set(e) >= {"instruction", "target", "detected", "passes"} for e in edits)
    gif = Image.open(out / "refine_0.gif")
    assert gif.n_frames == 17  # the blank canvas, then one frame per generated token
    assert Image.open(out / "edits.png").size[0] > 0
    # 24 edits rather than 8: the recorded count is checked, and 2 of 8 says little.
    _same_as_recorded(out, "unifluid-shapes")


def test_showcase_best_of_shows_the_candidates_the_model_kept(tmp_path, capsys) -> None:
    out = tmp_path / "best"
    argv = ["showcase", "--model", str(SHIPPED / "fudoki-shapes"), "--out", str(out),
            "--seeds", "1", "--vqa", "0", "--best-of", "4", "--cfg-scale", "1"]  # fmt: skip
    assert main(argv) == 0
    assert "(each the best of 4 drawn, judged by the model itself)" in capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    records = json.loads((out / "t2i.json").read_text())
    assert summary["t2i"]["best_of"] == 4 and summary["t2i"]["cfg_scale"] == 1.0
    assert len(records) == 7 and all(0 <= r["chosen"] < 4 for r in records)
    # The kept picture is the candidate of the plain batched call that scored highest.
    import kineflow
    from kineflow.pipelines.judge import self_scores

    pipe = kineflow.load(SHIPPED / "fudoki-shapes")
    many = [r["prompt"] for r in records for _ in range(4)]
    candidates = pipe.text_to_image(many, cfg_scale=1.0, seed=0).images
    scores = self_scores(pipe, candidates, many).view(7, 4)
    assert [r["chosen"] for r in records] == scores.argmax(1).tolist()
    for i, r in enumerate(records):
        kept = np.asarray(candidates[4 * i + r["chosen"]])
        shown = np.asarray(Image.open(out / r["file"]).convert("RGB"))[::4, ::4]
        assert np.array_equal(kept, shown)


def test_showcase_missing_checkpoint(tmp_path, capsys) -> None:
    assert main(["showcase", "--model", str(tmp_path / "nope"), "--out", str(tmp_path)]) == 2
    assert "error:" in capsys.readouterr().out
