"""The shared decoder with Gemma-2 options against ``transformers``' Gemma2 (same random
weights), plus loading a Hugging Face Gemma-2 folder."""

from __future__ import annotations

import pytest
import torch

from kineflow.interop.gemma import llama_config_from_gemma2, load_hf_gemma2
from kineflow.models.llama import LlamaConfig, LlamaModel, softcap
from kineflow.models.masking import KVCache, default_position_ids

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.usefixtures("one_thread")
#: float32 on both sides (both normalise in float32); differences are rounding only.
TOL = {"rtol": 1e-5, "atol": 1e-5}


def hf_model(**overrides):
    """A tiny Gemma2ForCausalLM whose caps and window bind: softcap 2 on the scores, window 3."""
    config = transformers.Gemma2Config(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=24,
        sliding_window=3, attn_logit_softcapping=2.0, final_logit_softcapping=3.0,
        max_position_embeddings=64, attn_implementation="eager", **overrides,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.Gemma2ForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:  # Gemma's norms start at 0: make the (1 + w) visible
                p.normal_(0.0, 0.5)
    return model


def ours(hf) -> LlamaModel:
    model = LlamaModel(llama_config_from_gemma2(hf.config.to_dict())).eval()
    state = {k.removeprefix("model."): v for k, v in hf.state_dict().items()}
    state.pop("lm_head.weight")
    model.load_state_dict(state)
    return model


def test_config_maps_gemma2() -> None:
    c = LlamaConfig.gemma2_2b()
    assert (c.hidden_size, c.num_hidden_layers, c.head_dim, c.num_key_value_heads) == (
        2304, 26, 256, 4)  # fmt: skip
    assert c.layer_types[:2] == ["sliding_attention", "full_attention"]
    assert c.norm_offset and c.embed_scale and c.sandwich_norms and c.hidden_act == "gelu_tanh"
    assert (c.attn_logit_softcapping, c.final_logit_softcapping) == (50.0, 30.0)
    with pytest.raises(ValueError, match="sliding_attention layers need a sliding_window"):
        LlamaConfig(8, 8, 8, 1, 1, layer_types=["sliding_attention"])
    with pytest.raises(ValueError, match="hidden_act must be one of"):
        LlamaConfig(8, 8, 8, 1, 1, hidden_act="relu")


def test_gemma2_2b_is_the_hugging_face_2b_config() -> None:
    """``LlamaConfig.gemma2_2b`` spells out what the Hugging Face 2B config maps to."""
    hf_2b = {
        "vocab_size": 256000,
        "hidden_size": 2304,
        "intermediate_size": 9216,
        "num_hidden_layers": 26,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
        "head_dim": 256,
        "max_position_embeddings": 8192,
        "query_pre_attn_scalar": 256,
        "sliding_window": 4096,
    }
    assert LlamaConfig.gemma2_2b().to_dict() == llama_config_from_gemma2(hf_2b).to_dict()


def test_matches_transformers_gemma2() -> None:
    hf = hf_model()
    model = ours(hf)
    ids = torch.randint(0, 128, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = hf.model(input_ids=ids).last_hidden_state
        got = model(ids, mask="causal")
        torch.testing.assert_close(got, want, **TOL)
        logits = softcap(got @ model.embed_tokens.weight.T, model.config.final_logit_softcapping)
        torch.testing.assert_close(logits, hf(input_ids=ids).logits, **TOL)
    assert logits.abs().max() <= 3.0  # the final cap binds


def test_matches_transformers_with_left_padding() -> None:
    hf = hf_model()
    model = ours(hf)
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(2))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[0, :4] = 0
    positions = default_position_ids(mask)
    with torch.no_grad():
        want = hf.model(input_ids=ids, attention_mask=mask, position_ids=positions)
        got = model(ids, attention_mask=mask, mask="causal")
    real = mask.bool()
    torch.testing.assert_close(got[real], want.last_hidden_state[real], **TOL)


def test_kv_cache_with_sliding_window_equals_one_pass() -> None:
    model = ours(hf_model())
    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = model(ids, mask="causal")
        cache = KVCache()
        steps = [model(ids[:, :4], mask="causal", kv_cache=cache)]
        steps += [model(ids[:, i : i + 1], mask="causal", kv_cache=cache) for i in range(4, 10)]
    torch.testing.assert_close(torch.cat(steps, 1), full, **TOL)


def test_load_hf_folder(tmp_path) -> None:
    hf = hf_model()
    hf.save_pretrained(tmp_path / "gemma")
    model = load_hf_gemma2(tmp_path / "gemma")
    ids = torch.randint(0, 128, (1, 7), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf.model(input_ids=ids).last_hidden_state)
    (tmp_path / "gemma" / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(ValueError, match="not 'gemma2'"):
        load_hf_gemma2(tmp_path / "gemma")
