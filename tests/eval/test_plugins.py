"""The benchmark harnesses' model classes without the harnesses installed: VLMEvalKit's
``generate(message)`` (VLMEvalKit is not on PyPI; tested against its documented BaseModel
interface) and lmms-eval's request handling with stand-in requests of its documented shape.
Every answer must equal the pipeline's own ``answer`` with the same settings."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

import kineflow
from kineflow.data.shapes.render import render_image
from kineflow.data.shapes.scene import ShapesWorld
from kineflow.eval.plugins.answerer import Answerer, cut_at, optional_int
from kineflow.eval.plugins.lmms_requests import MODEL_CLASS, MODEL_ID, answer_requests
from kineflow.eval.plugins.vlmevalkit import KineflowVLM, message_parts

FUDOKI, UNIFLUID = "checkpoints/fudoki-shapes", "checkpoints/unifluid-shapes"
QUESTION = "How many shapes are there?"


@pytest.fixture(scope="module")
def fudoki():
    return kineflow.load(FUDOKI)


@pytest.fixture(scope="module")
def pictures(tmp_path_factory):
    world, rng = ShapesWorld(), np.random.default_rng(0)
    folder = tmp_path_factory.mktemp("pictures")
    paths = []
    for k in range(2):
        paths.append(folder / f"scene{k}.png")
        render_image(world.sample(rng, "test")).save(paths[-1])
    return paths


def test_vlmevalkit_message_gives_the_pipelines_answer(fudoki, pictures):
    vlm = KineflowVLM(fudoki, steps=3, answer_tokens=None, seed=5)
    assert vlm.INTERLEAVE is False and vlm.is_api is False and not vlm.use_custom_prompt("MMBench")
    assert set(vlm.allowed_types) == {"text", "image"}
    message = [{"type": "image", "value": str(pictures[0])}, {"type": "text", "value": QUESTION}]
    expected = fudoki.answer(str(pictures[0]), QUESTION, steps=3, seed=5).texts[0]
    assert vlm.generate(message, dataset="MMBench_DEV_EN") == expected
    # The forms BaseModel accepts: a list of strings (a picture file is a picture).
    assert vlm.generate([str(pictures[0]), QUESTION]) == expected
    # Texts are joined by newlines, as VLMEvalKit's non-interleaved models read them.
    two = [{"type": "text", "value": "How many"}, {"type": "text", "value": "shapes?"}]
    assert message_parts([*two, {"type": "image", "value": "x.png"}]) == (
        "x.png",
        "How many\nshapes?",
    )
    with pytest.raises(ValueError, match="type 'video'"):
        vlm.generate([{"type": "video", "value": "v.mp4"}])
    vlm.set_dump_image(lambda line: [f"/data/{line['index']}.jpg"])
    assert vlm.dump_image({"index": 3}, "MMBench") == ["/data/3.jpg"]


def test_text_only_items_use_generate_text(fudoki):
    answerer = Answerer(fudoki, steps=2, answer_tokens=5, seed=1)
    expected = fudoki.generate_text("Hello", steps=2, max_tokens=5, seed=1).texts[0]
    assert answerer.answer([(None, "Hello")]) == [expected]


def _request(context, until, doc_id, task="shapes_vqa", split="test"):
    # lmms-eval's generate_until Instance.args for simple models.
    return SimpleNamespace(args=(context, {"until": until, "max_new_tokens": 9},
                                 lambda doc: [doc["image"]], doc_id, task, split))  # fmt: skip


def test_lmms_requests_in_order_and_cut_at_until(fudoki, pictures):
    from PIL import Image

    images = [Image.open(p).convert("RGB") for p in pictures]
    task_dict = {"shapes_vqa": {"test": [{"image": images[0]}, {"image": images[1]}]}}
    answerer = Answerer(fudoki, steps=3, seed=0, batch_size=2)
    full = fudoki.answer(images, [QUESTION, "What colour is the shape?"], steps=3, seed=0).texts
    requests = [_request(QUESTION, [], 0), _request("What colour is the shape?", "\n", 1)]
    assert answer_requests(answerer, requests, task_dict) == [full[0], cut_at(full[1], ["\n"])]
    assert cut_at("red. blue\nx", ["\n", ". "]) == "red"
    with pytest.raises(ValueError, match="request 0"):
        answer_requests(answerer, [SimpleNamespace(args=(QUESTION, {}))], task_dict)


def test_unifluid_through_the_interface(pictures):
    pipe = kineflow.load(UNIFLUID)
    expected = pipe.answer(str(pictures[1]), QUESTION, beams=2).texts[0]
    vlm = KineflowVLM(pipe, beams=2)
    assert vlm.generate([{"type": "image", "value": str(pictures[1])},
                         {"type": "text", "value": QUESTION}]) == expected  # fmt: skip
    with pytest.raises(ValueError, match="steps is not supported by UniFluid"):
        Answerer(pipe, steps=8)
    with pytest.raises(ValueError, match="answer questions about a picture"):
        Answerer(pipe).answer([(None, "Hello")])


def test_option_strings_and_refusals(fudoki):
    assert [optional_int(v, "x") for v in ("None", "", None, "16", 16.0)] == [
        None,
        None,
        None,
        16,
        16,
    ]
    with pytest.raises(ValueError, match="steps must be an integer"):
        Answerer(fudoki, steps="many")
    with pytest.raises(ValueError, match="beams is not supported by FUDOKI"):
        Answerer(fudoki, beams=2)


def test_pyproject_registers_the_lmms_eval_entry_point():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    project = tomllib.loads(Path("pyproject.toml").read_text())["project"]
    entry = project["entry-points"]["lmms_eval.models"][MODEL_ID]
    assert entry == "kineflow.eval.plugins.lmms_requests:manifest"
    assert MODEL_CLASS == "kineflow.eval.plugins.lmms_model.KineflowLmms"
    assert "lmms-eval" in " ".join(project["optional-dependencies"]["eval"])
