"""With nothing padded, LlamaModel calls SDPA without a mask tensor (``is_causal`` or none)
and gets what the materialised mask gives."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kineflow.models.llama import LlamaConfig, LlamaModel
from kineflow.models.masking import KVCache, build_attention_mask, plain_attention


def tiny(**extra) -> LlamaModel:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=31, hidden_size=32, intermediate_size=48,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=64, **extra)  # fmt: skip
    return LlamaModel(config).eval()


@pytest.fixture
def sdpa_calls(monkeypatch) -> list[dict]:
    """Every SDPA call's ``attn_mask`` and ``is_causal``."""
    calls, real = [], F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, is_causal=False, **kw):
        calls.append({"attn_mask": attn_mask, "is_causal": is_causal})
        return real(q, k, v, attn_mask=attn_mask, is_causal=is_causal, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    return calls


def masked_path(monkeypatch, model, **kwargs) -> torch.Tensor:
    """The same forward with the fast path off (the mask tensor always built)."""
    with monkeypatch.context() as m:
        m.setattr("kineflow.models.llama.plain_attention", lambda *a, **k: None)
        return model(**kwargs)


@pytest.mark.parametrize("mode", ["causal", "full"])
def test_unpadded_rows_take_the_fast_path_with_the_masked_paths_outputs(
    mode, monkeypatch, sdpa_calls
):
    model = tiny()
    ids = torch.randint(0, 31, (3, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        slow = masked_path(monkeypatch, model, input_ids=ids, mask=mode)
        assert all(c["attn_mask"] is not None for c in sdpa_calls)
        sdpa_calls.clear()
        fast = model(input_ids=ids, mask=mode)
        real = torch.ones(3, 9, dtype=torch.bool)
        explicit = model(input_ids=ids, mask=mode, attention_mask=real)
    assert len(sdpa_calls) == 4  # two layers, two calls
    assert all(c["attn_mask"] is None for c in sdpa_calls)
    assert all(c["is_causal"] == (mode == "causal") for c in sdpa_calls)
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(explicit, slow, rtol=1e-5, atol=1e-5)
    if mode == "causal":  # the fast path must still be causal: a later token changes nothing
        ids2 = ids.clone()
        ids2[:, -1] = (ids2[:, -1] + 1) % 31
        with torch.no_grad():
            torch.testing.assert_close(model(input_ids=ids2)[:, :-1], fast[:, :-1])


def test_padded_rows_keep_the_mask_tensor(sdpa_calls):
    model = tiny()
    ids = torch.randint(0, 31, (2, 6), generator=torch.Generator().manual_seed(2))
    attention_mask = torch.tensor([[0, 1, 1, 1, 1, 1], [1] * 6]).bool()
    with torch.no_grad():
        model(input_ids=ids, attention_mask=attention_mask)
    assert sdpa_calls and all(c["attn_mask"] is not None for c in sdpa_calls)


def test_decoding_after_a_cache_matches_the_full_forward(sdpa_calls):
    """A one-token step after an unpadded cache takes the no-mask path; a several-token
    chunk after the cache keeps the tensor (SDPA's is_causal is top-left aligned)."""
    model = tiny()
    ids = torch.randint(0, 31, (2, 8), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        whole = model(input_ids=ids)
        cache = KVCache()
        model(input_ids=ids[:, :5], kv_cache=cache)
        sdpa_calls.clear()
        chunk = model(input_ids=ids[:, 5:7], kv_cache=cache)
        assert all(c["attn_mask"] is not None for c in sdpa_calls)
        sdpa_calls.clear()
        last = model(input_ids=ids[:, 7:], kv_cache=cache)
        assert all(c["attn_mask"] is None and not c["is_causal"] for c in sdpa_calls)
    torch.testing.assert_close(chunk, whole[:, 5:7], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(last, whole[:, 7:], rtol=1e-5, atol=1e-5)


def test_softcapped_attention_with_the_plain_causal_mask(monkeypatch):
    model = tiny(attn_logit_softcapping=5.0)
    ids = torch.randint(0, 31, (2, 7), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(
            model(input_ids=ids), masked_path(monkeypatch, model, input_ids=ids),
            rtol=1e-5, atol=1e-5,
        )  # fmt: skip


@pytest.mark.parametrize(
    ("key_mask", "n", "mode", "window", "expected"),
    [
        ([[1, 1, 1]], None, "causal", None, "causal"),
        ([[1, 1, 1]], None, "full", None, "full"),
        ([[1, 1, 1]], 1, "causal", None, "full"),
        ([[1, 1, 1]], 2, "causal", None, None),
        ([[0, 1, 1]], None, "full", None, None),
        ([[1, 1, 1]], None, "prefix", None, None),
        ([[1, 1, 1]], None, "causal", 2, None),
    ],
)
def test_plain_attention_is_the_built_mask_when_it_answers(key_mask, n, mode, window, expected):
    key_mask = torch.tensor(key_mask).bool()
    assert plain_attention(key_mask, n, mode, window) == expected
    if expected is not None:
        built = build_attention_mask(key_mask, n, mode)[0, 0]
        N_k = key_mask.shape[1]
        plain = torch.ones(built.shape, dtype=torch.bool)
        if expected == "causal":
            plain = plain.tril(N_k - built.shape[0])
        assert torch.equal(built, plain)
