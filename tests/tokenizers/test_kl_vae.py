"""The KL-VAE tokenizer against diffusers' AutoencoderKL and against closed forms.

diffusers is a test reference only: random diffusers models (GroupNorm affines randomised too,
so a swapped norm cannot hide behind weight 1 / bias 0) are saved in diffusers' own layout,
loaded with :func:`kineflow.interop.diffusers.kl_vae_from_diffusers`, and must agree to float32
precision.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from kineflow.interop.diffusers import (
    diffusers_state_dict_from_kl,
    kl_vae_from_diffusers,
    save_diffusers,
)
from kineflow.tokenizers.kl_vae import (
    AutoencoderKL,
    DiagonalGaussian,
    KLConfig,
    patchify,
    unpatchify,
)

diffusers = pytest.importorskip("diffusers")

ATOL = 1e-5
# channels 8, widths (8, 16), f = 2: a model small enough to train in a test.
TINY = dict(channels=8, channel_mult=(1, 2), num_res_blocks=1, norm_groups=4, image_size=16)


def images(B: int = 2, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.rand(B, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def diffusers_vae(widths: tuple[int, ...], layers: int = 1, groups: int = 8, seed: int = 0):
    torch.manual_seed(seed)
    L = len(widths)
    vae = diffusers.AutoencoderKL(
        block_out_channels=widths,
        layers_per_block=layers,
        latent_channels=4,
        norm_num_groups=groups,
        down_block_types=("DownEncoderBlock2D",) * L,
        up_block_types=("UpDecoderBlock2D",) * L,
        sample_size=32,
    ).eval()
    with torch.no_grad():
        for m in vae.modules():
            if isinstance(m, torch.nn.GroupNorm):
                m.weight.normal_(1.0, 0.3)
                m.bias.normal_(0.0, 0.3)
    return vae


def tiny(**kw) -> AutoencoderKL:
    torch.manual_seed(0)
    return AutoencoderKL(KLConfig(**{**TINY, **kw}))


def assert_parity(ours: AutoencoderKL, ref, size: int = 32) -> dict[str, float]:
    """Max abs differences of mean, logvar, decode and a seeded sample; all must be < ATOL."""
    x = images(size=size)
    f = ours.config.downsample
    z = torch.randn(2, 4, size // f, size // f, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        theirs, mine = ref.encode(x).latent_dist, ours.encode(x)
        errors = {
            "mean": (theirs.mean - mine.mean).abs().max().item(),
            "logvar": (theirs.logvar - mine.logvar).abs().max().item(),
            "decode": (ref.decode(z).sample - ours.decode(z)).abs().max().item(),
            "sample": (
                theirs.sample(torch.Generator().manual_seed(5))
                - mine.sample(torch.Generator().manual_seed(5))
            )
            .abs()
            .max()
            .item(),
        }
    assert max(errors.values()) < ATOL, errors
    return errors


@pytest.fixture(scope="module")
def saved_diffusers(tmp_path_factory) -> tuple[Path, object]:
    """A 2-level diffusers VAE saved with diffusers' own save_pretrained."""
    folder = tmp_path_factory.mktemp("diffusers_vae")
    ref = diffusers_vae((32, 64))
    ref.save_pretrained(folder)
    return folder, ref


def copy_folder(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# -- parity with diffusers -----------------------------------------------------------------------
@pytest.mark.parametrize(
    "widths, layers", [((32, 64), 1), ((16, 32, 32), 2)], ids=["2-levels", "3-levels"]
)
def test_matches_diffusers(tmp_path, widths, layers):
    ref = diffusers_vae(widths, layers)
    ref.save_pretrained(tmp_path)
    ours = kl_vae_from_diffusers(tmp_path).eval()
    cfg = ours.config
    assert cfg.channels == widths[0] and cfg.num_res_blocks == layers
    assert [cfg.channels * m for m in cfg.channel_mult] == list(widths)
    assert (cfg.z_channels, cfg.norm_groups, cfg.image_size) == (4, 8, 32)
    assert cfg.scaling_factor == pytest.approx(0.18215) and cfg.shift_factor == 0.0
    assert_parity(ours, ref)
    with torch.no_grad():  # the full deterministic path too
        x = images()
        expected = ref(x, sample_posterior=False).sample
        assert torch.allclose(ours.reconstruct(x), expected, atol=ATOL)
        assert torch.equal(ours(x, sample=False)[0], ours.reconstruct(x))


def test_export_loads_back_into_diffusers(tmp_path, saved_diffusers):
    folder = saved_diffusers[0]
    ours = kl_vae_from_diffusers(folder).eval()
    fresh = diffusers_vae((32, 64), seed=99)
    fresh.load_state_dict(diffusers_state_dict_from_kl(ours), strict=True)
    assert_parity(ours, fresh)
    # a folder written by save_diffusers opens in diffusers and in kineflow
    save_diffusers(ours, tmp_path / "export")
    reopened = diffusers.AutoencoderKL.from_pretrained(tmp_path / "export").eval()
    assert_parity(ours, reopened)
    again = kl_vae_from_diffusers(tmp_path / "export")
    assert again.config == ours.config
    for k, v in ours.state_dict().items():
        assert torch.equal(v, again.state_dict()[k]), k


def test_legacy_attention_names_pipeline_folder_and_model_safetensors(tmp_path, saved_diffusers):
    folder, ref = saved_diffusers
    legacy = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    state = {}
    for k, v in load_file(folder / "diffusion_pytorch_model.safetensors").items():
        for new, old in legacy.items():
            k = k.replace(f"attentions.0.{new}.", f"attentions.0.{old}.")
        state[k] = v
    assert "encoder.mid_block.attentions.0.proj_attn.weight" in state
    vae = tmp_path / "pipeline" / "vae"  # a pipeline folder, weights under the plain name
    vae.mkdir(parents=True)
    shutil.copy(folder / "config.json", vae / "config.json")
    save_file(state, vae / "model.safetensors")
    ours = kl_vae_from_diffusers(tmp_path / "pipeline").eval()
    assert_parity(ours, ref)


def with_state(tmp_path: Path, src: Path, edit) -> Path:
    dst = copy_folder(src, tmp_path / "edited")
    file = dst / "diffusion_pytorch_model.safetensors"
    state = load_file(file)
    edit(state)
    save_file(state, file)
    return dst


@pytest.mark.parametrize(
    "edit, needles",
    [
        (
            lambda s: s.pop("decoder.up_blocks.1.resnets.0.conv_shortcut.bias"),
            ["missing keys", "decoder.up_blocks.1.resnets.0.conv_shortcut.bias"],
        ),
        (
            lambda s: s.update({"encoder.extra.weight": torch.zeros(1)}),
            ["unexpected keys", "encoder.extra.weight"],
        ),
        (
            lambda s: s.update({"encoder.conv_in.bias": torch.zeros(7)}),
            ["mis-shaped", "encoder.conv_in.bias (7,) (expected (32,))"],
        ),
        (
            lambda s: s.update(
                {"encoder.mid_block.attentions.0.query.weight": torch.zeros(64, 64)}
            ),
            ["same parameter twice", "encoder.mid_block.attentions.0.query.weight"],
        ),
    ],
    ids=["missing", "unexpected", "mis-shaped", "duplicate"],
)
def test_from_diffusers_is_strict_about_weights(tmp_path, saved_diffusers, edit, needles):
    folder = with_state(tmp_path, saved_diffusers[0], edit)
    with pytest.raises(ValueError) as err:
        kl_vae_from_diffusers(folder)
    for needle in needles:
        assert needle in str(err.value)


@pytest.mark.parametrize(
    "change, field",
    [
        (
            {"down_block_types": ["DownEncoderBlock2D", "AttnDownEncoderBlock2D"]},
            "down_block_types",
        ),
        ({"up_block_types": ["UpDecoderBlock2D"]}, "up_block_types"),
        ({"block_out_channels": [32, 48]}, "block_out_channels"),
        ({"act_fn": "gelu"}, "act_fn"),
        ({"latents_mean": [0.0] * 4}, "latents_mean"),
        ({"mid_block_add_attention": False}, "mid_block_add_attention"),
        ({"sample_size": [32, 64]}, "sample_size"),
        ({"_class_name": "AutoencoderTiny"}, "_class_name"),
        ({"sample_size": 30}, "image_size comes from sample_size"),
        ({"some_new_option": 1}, "some_new_option"),
    ],
)
def test_from_diffusers_rejects_unsupported_config(tmp_path, saved_diffusers, change, field):
    folder = copy_folder(saved_diffusers[0], tmp_path / "edited")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(ValueError, match=field):
        kl_vae_from_diffusers(folder)


def test_from_diffusers_missing_files(tmp_path, saved_diffusers):
    with pytest.raises(FileNotFoundError, match="no such folder"):
        kl_vae_from_diffusers(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=r"no config\.json"):
        kl_vae_from_diffusers(tmp_path)
    folder = copy_folder(saved_diffusers[0], tmp_path / "pickled")
    (folder / "diffusion_pytorch_model.safetensors").rename(folder / "diffusion_pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match="only safetensors"):
        kl_vae_from_diffusers(folder)


# -- latents, tokens, posterior ------------------------------------------------------------------
@pytest.mark.parametrize("p", [1, 2, 4])
def test_patchify_round_trip_and_channel_order(p):
    z = torch.randn(2, 3, 8, 12)
    tokens = patchify(z, p)
    assert tokens.shape == (2, (8 // p) * (12 // p), 3 * p * p)
    assert torch.equal(unpatchify(tokens, 8, 12, p), z)
    gw = 12 // p
    for r, s, c, i, j in [(0, 0, 0, 0, 0), (1, 2, 2, p - 1, 0), (8 // p - 1, gw - 1, 1, 0, p - 1)]:
        assert tokens[1, r * gw + s, c * p * p + i * p + j] == z[1, c, r * p + i, s * p + j]


def test_sd_f8_tokens_on_meta_device():
    config = KLConfig()  # SD KL-f8 at 256 px with 2x2 patches
    assert (config.downsample, config.latent_size, config.num_tokens, config.token_dim) == (
        8,
        32,
        256,
        16,
    )
    with torch.device("meta"):  # shapes only: no memory, no compute
        model = AutoencoderKL(config)
        x = torch.empty(2, 3, 256, 256)
        posterior = model.encode(x)
        tokens = model.images_to_tokens(x)
        out = model.tokens_to_images(tokens)
    assert posterior.mean.shape == (2, 4, 32, 32)
    assert tokens.shape == (2, 256, 16)
    assert out.shape == (2, 3, 256, 256)


def test_tokens_are_scaled_patchified_modes():
    model = tiny(scaling_factor=0.3611, shift_factor=0.1159).eval()
    x = images(size=16)
    with torch.no_grad():
        mode = model.encode(x).mode()
        tokens = model.images_to_tokens(x)
        assert torch.equal(tokens, patchify((mode - 0.1159) * 0.3611, 2))
        assert torch.allclose(model.unscale(model.scale(mode)), mode, atol=1e-6)
        assert torch.allclose(model.scale(model.unscale(mode)), mode, atol=1e-6)
        latents = model.tokens_to_latents(tokens, 8, 8)
        assert torch.equal(latents, model.scale(mode))
        assert torch.allclose(model.tokens_to_images(tokens), model.reconstruct(x), atol=1e-5)
        assert model.tokens_to_images(tokens, grid=(4, 4)).shape == (2, 3, 16, 16)
        wide = model.images_to_tokens(images(size=16).repeat(1, 1, 1, 2))  # 16 x 32 pixels
        assert model.tokens_to_images(wide, grid=(4, 8)).shape == (2, 3, 16, 32)


def test_kl_closed_form_and_clamp():
    mu = torch.tensor([1.0, 0.0, -2.0, 0.5])
    logvar = torch.tensor([0.0, math.log(2.0), -1.0, 50.0])  # 50 is clamped to 20
    moments = torch.cat([mu, logvar]).reshape(1, 8, 1, 1)
    q = DiagonalGaussian(moments)
    hand = 0.5 * (1 + 1 - 1 - 0) + 0.5 * (0 + 2 - 1 - math.log(2.0))
    hand += 0.5 * (4 + math.exp(-1) - 1 + 1) + 0.5 * (0.25 + math.exp(20) - 1 - 20)
    assert q.kl().shape == (1,)
    assert q.kl().item() == pytest.approx(hand, rel=1e-6)
    assert q.logvar.flatten().tolist() == [0.0, pytest.approx(math.log(2.0)), -1.0, 20.0]
    assert torch.equal(q.mode(), mu.reshape(1, 4, 1, 1))
    assert DiagonalGaussian(torch.full((1, 2, 1, 1), -100.0)).logvar.item() == -30.0
    # against torch.distributions, per sample
    m = torch.randn(3, 8, 2, 2)
    q = DiagonalGaussian(m)
    ref = torch.distributions.kl_divergence(
        torch.distributions.Normal(q.mean, q.std), torch.distributions.Normal(0.0, 1.0)
    )
    assert torch.allclose(q.kl(), ref.flatten(1).sum(1), atol=1e-5)


def test_sampling_uses_the_generator():
    q = DiagonalGaussian(torch.randn(2, 8, 4, 4))
    a = q.sample(torch.Generator().manual_seed(7))
    assert torch.equal(a, q.sample(torch.Generator().manual_seed(7)))
    assert not torch.equal(a, q.sample(torch.Generator().manual_seed(8)))
    eps = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(7))
    assert torch.allclose(a, q.mean + q.std * eps)
    half = DiagonalGaussian(q.moments.bfloat16()).sample(torch.Generator().manual_seed(7))
    assert half.dtype == torch.bfloat16 and torch.allclose(half.float(), a, atol=0.1)
    model = tiny()
    x = images(size=16)
    first = model.training_losses(x, torch.Generator().manual_seed(3))
    second = model.training_losses(x, torch.Generator().manual_seed(3))
    assert torch.equal(first["loss"], second["loss"])
    tokens = [
        model.images_to_tokens(x, sample=True, generator=torch.Generator().manual_seed(3))
        for _ in range(2)
    ]
    assert torch.equal(*tokens) and not torch.equal(tokens[0], model.images_to_tokens(x))


# -- training, dtypes, files ---------------------------------------------------------------------
@pytest.mark.parametrize("recon_loss", ["l1", "l2"])
def test_training_loss_decreases(recon_loss):
    model = tiny(recon_loss=recon_loss, kl_weight=1e-4)
    # smooth pictures: a few low-frequency colour waves
    u = torch.linspace(0, 2 * math.pi, 16)
    freqs = [(1, 0, 0), (0, 1, 1), (1, 1, 2), (2, 1, 0)]
    waves = [torch.sin(a * u[:, None] + b * u[None, :] + c) for a, b, c in freqs]
    x = torch.stack([torch.stack([w, w.roll(3, 0), -w]) for w in waves]) * 0.8
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    gen = torch.Generator().manual_seed(0)
    history = []
    for _ in range(30):
        losses = model.training_losses(x, gen)
        opt.zero_grad()
        losses["loss"].backward()
        opt.step()
        history.append(losses["loss"].item())
    expected = losses["recon"] + model.config.kl_weight * losses["kl"]
    assert losses["loss"].item() == pytest.approx(expected.item(), rel=1e-6)
    assert not losses["recon"].requires_grad and not losses["kl"].requires_grad
    assert sum(history[-5:]) / 5 < 0.6 * history[0], history


def test_bf16_end_to_end():
    model = tiny()
    x = images(size=16)
    with torch.no_grad():
        reference = model.reconstruct(x)
    model = model.to(torch.bfloat16)
    xb = x.bfloat16()
    losses = model.training_losses(xb, torch.Generator().manual_seed(0))
    losses["loss"].backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and g.dtype == torch.bfloat16 and g.isfinite().all() for g in grads)
    assert losses["loss"].dtype == torch.float32 and losses["loss"].isfinite()
    with torch.no_grad():
        out = model.reconstruct(xb)
        assert out.dtype == torch.bfloat16
        assert (out.float() - reference).abs().max() < 0.1
        assert torch.equal(model.reconstruct(x), out)  # float32 input is cast to the model dtype
        tokens = model.images_to_tokens(xb)
        assert tokens.dtype == torch.bfloat16 and tokens.shape == (2, 16, 16)
        assert model.tokens_to_images(tokens).dtype == torch.bfloat16


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_save_load_round_trip_is_bit_exact(tmp_path, dtype):
    model = tiny(use_post_quant_conv=False, patch_size=1).to(dtype)
    model.save_pretrained(tmp_path / "vae")
    assert sorted(p.name for p in (tmp_path / "vae").iterdir()) == [
        "config.json",
        "model.safetensors",
    ]
    config = json.loads((tmp_path / "vae" / "config.json").read_text())
    assert config["kineflow_type"] == "kl_vae" and config["channel_mult"] == [1, 2]
    loaded = AutoencoderKL.from_pretrained(tmp_path / "vae")
    assert loaded.config == model.config and loaded.post_quant_conv is None
    assert loaded.dtype == dtype
    state = loaded.state_dict()
    assert state.keys() == model.state_dict().keys()
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    x = images(size=16).to(dtype)
    with torch.no_grad():
        assert torch.equal(loaded.reconstruct(x), model.reconstruct(x))
    assert AutoencoderKL.from_pretrained(tmp_path / "vae", dtype=torch.float32).dtype == (
        torch.float32
    )


def test_from_pretrained_errors(tmp_path, saved_diffusers):
    with pytest.raises(FileNotFoundError, match="no such folder"):
        AutoencoderKL.from_pretrained(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=r"no config\.json"):
        AutoencoderKL.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"use kineflow\.interop\.diffusers\.kl_vae_from_diff"):
        AutoencoderKL.from_pretrained(saved_diffusers[0])
    folder = tiny().save_pretrained(tmp_path / "vae")
    config = json.loads((folder / "config.json").read_text())

    def write(**changes):
        (folder / "config.json").write_text(json.dumps({**config, **changes}))

    write(kineflow_type="vq")
    with pytest.raises(ValueError, match="is of type 'vq'; expected a KL autoencoder"):
        AutoencoderKL.from_pretrained(folder)
    write(mystery=1)
    with pytest.raises(ValueError, match=r"unknown KLConfig key\(s\) \['mystery'\]"):
        AutoencoderKL.from_pretrained(folder)
    write(channels=16, norm_groups=4)
    with pytest.raises(ValueError, match=r"mis-shaped: decoder\.conv_blocks\.0\.res\.0"):
        AutoencoderKL.from_pretrained(folder)
    write(use_post_quant_conv=False)
    with pytest.raises(ValueError, match=r"unexpected: post_quant_conv\.bias"):
        AutoencoderKL.from_pretrained(folder)
    write()
    state = load_file(folder / "model.safetensors")
    del state["encoder.mid.1.q.weight"]
    save_file(state, folder / "model.safetensors")
    with pytest.raises(ValueError, match=r"missing: encoder\.mid\.1\.q\.weight"):
        AutoencoderKL.from_pretrained(folder)
    (folder / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"no model\.safetensors"):
        AutoencoderKL.from_pretrained(folder)


# -- configuration and input validation ----------------------------------------------------------
def test_config_round_trip_and_validation():
    config = KLConfig(z_channels=16, patch_size=2, recon_loss="l2")
    assert config.token_dim == 64
    assert KLConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    with pytest.raises(ValueError, match=r"unknown KLConfig key\(s\) \['bogus', 'other'\]"):
        KLConfig.from_dict({**config.to_dict(), "bogus": 1, "other": 2})
    for kw, needle in [
        ({"recon_loss": "l3"}, "recon_loss"),
        ({"patch_size": 0}, "patch_size"),
        ({"image_size": 250}, "multiple of downsample \\* patch_size = 8 \\* 2 = 16"),
        ({"scaling_factor": 0.0}, "scaling_factor"),
        ({"kl_weight": -1.0}, "kl_weight"),
        ({"norm_groups": 48}, "GroupNorm"),
    ]:
        with pytest.raises(ValueError, match=needle):
            KLConfig(**kw)


@pytest.mark.parametrize(
    "call, needles",
    [
        (lambda m: m.encode(torch.zeros(3, 16, 16)), ["[B, 3, H, W]", "(3, 16, 16)"]),
        (lambda m: m.encode(torch.zeros(1, 1, 16, 16)), ["[B, 3, H, W]", "(1, 1, 16, 16)"]),
        (lambda m: m.encode(torch.zeros(1, 3, 15, 16)), ["multiples of 2", "15x16"]),
        (lambda m: m.encode(torch.zeros(1, 3, 16, 16, dtype=torch.uint8)), ["torch.uint8"]),
        (lambda m: m.encode([[0.0]]), ["torch.Tensor", "list"]),
        (lambda m: m.images_to_tokens(torch.zeros(1, 3, 18, 18)), ["multiples of 4", "18x18"]),
        (lambda m: m.decode(torch.zeros(1, 3, 8, 8)), ["[B, 4, h, w]", "(1, 3, 8, 8)"]),
        (lambda m: m.latents_to_tokens(torch.zeros(1, 4, 5, 4)), ["patch_size 2", "5x4"]),
        (lambda m: m.tokens_to_latents(torch.zeros(1, 16, 15), 8, 8), ["[B, N, 16]", "15)"]),
        (lambda m: m.tokens_to_latents(torch.zeros(1, 15, 16), 8, 8), ["15 tokens", "4x4 = 16"]),
        (lambda m: m.tokens_to_latents(torch.zeros(1, 16, 16), 7, 8), ["patch_size 2", "7x8"]),
        (lambda m: m.tokens_to_images(torch.zeros(1, 15, 16)), ["15 tokens", "4x4 = 16"]),
        (lambda m: m.tokens_to_images(torch.zeros(1, 16, 16).long()), ["floating", "int64"]),
        (lambda m: m.tokens_to_images(torch.zeros(1, 16, 16), grid=(4, 4, 1)), ["(4, 4, 1)"]),
        (lambda m: DiagonalGaussian(torch.zeros(1, 3, 2, 2)), ["[B, 2C, ...]", "(1, 3, 2, 2)"]),
    ],
)
def test_bad_inputs_raise_precise_errors(call, needles):
    with pytest.raises(ValueError) as err:
        call(tiny())
    for needle in needles:
        assert needle in str(err.value)
