"""ShapesWorld scorers and the ``kineflow data`` / ``kineflow eval`` commands, end to end.

The sanity checks of a benchmark: ground truth scores 1.0, shuffled pictures score what
chance predicts, and every kind of wrong output is caught.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from kineflow.cli import main
from kineflow.data.shapes.prompts import CATEGORIES, passes, prompt_set
from kineflow.data.shapes.scene import Scene
from kineflow.eval.detector import detect
from kineflow.eval.score_files import evaluate, load_prompts, write_reference
from kineflow.eval.scores import FAIL_COLOUR, PASS_COLOUR, contact_sheet, score_vqa
from kineflow.tokenizers.text import TextTokenizer


@pytest.fixture(scope="module")
def t2i_reference(tmp_path_factory) -> Path:
    return write_reference("t2i", tmp_path_factory.mktemp("t2i"), "test", samples_per_prompt=2)


def _pictures(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*.png"))


def test_t2i_ground_truth_scores_one(t2i_reference, tmp_path):
    report, paths = evaluate("t2i", t2i_reference, tmp_path)
    prompts = prompt_set("test")
    assert report["accuracy"] == 1.0 and report["image_accuracy"] == 1.0
    assert report["n"] == 2 * len(prompts) and report["prompts"] == len(prompts)
    assert list(report["by_category"]) == list(CATEGORIES)
    assert json.loads(Path(paths["report"]).read_text())["accuracy"] == 1.0
    assert Image.open(paths["contact_sheet"]).size[0] > 0


def test_t2i_shuffled_pictures_score_chance(t2i_reference, tmp_path):
    files = _pictures(t2i_reference)
    perm = np.random.default_rng(0).permutation(len(files))
    shuffled = tmp_path / "shuffled"
    for f, j in zip(files, perm, strict=True):
        target = shuffled / f.relative_to(t2i_reference)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(files[j], target)
    report, _ = evaluate("t2i", shuffled, tmp_path / "report")
    # Chance: the expected pass rate of a picture drawn at random from the pool, per category.
    scenes = detect(np.stack([np.asarray(Image.open(f)) for f in files]))
    prompts = prompt_set("test")
    chance = np.mean(
        [
            np.mean([passes(p, s) for p in prompts if p.category == c for s in scenes])
            for c in CATEGORIES
        ]
    )
    assert report["accuracy"] < 0.45
    assert abs(report["accuracy"] - chance) < 0.06, (report["accuracy"], chance)


def test_t2i_missing_pictures_are_named(t2i_reference, tmp_path):
    partial = tmp_path / "partial"
    shutil.copytree(t2i_reference, partial)
    shutil.rmtree(partial / "counting")
    with pytest.raises(ValueError, match=r"no pictures for 9 of .* prompts, e\.g\. counting/"):
        evaluate("t2i", partial, tmp_path / "r")


def test_t2i_prompt_file_round_trip(tmp_path):
    prompts = prompt_set("heldout")
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(p.to_dict()) + "\n" for p in prompts))
    assert load_prompts(path) == prompts
    path.write_text('{"id": "x"}\n')
    with pytest.raises(ValueError, match=r"prompts\.jsonl:1: not a ShapesWorld prompt"):
        load_prompts(path)


@pytest.mark.parametrize("task", ["vqa", "caption", "edit"])
def test_ground_truth_scores_one(task, tmp_path):
    samples = write_reference(task, tmp_path / "ref", "test", n=120)
    report, paths = evaluate(task, samples, tmp_path / "out")
    assert report["accuracy"] == 1.0 and report["n"] == 120
    if task == "edit":  # the target pictures: every change made, every other object kept
        assert (report["applied"], report["kept"], report["unchanged"]) == (1.0, 1.0, 0.0)
    assert Path(paths["contact_sheet"]).is_file()


def test_vqa_wrong_answers_and_answer_normalisation(tmp_path):
    path = write_reference("vqa", tmp_path, "test", n=600)
    gold = [json.loads(line) for line in path.read_text().splitlines()]
    # Case, surrounding space and a final period do not matter.
    path.write_text(
        "".join(
            json.dumps({"id": g["id"], "answer": f" {g['answer'].upper()}. "}) + "\n" for g in gold
        )
    )
    assert evaluate("vqa", path, tmp_path / "a")[0]["accuracy"] == 1.0
    path.write_text("".join(json.dumps({"id": g["id"], "answer": "yes"}) + "\n" for g in gold))
    report = evaluate("vqa", path, tmp_path / "b")[0]
    # Existence questions are balanced yes / no, so "yes" scores half of them on average.
    assert report["by_type"]["exist"]["accuracy"] == pytest.approx(0.5, abs=0.1)
    assert report["by_type"]["count"]["accuracy"] == 0.0
    assert set(report["by_type"]) == {"count", "colour", "shape", "relation", "exist"}


def test_caption_scoring_needs_the_exact_scene(tmp_path):
    path = write_reference("caption", tmp_path, "test", n=50)
    gold = [json.loads(line) for line in path.read_text().splitlines()]
    assert gold[0]["caption"] != gold[1]["caption"]
    # Item 0 gets a well-formed caption of another scene, item 1 an unparseable one.
    lines = [
        {"id": gold[0]["id"], "caption": gold[1]["caption"]},
        {"id": gold[1]["id"], "caption": "a picture of shapes."},
    ] + [{"id": g["id"], "caption": g["caption"]} for g in gold[2:]]
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    report = evaluate("caption", path, tmp_path / "r")[0]
    verdict = {it["id"]: it for it in report["items"]}
    assert not verdict[gold[0]["id"]]["passed"] and verdict[gold[0]["id"]]["parsed"]
    assert not verdict[gold[1]["id"]]["passed"] and verdict[gold[1]["id"]]["parsed"] is None
    assert report["accuracy"] == pytest.approx(48 / 50)
    assert report["parse_rate"] == pytest.approx(49 / 50)


def test_unedited_pictures_fail_every_edit(tmp_path):
    from kineflow.data.shapes.dataset import draw_item
    from kineflow.data.shapes.render import render
    from kineflow.data.shapes.scene import ShapesWorld

    world = ShapesWorld()
    for i in range(60):
        item = draw_item(world, "edit", "test", i)
        Image.fromarray(render(Scene.from_key(item.scene_key))).save(tmp_path / f"{item.id}.png")
    report = evaluate("edit", tmp_path, tmp_path / "r")[0]
    assert report["accuracy"] == 0.0 and report["n"] == 60
    assert set(report["by_kind"]) == {"recolour", "remove", "add", "move"}
    # The source pictures: nothing applied, everything kept, all unchanged, for every kind.
    assert (report["applied"], report["kept"], report["unchanged"]) == (0.0, 1.0, 1.0)
    assert set(report["applied_by_kind"].values()) == {0.0}


def test_edit_failures_split_into_applied_and_kept():
    """Hand-made edits of one scene: the right object removed; the wrong one removed; the
    right one removed but another drawn anew; a recolour that also recolours a bystander."""
    from kineflow.eval.scores import score_edits

    source = Scene.from_key("00circle-red-small;11square-blue-large;22triangle-green-small")
    remove = Scene.from_key("00circle-red-small;11square-blue-large")  # remove the triangle
    recolour = Scene.from_key("00circle-red-small;11square-cyan-large;22triangle-green-small")
    cases = {  # id: (kind, target, detected, passed, applied, kept)
        "right": ("remove", remove, remove, True, True, True),
        "wrong": ("remove", remove, Scene.from_key("00circle-red-small;22triangle-green-small"),
                  False, False, False),
        "extra": ("remove", remove, Scene.from_key(
            "00circle-red-small;02square-red-small;11square-blue-large"), False, True, True),
        "bystander": ("recolour", recolour, Scene.from_key(
            "00circle-red-small;11square-cyan-large;22triangle-cyan-small"), False, True, False),
    }  # fmt: skip
    report = score_edits({i: c[1] for i, c in cases.items()}, {i: c[2] for i, c in cases.items()},
                         {i: c[0] for i, c in cases.items()},
                         sources={i: source for i in cases})  # fmt: skip
    rows = {r["id"]: r for r in report["items"]}
    for i, (_, _, _, passed, applied, kept) in cases.items():
        assert (rows[i]["passed"], rows[i]["applied"], rows[i]["kept"]) == (passed, applied, kept)
        assert not rows[i]["unchanged"]
    assert report["applied"] == 0.75 and report["kept"] == 0.5
    assert report["applied_by_kind"] == {"recolour": 1.0, "remove": 2 / 3}


def test_bad_outputs_are_named(tmp_path):
    path = tmp_path / "answers.jsonl"
    path.write_text('{"id": "test-vqa-000000", "answer": "two"}\nnot json\n')
    with pytest.raises(ValueError, match=r"answers\.jsonl:2: bad JSON"):
        evaluate("vqa", path, tmp_path)
    path.write_text('{"id": "test-vqa-000000", "answr": "two"}\n')
    with pytest.raises(ValueError, match=r"answers\.jsonl:1: expected keys 'id' and 'answer'"):
        evaluate("vqa", path, tmp_path)
    path.write_text('{"id": "my-question-1", "answer": "two"}\n')
    with pytest.raises(ValueError, match=r"cannot redraw item 'my-question-1'.*--bench"):
        evaluate("vqa", path, tmp_path)
    (tmp_path / "pics").mkdir()
    Image.new("RGB", (48, 48)).save(tmp_path / "pics" / "test-edit-000000.png")
    with pytest.raises(ValueError, match=r"test-edit-000000\.png: ShapesWorld pictures are 32 or"):
        evaluate("edit", tmp_path / "pics", tmp_path)
    with pytest.raises(ValueError, match="no output for 1 item"):
        score_vqa([{"id": "a", "question": "q", "answer": "x"}], {})


def test_contact_sheet_marks_failures():
    pics = [np.full((32, 32, 3), 240, np.uint8)] * 3
    sheet = np.asarray(contact_sheet(pics, [True, False, True], ["a", "b", "c"], columns=3))
    frames = [sheet[2, 2 + k * (96 + 10)] for k in range(3)]  # top-left frame pixel per tile
    assert [tuple(f) for f in frames] == [PASS_COLOUR, FAIL_COLOUR, PASS_COLOUR]
    with pytest.raises(ValueError, match="3 pictures but 2 verdicts"):
        contact_sheet(pics, [True, False])


# -- command line -------------------------------------------------------------------------------
def test_cli_data_shapes_validate_and_eval(tmp_path, capsys):
    out = tmp_path / "sw"
    assert (
        main(
            ["data", "shapes", "--out", str(out), "--n", "40", "--split", "test", "--workers", "1"]
        )
        == 0
    )
    summary = json.loads(capsys.readouterr().out)
    assert summary["items"] == 160 and summary["pictures"] == 200
    assert (out / "prompts.jsonl").is_file() and (out / "world.json").is_file()
    assert main(["data", "validate", str(out / "manifest.jsonl")]) == 0
    assert "OK" in capsys.readouterr().out
    # Edited pictures scored against the materialised benchmark manifest.
    ref = tmp_path / "ref"
    assert main(["data", "reference", "--task", "edit", "--out", str(ref), "--n", "40"]) == 0
    assert (
        main(
            [
                "eval",
                "shapes",
                "--task",
                "edit",
                "--samples",
                str(ref),
                "--bench",
                str(out / "manifest.jsonl"),
                "--out",
                str(tmp_path / "rep"),
            ]
        )
        == 0
    )
    assert "edit: accuracy 1.000 over 40 items" in capsys.readouterr().out
    assert (tmp_path / "rep" / "report_edit.json").is_file()


def test_cli_validate_reports_bad_manifest(tmp_path, capsys):
    bad = tmp_path / "m.jsonl"
    bad.write_text('{"image": "missing.png", "caption": "x"}\n{"image": "a.png"}\n')
    assert main(["data", "validate", str(bad)]) == 1
    text = capsys.readouterr().out
    assert "m.jsonl:1:" in text and "m.jsonl:2:" in text and "FAILED" in text
    assert main(["data", "validate", str(tmp_path / "nope.jsonl")]) == 2


def test_cli_eval_error_is_a_message_not_a_traceback(tmp_path, capsys):
    assert main(["eval", "shapes", "--task", "t2i", "--samples", str(tmp_path)]) == 2
    assert "no pictures for" in capsys.readouterr().out


def test_cli_tokenizer_on_shapes_corpus(tmp_path, capsys):
    assert main(["data", "tokenizer", "--out", str(tmp_path), "--n", "200"]) == 0
    tok = TextTokenizer.load(tmp_path)
    text = "how many circles are there?"
    ids = tok.encode(text)
    assert tok.decode(ids) == text and len(ids) <= 6  # whole words are single tokens
    assert tok.vocab_size <= 512 and tok.bos_id == 0
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("hello world\nhello there\n")
    assert main(["data", "tokenizer", "--out", str(tmp_path / "c"), "--corpus", str(corpus)]) == 0


class _BlankPainter:
    """A stand-in pipeline that paints empty pictures and records how many it was asked for."""

    def __init__(self) -> None:
        self.asked: list[str] = []

    def text_to_image(self, texts, seed=0, **options):
        from types import SimpleNamespace

        self.asked += texts
        return SimpleNamespace(images=[Image.new("RGB", (32, 32), "white") for _ in texts])

    def supports(self, task: str) -> bool:
        return False


@pytest.mark.parametrize("test_k, heldout_k", [(2, None), (1, 3), (0, 2), (2, 0)])
def test_evaluate_model_draws_each_split_its_own_picture_count(test_k, heldout_k):
    """Each split is generated once, with its own pictures per prompt (the held-out count
    defaults to the test one); a split asked for no pictures is left out of the report."""
    from kineflow.eval.benchmark import evaluate_model

    painter = _BlankPainter()
    report = evaluate_model(painter, images_per_prompt=test_k, heldout_images_per_prompt=heldout_k,
                            max_prompts_per_category=1, vqa_items=0, caption_items=0,
                            progress=False)  # fmt: skip
    want = {"test": test_k, "heldout": test_k if heldout_k is None else heldout_k}
    expected = []
    for split, k in want.items():
        prompts = prompt_set(split, max_per_category=1, seed=0)
        expected += [p.text for p in prompts for _ in range(k)]
        if k == 0:
            assert f"t2i_{split}" not in report
        else:
            assert len(report[f"t2i_{split}"]["pictures"]) == len(prompts) * k
    assert painter.asked == expected
