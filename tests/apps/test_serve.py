"""``kineflow serve`` without a browser: the handlers on the shipped tiny checkpoints, the run
card round trip, the messages for bad input, and the tabs / controls the interface decides."""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
import torch
from PIL import Image

import kineflow
from kineflow.apps.serve import RunCard, Session
from kineflow.apps.serve.controls import default_value, tabs_for, visible_controls
from kineflow.apps.serve.run_card import model_fingerprint, pixel_hash
from kineflow.data.shapes.render import render_image
from kineflow.data.shapes.scene import Obj, Scene
from kineflow.pipelines.base import Pipeline
from kineflow.pipelines.fudoki import FudokiPipeline
from kineflow.pipelines.unifluid import UnifluidPipeline

ROOT = Path(__file__).resolve().parents[2]
FUDOKI = str(ROOT / "checkpoints" / "fudoki-shapes")
UNIFLUID = str(ROOT / "checkpoints" / "unifluid-shapes")

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def fudoki(tmp_path_factory: pytest.TempPathFactory) -> Session:
    return Session(kineflow.load(FUDOKI), FUDOKI, tmp_path_factory.mktemp("f"), "cpu", "float32")


@pytest.fixture(scope="module")
def unifluid(tmp_path_factory: pytest.TempPathFactory) -> Session:
    return Session(
        kineflow.load(UNIFLUID), UNIFLUID, tmp_path_factory.mktemp("u"), "cpu", "float32"
    )


def _scene_picture() -> Image.Image:
    """A ShapesWorld render: a large red circle top left, a small blue square in the middle."""
    scene = Scene((Obj(0, 0, "circle", "red", "large"), Obj(1, 1, "square", "blue", "small")))
    return render_image(scene, 32)


def _same_pixels(a: list[Image.Image], b: list[Image.Image]) -> bool:
    return len(a) == len(b) and all(
        np.array_equal(np.asarray(x.convert("RGB")), np.asarray(y.convert("RGB")))
        for x, y in zip(a, b, strict=True)
    )


# -- what the page shows: asked of the interface ------------------------------------------------
class _TextOnly(Pipeline):
    """A family that only draws and answers (never instantiated: the page asks the class)."""

    kineflow_type = "text-only-test"
    display_name = "TextOnly"
    task_options: ClassVar[Mapping[str, frozenset[str]]] = {
        "text_to_image": frozenset({"seed", "temperature"}),
        "answer": frozenset(),
    }


def test_tabs_follow_what_the_family_supports() -> None:
    titles = lambda cls: [tab.title for tab in tabs_for(cls)]  # noqa: E731
    assert titles(FudokiPipeline) == [
        "Text to image", "Ask about a picture", "Infill", "Reproduce a run card",
    ]  # fmt: skip
    assert titles(UnifluidPipeline) == [
        "Text to image", "Ask about a picture", "Edit", "Infill", "Reproduce a run card",
    ]  # fmt: skip
    assert titles(_TextOnly) == ["Text to image", "Ask about a picture", "Reproduce a run card"]


def test_controls_follow_the_options_each_task_uses() -> None:
    assert visible_controls(FudokiPipeline, "text_to_image") == [
        "seed", "steps", "cfg_scale", "temperature", "top_k",
    ]  # fmt: skip
    assert visible_controls(UnifluidPipeline, "text_to_image") == [
        "seed", "cfg_scale", "temperature",
    ]  # fmt: skip
    assert visible_controls(FudokiPipeline, "answer") == ["seed", "steps"]
    assert visible_controls(UnifluidPipeline, "answer") == ["beams"]
    assert visible_controls(UnifluidPipeline, "edit") == ["seed", "temperature"]
    assert visible_controls(_TextOnly, "text_to_image") == ["seed", "temperature"]


def test_page_has_the_components_of_its_tabs(fudoki: Session, unifluid: Session) -> None:
    pytest.importorskip("gradio")
    from kineflow.apps.serve.page import build_page

    def ids(session: Session) -> set[str]:
        page = build_page(session, max_queue=7)
        # Every model call shares one concurrency group limited to 1: one run at a time.
        clicks = [fn for fn in page.fns.values() if fn.name == "click"]
        assert {fn.concurrency_id for fn in clicks} == {"model"}
        assert (page._queue.default_concurrency_limit, page._queue.max_size) == (1, 7)
        return {b.elem_id for b in page.blocks.values() if getattr(b, "elem_id", None)}

    f, u = ids(fudoki), ids(unifluid)
    assert {"t2i-run", "vqa-run", "infill-run", "replay-run", "text_to_image-steps"} <= f
    assert "edit-run" not in f
    assert {"t2i-run", "vqa-run", "vqa-caption", "edit-run", "infill-run", "replay-run"} <= u


def test_defaults_are_the_pipelines_own(fudoki: Session, unifluid: Session) -> None:
    f, u = fudoki.pipe, unifluid.pipe
    assert default_value(f, "text_to_image", "steps") == f.config.steps == 16
    assert default_value(f, "text_to_image", "cfg_scale") == f.config.cfg_scale
    assert default_value(f, "text_to_image", "temperature") == 1.0  # the keyword's default
    assert default_value(f, "text_to_image", "top_k") is None
    assert default_value(u, "text_to_image", "temperature") == u.config.temperature
    assert default_value(u, "answer", "beams") == 1
    assert default_value(u, "caption", "beams") == 3


# -- results, their size and their run cards ----------------------------------------------------
def test_text_to_image_matches_the_pipeline_and_its_card_reproduces_it(fudoki: Session) -> None:
    out = fudoki.text_to_image(" a red circle \n\nthree squares\n", {"seed": 5, "top_k": 0})
    size = fudoki.pipe.model.config.gen_vision.image_size
    assert [im.size for im in out.images] == [(size, size)] * 2
    card = out.card
    assert card.inputs == {"prompts": ["a red circle", "three squares"]}
    assert card.options == {"seed": 5, "steps": 16, "cfg_scale": 3.0, "temperature": 1.0,
                            "top_k": None}  # fmt: skip
    assert card.model == FUDOKI and card.model_fingerprint == model_fingerprint(FUDOKI)
    assert card.kineflow_version == kineflow.__version__
    assert card.outputs == {"image_sha256": [pixel_hash(im) for im in out.images]}
    # The pipeline called directly with the card's settings draws the same pixels.
    direct = fudoki.pipe.text_to_image(card.inputs["prompts"], **card.options)
    assert _same_pixels(out.images, direct.images)
    # One GIF per picture: a frame per solver step plus the noise, enlarged to 256 px.
    assert len(out.gifs) == 2
    for gif in out.gifs:
        with Image.open(gif) as g:
            assert g.n_frames == 16 + 1 and g.size == (256, 256)
    # The card written for download, fed back, gives the same pixels.
    assert json.loads(out.card_path.read_text()) == card.to_dict()
    again = fudoki.replay(out.card_path.read_text())
    assert _same_pixels(again.images, out.images)
    assert again.note == "reproduced: the same outputs as the run card"
    other = fudoki.text_to_image("a red circle\nthree squares", {"seed": 6})
    assert not _same_pixels(other.images, out.images)  # the seed matters


def test_unifluid_edit_card_needs_its_picture(unifluid: Session) -> None:
    picture = _scene_picture()
    out = unifluid.edit(picture, "make the circle green.", {"seed": 2, "temperature": 0.5})
    size = unifluid.pipe.model.config.vae.image_size
    assert out.images[0].size == (size, size)
    assert out.card.options == {"seed": 2, "temperature": 0.5}
    assert out.card.inputs["image_sha256"] == pixel_hash(picture)
    direct = unifluid.pipe.edit(picture, "make the circle green.", seed=2, temperature=0.5)
    assert _same_pixels(out.images, direct.images)
    again = unifluid.replay(out.card.to_json(), picture.copy())
    assert _same_pixels(again.images, out.images)
    with pytest.raises(ValueError, match="upload a picture first"):
        unifluid.replay(out.card.to_json(), None)
    with pytest.raises(ValueError, match="not the run card's"):
        unifluid.replay(out.card.to_json(), picture.transpose(Image.Transpose.FLIP_LEFT_RIGHT))


def test_answers_and_captions_are_the_pipelines(fudoki: Session, unifluid: Session) -> None:
    picture, question = _scene_picture(), "how many circles are there?"
    out = fudoki.answer(picture, question, {})
    assert out.texts == fudoki.pipe.answer(picture, question, steps=16, seed=0).texts
    assert out.card.outputs == {"texts": out.texts} and out.card.options == {"seed": 0, "steps": 16}
    assert fudoki.replay(out.card.to_json(), picture).texts == out.texts
    caption = unifluid.caption(picture, {"beams": 2})
    assert caption.texts == unifluid.pipe.caption(picture, beams=2).texts
    assert caption.texts[0]  # a non-empty caption


def test_infill_keeps_the_codes_outside_the_box(fudoki: Session) -> None:
    """The served infill is the pipeline's, on the box's pixel mask; the pipeline's codes
    outside the box are the picture's, exactly (re-encoding the decoded picture is not: the VQ
    encoder's attention lets the new region move codes anywhere)."""
    picture = _scene_picture()
    out = fudoki.infill(picture, "16,16,32,32", "a green square", {"seed": 1})
    mask = np.zeros((32, 32), bool)
    mask[16:32, 16:32] = True
    direct = fudoki.pipe.infill(picture, mask, "a green square", seed=1)
    assert _same_pixels(out.images, direct.images)
    # 32 px, 8 x 8 codes of 4 px: the box covers the bottom-right 4 x 4 codes.
    keep = torch.ones(8, 8, dtype=torch.bool)
    keep[4:, 4:] = False
    codes = fudoki.pipe.encode_images(picture)[0]
    assert torch.equal(direct.codes[0][keep], codes[keep])
    assert out.card.inputs["box"] == [16, 16, 32, 32]
    assert _same_pixels(fudoki.replay(out.card.to_json(), picture).images, out.images)


# -- bad input: one-line messages ---------------------------------------------------------------
@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda s: s.text_to_image(" \n ", {}), "enter at least one prompt (one per line)"),
        (lambda s: s.text_to_image("\n".join(["a circle"] * 17), {}), "at most 16 at a time"),
        (lambda s: s.text_to_image("a circle", {"steps": 2.5}), "steps must be a whole number"),
        (lambda s: s.text_to_image("a circle", {"steps": 0}), "steps must be between 1 and"),
        (lambda s: s.text_to_image("a circle", {"cfg_scale": -1.0}), "CFG must be between 0"),
        (lambda s: s.answer(None, "what?", {}), "upload a picture first"),
        (lambda s: s.answer(_scene_picture(), "  ", {}), "enter a question"),
        (lambda s: s.infill(_scene_picture(), "1,2", "x", {}), "must be X0,Y0,X1,Y1"),
        (lambda s: s.infill(_scene_picture(), "8,8,40,40", "x", {}), "inside the 32x32"),
        (lambda s: s.replay("{not json"), "the run card is not JSON"),
        (lambda s: s.replay("[]"), "must be a JSON object"),
        (lambda s: s.replay(""), "enter a run card"),
    ],
)
def test_bad_input_gets_a_message(fudoki: Session, call, message: str) -> None:
    with pytest.raises((ValueError, TypeError), match=re.escape(message)):
        call(fudoki)


def test_a_card_of_another_model_is_refused(fudoki: Session, unifluid: Session) -> None:
    card = unifluid.text_to_image("a red circle", {"seed": 0}).card
    with pytest.raises(ValueError, match="for a 'unifluid' model"):
        fudoki.replay(card.to_json())
    data = fudoki.text_to_image("a red circle", {"steps": 2}).card.to_dict()
    with pytest.raises(ValueError, match="fingerprint"):
        fudoki.replay(json.dumps({**data, "model_fingerprint": "0" * 16}))
    for bad, message in [
        ({**data, "task": "dance"}, "task 'dance' is not one of"),
        ({**data, "inputs": {"prompt": "x"}}, "inputs for text_to_image must be"),
        ({**data, "extra": 1}, "unknown field"),
        ({k: v for k, v in data.items() if k != "options"}, r"lacks field\(s\) \['options'\]"),
        ({**data, "format": "other/9"}, "format is 'other/9'"),
    ]:
        with pytest.raises(ValueError, match=message):
            RunCard.from_json(json.dumps(bad))


# -- the command --------------------------------------------------------------------------------
def test_serve_without_gradio_says_how_to_install_it(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from kineflow.cli import main

    monkeypatch.setitem(sys.modules, "gradio", None)  # "import gradio" raises ImportError
    assert main(["serve", "--model", FUDOKI]) == 2
    assert capsys.readouterr().out == (
        "error: kineflow serve needs gradio: pip install 'kineflow[serve]'\n"
    )


def test_serve_with_a_missing_checkpoint_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("gradio")
    from kineflow.cli import main

    assert main(["serve", "--model", str(tmp_path / "nowhere")]) == 2
    out = capsys.readouterr().out
    assert out.startswith("error: ") and out.count("\n") == 1 and "nowhere" in out
