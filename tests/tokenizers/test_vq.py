"""VQ image tokenizer: parity with transformers' JanusVQVAE, the Janus checkpoint layout, the
quantizer's losses and statistics, bf16, save / load and input validation."""

from __future__ import annotations

import json
import re

import pytest
import torch
import torch.nn.functional as F
import yaml
from conftest import LargestAllocation

from kineflow.interop.janus import vq_model_from_janus
from kineflow.tokenizers.autoencoder import AutoencoderConfig
from kineflow.tokenizers.quantizer import CodebookUsage, VectorQuantizer, usage_stats
from kineflow.tokenizers.vq import VQConfig, VQModel

SIZE = 16  # tiny models: 3 levels, downsample 4, so 16 px -> 4 x 4 tokens


@pytest.fixture(autouse=True)
def one_thread():
    """The models here are tiny: a second intra-op thread buys nothing, and on a busy machine
    (parallel test runs) OpenMP's spinning threads slowed an Adam step from 40 ms to seconds."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_config(**overrides) -> VQConfig:
    kwargs = dict(
        autoencoder=AutoencoderConfig(
            channels=32, channel_mult=(1, 2, 2), num_res_blocks=1, z_channels=16
        ),
        codebook_size=64,
        codebook_dim=4,
        image_size=SIZE,
    )
    kwargs.update(overrides)
    return VQConfig(**kwargs)


def tiny_model(seed: int = 0, **overrides) -> VQModel:
    """A tiny VQModel whose every parameter (GroupNorm affines included) is randomised, so
    that a parity test would notice a swapped or misnamed tensor."""
    torch.manual_seed(seed)
    model = VQModel(tiny_config(**overrides))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model.eval()


def images(batch: int = 2, seed: int = 0, size: int = SIZE) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, size, size, generator=g) * 2 - 1


# -- parity with transformers ----------------------------------------------------------------


def to_transformers_key(key: str) -> str:
    """Our (LlamaGen / Janus) parameter name -> transformers' JanusVQVAE name."""

    def level(m: re.Match) -> str:
        side = "down" if m[1] == "encoder" else "up"
        part = {"res": "block", "attn": "attn"}.get(m[3], m[3])
        return f"{m[1]}.{side}.{m[2]}.{part}"

    key = re.sub(
        r"^(encoder|decoder)\.conv_blocks\.(\d+)\.(res|attn|downsample|upsample)", level, key
    )
    for i, name in enumerate(("block_1", "attn_1", "block_2")):
        key = re.sub(rf"^(encoder|decoder)\.mid\.{i}\.", rf"\1.mid.{name}.", key)
    return key


def transformers_twin(model: VQModel):
    transformers = pytest.importorskip("transformers")
    from transformers.models.janus.modeling_janus import JanusVQVAE

    ae, c = model.config.autoencoder, model.config
    config = transformers.JanusVQVAEConfig(
        base_channels=ae.channels,
        channel_multiplier=list(ae.channel_mult),
        num_res_blocks=ae.num_res_blocks,
        latent_channels=ae.z_channels,
        embed_dim=c.codebook_dim,
        num_embeddings=c.codebook_size,
        num_patches=model.tokens_shape()[0],
    )
    twin = JanusVQVAE(config).eval()
    state = {to_transformers_key(k): v for k, v in model.state_dict().items()}
    twin.load_state_dict(state, strict=True)  # strict: the name map is a bijection
    return twin


def test_matches_transformers_janus_vqvae_with_unit_codebook() -> None:
    model = tiny_model()
    with torch.no_grad():  # unit rows: transformers' unnormalised argmin then agrees
        w = model.quantize.embedding.weight
        w.copy_(F.normalize(w, dim=-1))
    twin = transformers_twin(model)
    x = images(batch=3)
    with torch.no_grad():
        ids = model.encode(x)
        ref = twin.encode(x)
        assert ids.shape == (3, 4, 4) and ids.dtype == torch.long
        assert torch.equal(ids.flatten(), ref.image_tokens)
        assert len(ids.unique()) > 5  # a non-trivial assignment
        torch.testing.assert_close(model.encoder(x), ref.last_hidden_state, atol=1e-5, rtol=0)
        recon = model.decode(ids)
        torch.testing.assert_close(recon, twin.decode(ids.view(3, -1)), atol=1e-5, rtol=0)
        torch.testing.assert_close(
            model.reconstruct(x), twin(x).decoded_pixel_values, atol=1e-5, rtol=0
        )
        out, ids_fwd, _ = model(x)
        assert torch.equal(ids_fwd, ids)
        torch.testing.assert_close(out, recon, atol=1e-5, rtol=0)  # ẑ + (ê − ẑ) ≈ ê


def test_non_unit_codebook_follows_the_official_normalised_lookup() -> None:
    """LlamaGen / Janus normalise latents and codes before the argmin; transformers'
    quantizer does not (it normalises only when decoding ids). Rows of very different norms
    tell the two apart: ours is the official rule, and both decode ids identically."""
    model = tiny_model()
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        w = model.quantize.embedding.weight
        w.mul_(torch.exp(2 * torch.randn(w.shape[0], 1, generator=g)))
    twin = transformers_twin(model)
    x = images(batch=4, seed=1)
    with torch.no_grad():
        ids = model.encode(x)
        z = F.normalize(model.latents(x).permute(0, 2, 3, 1).reshape(-1, 4), dim=-1)
        e = F.normalize(w, dim=-1)
        official = torch.cdist(z.double(), e.double()).argmin(-1)
        assert torch.equal(ids.flatten(), official)
        assert (twin.encode(x).image_tokens != official).any()
        torch.testing.assert_close(
            model.decode(ids), twin.decode(ids.view(4, -1)), atol=1e-5, rtol=0
        )


# -- the Janus layout ---------------------------------------------------------------------------


def janus_layout() -> dict[str, tuple[int, ...]]:
    """Janus's ``gen_vision_model.*`` tensors (minus the prefix and the ``codebook_used``
    buffer), written out from the LlamaGen VQ-16 description."""
    shapes: dict[str, tuple[int, ...]] = {}

    def conv(name: str, c_out: int, c_in: int, k: int) -> None:
        shapes[f"{name}.weight"], shapes[f"{name}.bias"] = (c_out, c_in, k, k), (c_out,)

    def norm(name: str, c: int) -> None:
        shapes[f"{name}.weight"], shapes[f"{name}.bias"] = (c,), (c,)

    def res(name: str, c_in: int, c_out: int) -> None:
        norm(f"{name}.norm1", c_in)
        conv(f"{name}.conv1", c_out, c_in, 3)
        norm(f"{name}.norm2", c_out)
        conv(f"{name}.conv2", c_out, c_out, 3)
        if c_in != c_out:
            conv(f"{name}.nin_shortcut", c_out, c_in, 1)

    def attn(name: str, c: int) -> None:
        norm(f"{name}.norm", c)
        for p in ("q", "k", "v", "proj_out"):
            conv(f"{name}.{p}", c, c, 1)

    def mid(name: str, c: int) -> None:
        res(f"{name}.0", c, c)
        attn(f"{name}.1", c)
        res(f"{name}.2", c, c)

    widths = [128, 128, 256, 256, 512]
    conv("encoder.conv_in", 128, 3, 3)
    c = 128
    for i, width in enumerate(widths):
        for j in range(2):
            res(f"encoder.conv_blocks.{i}.res.{j}", c, width)
            c = width
            if i == 4:
                attn(f"encoder.conv_blocks.{i}.attn.{j}", width)
        if i < 4:
            conv(f"encoder.conv_blocks.{i}.downsample.conv", width, width, 3)
    mid("encoder.mid", 512)
    norm("encoder.norm_out", 512)
    conv("encoder.conv_out", 256, 512, 3)

    conv("decoder.conv_in", 512, 256, 3)
    mid("decoder.mid", 512)
    c = 512
    for k, width in enumerate(reversed(widths)):
        for j in range(3):
            res(f"decoder.conv_blocks.{k}.res.{j}", c, width)
            c = width
            if k == 0:
                attn(f"decoder.conv_blocks.{k}.attn.{j}", width)
        if k < 4:
            conv(f"decoder.conv_blocks.{k}.upsample.conv", width, width, 3)
    norm("decoder.norm_out", 128)
    conv("decoder.conv_out", 3, 128, 3)

    shapes["quantize.embedding.weight"] = (16384, 8)
    conv("quant_conv", 8, 256, 1)
    conv("post_quant_conv", 256, 8, 1)
    return shapes


def test_janus_default_has_the_janus_state_dict_layout() -> None:
    with torch.device("meta"):  # no memory: 72M parameters are never allocated
        model = VQModel(VQConfig.janus())
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    expected = janus_layout()
    assert sorted(set(ours) ^ set(expected)) == []
    assert {k: s for k, s in ours.items() if expected[k] != s} == {}
    assert len(ours) == 343  # Janus ships these plus the quantize.codebook_used buffer
    assert ours["quantize.embedding.weight"] == (16384, 8)
    assert ours["quant_conv.weight"] == (8, 256, 1, 1)
    assert ours["encoder.conv_in.weight"] == (128, 3, 3, 3)
    assert ours["encoder.conv_blocks.4.attn.0.q.weight"] == (512, 512, 1, 1)
    assert ours["decoder.conv_blocks.0.res.2.conv1.weight"] == (512, 512, 3, 3)
    assert ours["decoder.conv_blocks.4.res.0.conv1.weight"] == (128, 128, 3, 3)
    assert sum(v.numel() for v in model.state_dict().values()) == 71_883_403
    assert model.downsample == 16 and model.codebook_size == 16384
    assert model.tokens_shape() == (24, 24) == model.tokens_shape(384)
    assert model.tokens_shape((256, 512)) == (16, 32)
    assert VQConfig() == VQConfig.janus()


def test_janus_config_encodes_384px_to_24x24_ids() -> None:
    """The real geometry end to end, with the width cut to 32 channels to stay fast."""
    cfg = VQConfig.janus()
    cfg.autoencoder = AutoencoderConfig(channels=32, channel_mult=(1, 1, 2, 2, 4), z_channels=32)
    torch.manual_seed(0)
    model = VQModel(cfg).eval()
    ids = model.encode(images(batch=1, size=384))
    assert ids.shape == (1, 24, 24) and ids.dtype == torch.long
    assert int(ids.min()) >= 0 and int(ids.max()) < 16384


def full_state_dict(model: VQModel) -> dict[str, torch.Tensor]:
    """A Janus-like full state dict: the tokenizer under its prefix plus unrelated parts."""
    sd = {f"gen_vision_model.{k}": v.clone() for k, v in model.state_dict().items()}
    sd["gen_vision_model.quantize.codebook_used"] = torch.zeros(65536)
    sd["language_model.model.embed_tokens.weight"] = torch.randn(10, 6)
    sd["gen_embed.weight"] = torch.randn(64, 4)
    sd["gen_head.vision_head.weight"] = torch.randn(64, 6)
    return sd


def test_from_janus_state_dict_loads_only_the_prefixed_tensors() -> None:
    src = tiny_model(seed=3)
    loaded = vq_model_from_janus(full_state_dict(src), tiny_config())
    for k, v in src.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    bare = vq_model_from_janus(src.state_dict(), tiny_config(), prefix="")
    assert torch.equal(bare.quantize.embedding.weight, src.quantize.embedding.weight)


def test_from_janus_state_dict_names_every_bad_key() -> None:
    sd = full_state_dict(tiny_model())
    del sd["gen_vision_model.decoder.conv_out.bias"]
    sd["gen_vision_model.encoder.extra.weight"] = torch.zeros(1)
    sd["gen_vision_model.quant_conv.weight"] = torch.zeros(8, 16, 1, 1)
    with pytest.raises(ValueError) as err:
        vq_model_from_janus(sd, tiny_config())
    msg = str(err.value)
    assert "1 missing: gen_vision_model.decoder.conv_out.bias" in msg
    assert "1 unexpected: gen_vision_model.encoder.extra.weight" in msg
    assert "gen_vision_model.quant_conv.weight: expected (4, 16, 1, 1), got (8, 16, 1, 1)" in msg
    assert "language_model" not in msg and "codebook_used" not in msg
    with pytest.raises(ValueError, match=r"no key of the state dict starts with 'vq\.'"):
        vq_model_from_janus(sd, tiny_config(), prefix="vq.")
    # The full-size default config against tiny weights: every tensor is named.
    with pytest.raises(ValueError, match=r"quantize\.embedding\.weight: expected \(16384, 8\)"):
        vq_model_from_janus(full_state_dict(tiny_model()))


# -- the quantizer -------------------------------------------------------------------------------


def test_straight_through_without_normalisation_is_the_identity() -> None:
    torch.manual_seed(0)
    vq = VectorQuantizer(16, 3, l2_norm=False)
    z = torch.randn(2, 3, 4, 5, requires_grad=True)
    out = vq(z)
    assert out.ids.shape == (2, 4, 5)
    w = vq.embedding.weight
    expected_ids = torch.cdist(z.detach().permute(0, 2, 3, 1).reshape(-1, 3), w.detach()).argmin(-1)
    assert torch.equal(out.ids.flatten(), expected_ids)
    torch.testing.assert_close(out.z_q.detach(), vq.lookup(out.ids).detach())
    upstream = torch.randn(out.z_q.shape)
    (out.z_q * upstream).sum().backward()
    torch.testing.assert_close(z.grad, upstream)  # identity Jacobian through the argmin
    assert w.grad is None  # z_q carries no gradient to the codebook; the codebook loss does


def test_quantizer_losses_are_the_vq_vae_terms() -> None:
    torch.manual_seed(0)
    vq = VectorQuantizer(32, 4, commit_beta=0.25)
    z = torch.randn(3, 4, 2, 2)
    out = vq(z)
    flat = F.normalize(z.permute(0, 2, 3, 1).reshape(-1, 4), dim=-1)
    q = F.normalize(vq.embedding.weight, dim=-1)[out.ids.flatten()].detach()
    sq = (flat - q).square().mean()
    torch.testing.assert_close(out.losses["codebook"].detach(), sq)
    torch.testing.assert_close(out.losses["commitment"], 0.25 * sq)
    assert out.losses["entropy"].item() == 0.0
    out.losses["codebook"].backward()
    assert vq.embedding.weight.grad.abs().sum() > 0


def test_nearest_code_search_is_chunked_and_exact() -> None:
    torch.manual_seed(0)
    vq = VectorQuantizer(4096, 8)
    vq.chunk_elements = 1 << 16  # 16 rows x 4096 codes per block
    flat = F.normalize(torch.randn(2048, 8), dim=-1)
    with LargestAllocation() as probe:
        ids = vq.nearest(flat)
    assert probe.largest <= 1 << 16  # never [N, K] = 8M, let alone [N, K, d]
    expected = torch.cdist(flat.double(), F.normalize(vq.embedding.weight, dim=-1).double())
    assert torch.equal(ids, expected.argmin(-1))


def test_usage_and_perplexity() -> None:
    vq = VectorQuantizer(8, 3)
    codes = vq.codebook()  # unit rows
    every_code = codes.T.reshape(1, 3, 1, 8)
    out = vq(every_code)
    assert torch.equal(out.ids.flatten(), torch.arange(8))
    assert out.usage.item() == 1.0
    assert out.perplexity.item() == pytest.approx(8.0)
    one_code = codes[5].view(1, 3, 1, 1).expand(2, 3, 4, 4)
    out = vq(one_code)
    assert out.usage.item() == pytest.approx(1 / 8) and out.perplexity.item() == pytest.approx(1)
    half = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    usage, perplexity = usage_stats(half, 8)
    assert usage.item() == 0.5 and perplexity.item() == pytest.approx(4.0)


def test_codebook_usage_tracker_accumulates_batches() -> None:
    tracker = CodebookUsage(10)
    tracker.update(torch.tensor([[0, 1], [1, 1]]))
    tracker.update(torch.tensor([3, 3, 0, 1]))
    assert tracker.total == 8
    assert tracker.counts.tolist() == [2, 4, 0, 2, 0, 0, 0, 0, 0, 0]
    assert torch.equal(tracker.dead_codes(), torch.tensor([2, 4, 5, 6, 7, 8, 9]))
    p = torch.tensor([0.25, 0.5, 0.25])
    summary = tracker.summary()
    assert summary["used_fraction"] == pytest.approx(0.3) and summary["dead_codes"] == 7
    assert summary["perplexity"] == pytest.approx(float(torch.exp(-(p * p.log()).sum())))
    with pytest.raises(ValueError, match="found 10 at index"):
        tracker.update(torch.tensor([2, 10]))
    with pytest.raises(ValueError, match=r"torch\.long"):
        tracker.update(torch.tensor([1.0]))
    tracker.reset()
    assert tracker.total == 0


def test_entropy_regulariser() -> None:
    x = images(batch=2)
    plain = tiny_model().training_losses(x)
    assert plain["entropy"].item() == 0.0
    ratio, tau = 0.1, 0.01
    model = tiny_model(entropy_loss_ratio=ratio)  # the same weights
    reg = model.training_losses(x)
    # Reference: softmax over negative squared distances between the unit vectors.
    with torch.no_grad():
        z = F.normalize(model.latents(x).permute(0, 2, 3, 1).reshape(-1, 4), dim=-1)
        e = F.normalize(model.quantize.embedding.weight, dim=-1)
        p = torch.softmax(-torch.cdist(z, e).square() / tau, -1)
        dist = torch.distributions.Categorical
        expected = dist(probs=p).entropy().mean() - dist(probs=p.mean(0)).entropy()
    torch.testing.assert_close(reg["entropy"].detach(), ratio * expected, atol=1e-4, rtol=1e-4)
    assert reg["entropy"].item() != 0.0
    torch.testing.assert_close(reg["loss"], plain["loss"] + reg["entropy"])
    reg["entropy"].backward()
    grad = model.encoder.conv_in.weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


# -- the model ---------------------------------------------------------------------------------


def test_training_losses_and_gradients_reach_the_encoder() -> None:
    model = tiny_model().train()
    losses = model.training_losses(images(batch=2))
    parts = ("recon", "codebook", "commitment", "entropy")
    assert set(losses) == {"loss", *parts, "usage", "perplexity"}
    torch.testing.assert_close(losses["loss"], sum(losses[k] for k in parts))
    assert all(v.dtype == torch.float32 and v.ndim == 0 for v in losses.values())
    assert not losses["usage"].requires_grad and 0 < losses["usage"].item() <= 1
    assert 1 <= losses["perplexity"].item() <= 64
    losses["recon"].backward()  # the pixel loss alone: only the straight-through path
    for name in ("encoder.conv_in.weight", "quant_conv.weight", "decoder.conv_out.weight"):
        grad = model.get_parameter(name).grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name


@pytest.mark.parametrize("recon_loss", ["l1", "l2"])
def test_losses_decrease_with_adam(recon_loss: str) -> None:
    model = tiny_model(recon_loss=recon_loss).train()
    x = images(batch=4, seed=7)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    history = []
    for _ in range(30):
        losses = model.training_losses(x)
        opt.zero_grad()
        losses["loss"].backward()
        opt.step()
        history.append(losses["loss"].item())
    assert history[-1] < 0.7 * history[0], history
    assert min(history[-5:]) < min(history[:5])


def test_bfloat16_end_to_end() -> None:
    model = tiny_model()
    x = images(batch=4, seed=2)
    ids32 = model.encode(x)
    model = model.to(torch.bfloat16)
    ids16 = model.encode(x.to(torch.bfloat16))
    assert ids16.dtype == torch.long
    assert (ids16 == ids32).float().mean() >= 0.8
    assert torch.equal(model.encode(x), ids16)  # float32 images are cast to the module dtype
    recon = model.decode(ids16)
    assert recon.dtype == torch.bfloat16 and recon.shape == x.shape
    assert torch.isfinite(recon).all()
    out, ids, _ = model(x.to(torch.bfloat16))
    assert out.dtype == torch.bfloat16 and torch.equal(ids, ids16)
    losses = model.train().training_losses(x.to(torch.bfloat16))
    assert losses["loss"].dtype == torch.float32 and torch.isfinite(losses["loss"])
    losses["loss"].backward()
    assert model.encoder.conv_in.weight.grad.dtype == torch.bfloat16


def test_decode_accepts_flat_square_ids() -> None:
    model = tiny_model()
    ids = model.encode(images(batch=2))
    torch.testing.assert_close(model.decode(ids.view(2, -1)), model.decode(ids))
    assert model.decode(ids).shape == (2, 3, SIZE, SIZE)


def test_image_size_none_accepts_any_multiple_of_the_downsample() -> None:
    model = tiny_model(image_size=None)
    ids = model.encode(images(batch=1, size=24))
    assert ids.shape == (1, 6, 6)
    assert model.decode(ids).shape == (1, 3, 24, 24)
    with pytest.raises(ValueError, match="multiples of the downsample factor 4, got 18x18"):
        model.encode(images(batch=1, size=18))
    with pytest.raises(ValueError, match="image_size=None"):
        model.tokens_shape()


# -- config, save / load ----------------------------------------------------------------------


def test_config_round_trips_through_json_and_yaml() -> None:
    for cfg in (tiny_config(recon_loss="l2", entropy_loss_ratio=0.1), VQConfig.janus()):
        d = cfg.to_dict()
        assert VQConfig.from_dict(json.loads(json.dumps(d))) == cfg
        assert VQConfig.from_dict(yaml.safe_load(yaml.safe_dump(d))) == cfg


def test_config_rejects_bad_values_and_unknown_keys() -> None:
    d = tiny_config().to_dict()
    with pytest.raises(ValueError, match=r"unknown VQ config key\(s\) \['beta', 'codebook'\]"):
        VQConfig.from_dict({**d, "codebook": 3, "beta": 1})
    with pytest.raises(ValueError, match=r"unknown autoencoder config key\(s\) \['ch'\]"):
        VQConfig.from_dict({**d, "autoencoder": {**d["autoencoder"], "ch": 1}})
    with pytest.raises(ValueError, match="image_size 18 is not divisible"):
        tiny_config(image_size=18)
    with pytest.raises(ValueError, match="recon_loss"):
        tiny_config(recon_loss="l3")
    with pytest.raises(ValueError, match="codebook_size"):
        tiny_config(codebook_size=0)
    with pytest.raises(ValueError, match="double_z"):
        tiny_config(autoencoder=AutoencoderConfig(channels=32, double_z=True))


def test_save_and_load_round_trip_bit_exact(tmp_path) -> None:
    model = tiny_model(seed=4)
    folder = model.save_pretrained(tmp_path / "vq")
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    assert json.loads((folder / "config.json").read_text())["kineflow_type"] == "vq"
    loaded = VQModel.from_pretrained(folder)
    assert loaded.config == model.config
    ours, theirs = model.state_dict(), loaded.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) and theirs[k].dtype == ours[k].dtype for k in ours)
    x = images(batch=2)
    assert torch.equal(loaded.encode(x), model.encode(x))
    model.to(torch.bfloat16).save_pretrained(folder)  # overwrite in place
    assert VQModel.from_pretrained(folder).quantize.embedding.weight.dtype == torch.bfloat16


def test_from_pretrained_errors(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="no VQ tokenizer folder"):
        VQModel.from_pretrained(tmp_path / "nowhere")
    folder = tiny_model().save_pretrained(tmp_path / "vq")
    config = json.loads((folder / "config.json").read_text())

    (folder / "model.safetensors").rename(tmp_path / "weights")
    with pytest.raises(FileNotFoundError, match=r"has no model\.safetensors"):
        VQModel.from_pretrained(folder)
    (tmp_path / "weights").rename(folder / "model.safetensors")

    (folder / "config.json").write_text(json.dumps({**config, "kineflow_type": "kl_vae"}))
    with pytest.raises(ValueError, match="is of type 'kl_vae'; expected a VQ tokenizer"):
        VQModel.from_pretrained(folder)
    (folder / "config.json").write_text(json.dumps({**config, "codebook_size": 32}))
    with pytest.raises(ValueError, match=r"quantize\.embedding\.weight: expected \(32, 4\), got"):
        VQModel.from_pretrained(folder)
    (folder / "config.json").write_text(json.dumps({**config, "colour": 1}))
    with pytest.raises(ValueError, match=r"config.json: unknown VQ config key\(s\) \['colour'\]"):
        VQModel.from_pretrained(folder)
    (folder / "config.json").write_text("{")
    with pytest.raises(ValueError, match="not valid JSON"):
        VQModel.from_pretrained(folder)


# -- bad inputs ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("x", "message"),
    [
        (torch.zeros(3, SIZE, SIZE), r"images must be 4-D \[B, 3, H, W\], got shape \(3, 16, 16\)"),
        (torch.zeros(1, 1, SIZE, SIZE), r"images must have 3 channels"),
        (torch.zeros(1, 3, 32, 32), r"images must be 16x16 \(VQConfig.image_size\), got 32x32"),
        (torch.zeros(1, 3, SIZE, SIZE, dtype=torch.uint8), "floating point .* torch.uint8"),
    ],
)
def test_bad_images(x: torch.Tensor, message: str) -> None:
    model = tiny_model()
    with pytest.raises(ValueError, match=message):
        model.encode(x)
    with pytest.raises(ValueError, match=message):
        model.training_losses(x)


@pytest.mark.parametrize(
    ("ids", "message"),
    [
        (torch.zeros(1, 4, 4, dtype=torch.int32), "dtype torch.long .* got torch.int32"),
        (torch.zeros(1, 1, 4, 4, dtype=torch.long), r"ids must be \[B, h, w\]"),
        (torch.zeros(1, 15, dtype=torch.long), "N = 15 is not a perfect square"),
        (torch.zeros(1, 5, 5, dtype=torch.long), r"must form a 4x4 grid"),
        (torch.full((1, 4, 4), 64), r"\[0, 64\); found 64 at index \[0, 0, 0\] \(16 id"),
        (torch.tensor([[[0, 1, 2, 3]] * 3 + [[0, -7, 2, 3]]]), r"found -7 at index \[0, 3, 1\]"),
    ],
)
def test_bad_ids(ids: torch.Tensor, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        tiny_model().decode(ids)
