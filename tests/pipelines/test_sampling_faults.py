"""User mistakes at the pipelines' API boundary: every sampling option, text and device is
checked, with its name in the error, before any heavy work (issue 14, points 2, 3, 4, 7, 16,
20). The shipped tiny checkpoints load in well under a second."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from PIL import Image

import kineflow
from kineflow.inputs.checks import check_device, check_options, check_texts
from kineflow.inputs.layout import DEFAULT_TEXT_TOKENS, text_layout
from kineflow.pipelines import FudokiPipelineConfig
from kineflow.pipelines.unifluid import UnifluidPipelineConfig

SHIPPED = Path(__file__).resolve().parents[2] / "checkpoints"
PICTURE = Image.new("RGB", (32, 32), "white")
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def fudoki():
    return kineflow.load(SHIPPED / "fudoki-shapes")


@pytest.fixture(scope="module")
def unifluid():
    return kineflow.load(SHIPPED / "unifluid-shapes")


class HeavyWorkError(Exception):
    """Raised by a patched heavy step: the check under test must come before it."""


def forbid(monkeypatch, obj, *names: str) -> None:
    def boom(*args, **kwargs):
        raise HeavyWorkError

    for name in names:
        monkeypatch.setattr(obj, name, boom)


# -- point 16: options ---------------------------------------------------------------------------
FUDOKI_CALLS = {
    "text_to_image": lambda p, **kw: p.text_to_image("a red circle", **kw),
    "answer": lambda p, **kw: p.answer(PICTURE, "how many?", **kw),
    "generate_text": lambda p, **kw: p.generate_text("hello", **kw),
}
UNIFLUID_CALLS = {
    "text_to_image": lambda p, **kw: p.text_to_image("a red circle", **kw),
    "edit": lambda p, **kw: p.edit(PICTURE, "make it red.", **kw),
    "answer": lambda p, **kw: p.answer(PICTURE, "how many?", **kw),
}


@pytest.mark.parametrize(
    ("call", "options", "match"),
    [
        ("text_to_image", {"temperature": math.nan}, r"temperature must be >= 0 and finite"),
        ("text_to_image", {"temperature": math.inf}, r"temperature must be >= 0 and finite"),
        ("text_to_image", {"cfg_scale": math.nan}, r"cfg_scale must be >= 0 and finite"),
        ("text_to_image", {"cfg_scale": -1.0}, r"cfg_scale must be >= 0"),
        ("text_to_image", {"steps": 0}, r"steps must be >= 1, got 0"),
        ("text_to_image", {"steps": 2.5}, r"steps must be an integer, got 2.5"),
        ("text_to_image", {"steps": True}, r"steps must be an integer, got True"),
        ("text_to_image", {"top_k": 0}, r"top_k must be >= 1"),
        ("text_to_image", {"seed": -1}, r"seed must be between 0 and"),
        ("text_to_image", {"seed": 1.5}, r"seed must be an integer"),
        ("answer", {"answer_tokens": 0}, r"answer_tokens must be >= 1"),
        ("answer", {"steps": -3}, r"steps must be >= 1"),
        ("generate_text", {"max_tokens": 0}, r"max_tokens must be >= 1"),
        ("generate_text", {"temperature": math.nan}, r"temperature must be >= 0 and finite"),
        ("generate_text", {"top_k": 2.5}, r"top_k must be an integer"),
    ],
)
def test_fudoki_refuses_bad_options_before_sampling(
    fudoki, monkeypatch, call, options, match
) -> None:
    # nan temperature used to crash deep in the solver ("index 22 is out of bounds").
    forbid(monkeypatch, fudoki, "_solve")
    forbid(monkeypatch, fudoki.model, "encode_images")
    with pytest.raises(ValueError, match=match):
        FUDOKI_CALLS[call](fudoki, **options)


@pytest.mark.parametrize(
    ("call", "options", "match"),
    [
        ("text_to_image", {"cfg_scale": math.nan}, r"cfg_scale must be >= 0 and finite"),
        ("text_to_image", {"cfg_scale": math.inf}, r"cfg_scale must be >= 0 and finite"),
        ("text_to_image", {"temperature": math.inf}, r"temperature must be >= 0 and finite"),
        ("text_to_image", {"temperature": -0.5}, r"temperature must be >= 0"),
        ("text_to_image", {"seed": "0"}, r"seed must be an integer"),
        ("text_to_image", {"frames": 0}, r"frames must be >= 1"),
        ("text_to_image", {"steps": 10}, r"UniFluid has no solver steps"),
        ("edit", {"temperature": math.nan}, r"temperature must be >= 0 and finite"),
        ("edit", {"seed": -2}, r"seed must be between"),
        ("answer", {"beams": 0}, r"beams must be >= 1"),
        ("answer", {"max_tokens": 0}, r"max_tokens must be >= 1"),
        ("answer", {"answer_tokens": 2.0}, r"answer_tokens must be an integer"),
        ("answer", {"max_tokens": 3, "answer_tokens": 4}, r"max_tokens=3 and answer_tokens=4"),
    ],
)
def test_unifluid_refuses_bad_options_before_sampling(
    unifluid, monkeypatch, call, options, match
) -> None:
    # cfg_scale nan / temperature inf used to return all-black pictures with no error.
    forbid(monkeypatch, unifluid.model, "generate_tokens", "generate_text", "encode_images")
    forbid(monkeypatch, unifluid, "encode")
    with pytest.raises(ValueError, match=match):
        UNIFLUID_CALLS[call](unifluid, **options)


def test_caption_checks_its_beams(unifluid) -> None:
    with pytest.raises(ValueError, match="beams must be >= 1"):
        unifluid.caption(PICTURE, beams=0)


def test_configs_refuse_non_finite_defaults() -> None:
    # A config.json with cfg_scale NaN would make every call draw black pictures.
    with pytest.raises(ValueError, match="cfg_scale must be >= 0 and finite"):
        UnifluidPipelineConfig(cfg_scale=math.nan)
    with pytest.raises(ValueError, match="temperature must be >= 0 and finite"):
        UnifluidPipelineConfig(temperature=math.inf)
    with pytest.raises(ValueError, match="clip_x0 must be None or a finite number"):
        UnifluidPipelineConfig(clip_x0=math.nan)
    with pytest.raises(ValueError, match="cfg_scale must be >= 0 and finite"):
        FudokiPipelineConfig(cfg_scale=math.inf)
    with pytest.raises(ValueError, match="steps must be >= 1"):
        FudokiPipelineConfig(steps=0)


def test_check_options_normalises_and_passes_none() -> None:
    import numpy as np

    checked = check_options(steps=np.int64(3), temperature=0, cfg_scale=None, seed=2**64 - 1)
    assert checked == {"steps": 3, "temperature": 0.0, "cfg_scale": None, "seed": 2**64 - 1}
    assert type(checked["steps"]) is int and type(checked["temperature"]) is float


# -- point 3: over-long prompts, refused before any heavy work ------------------------------------
LONG = "red circle " * 300  # ~600 tokens: past the shipped models' 256 positions


def test_unifluid_text_to_image_refuses_a_prompt_past_its_positions(unifluid, monkeypatch) -> None:
    forbid(monkeypatch, unifluid.model, "generate_tokens")
    with pytest.raises(ValueError) as caught:
        unifluid.text_to_image(["a red circle", LONG])
    message = str(caught.value)
    assert message.startswith("prompt 1 has ")
    assert "this model reads at most 256 positions (max_position_embeddings)" in message
    assert "16 of them for the picture: shorten the prompt to at most 240 tokens" in message


def test_unifluid_edit_refuses_a_long_instruction_before_encoding(unifluid, monkeypatch) -> None:
    # A 50k-character instruction tried to allocate 40 GB.
    forbid(monkeypatch, unifluid, "encode")
    forbid(monkeypatch, unifluid.model, "generate_tokens")
    with pytest.raises(ValueError, match=r"instruction 0 has \d+ tokens .*max_position_emb"):
        unifluid.edit(PICTURE, "x" * 50_000)


def test_unifluid_answer_refuses_more_positions_than_the_model_reads(unifluid, monkeypatch) -> None:
    forbid(monkeypatch, unifluid.model, "encode_images", "generate_text")
    with pytest.raises(ValueError, match=r"lower answer_tokens= \(--answer-tokens\) to at most"):
        unifluid.answer(PICTURE, "how many circles are there?", max_tokens=1000)
    with pytest.raises(ValueError, match=r"question 0 needs \d+ text tokens .* text budget"):
        unifluid.answer(PICTURE, LONG)


def test_fudoki_refuses_answers_past_its_positions(fudoki, monkeypatch) -> None:
    forbid(monkeypatch, fudoki.model, "encode_images")
    with pytest.raises(ValueError, match=r"question 0 has \d+ tokens.*at most 256 positions"):
        fudoki.answer(PICTURE, "how many?", answer_tokens=1000)


# -- point 2: text answers fit the budget by default ----------------------------------------------
def test_text_reply_with_defaults_fits_the_budget(fudoki) -> None:
    # The README's `kineflow answer --model checkpoints/fudoki-shapes "Write a haiku"` failed:
    # 64 default answer slots counted against the shipped model's 64-token text budget.
    result = fudoki.generate_text("Write a haiku", steps=2, seed=0)
    assert len(result.texts) == 1 and result.trajectory is None
    tok, budget = fudoki.tokenizer, fudoki.config.text_budget
    layout = text_layout(tok, ["Write a haiku", "hi"], None, budget)
    slots = layout.region.sum(1).tolist()
    # Each row gets what its own prompt leaves of the budget (at most 64).
    assert slots == [min(DEFAULT_TEXT_TOKENS, budget - n) for n in layout.prompt_lengths]
    assert layout.attention_mask.sum(1).tolist() == [budget, budget]
    roomy = text_layout(tok, ["Write a haiku"], None, 500)
    assert roomy.region.sum().item() == DEFAULT_TEXT_TOKENS  # capped when the budget is large


def test_text_reply_beyond_the_budget_names_the_knob(fudoki) -> None:
    with pytest.raises(ValueError) as caught:
        fudoki.generate_text("Write a haiku", max_tokens=64)
    message = str(caught.value)
    assert "prompt 0 needs" in message and "text budget" in message
    assert "max_tokens= / --answer-tokens" in message and "shorten the prompt" in message


# -- point 4: trajectories -----------------------------------------------------------------------
def test_trajectory_is_filled_only_when_asked(fudoki) -> None:
    plain = fudoki.answer(PICTURE, "how many?", steps=2, seed=0)
    assert plain.trajectory is None
    traced = fudoki.answer(PICTURE, "how many?", steps=2, seed=0, return_trajectory=True)
    assert len(traced.trajectory[0]) == 3  # steps + 1


def test_unifluid_answer_refuses_a_trajectory(unifluid) -> None:
    with pytest.raises(ValueError, match="not supported by UniFluid models"):
        unifluid.answer(PICTURE, "how many?", return_trajectory=True)


# -- point 7: progress ---------------------------------------------------------------------------
def test_unifluid_sampling_shows_progress_when_asked(unifluid, capsys) -> None:
    unifluid.text_to_image("a red circle", seed=0, progress=True)
    shown = capsys.readouterr().err
    assert "UniFluid tokens" in shown and "/16 [" in shown  # a bar over the 16 tokens
    unifluid.edit(PICTURE, "make it red.", seed=0, progress=True)
    assert "UniFluid tokens" in capsys.readouterr().err
    unifluid.text_to_image("a red circle", seed=0)
    assert capsys.readouterr().err == ""


# -- point 20: texts and devices -----------------------------------------------------------------
@pytest.mark.parametrize(
    ("texts", "error", "match"),
    [
        (b"a red circle", TypeError, "prompts must be a str or a list of str, got bytes"),
        ([b"a red circle"], TypeError, "prompt 0 must be a str, got bytes"),
        (["ok", None], TypeError, "prompt 1 must be a str, got NoneType"),
        (["a red \udcff circle"], ValueError, r"prompt 0 is not valid UTF-8 \(the byte 0xff\)"),
        ([], ValueError, "no prompts given"),
    ],
)
def test_text_to_image_refuses_texts_that_are_not_text(
    fudoki, unifluid, texts, error, match
) -> None:
    for pipe in (fudoki, unifluid):
        with pytest.raises(error, match=match):
            pipe.text_to_image(texts)


def test_other_tasks_refuse_non_utf8_text(fudoki, unifluid) -> None:
    bad = "make it \udce9 red."  # argv byte 0xe9 (Latin-1 'é') on a UTF-8 system
    with pytest.raises(ValueError, match="instruction 0 is not valid UTF-8"):
        unifluid.edit(PICTURE, bad)
    for pipe in (fudoki, unifluid):
        with pytest.raises(ValueError, match="question 0 is not valid UTF-8"):
            pipe.answer(PICTURE, bad)
    with pytest.raises(ValueError, match="prompt 0 is not valid UTF-8"):
        fudoki.generate_text(bad)
    with pytest.raises(TypeError, match="questions must be a str or a list of str"):
        unifluid.answer(PICTURE, b"how many?")
    assert check_texts(" spaced ", "prompt") == ["spaced"]


@pytest.mark.parametrize("device", ["potato", "cuda:x", "", 3.5])
def test_bad_device_names_the_accepted_forms(fudoki, unifluid, device) -> None:
    for pipe in (fudoki, unifluid):
        with pytest.raises(ValueError, match=r"is not a device: use cpu, cuda, cuda:N"):
            pipe.to(device)
    assert check_device("cpu") == torch.device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_missing_cuda_is_named(unifluid) -> None:
    with pytest.raises(ValueError, match="no CUDA device"):
        unifluid.to("cuda:1")
    with pytest.raises(ValueError, match="no CUDA device"):
        kineflow.load(SHIPPED / "unifluid-shapes", device="cuda")
