"""FudokiModel: Janus state-dict layout, strict loading, shifted logits, masks, embeddings."""

from __future__ import annotations

import copy

import pytest
import torch

from kineflow.interop.janus import (
    fudoki_config_from_janus,
    fudoki_model_from_janus,
    janus_config_from_fudoki,
)
from kineflow.models.fudoki import FudokiConfig, FudokiModel
from kineflow.models.llama import LlamaConfig
from kineflow.models.siglip import SiglipConfig
from kineflow.tokenizers.autoencoder import AutoencoderConfig
from kineflow.tokenizers.vq import VQConfig

V, D, K = 40, 16, 64
S = 16  # SigLIP image side: 16 px / patch 8 -> 4 understanding tokens


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_config() -> FudokiConfig:
    return FudokiConfig(
        language=LlamaConfig(
            vocab_size=V,
            hidden_size=D,
            intermediate_size=24,
            num_hidden_layers=2,
            num_attention_heads=2,
        ),
        vision=SiglipConfig(
            image_size=S,
            patch_size=8,
            hidden_size=8,
            intermediate_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
        ),
        gen_vision=VQConfig(
            autoencoder=AutoencoderConfig(
                channels=32, channel_mult=(1, 2), num_res_blocks=1, z_channels=8
            ),
            codebook_size=K,
            codebook_dim=4,
            image_size=8,
        ),
        aligner_hidden=D,
        gen_aligner_hidden=D,
        gen_head_hidden=12,
    )


@pytest.fixture(scope="module")
def janus_state_dict() -> dict[str, torch.Tensor]:
    """A random tiny model in Janus's layout, every tensor perturbed (norm scales included) so
    that a swapped or dropped tensor would change the outputs; plus the unused Janus buffers."""
    torch.manual_seed(0)
    model = FudokiModel(tiny_config())
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    sd["gen_vision_model.quantize.codebook_used"] = torch.zeros(1000)
    sd["vision_model.vision_tower.attn_pool.latent"] = torch.randn(1, 1, 8)
    return sd


@pytest.fixture(scope="module")
def model(janus_state_dict) -> FudokiModel:
    return fudoki_model_from_janus(janus_state_dict, tiny_config()).eval()


def test_state_dict_has_janus_prefixes(model):
    keys = set(model.state_dict())
    expected = {
        "language_model.lm_head.weight",
        "language_model.model.embed_tokens.weight",
        "language_model.model.norm.weight",
        "vision_model.vision_tower.pos_embed",
        "aligner.layers.0.weight",
        "aligner.layers.2.bias",
        "gen_aligner.layers.0.weight",
        "gen_aligner.layers.2.bias",
        "gen_head.output_mlp_projector.weight",
        "gen_head.vision_head.bias",
        "gen_embed.weight",
        "gen_vision_model.quantize.embedding.weight",
    }
    assert expected <= keys
    for sub in ("encoder", "decoder", "quant_conv", "post_quant_conv"):
        assert any(k.startswith(f"gen_vision_model.{sub}.") for k in keys), sub
    prefixes = (
        "language_model.model.",
        "language_model.lm_head.",
        "vision_model.vision_tower.",
        "aligner.layers.0.",
        "aligner.layers.2.",
        "gen_vision_model.",
        "gen_aligner.layers.0.",
        "gen_aligner.layers.2.",
        "gen_head.output_mlp_projector.",
        "gen_head.vision_head.",
        "gen_embed.",
    )
    assert all(k.startswith(prefixes) for k in keys)
    assert model.gen_embed.weight.shape == (K, 4)
    assert model.language_model.lm_head.weight.data_ptr() != (
        model.language_model.model.embed_tokens.weight.data_ptr()
    )


def test_load_consumes_every_key_and_reproduces_outputs(janus_state_dict, model):
    sd = model.state_dict()
    skipped = {
        "gen_vision_model.quantize.codebook_used",
        "vision_model.vision_tower.attn_pool.latent",
    }
    assert set(sd) == set(janus_state_dict) - skipped
    for k, v in sd.items():
        assert torch.equal(v, janus_state_dict[k]), k
    # A fresh load from the same dict gives identical outputs.
    again = fudoki_model_from_janus(janus_state_dict, tiny_config()).eval()
    ids = torch.randint(0, V, (2, 7), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(model(ids), again(ids))


@pytest.mark.parametrize(
    "edit, name",
    [
        ("drop", "gen_head.vision_head.weight"),
        ("extra", "gen_head.bogus.weight"),
        ("shape", "aligner.layers.2.weight"),
    ],
)
def test_load_errors_name_the_key(janus_state_dict, edit, name):
    sd = dict(janus_state_dict)
    if edit == "drop":
        del sd[name]
        word = "missing"
    elif edit == "extra":
        sd[name] = torch.zeros(2)
        word = "unexpected"
    else:
        sd[name] = torch.zeros(3, 3)
        word = "mis-shaped"
    with pytest.raises(ValueError, match=word) as info:
        fudoki_model_from_janus(sd, tiny_config())
    assert name in str(info.value)


def test_shifted_logits_exact(model):
    h = torch.randn(2, 5, D, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        for logits, head in (
            (model.text_logits(h), model.language_model.lm_head),
            (model.image_logits(h), model.gen_head),
        ):
            assert torch.equal(logits[:, 0], torch.zeros_like(logits[:, 0]))
            full = head(h)
            for i in range(1, 5):
                # Bit-exact against the head over the whole sequence; a per-position call takes
                # another GEMM path, so it agrees only to rounding.
                assert torch.equal(logits[:, i], full[:, i - 1])
                torch.testing.assert_close(logits[:, i], head(h[:, i - 1]))
        assert model.text_logits(h).shape == (2, 5, V)
        assert model.image_logits(h).shape == (2, 5, K)
        assert torch.equal(model.image_logits(h, shift=False), model.gen_head(h))


def test_full_mask_is_bidirectional_causal_is_not(model):
    ids = torch.randint(0, V, (1, 6), generator=torch.Generator().manual_seed(5))
    later = ids.clone()
    later[0, 5] = (ids[0, 5] + 1) % V
    with torch.no_grad():
        full_a, full_b = model(ids), model(later)
        causal_a, causal_b = model(ids, mask="causal"), model(later, mask="causal")
    assert not torch.allclose(full_a[:, :5], full_b[:, :5])
    assert torch.equal(causal_a[:, :5], causal_b[:, :5])


def test_generation_image_embeddings(model):
    ids = torch.randint(0, V, (2, 6), generator=torch.Generator().manual_seed(6))
    mask = torch.zeros(2, 6, dtype=torch.bool)
    mask[:, 2:5] = True
    codes = torch.randint(0, K, (2, 6), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        e = model.embed(ids, image_ids=codes, image_mask=mask)
        text = model.language_model.model.embed_tokens(ids)
        gen = model.gen_aligner(model.gen_embed(codes))
        assert torch.equal(e[~mask], text[~mask])
        assert torch.allclose(e[mask], gen[mask])
        # Codes may also sit in input_ids themselves (as in FUDOKI's mixed sequences).
        mixed = torch.where(mask, codes, ids)
        assert torch.equal(model.embed(mixed, image_mask=mask), e)
        flat = model.embed(ids, image_ids=codes[mask], image_mask=mask)
        assert torch.equal(flat, e)
    with pytest.raises(ValueError, match="image ids"):
        model.embed(ids, image_ids=torch.full((2, 6), K), image_mask=mask)


def test_understanding_features_replace_exactly_the_placeholders(model):
    n_patch = tiny_config().understanding_token_count
    ids = torch.randint(0, V, (1, 9), generator=torch.Generator().manual_seed(8))
    ids[0, 3 : 3 + n_patch] = -1  # Janus's placeholder ids may be anything
    und = torch.zeros(1, 9, dtype=torch.bool)
    und[0, 3 : 3 + n_patch] = True
    pixels = torch.rand(1, 3, S, S, generator=torch.Generator().manual_seed(9)) * 2 - 1
    with torch.no_grad():
        e = model.embed(ids, pixel_values=pixels, understanding_mask=und)
        feats = model.aligner(model.vision_model.vision_tower(pixels))[0]
        text = model.language_model.model.embed_tokens(ids.clamp_min(0))
        assert torch.equal(e[0, 3 : 3 + n_patch], feats)
        assert torch.equal(e[~und], text[~und])
        h = model(ids, pixel_values=pixels[:, None], understanding_mask=und)
        assert h.shape == (1, 9, D)
    bad = und.clone()
    bad[0, 0] = True
    with pytest.raises(ValueError, match="understanding_mask marks 5 positions"):
        model.embed(ids.clamp_min(0), pixel_values=pixels, understanding_mask=bad)


def test_understanding_positions_add_one_learnt_row_per_patch(janus_state_dict):
    """``understanding_positions``: each patch's feature gains its own row of a table that
    starts at zero (the model then equals the one without) and is trained by the loss; Janus
    has no such table, so exporting its config refuses."""
    cfg = tiny_config()
    cfg.understanding_positions = True
    with_pos = FudokiModel(cfg)
    missing = with_pos.load_state_dict(janus_state_dict, strict=False).missing_keys
    assert missing == ["understanding_pos_embed"]
    plain = fudoki_model_from_janus(janus_state_dict, tiny_config())
    P = cfg.understanding_token_count
    assert with_pos.understanding_pos_embed.shape == (P, D)
    pixels = torch.rand(2, 3, S, S, generator=torch.Generator().manual_seed(3)) * 2 - 1
    with torch.no_grad():
        assert torch.equal(with_pos.encode_images(pixels), plain.encode_images(pixels))
        table = torch.randn(P, D, generator=torch.Generator().manual_seed(4))
        with_pos.understanding_pos_embed.copy_(table)
        torch.testing.assert_close(with_pos.encode_images(pixels),
                                   plain.encode_images(pixels) + table)  # fmt: skip
    with_pos.encode_images(pixels).pow(2).sum().backward()
    assert with_pos.understanding_pos_embed.grad.abs().sum() > 0
    again = FudokiConfig.from_dict(copy.deepcopy(cfg.to_dict()))
    assert again.understanding_positions
    with pytest.raises(ValueError, match="understanding_positions=True"):
        janus_config_from_fudoki(cfg)


def test_config_round_trip():
    cfg = tiny_config()
    again = FudokiConfig.from_dict(copy.deepcopy(cfg.to_dict()))
    assert again == cfg
    assert cfg.image_token_count == 16  # 8 px / downsample 2 -> 4 x 4
    with pytest.raises(ValueError, match="unknown FUDOKI config"):
        FudokiConfig.from_dict({**cfg.to_dict(), "bogus": 1})


def janus_config() -> dict:
    """Janus-1.3B's ``config.json`` layout, with the field names the official
    ``modeling_vlm.py`` / ``projector.py`` / ``clip_encoder.py`` read."""
    mlp = {"cls": "MlpProjector", "params": {"projector_type": "mlp_gelu", "depth": 2}}
    return {
        "model_type": "multi_modality",
        "language_config": {
            "model_type": "llama",
            "vocab_size": 102400,
            "hidden_size": 2048,
            "intermediate_size": 5632,
            "num_hidden_layers": 24,
            "num_attention_heads": 16,
            "num_key_value_heads": 16,
            "max_position_embeddings": 16384,
        },
        "vision_config": {
            "cls": "CLIPVisionTower",
            "model_type": "vision",
            "params": {
                "image_size": 384,
                "model_name": "siglip_large_patch16_384",
                "select_feature": "same",
                "select_layer": -1,
            },
        },
        "aligner_config": {
            **mlp,
            "model_type": "aligner",
            "params": {**mlp["params"], "input_dim": 1024, "n_embed": 2048},
        },
        "gen_vision_config": {
            "cls": "VQ-16",
            "model_type": "gen_vision",
            "params": {"image_token_size": 16384, "n_embed": 8},
        },
        "gen_aligner_config": {
            **mlp,
            "model_type": "gen_aligner",
            "params": {**mlp["params"], "input_dim": 8, "n_embed": 2048},
        },
        "gen_head_config": {
            "cls": "vision_head",
            "model_type": "gen_head",
            "params": {"n_embed": 2048, "image_token_embed": 2048, "image_token_size": 16384},
        },
    }


def test_from_janus_config_matches_janus_1_3b():
    cfg = fudoki_config_from_janus(janus_config())
    assert cfg == FudokiConfig.janus_1_3b()
    assert cfg.image_token_count == 576
    assert cfg.understanding_token_count == 576


def test_from_janus_config_names_missing_fields():
    d = janus_config()
    del d["gen_head_config"]["params"]["image_token_embed"]
    del d["language_config"]["hidden_size"]
    del d["aligner_config"]
    with pytest.raises(ValueError) as info:
        fudoki_config_from_janus(d)
    msg = str(info.value)
    for field in (
        "gen_head_config.params.image_token_embed",
        "language_config.hidden_size",
        "aligner_config",
    ):
        assert field in msg
    with pytest.raises(ValueError, match="multi_modality"):
        fudoki_config_from_janus({**janus_config(), "model_type": "llama"})
    bad = janus_config()
    bad["gen_head_config"]["params"]["image_token_size"] = 100
    with pytest.raises(ValueError, match="image_token_size=100"):
        fudoki_config_from_janus(bad)


def test_janus_config_round_trip() -> None:
    real = FudokiConfig.janus_1_3b()
    janus = janus_config_from_fudoki(real)
    # The real architecture is named, exactly as Janus writes it: no kineflow extension.
    assert "kineflow_config" not in str(janus)
    assert janus["vision_config"]["params"]["model_name"] == "siglip_large_patch16_384"
    assert janus["gen_head_config"]["params"] == {
        "image_token_embed": 2048,
        "image_token_size": 16384,
        "n_embed": 2048,
    }
    assert fudoki_config_from_janus(janus).to_dict() == real.to_dict()
    # Smaller towers travel as params.kineflow_config.
    tiny = tiny_config()
    janus = janus_config_from_fudoki(tiny)
    assert janus["vision_config"]["params"]["kineflow_config"]["hidden_size"] == 8
    assert fudoki_config_from_janus(janus).to_dict() == tiny.to_dict()
    janus["gen_vision_config"]["params"]["kineflow_config"] = "VQ-8"
    with pytest.raises(ValueError, match="kineflow_config must be an object"):
        fudoki_config_from_janus(janus)
