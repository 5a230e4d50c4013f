"""SigLIP vision tower: parity with transformers, Janus layout and loader, input checks."""

from __future__ import annotations

import pytest
import torch

from kineflow.interop.siglip import (
    JANUS_PREFIX,
    hf_to_janus_state_dict,
    janus_to_hf_state_dict,
    load_siglip_from_janus,
    siglip_from_janus,
)
from kineflow.models.siglip import SiglipConfig, SiglipVisionModel

transformers = pytest.importorskip("transformers")

TINY = {
    "image_size": 32,
    "patch_size": 8,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
}
HF_ACT = {"gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh"}


def _randomize(model: torch.nn.Module, seed: int = 0) -> None:
    # Every parameter random, LayerNorm affine included, so no mapping hides behind 1s and 0s.
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def _hf_model(act: str = "gelu") -> torch.nn.Module:
    cfg = transformers.SiglipVisionConfig(
        **TINY, hidden_act=HF_ACT[act], layer_norm_eps=1e-6, vision_use_head=False
    )
    model = transformers.SiglipVisionModel(cfg).eval()
    _randomize(model)
    return model


def _pixels(batch: int = 2, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, 32, 32, generator=g) * 2 - 1


@pytest.mark.parametrize("act", ["gelu", "gelu_tanh"])
def test_parity_with_transformers_hf_to_ours(act: str) -> None:
    hf = _hf_model(act)
    ours = SiglipVisionModel(SiglipConfig(**TINY, hidden_act=act)).eval()
    ours.load_state_dict(hf_to_janus_state_dict(hf.state_dict()), strict=True)
    x = _pixels()
    with torch.no_grad():
        expected = hf(pixel_values=x).last_hidden_state
        got = ours(x)
    assert got.shape == (2, 16, 64)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_parity_with_transformers_ours_to_hf() -> None:
    ours = SiglipVisionModel(SiglipConfig(**TINY)).eval()
    _randomize(ours, seed=3)
    hf = transformers.SiglipVisionModel(
        transformers.SiglipVisionConfig(**TINY, hidden_act="gelu", vision_use_head=False)
    ).eval()
    # transformers 5 keeps no "vision_model." prefix in this class's own state dict; 4 does.
    prefix = "vision_model." if "vision_model.post_layernorm.weight" in hf.state_dict() else ""
    result = hf.load_state_dict(janus_to_hf_state_dict(ours.state_dict(), prefix), strict=False)
    # position_ids is a non-persistent buffer; nothing else may be left out.
    assert not result.unexpected_keys and not result.missing_keys
    x = _pixels(seed=4)
    with torch.no_grad():
        torch.testing.assert_close(
            ours(x), hf(pixel_values=x).last_hidden_state, atol=1e-5, rtol=1e-5
        )
    hub = janus_to_hf_state_dict(ours.state_dict())
    assert "vision_model.encoder.layers.1.self_attn.v_proj.bias" in hub
    assert hub["vision_model.embeddings.position_embedding.weight"].shape == (16, 64)
    for hf_keys in (hub, janus_to_hf_state_dict(ours.state_dict(), prefix="")):
        back = hf_to_janus_state_dict(hf_keys)
        assert back.keys() == ours.state_dict().keys()
        for k, v in ours.state_dict().items():
            assert torch.equal(back[k], v), k


def test_select_layer_truncates_depth_then_applies_final_norm() -> None:
    hf = _hf_model()
    ours = SiglipVisionModel(SiglipConfig(**TINY, select_layer=-2)).eval()
    assert len(ours.blocks) == 1
    sd = hf_to_janus_state_dict(hf.state_dict())
    load_siglip_from_janus(ours, {JANUS_PREFIX + k: v for k, v in sd.items()})
    x = _pixels()
    with torch.no_grad():
        out = hf(pixel_values=x, output_hidden_states=True)
        expected = getattr(hf, "vision_model", hf).post_layernorm(out.hidden_states[-2])
        torch.testing.assert_close(ours(x), expected, atol=1e-5, rtol=1e-5)


def test_janus_config_on_meta_device() -> None:
    cfg = SiglipConfig.janus_siglip_l16_384()
    assert cfg.num_patches == 576 and cfg.num_used_layers == 24
    with torch.device("meta"):
        model = SiglipVisionModel(cfg)
        out = model(torch.empty(2, 3, 384, 384))
    assert out.shape == (2, 576, 1024)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert len(shapes) == 5 + 24 * 12
    assert shapes["patch_embed.proj.weight"] == (1024, 3, 16, 16)
    assert shapes["patch_embed.proj.bias"] == (1024,)
    assert shapes["pos_embed"] == (1, 576, 1024)
    assert shapes["blocks.23.attn.qkv.weight"] == (3072, 1024)
    assert shapes["blocks.23.attn.qkv.bias"] == (3072,)
    assert shapes["blocks.0.attn.proj.weight"] == (1024, 1024)
    assert shapes["blocks.0.mlp.fc1.weight"] == (4096, 1024)
    assert shapes["blocks.0.mlp.fc2.weight"] == (1024, 4096)
    assert shapes["blocks.0.norm1.weight"] == shapes["norm.bias"] == (1024,)
    assert "blocks.24.norm1.weight" not in shapes
    assert SiglipConfig.from_dict(cfg.to_dict()) == cfg


def test_janus_loader_skips_head_and_unused_blocks_and_names_bad_keys() -> None:
    ours = SiglipVisionModel(SiglipConfig(**TINY, select_layer=-2))
    full = SiglipVisionModel(SiglipConfig(**TINY))
    _randomize(full)
    sd = {JANUS_PREFIX + k: v for k, v in full.state_dict().items()}
    sd[JANUS_PREFIX + "attn_pool.latent"] = torch.zeros(1, 1, 64)
    sd["language_model.model.norm.weight"] = torch.zeros(8)
    loaded = siglip_from_janus(sd, SiglipConfig(**TINY, select_layer=-2))
    assert torch.equal(loaded.blocks[0].attn.qkv.weight, full.blocks[0].attn.qkv.weight)
    load_siglip_from_janus(ours, sd)

    bad = dict(sd)
    del bad[JANUS_PREFIX + "norm.weight"]
    bad[JANUS_PREFIX + "cls_token"] = torch.zeros(1, 1, 64)
    bad[JANUS_PREFIX + "pos_embed"] = torch.zeros(1, 17, 64)
    with pytest.raises(ValueError) as err:
        load_siglip_from_janus(ours, bad)
    msg = str(err.value)
    assert "missing: vision_model.vision_tower.norm.weight" in msg
    assert "unexpected: vision_model.vision_tower.cls_token" in msg
    assert "vision_model.vision_tower.pos_embed: expected (1, 16, 64), got (1, 17, 64)" in msg


def test_converters_name_unknown_keys() -> None:
    with pytest.raises(ValueError, match=r"no counterpart: vision_model\.encoder\.foo$"):
        hf_to_janus_state_dict({"vision_model.encoder.foo": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"lacks self_attn\.\{v\}_proj\.weight"):
        hf_to_janus_state_dict(
            {
                "vision_model.encoder.layers.0.self_attn.q_proj.weight": torch.zeros(2, 2),
                "vision_model.encoder.layers.0.self_attn.k_proj.weight": torch.zeros(2, 2),
            }
        )
    with pytest.raises(ValueError, match=r"no counterpart: attn_pool\.latent"):
        janus_to_hf_state_dict({"attn_pool.latent": torch.zeros(1)})


@pytest.mark.parametrize(
    ("x", "match"),
    [
        (torch.zeros(1, 4, 32, 32), r"shape \[B, 3, 32, 32\], got \[1, 4, 32, 32\]"),
        (torch.zeros(1, 3, 48, 48), r"shape \[B, 3, 32, 32\], got \[1, 3, 48, 48\]"),
        (torch.zeros(3, 32, 32), r"shape \[B, 3, 32, 32\], got \[3, 32, 32\]"),
        (torch.zeros(1, 3, 32, 32, dtype=torch.uint8), r"floating-point .* torch\.uint8"),
        ([[0.0]], r"must be a tensor, got list"),
    ],
)
def test_bad_input_raises(x: object, match: str) -> None:
    model = SiglipVisionModel(SiglipConfig(**TINY))
    with pytest.raises(ValueError, match=match):
        model(x)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"image_size": 30}, "not divisible by patch_size"),
        ({"num_attention_heads": 3}, "not divisible by num_attention_heads"),
        ({"select_layer": 0}, r"select_layer must be a non-zero integer in \[-2, 2\]"),
        ({"select_layer": -3}, "select_layer"),
        ({"hidden_act": "relu"}, "hidden_act must be one of"),
        ({"patch_size": 0}, "patch_size must be a positive integer"),
    ],
)
def test_bad_config_raises(change: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        SiglipConfig(**{**TINY, **change})


def test_from_dict_names_unknown_keys() -> None:
    with pytest.raises(ValueError, match=r"unknown SigLIP config key\(s\) \['width'\]"):
        SiglipConfig.from_dict({**TINY, "width": 3})


def test_bf16_runs_and_tracks_fp32() -> None:
    model = SiglipVisionModel(SiglipConfig(**TINY)).eval()
    _randomize(model)
    x = _pixels()
    with torch.no_grad():
        ref = model(x)
        out = model.to(torch.bfloat16)(x.bfloat16())
    assert out.dtype == torch.bfloat16 and out.shape == ref.shape
    assert torch.isfinite(out).all()
    assert (out.float() - ref).abs().max() < 0.25 * ref.abs().max()
