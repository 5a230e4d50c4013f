"""UniFluid network core: teacher-forced vs KV-cache generation, masks, orders, losses."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from kineflow.interop.gemma import llama_config_from_gemma2
from kineflow.models.siglip import SiglipConfig
from kineflow.models.unifluid import UnifluidConfig, UnifluidModel, generation_order
from kineflow.tokenizers.kl_vae import KLConfig

pytestmark = pytest.mark.usefixtures("one_thread")
V, L, C = 64, 16, 16


def tiny(order: str = "random") -> UnifluidModel:
    language = llama_config_from_gemma2({
        "vocab_size": V, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8,
        "query_pre_attn_scalar": 8, "sliding_window": 64, "max_position_embeddings": 128,
    })  # fmt: skip
    vae = KLConfig(channels=8, channel_mult=(1, 2), num_res_blocks=1, z_channels=4,
                   norm_groups=4, image_size=16)  # fmt: skip
    vision = SiglipConfig(image_size=16, patch_size=8, hidden_size=16, intermediate_size=32,
                          num_hidden_layers=1, num_attention_heads=2)  # fmt: skip
    head = {"width": 32, "depth": 1, "steps": 50, "sample_steps": 5, "draws": 2}
    torch.manual_seed(0)
    model = UnifluidModel(UnifluidConfig(language, vae, vision, head, order=order)).double()
    with torch.no_grad():  # non-trivial Gemma norms and a head that is not zero at init
        for name, p in model.named_parameters():
            if "norm" in name or "diffusion_head" in name:
                p.normal_(0, 0.3)
    return model.eval()


def prompts():
    ids = torch.randint(1, V, (2, 6), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[0, :2] = False  # left padding
    return ids, mask


def test_config_and_orders() -> None:
    model = tiny()
    assert model.config.num_image_tokens == L and model.config.vae.token_dim == C
    raster = generation_order(2, L, "raster")
    assert raster.tolist() == [list(range(L))] * 2
    rand = generation_order(3, L, "random", torch.Generator().manual_seed(0))
    assert (
        all(sorted(r) == list(range(L)) for r in rand.tolist())
        and rand[0].tolist() != rand[1].tolist()
    )
    with pytest.raises(ValueError, match="order must be one of"):
        UnifluidConfig(model.config.language, model.config.vae, order="zigzag")


def test_kv_cache_generation_sees_what_teacher_forcing_sees(monkeypatch) -> None:
    """The head's conditions during cached generation equal a teacher-forced pass over the
    generated tokens (a deterministic stand-in sampler records them)."""
    model = tiny()
    ids, mask = prompts()
    seen = []

    def fake_sample(z, *, z_uncond=None, cfg_scale=1.0, **kw):
        seen.append(z.clone())
        return torch.tanh(z[:, :C] * 3 + 0.1 * len(seen))

    monkeypatch.setattr(model.diffusion_head, "sample", fake_sample)
    order = generation_order(2, L, "random", torch.Generator().manual_seed(2))
    tokens = model.generate_tokens(ids, mask, order=order)
    z_tf = model.generation_hidden(ids, mask, tokens, order)
    torch.testing.assert_close(
        torch.stack(seen, 1), z_tf, rtol=1e-5, atol=1e-5
    )  # norms run in float32
    # Left padding changes nothing: row 0 alone, unpadded.
    seen.clear()
    alone = model.generate_tokens(ids[:1, 2:], mask[:1, 2:], order=order[:1])
    torch.testing.assert_close(alone, tokens[:1], rtol=1e-5, atol=1e-5)  # norms run in float32


def test_guided_generation_uses_both_halves(monkeypatch) -> None:
    model = tiny()
    ids, mask = prompts()
    weights = []

    def fake_sample(z, *, z_uncond=None, cfg_scale=1.0, **kw):
        assert z_uncond is not None and z_uncond.shape == z.shape
        weights.append(cfg_scale)
        return torch.tanh(z[:, :C] + cfg_scale * (z[:, :C] - z_uncond[:, :C]))

    monkeypatch.setattr(model.diffusion_head, "sample", fake_sample)
    model.generate_tokens(ids, mask, uncond=torch.zeros_like(ids), cfg_scale=4.0)
    assert weights[0] == pytest.approx(1 + 3 / L) and weights[-1] == pytest.approx(4.0)
    assert all(a < b for a, b in itertools.pairwise(weights))  # rises over the tokens


def test_next_position_embedding_reaches_boi() -> None:
    model = tiny()
    ids, mask = prompts()
    tokens = torch.randn(2, L, C, dtype=torch.float64)
    a = model.generation_hidden(ids, mask, tokens, generation_order(2, L, "raster"))
    flipped = generation_order(2, L, "raster").flip(1)
    b = model.generation_hidden(ids, mask, tokens, flipped)
    assert not torch.allclose(a[:, 0], b[:, 0])  # <boi> announces another first cell


def test_losses_and_gradients() -> None:
    model = tiny().train()
    ids, mask = prompts()
    tokens = torch.randn(2, L, C, dtype=torch.float64)
    order = generation_order(2, L, "random", torch.Generator().manual_seed(3))
    img = model.image_loss(ids, mask, tokens, order, torch.Generator().manual_seed(0))
    assert img.shape == (2,) and torch.isfinite(img).all()
    img.mean().backward()
    assert model.pos_next.grad.abs().sum() > 0 and model.image_in.weight.grad.abs().sum() > 0
    # Text: the per-sample mean CE of shifted logits at the target slots.
    hidden = torch.randn(2, 5, 32, dtype=torch.float64)
    targets = torch.randint(0, V, (2, 5))
    slots = torch.zeros(2, 5, dtype=torch.bool)
    slots[:, 3:] = True
    got = model.text_loss(hidden, targets, slots)
    want = torch.stack([F.cross_entropy(model.text_logits(hidden[b, 2:4]), targets[b, 3:5])
                        for b in range(2)])  # fmt: skip
    torch.testing.assert_close(got, want)


def test_understanding_prefix_is_bidirectional_and_answer_causal() -> None:
    model = tiny()
    P = model.config.vision.num_patches
    ids = torch.randint(1, V, (1, P + 6), generator=torch.Generator().manual_seed(4))
    image_mask = torch.zeros_like(ids, dtype=torch.bool)
    image_mask[0, 1 : 1 + P] = True
    features = model.encode_images(torch.randn(1, 3, 16, 16, dtype=torch.float64))
    attn = torch.ones_like(ids, dtype=torch.bool)
    prefix = torch.tensor([P + 4])  # BOS, image, 3 question tokens; then 2 answer tokens

    def run(x):
        return model.understanding_hidden(x, attn, image_mask, features, prefix)

    base = run(ids)
    later_question = ids.clone()
    later_question[0, P + 3] = (ids[0, P + 3] + 1) % V
    assert not torch.allclose(run(later_question)[0, 1], base[0, 1])  # the prefix sees ahead
    answer = ids.clone()
    answer[0, -1] = (ids[0, -1] + 1) % V
    torch.testing.assert_close(run(answer)[0, :-1], base[0, :-1])  # nothing sees the answer


def sequence_logprob(model, embeds, prefix, tokens) -> float:
    """log p(tokens | prompt) by one prefix-LM forward over prompt + tokens."""
    ids = torch.tensor([tokens])
    full = torch.cat([embeds, model.backbone.embed(ids)], dim=1)
    mask = torch.ones(full.shape[:2], dtype=torch.bool)
    hidden = model.backbone(inputs_embeds=full, attention_mask=mask, mask="prefix",
                            prefix_lengths=prefix)  # fmt: skip
    N = embeds.shape[1]
    logp = torch.log_softmax(model.text_logits(hidden[0, N - 1 : -1]).double(), -1)
    return float(logp[torch.arange(len(tokens)), ids[0]].sum().detach())


def test_text_generation_greedy_and_beam() -> None:
    model = tiny()
    ids = torch.randint(1, V, (2, 7), generator=torch.Generator().manual_seed(5))
    embeds = model.backbone.embed(ids)
    mask = torch.ones(2, 7, dtype=torch.bool)
    prefix = torch.tensor([7, 7])
    eos = 3
    greedy = model.generate_text(embeds, mask, prefix, max_tokens=6, eos_id=eos)
    beam = model.generate_text(embeds, mask, prefix, max_tokens=6, eos_id=eos, beams=4)
    for b in range(2):
        g, k = greedy[b], beam[b]
        # Greedy: every token is the argmax after the previous ones (one full forward).
        full = (
            torch.cat([embeds[b : b + 1], model.backbone.embed(torch.tensor([g]))], 1)
            if g
            else embeds[b : b + 1]
        )
        real = torch.ones(full.shape[:2], dtype=torch.bool)
        hidden = model.backbone(inputs_embeds=full, attention_mask=real, mask="prefix",
                                prefix_lengths=prefix[b : b + 1])  # fmt: skip
        argmax = model.text_logits(hidden[0, 6:]).argmax(-1).tolist()
        assert argmax[: len(g)] == g
        # Beam search finds a sequence at least as likely as greedy's.
        with_eos = [[*s, eos] if len(s) < 6 else s for s in (g, k)]
        assert sequence_logprob(model, embeds[b : b + 1], prefix[b : b + 1], with_eos[1]) >= (
            sequence_logprob(model, embeds[b : b + 1], prefix[b : b + 1], with_eos[0]) - 1e-9
        )
    assert model.generate_text(embeds, mask, prefix, max_tokens=6, eos_id=eos, beams=1) == greedy


def test_editing_prompt_carries_the_source_tokens(monkeypatch) -> None:
    """An editing prompt (the source picture's own tokens + instruction) generates like
    teacher forcing sees it; the source slots hold ``W_in x_i + P_in[i]`` in grid order, and a
    source of the wrong latent size is refused by name."""
    model = tiny()
    with torch.no_grad():  # W_src starts at zero: make the announced source cells count
        model.source_in.weight.normal_(0, 0.3)
    ids = torch.randint(1, V, (1, L + 5), generator=torch.Generator().manual_seed(6))
    image_mask = torch.zeros_like(ids, dtype=torch.bool)
    image_mask[0, 1 : 1 + L] = True
    source = torch.randn(1, L, C, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    prompt = model.edit_embeds(ids, image_mask, source)
    expected = model.image_in(source[0]) + model.pos_in
    torch.testing.assert_close(prompt[0, 1 : 1 + L], expected)
    torch.testing.assert_close(prompt[0, L + 1 :], model.backbone.embed(ids[:, L + 1 :])[0])
    mask = torch.ones_like(ids, dtype=torch.bool)
    seen = []

    def fake_sample(z, **kw):
        seen.append(z.clone())
        return torch.tanh(z[:, :C])

    monkeypatch.setattr(model.diffusion_head, "sample", fake_sample)
    order = generation_order(1, L, "random", torch.Generator().manual_seed(7))
    tokens = model.generate_tokens(prompt, mask, order=order, source=source)
    z_tf = model.generation_hidden(prompt, mask, tokens, order, source)
    torch.testing.assert_close(torch.stack(seen, 1), z_tf, rtol=1e-5, atol=1e-5)
    # Each input announces the next cell's source token: e_j − (text-to-image input) is
    # W_src x^src_π(j+1) (and at <boi>, of π(0)).
    plain = model.generation_hidden(prompt, mask, tokens, order)
    assert not torch.allclose(plain, z_tf)
    announced = model.next_cell(order, source) - model.next_cell(order)
    torch.testing.assert_close(announced[0], model.source_in(source[0, order[0]]))
    seen.clear()  # another source picture changes the result
    again = model.generate_tokens(model.edit_embeds(ids, image_mask, source + 1.0), mask,
                                  order=order, source=source + 1.0)  # fmt: skip
    assert not torch.allclose(again, tokens)
    with pytest.raises(ValueError, match=r"source image tokens must be \[B, 16, 16\].*16 px"):
        model.edit_embeds(ids, image_mask, source[:, :8])
    with pytest.raises(ValueError, match="image_mask marks 16 positions"):
        model.edit_embeds(ids, image_mask, torch.cat([source, source]))


def test_edit_features_fill_the_first_placeholders() -> None:
    """With ``edit_features`` an editing prompt holds P + L picture positions: the source's
    understanding features (as given) in the first P of each row, then its latent tokens
    ``W_in x_i + P_in[i]``; the text keeps its embeddings. Features missing or unasked for,
    and the option without a tower, are refused by name."""
    import dataclasses

    base = tiny()
    model = UnifluidModel(dataclasses.replace(base.config, edit_features=True)).double()
    model.load_state_dict(base.state_dict())
    c = model.config
    P = c.vision.num_patches
    assert c.edit_placeholders == P + L and base.config.edit_placeholders == L
    assert UnifluidConfig(**{**c.to_dict(), "vae": c.vae}).edit_features  # round trip
    ids = torch.randint(1, V, (2, P + L + 4), generator=torch.Generator().manual_seed(2))
    image_mask = torch.zeros_like(ids, dtype=torch.bool)
    image_mask[0, 1 : 1 + P + L] = True
    image_mask[1, 3 : 3 + P + L] = True  # rows may place the picture differently
    g = torch.Generator().manual_seed(3)
    source = torch.randn(2, L, C, dtype=torch.float64, generator=g)
    pixels = torch.randn(2, 3, 16, 16, dtype=torch.float64, generator=g)
    features = model.encode_images(pixels)
    prompt = model.edit_embeds(ids, image_mask, source, features)
    for b, at in ((0, 1), (1, 3)):
        torch.testing.assert_close(prompt[b, at : at + P], features[b])
        torch.testing.assert_close(prompt[b, at + P : at + P + L],
                                   model.image_in(source[b]) + model.pos_in)  # fmt: skip
        text = ~image_mask[b]
        torch.testing.assert_close(prompt[b, text], model.backbone.embed(ids[b : b + 1])[0, text])
    with pytest.raises(ValueError, match=r"config\.edit_features: pass the source.s features"):
        model.edit_embeds(ids, image_mask, source)
    with pytest.raises(ValueError, match=r"features given, but config\.edit_features is off"):
        base.edit_embeds(ids[:, P:], image_mask[:, P:], source, features)
    with pytest.raises(ValueError, match="edit_features needs the understanding tower"):
        UnifluidConfig(c.language, c.vae, None, c.head, edit_features=True)
