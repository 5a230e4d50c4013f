"""FudokiPipeline: Janus layouts, exact windowed logits, CFG, batching, sampling outputs."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from janus_fixture import random_model, tiny_config, tiny_pipeline
from PIL import Image

from kineflow.flow import classifier_free_guidance
from kineflow.inputs.images import preprocess_understanding, resize_pad
from kineflow.inputs.layout import text_to_image_layout, understanding_layout
from kineflow.pipelines import FudokiPipeline, FudokiPipelineConfig
from kineflow.tokenizers.text import BOI, EOI, IMAGE

P, L = 4, 16  # understanding placeholders, generation image tokens of the tiny model


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pipe() -> FudokiPipeline:
    return tiny_pipeline()


# -- layouts ------------------------------------------------------------------------------------
def test_text_to_image_layout_is_the_official_one(pipe: FudokiPipeline) -> None:
    tok = pipe.tokenizer
    prompts = ["a red circle", "two green triangles left of a yellow circle"]
    lay = text_to_image_layout(tok, prompts, L, text_budget=48)
    for b, prompt in enumerate(prompts):
        # FUDOKI's script: encode(template + "<begin_of_image>") + placeholders + <eoi>.
        text = f"User: {prompt}\n\nAssistant:{BOI}"
        want = tok.encode(text, bos=True) + [tok.image_id] * L + [tok.eoi_id]
        row = lay.input_ids[b][lay.attention_mask[b]].tolist()
        assert row == want
        # Blanked for CFG: after BOS through "Assistant:" (FUDOKI's text_token_mask).
        span = lay.prompt_span[b][lay.attention_mask[b]]
        n_text = len(tok.encode(f"User: {prompt}\n\nAssistant:", bos=True))
        assert span.nonzero().flatten().tolist() == list(range(1, n_text))
    # Left padding puts both image spans in the same columns: the window.
    lo, hi = lay.window
    assert hi == lay.input_ids.shape[1] - 1 and hi - lo == L
    assert lay.region[:, lo:hi].all() and lay.region.sum() == 2 * L
    assert torch.equal(lay.image_mask, lay.region)
    assert not lay.attention_mask[0, 0] and lay.attention_mask[1].all()


def test_understanding_layout_is_the_official_one(pipe: FudokiPipeline) -> None:
    tok = pipe.tokenizer
    system = "You help."
    lay = understanding_layout(tok, ["how many?", "is there a blue circle?"], P, 48, None, system)
    # Official budget: every row has text_budget + P positions, so no padding at all.
    assert lay.input_ids.shape == (2, 48 + P) and lay.attention_mask.all()
    text = f"{system}\n\nUser: {BOI}{IMAGE * P}{EOI}how many?\n\nAssistant:"
    prompt = tok.encode(text, bos=True)
    assert lay.input_ids[0, : len(prompt)].tolist() == prompt
    assert lay.region[0].nonzero().flatten().tolist() == list(range(len(prompt), 48 + P))
    assert lay.understanding_mask.sum(1).tolist() == [P, P]
    # A fixed number of answer slots: the rows are left-padded to align them.
    lay = understanding_layout(tok, ["how many?", "is there a blue circle?"], P, 48, 5, system)
    lo, hi = lay.window
    assert hi - lo == 5 and lay.region[:, lo:hi].all() and lay.region.sum() == 10


@pytest.mark.parametrize(
    ("prompts", "error", "match"),
    [
        ([""], ValueError, "prompt 0 is empty"),
        (["ok", "   "], ValueError, "prompt 1 is empty"),
        (["a " * 60], ValueError, "prompt 0 needs .* text budget"),
        ([f"draw {IMAGE} here"], ValueError, "special token"),
        ([], ValueError, "no prompts"),
        ("a red circle", TypeError, "list of strings"),
        ([3], TypeError, "prompt 0 must be a str"),
    ],
)
def test_bad_prompts(pipe: FudokiPipeline, prompts, error, match) -> None:
    with pytest.raises(error, match=match):
        text_to_image_layout(pipe.tokenizer, prompts, L, text_budget=48)


def test_understanding_preprocessing_matches_resize_pad() -> None:
    # 20 x 10 picture -> 16 x 8 (bilinear), pasted at row (16 - 8) // 2 = 4 on grey 127.
    picture = Image.new("RGB", (20, 10), (255, 0, 0))
    out = resize_pad(picture, 16)
    assert out.size == (16, 16)
    assert out.getpixel((0, 0)) == (127, 127, 127) and out.getpixel((8, 8)) == (255, 0, 0)
    assert out.getpixel((8, 3)) == (127, 127, 127) and out.getpixel((8, 12)) == (127, 127, 127)
    x = preprocess_understanding([picture], 16)
    assert x.shape == (1, 3, 16, 16)
    torch.testing.assert_close(x[0, :, 8, 8], torch.tensor([1.0, -1.0, -1.0]))
    torch.testing.assert_close(x[0, :, 0, 0], torch.full((3,), 127 / 127.5 - 1))


# -- the model function the solver sees ---------------------------------------------------------
def full_shifted_logits(pipe, lay, ids, head: str) -> torch.Tensor:
    """Reference: the whole sequence through the model, shifted logits read at the region."""
    hidden = pipe.model(ids, image_mask=lay.image_mask, attention_mask=lay.attention_mask)
    read = pipe.model.image_logits if head == "image" else pipe.model.text_logits
    return read(hidden)


def test_windowed_guided_logits_are_exact(pipe: FudokiPipeline) -> None:
    lay = text_to_image_layout(pipe.tokenizer, ["a red circle", "two blue squares"], L, 48)
    lo, hi = lay.window
    x = torch.randint(0, 64, (2, hi - lo), generator=torch.Generator().manual_seed(0))
    fn, _ = pipe._model_fn(lay, "image", cfg_scale=5.0)
    with torch.no_grad():
        got = fn(x, torch.full((2,), 0.3))
        ids = lay.input_ids.clone()
        ids[:, lo:hi] = x
        cond = full_shifted_logits(pipe, lay, ids, "image")[:, lo:hi]
        uncond_ids = ids.masked_fill(lay.prompt_span, pipe.tokenizer.pad_id)
        uncond = full_shifted_logits(pipe, lay, uncond_ids, "image")[:, lo:hi]
    torch.testing.assert_close(got, classifier_free_guidance(cond, uncond, 5.0))


def test_batch_rows_equal_single_prompt_runs(pipe: FudokiPipeline) -> None:
    """Left padding with position ids counting real tokens: a row's logits do not depend on
    the other prompts of the batch."""
    prompts = ["a red circle", "two green triangles left of a yellow circle"]
    x = torch.randint(0, 64, (2, L), generator=torch.Generator().manual_seed(1))
    t = torch.full((2,), 0.5)
    batch_fn, _ = pipe._model_fn(text_to_image_layout(pipe.tokenizer, prompts, L, 48), "image", 5.0)
    with torch.no_grad():
        together = batch_fn(x, t)
        for b, prompt in enumerate(prompts):
            lay = text_to_image_layout(pipe.tokenizer, [prompt], L, 48)
            alone = pipe._model_fn(lay, "image", 5.0)[0](x[b : b + 1], t[:1])
            torch.testing.assert_close(together[b : b + 1], alone, atol=2e-5, rtol=1e-4)


# -- sampling -------------------------------------------------------------------------------------
def test_text_to_image_seeded_batch_and_trajectory(pipe: FudokiPipeline, tmp_path: Path) -> None:
    prompts = ["a red circle", "two blue squares above a green triangle"]
    a = pipe.text_to_image(prompts, steps=4, seed=3, return_trajectory=True)
    b = pipe.text_to_image(prompts, steps=4, seed=3)
    c = pipe.text_to_image(prompts, steps=4, seed=4)
    assert torch.equal(a.codes, b.codes) and not torch.equal(a.codes, c.codes)
    assert a.codes.shape == (2, 4, 4) and len(a.images) == 2 and a.images[0].size == (8, 8)
    assert a.timings["nfe"] == 4 and a.timings["model_s"] > 0
    # The trajectory: noise first, the returned picture last.
    assert a.states.shape == (5, 2, L) and len(a.trajectory[1]) == 5
    assert torch.equal(a.states[-1].reshape(2, 4, 4), a.codes)
    assert a.trajectory[1][-1].tobytes() == a.images[1].tobytes()
    files = a.save(tmp_path, scale=4)
    gif = Image.open(tmp_path / "sample_0_refine.gif")
    assert gif.n_frames == 5 and gif.size == (32, 32)
    assert (tmp_path / "sample_1_refine.png").is_file() and len(files) == 6


def test_rigged_denoiser_is_reproduced_exactly(pipe: FudokiPipeline, monkeypatch) -> None:
    """With a denoiser certain of x_1 the sampler must end exactly on it, and CFG must not
    move a target both branches agree on."""
    K = 64
    target = torch.arange(L) * 3 % K

    def image_logits(hidden, shift=True):
        W = hidden.shape[1]  # the window: the L image columns
        logits = torch.full((*hidden.shape[:2], K), -30.0)
        logits[:, torch.arange(W), target[:W]] = 30.0
        return logits

    monkeypatch.setattr(pipe.model, "image_logits", image_logits)
    out = pipe.text_to_image(["a red circle", "two squares"], steps=3, seed=0)
    assert torch.equal(out.codes.reshape(2, L), target.expand(2, L))


def test_answer_cut_at_eos_and_trajectory(pipe: FudokiPipeline, monkeypatch) -> None:
    tok = pipe.tokenizer
    answer = tok.encode("three")
    V = pipe.model.config.language.vocab_size
    A = 6
    wanted = answer + [tok.eos_id] * (A - len(answer))

    def text_logits(hidden, shift=True):
        logits = torch.zeros(*hidden.shape[:2], V)
        W = hidden.shape[1]
        logits[:, torch.arange(W), torch.tensor(wanted[-W:])] = 10.0
        return logits

    monkeypatch.setattr(pipe.model, "text_logits", text_logits)
    red = Image.new("RGB", (30, 20), (255, 0, 0))
    out = pipe.answer([red, red], ["how many?", "how many shapes are there?"], answer_tokens=A,
                      steps=3, seed=0, return_trajectory=True)  # fmt: skip
    assert out.texts == ["three", "three"] and out.ids == [answer, answer]
    assert len(out.trajectory[0]) == 4 and out.trajectory[0][-1] == "three"
    assert out.timings["nfe"] == 3


def test_answer_and_text_generation_run(pipe: FudokiPipeline, tmp_path: Path) -> None:
    picture = tmp_path / "p.png"
    Image.new("RGB", (40, 25), (0, 0, 255)).save(picture)
    out = pipe.answer(picture, "what colour?", steps=2, seed=1)
    assert len(out.texts) == 1 and isinstance(out.texts[0], str)
    again = pipe.answer(str(picture), "what colour?", steps=2, seed=1)
    assert again.ids == out.ids
    text = pipe.generate_text(["a red", "how many"], chat=False, max_tokens=5, steps=2, seed=0)
    assert len(text.texts) == 2 and all(len(ids) <= 5 for ids in text.ids)
    chat = pipe.generate_text("hello", max_tokens=4, steps=2, seed=0, temperature=1.0, top_k=None)
    assert len(chat.ids[0]) <= 4


def test_answer_bad_inputs(pipe: FudokiPipeline, tmp_path: Path) -> None:
    not_png = tmp_path / "x.png"
    not_png.write_text("not a picture")
    with pytest.raises(ValueError, match=r"cannot read image .*x.png"):
        pipe.answer(not_png, "what?")
    with pytest.raises(ValueError, match="image file not found"):
        pipe.answer(tmp_path / "missing.png", "what?")
    red = Image.new("RGB", (8, 8))
    with pytest.raises(ValueError, match=r"2 image.*1 question"):
        pipe.answer([red, red], ["what?"])
    with pytest.raises(ValueError, match="question 0 is empty"):
        pipe.answer(red, "  ")
    with pytest.raises(ValueError, match="seed or generator"):
        pipe.answer(red, "what?", seed=1, generator=torch.Generator())
    with pytest.raises(ValueError, match="cfg_scale must be >= 0"):
        pipe.text_to_image(["x"], cfg_scale=-1)


def bfloat16_twins(pipe: FudokiPipeline) -> tuple[FudokiPipeline, FudokiPipeline]:
    """A bfloat16 pipeline and a float32 one with the very same (bf16-representable) weights,
    so the two differ only in the precision of the activations."""
    tok = pipe.tokenizer
    half_model = random_model(tiny_config(tok.vocab_size + 10)).to(torch.bfloat16)
    config = FudokiPipelineConfig(text_budget=48, steps=2, system_prompt="")
    twins = []
    for model in (half_model, copy.deepcopy(half_model).float()):
        text_table = model.language_model.model.embed_tokens.weight
        image_table = model.gen_vision_model.quantize.embedding.weight
        twins.append(FudokiPipeline(model, tok, text_table, image_table, config))
    return twins[0], twins[1]


def test_bfloat16_model_computes_what_float32_computes(pipe: FudokiPipeline) -> None:
    """The solver's logits (generation with CFG, and understanding with bf16 picture
    features) and the decoded pictures of a bf16 model equal those of the same weights in
    float32, up to bf16 rounding (measured: 0.07 of logits spread over ±7, 0.02, 3 levels)."""
    half, full = bfloat16_twins(pipe)
    assert half.dtype == torch.bfloat16 and full.dtype == torch.float32
    g = torch.Generator().manual_seed(0)
    lay = text_to_image_layout(pipe.tokenizer, ["a red circle", "two blue squares"], L, 48)
    x, t = torch.randint(0, 64, (2, L), generator=g), torch.full((2,), 0.4)
    with torch.no_grad():
        got = half._model_fn(lay, "image", 5.0)[0](x, t)
        want = full._model_fn(lay, "image", 5.0)[0](x, t)
    assert got.dtype == torch.float32 and want.abs().max() > 2
    torch.testing.assert_close(got, want, atol=0.25, rtol=0.02)

    vision = full.model.config.vision
    c = full.config
    pictures = [Image.new("RGB", (16, 16), (255, 0, 0)), Image.new("RGB", (12, 16), (0, 0, 255))]
    pixels = preprocess_understanding(
        pictures, vision.image_size, c.image_mean, c.image_std, c.background
    )
    lay = understanding_layout(pipe.tokenizer, ["what?", "how many?"], P, 48, 4, "")
    x = torch.randint(0, 100, (2, lay.window[1] - lay.window[0]), generator=g)
    with torch.no_grad():
        features = half.model.encode_images(pixels.to(torch.bfloat16))
        got = half._model_fn(lay, "text", 0.0, features)[0](x, t)
        want = full._model_fn(lay, "text", 0.0, full.model.encode_images(pixels))[0](x, t)
    assert want.abs().max() > 1
    torch.testing.assert_close(got, want, atol=0.1, rtol=0.02)

    codes = torch.randint(0, 64, (2, 4, 4), generator=g)
    for a, b in zip(half._decode_images(codes), full._decode_images(codes), strict=True):
        a, b = np.asarray(a).astype(int), np.asarray(b).astype(int)
        assert b.std() > 20 and np.abs(a - b).max() <= 8


def test_bfloat16_model_samples_and_answers(pipe: FudokiPipeline, monkeypatch) -> None:
    """bf16 heads certain of a target: the picture is exactly the target's codes, decoded as
    the float32 twin decodes them, and the answer is exactly the rigged one."""
    half, full = bfloat16_twins(pipe)
    K, V = 64, half.model.config.language.vocab_size
    target = torch.arange(L) * 5 % K
    answer = pipe.tokenizer.encode("three")
    wanted = torch.tensor(answer + [pipe.tokenizer.eos_id] * (6 - len(answer)))

    def certain(hidden, columns, size):
        logits = torch.full((*hidden.shape[:2], size), -30.0, dtype=torch.bfloat16)
        W = hidden.shape[1]
        logits[:, torch.arange(W), columns[-W:]] = 30.0
        return logits

    monkeypatch.setattr(half.model, "image_logits", lambda h, shift=True: certain(h, target, K))
    monkeypatch.setattr(half.model, "text_logits", lambda h, shift=True: certain(h, wanted, V))
    out = half.text_to_image(["a red circle"], seed=0)
    assert torch.equal(out.codes.reshape(L), target)
    reference = np.asarray(full._decode_images(out.codes)[0]).astype(int)
    assert np.abs(np.asarray(out.images[0]).astype(int) - reference).max() <= 8
    replies = half.answer(Image.new("RGB", (8, 8)), "how many?", answer_tokens=6, seed=0)
    assert replies.texts == ["three"] and replies.ids == [answer]


def test_vocab_and_table_checks(pipe: FudokiPipeline) -> None:
    tok = pipe.tokenizer
    small = random_model(tiny_config(tok.vocab_size - 1))
    with pytest.raises(ValueError, match="does not belong to this model"):
        FudokiPipeline(small, tok, torch.randn(tok.vocab_size - 1, 4), torch.randn(64, 4))
    model = random_model(tiny_config(tok.vocab_size))
    with pytest.raises(ValueError, match=r"image metric table has shape \(63, 4\)"):
        FudokiPipeline(model, tok, torch.randn(tok.vocab_size, 4), torch.randn(63, 4))


def test_masked_path_trajectory_shows_masked_cells_grey() -> None:
    masked = tiny_pipeline("masked")
    out = masked.text_to_image(["a red circle"], seed=0, return_trajectory=True)
    K = masked.model.config.gen_vision.codebook_size
    assert (out.states[0] == K).all() and (out.states[-1] < K).all()
    first = np.asarray(out.trajectory[0][0])
    assert np.abs(first.astype(int) - 127).max() <= 1  # every cell still masked: all grey
    assert (out.codes < K).all()


def test_a_float64_model_samples_in_float64_end_to_end(pipe: FudokiPipeline, monkeypatch) -> None:
    """A float64 pipeline's paths, logits and draws stay float64 (no float32 rounding a thread
    count could move a draw across), and it draws the same picture on one and two threads;
    float32 and bfloat16 pipelines keep float32 tables."""
    import kineflow.flow.sampling
    import kineflow.flow.solver

    wide = copy.deepcopy(pipe).to(dtype=torch.float64)
    tables = [wide.text_path.metric.unit, wide.image_path.metric.unit]
    assert wide.dtype == torch.float64 and all(t.dtype == torch.float64 for t in tables)
    seen: set[torch.dtype] = set()
    draw = kineflow.flow.sampling.categorical

    def spy(weights, generator=None, u=None):
        seen.add(weights.dtype)
        return draw(weights, generator, u)

    monkeypatch.setattr(kineflow.flow.sampling, "categorical", spy)
    monkeypatch.setattr(kineflow.flow.solver, "categorical", spy)
    codes = {}
    for threads in (1, 2):
        torch.set_num_threads(threads)
        codes[threads] = wide.text_to_image(["a red circle"], steps=4, seed=3).codes
    torch.set_num_threads(1)
    assert seen == {torch.float64} and torch.equal(codes[1], codes[2])
    narrow = copy.deepcopy(wide).to(dtype=torch.float32)
    assert narrow.image_path.metric.unit.dtype == torch.float32
    half, _ = bfloat16_twins(pipe)
    assert half.image_path.metric.unit.dtype == torch.float32
