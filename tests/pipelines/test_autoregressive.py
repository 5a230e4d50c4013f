"""AR baseline decoding: KV cache vs full re-runs vs one causal forward, EOS handling, pipeline."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from janus_fixture import tiny_pipeline
from PIL import Image

import kineflow.pipelines.fudoki as fudoki_module
from kineflow.flow import classifier_free_guidance
from kineflow.inputs.images import preprocess_understanding
from kineflow.inputs.layout import text_to_image_layout, understanding_layout
from kineflow.pipelines import FudokiPipeline
from kineflow.pipelines.autoregressive import decode_autoregressive

P, L = 4, 16  # understanding placeholders, generation image tokens of the tiny model
PROMPTS = ["a red circle", "two green triangles left of a yellow circle", "a blue square"]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pipe() -> FudokiPipeline:
    return tiny_pipeline("ar", torch.float64)


def image_layout(pipe):
    return text_to_image_layout(pipe.tokenizer, PROMPTS, L, text_budget=48)


def vqa_inputs(pipe, answer_tokens=6):
    pictures = [Image.new("RGB", (16, 16), c) for c in ("red", "blue", "green")]
    lay = understanding_layout(
        pipe.tokenizer, ["what colour?", "how many shapes are there?", "is it round?"],
        P, 48, answer_tokens, "",
    )  # fmt: skip
    pixels = preprocess_understanding(pictures, pipe.model.config.vision.image_size)
    return lay, pipe.model.encode_images(pixels.double())


@pytest.mark.parametrize("cfg", [0.0, 3.0])
def test_kv_cache_equals_full_reruns(pipe, cfg) -> None:
    lay = image_layout(pipe)

    def run(cache: bool) -> dict:
        g = torch.Generator().manual_seed(7)
        return decode_autoregressive(
            pipe.model, lay, "image", pad_id=pipe.tokenizer.pad_id, cfg_scale=cfg, generator=g,
            use_cache=cache,
        )  # fmt: skip

    runs = [run(True), run(False)]
    assert torch.equal(runs[0]["samples"], runs[1]["samples"])
    assert runs[0]["nfe"] == runs[1]["nfe"] == L  # the prefix pass draws the first token


def test_each_token_is_the_argmax_of_one_causal_forward(pipe) -> None:
    """Greedy guided decoding, checked against a single causal forward over the result."""
    lay, w = image_layout(pipe), 2.0
    run = decode_autoregressive(
        pipe.model, lay, "image", pad_id=pipe.tokenizer.pad_id, cfg_scale=w, top_k=1
    )
    lo, hi = lay.window
    ids = lay.input_ids.clone()
    ids[:, lo:hi] = run["samples"]
    uncond = ids.masked_fill(lay.prompt_span, pipe.tokenizer.pad_id)
    logits = []
    for x in (ids, uncond):
        hidden = pipe.model(
            x, image_mask=lay.image_mask, attention_mask=lay.attention_mask, mask="causal"
        )
        logits.append(pipe.model.image_logits(hidden)[:, lo:hi])
    assert torch.equal(classifier_free_guidance(*logits, w).argmax(-1), run["samples"])


def test_text_with_understanding_features_and_eos(pipe) -> None:
    lay, features = vqa_inputs(pipe)
    tok = pipe.tokenizer

    def run(cache: bool) -> dict:
        return decode_autoregressive(
            pipe.model, lay, "text", pad_id=tok.pad_id, features=features, stop_id=tok.eos_id,
            top_k=1, use_cache=cache,
        )  # fmt: skip

    runs = [run(True), run(False)]
    assert torch.equal(runs[0]["samples"], runs[1]["samples"])
    # Reference: one causal forward over the answer, greedy at each slot until EOS.
    lo, hi = lay.window
    ids = lay.input_ids.clone()
    ids[:, lo:hi] = runs[0]["samples"]
    hidden = pipe.model(
        ids, understanding_mask=lay.understanding_mask, understanding_features=features,
        attention_mask=lay.attention_mask, mask="causal",
    )  # fmt: skip
    greedy = pipe.model.text_logits(hidden)[:, lo:hi].argmax(-1)
    for b, row in enumerate(runs[0]["samples"].tolist()):
        n = row.index(tok.eos_id) + 1 if tok.eos_id in row else len(row)
        assert row[:n] == greedy[b, :n].tolist()
        assert all(t == tok.eos_id for t in row[n:])


def test_stops_once_every_row_has_emitted_eos(pipe) -> None:
    """A head rigged to always say EOS: one forward, every slot EOS."""
    lay, features = vqa_inputs(pipe, answer_tokens=8)
    tok = pipe.tokenizer

    def always_eos(module, inputs, logits):
        return logits.index_fill(-1, torch.tensor([tok.eos_id]), 1e4)

    hook = pipe.model.language_model.lm_head.register_forward_hook(always_eos)
    try:
        run = decode_autoregressive(
            pipe.model, lay, "text", pad_id=tok.pad_id, features=features, stop_id=tok.eos_id,
            top_k=1, return_trajectory=True,
        )  # fmt: skip
    finally:
        hook.remove()
    assert run["nfe"] == 1  # the prefix pass drew EOS for every row: nothing left to run
    lo, hi = lay.window
    samples = run["samples"]
    assert (samples[lay.region[:, lo:hi]] == tok.eos_id).all()
    assert run["states"].shape[1:] == samples.shape
    assert torch.equal(run["states"][-1], samples)


@torch.no_grad()
def causal_argmax(pipe, lay, head: str, samples, features=None, cfg: float = 0.0):
    """Greedy reference: the argmax at every window column of one causal forward over the
    prompt followed by ``samples`` (guided by ``cfg`` for images)."""
    lo, hi = lay.window
    ids = lay.input_ids.clone()
    ids[:, lo:hi] = samples
    rows = [ids, ids.masked_fill(lay.prompt_span, pipe.tokenizer.pad_id)] if cfg else [ids]
    read = pipe.model.image_logits if head == "image" else pipe.model.text_logits
    logits = []
    for x in rows:
        hidden = pipe.model(
            x, image_mask=lay.image_mask, understanding_mask=lay.understanding_mask,
            understanding_features=features, attention_mask=lay.attention_mask, mask="causal",
        )  # fmt: skip
        logits.append(read(hidden)[:, lo:hi])
    return (classifier_free_guidance(*logits, cfg) if cfg else logits[0]).argmax(-1)


def test_pipeline_ar_path(pipe, monkeypatch) -> None:
    """The pipeline's AR pictures and answers are the greedy decodes of its own layouts,
    checked against one causal forward; the pictures are the VQ decoder's of those codes."""
    calls = []
    real = fudoki_module.decode_autoregressive

    def spy(model, layout, head, **kw):
        calls.append((layout, kw.get("features")))
        return real(model, layout, head, **kw)

    monkeypatch.setattr(fudoki_module, "decode_autoregressive", spy)
    out = pipe.text_to_image(PROMPTS[:2], cfg_scale=2.0, top_k=1, return_trajectory=True)
    ((lay, _),) = calls
    codes = out.codes.reshape(2, L)
    assert torch.equal(causal_argmax(pipe, lay, "image", codes, cfg=2.0), codes)
    assert codes.unique().numel() > 2  # a real decode, not a constant
    with torch.no_grad():
        decoded = pipe.model.gen_vision_model.decode(out.codes)
    for picture, pixels in zip(out.images, decoded, strict=True):
        expected = ((pixels.float().clamp(-1, 1) + 1) * 127.5).round().permute(1, 2, 0)
        assert np.abs(np.asarray(picture).astype(float) - expected.numpy()).max() <= 1
    assert out.timings["nfe"] == L and out.timings["model_s"] > 0
    assert len(out.trajectory[0]) == L + 1  # empty canvas, then one frame per token
    assert out.trajectory[0][-1].tobytes() == out.images[0].tobytes()
    seeded = [pipe.text_to_image(PROMPTS[:2], cfg_scale=2.0, seed=s).codes for s in (3, 3, 4)]
    assert torch.equal(seeded[0], seeded[1]) and not torch.equal(seeded[0], seeded[2])

    answers = pipe.answer([Image.new("RGB", (20, 12), "red")], "what colour?", answer_tokens=4)
    lay, features = calls[-1]
    lo, hi = lay.window
    tok = pipe.tokenizer
    row = answers.ids[0] + [tok.eos_id] * (hi - lo - len(answers.ids[0]))
    greedy = causal_argmax(pipe, lay, "text", torch.tensor([row]), features)[0].tolist()
    n = len(answers.ids[0])
    assert answers.ids[0] == greedy[:n] and (n == hi - lo or greedy[n] == tok.eos_id)
    assert answers.texts == [tok.decode([i for i in answers.ids[0] if i < tok.vocab_size])]
    assert answers.timings["nfe"] <= 4


def test_bad_arguments(pipe) -> None:
    lay = image_layout(pipe)
    with pytest.raises(ValueError, match="head must be"):
        decode_autoregressive(pipe.model, lay, "audio", pad_id=0)
    with pytest.raises(ValueError, match="cfg_scale"):
        decode_autoregressive(pipe.model, lay, "image", pad_id=0, cfg_scale=-1.0)
