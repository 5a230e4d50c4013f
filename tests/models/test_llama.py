"""Tests for the Llama decoder backbone: Hugging Face parity, masks, KV cache, validation."""

from __future__ import annotations

import pytest
import torch

from kineflow.models.llama import LlamaConfig, LlamaModel
from kineflow.models.masking import KVCache, build_attention_mask

transformers = pytest.importorskip("transformers")

TINY = dict(
    vocab_size=100,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    rms_norm_eps=1e-6,
    rope_theta=10000.0,
    max_position_embeddings=128,
)
ATOL = 1e-5


def _randomise(model: torch.nn.Module, seed: int = 0) -> None:
    # Larger-than-init weights (and non-unit norm scales) so the comparison is not trivially small.
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2 + (1.0 if p.ndim == 1 else 0.0))


@pytest.fixture(scope="module")
def pair() -> tuple[LlamaModel, torch.nn.Module]:
    hf_cfg = transformers.LlamaConfig(**TINY, attention_bias=False)
    hf_cfg._attn_implementation = "sdpa"
    hf = transformers.LlamaModel(hf_cfg).eval()
    _randomise(hf)
    ours = LlamaModel(LlamaConfig(**TINY)).eval()
    ours.load_state_dict(hf.state_dict(), strict=True)
    return ours, hf


def _ids(B: int, N: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 100, (B, N), generator=torch.Generator().manual_seed(seed))


def _hf(hf, ids, mask, position_ids=None):
    with torch.no_grad():
        return hf(input_ids=ids, attention_mask=mask, position_ids=position_ids).last_hidden_state


@pytest.mark.parametrize("side", ["right", "left"])
def test_causal_parity_with_padding(pair, side):
    ours, hf = pair
    ids = _ids(3, 9)
    lengths = torch.tensor([9, 6, 3])
    ar = torch.arange(9)[None]
    real = ar < lengths[:, None] if side == "right" else ar >= 9 - lengths[:, None]
    # HF counts positions from the start of the row; give it the real-token positions ours uses.
    pos = (real.long().cumsum(1) - 1).clamp_min(0)
    ref = _hf(hf, ids, real.long(), pos)
    with torch.no_grad():
        out = ours(ids, attention_mask=real, mask="causal")
    err = (out - ref)[real].abs().max().item()
    assert err < ATOL, err
    assert torch.isfinite(out).all()


def test_full_parity_with_4d_mask(pair):
    ours, hf = pair
    ids = _ids(2, 7, seed=2)
    real = torch.ones(2, 7, dtype=torch.bool)
    real[1, 5:] = False
    mask4 = real[:, None, None, :].expand(2, 1, 7, 7)
    ref_bool = _hf(hf, ids, mask4)
    additive = torch.zeros(2, 1, 7, 7).masked_fill(~mask4, torch.finfo(torch.float32).min)
    ref_add = _hf(hf, ids, additive)
    with torch.no_grad():
        out = ours(ids, attention_mask=real, mask="full")
    assert (out - ref_bool)[real].abs().max().item() < ATOL
    assert (out - ref_add)[real].abs().max().item() < ATOL
    assert torch.isfinite(out).all()


def _brute_prefix_mask(key_mask: torch.Tensor, prefix: torch.Tensor) -> torch.Tensor:
    B, N = key_mask.shape
    out = torch.zeros(B, 1, N, N, dtype=torch.bool)
    for b in range(B):
        ranks, rank = [], -1
        for j in range(N):
            rank += int(key_mask[b, j])
            ranks.append(rank)
        for i in range(N):
            for j in range(N):
                out[b, 0, i, j] = bool(key_mask[b, j]) and (j <= i or ranks[j] < int(prefix[b]))
            if not out[b, 0, i].any():
                out[b, 0, i, i] = True  # safe row for a query with no real key
    return out


def test_build_mask_prefix_brute_force():
    key_mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0, 0]], dtype=torch.bool)
    prefix = torch.tensor([3, 2])
    got = build_attention_mask(key_mask, mode="prefix", prefix_lengths=prefix)
    assert got.shape == (2, 1, 7, 7) and got.dtype == torch.bool
    assert torch.equal(got, _brute_prefix_mask(key_mask, prefix))


def test_build_mask_modes_small():
    km = torch.tensor([[1, 1, 1, 0]], dtype=torch.bool)
    causal = build_attention_mask(km, mode="causal")[0, 0]
    full = build_attention_mask(km, mode="full")[0, 0]
    assert causal.tolist() == [
        [True, False, False, False],
        [True, True, False, False],
        [True, True, True, False],
        [True, True, True, False],
    ]
    assert full.tolist() == [[True, True, True, False]] * 4
    # Queries as the last N keys (after a cache): row i sits at key position N_k - N + i.
    tail = build_attention_mask(km, num_queries=2, mode="causal")[0, 0]
    assert tail.tolist() == causal[2:].tolist()


def test_prefix_forward_matches_reference_mask(pair):
    ours, hf = pair
    ids = _ids(2, 8, seed=3)
    real = torch.ones(2, 8, dtype=torch.bool)
    real[0, :2] = False  # left padding
    prefix = torch.tensor([4, 5])
    with torch.no_grad():
        out = ours(ids, attention_mask=real, mask="prefix", prefix_lengths=prefix)
        # The first prefix token sees the whole prefix, so it differs from causal.
        causal = ours(ids, attention_mask=real, mask="causal")
    assert torch.isfinite(out).all()
    pos = (real.long().cumsum(1) - 1).clamp_min(0)
    ref = _hf(hf, ids, _brute_prefix_mask(real, prefix), pos)
    assert (out - ref)[real].abs().max().item() < ATOL
    assert (out[0, 2] - causal[0, 2]).abs().max() > 1e-3
    # Changing the last (suffix) token must not reach any prefix position.
    ids2 = ids.clone()
    ids2[:, -1] = (ids2[:, -1] + 1) % 100
    with torch.no_grad():
        out2 = ours(ids2, attention_mask=real, mask="prefix", prefix_lengths=prefix)
    assert torch.allclose(out[0, 2:6], out2[0, 2:6], atol=1e-6)
    assert torch.allclose(out[1, :5], out2[1, :5], atol=1e-6)


def test_kv_cache_matches_full_forward(pair):
    ours, _ = pair
    ids = _ids(2, 10, seed=4)
    real = torch.ones(2, 10, dtype=torch.bool)
    real[1, :3] = False  # left-padded second row
    with torch.no_grad():
        ref = ours(ids, attention_mask=real, mask="causal")
        cache = KVCache()
        chunks = [ours(ids[:, :6], attention_mask=real[:, :6], kv_cache=cache)]
        for t in range(6, 10):
            chunks.append(
                ours(ids[:, t : t + 1], attention_mask=real[:, t : t + 1], kv_cache=cache)
            )
    out = torch.cat(chunks, dim=1)
    assert cache.seq_length == 10 and cache.keys[0].shape == (2, 2, 10, 16)
    assert (out - ref)[real].abs().max().item() < ATOL


def test_left_padding_equals_unpadded(pair):
    ours, _ = pair
    ids = _ids(1, 6, seed=5)
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], dim=1)
    real = torch.tensor([[False] * 3 + [True] * 6])
    with torch.no_grad():
        for mode, kw in [("causal", {}), ("full", {}), ("prefix", {"prefix_lengths": [2]})]:
            a = ours(ids, mask=mode, **kw)
            b = ours(padded, attention_mask=real, mask=mode, **kw)
            assert (a - b[:, 3:]).abs().max().item() < ATOL, mode


def test_janus_config_shapes_on_meta():
    cfg = LlamaConfig.janus_1_3b()
    assert cfg.head_dim == 128 and cfg.num_key_value_heads == 16
    with torch.device("meta"):
        model = LlamaModel(cfg)
    sd = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert len(sd) == 1 + 24 * 9 + 1
    assert sd["embed_tokens.weight"] == (102400, 2048)
    assert sd["layers.23.self_attn.q_proj.weight"] == (2048, 2048)
    assert sd["layers.0.self_attn.k_proj.weight"] == (2048, 2048)
    assert sd["layers.0.self_attn.o_proj.weight"] == (2048, 2048)
    assert sd["layers.0.mlp.gate_proj.weight"] == (5632, 2048)
    assert sd["layers.0.mlp.up_proj.weight"] == (5632, 2048)
    assert sd["layers.0.mlp.down_proj.weight"] == (2048, 5632)
    assert sd["layers.0.input_layernorm.weight"] == (2048,)
    assert sd["layers.0.post_attention_layernorm.weight"] == (2048,)
    assert sd["norm.weight"] == (2048,)
    assert not any(k.endswith(".bias") for k in sd)
    n_params = sum(v.numel() for v in model.parameters())
    per_layer = 4 * 2048 * 2048 + 3 * 2048 * 5632 + 2 * 2048
    assert n_params == 24 * per_layer + 102400 * 2048 + 2048  # 1.44e9, lm_head not included
    out = model(torch.zeros(1, 4, dtype=torch.long, device="meta"))
    assert out.shape == (1, 4, 2048)


def test_config_roundtrip_and_validation():
    cfg = LlamaConfig(**TINY)
    assert LlamaConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.head_dim == 16
    with pytest.raises(ValueError, match=r"unknown LlamaConfig key\(s\) \['bogus'\]"):
        LlamaConfig.from_dict({**cfg.to_dict(), "bogus": 1})
    with pytest.raises(ValueError, match="num_attention_heads=5 must divide hidden_size=64"):
        LlamaConfig(**{**TINY, "num_attention_heads": 5})
    with pytest.raises(ValueError, match="num_key_value_heads=3 must be >= 1 and divide"):
        LlamaConfig(**{**TINY, "num_key_value_heads": 3})


def test_bad_inputs_raise(pair):
    ours, _ = pair
    ids = _ids(2, 5)
    emb = torch.zeros(2, 5, 64)
    with pytest.raises(ValueError, match="exactly one of input_ids and inputs_embeds, got both"):
        ours(ids, inputs_embeds=emb)
    with pytest.raises(ValueError, match="exactly one of input_ids and inputs_embeds, got neither"):
        ours()
    bad = ids.clone()
    bad[1, 2] = 150
    with pytest.raises(ValueError, match=r"input_ids must lie in \[0, vocab_size=100\), got 150"):
        ours(bad)
    bad[1, 2] = -3
    with pytest.raises(ValueError, match=r"got -3"):
        ours(bad)
    with pytest.raises(ValueError, match="mask='prefix' needs prefix_lengths"):
        ours(ids, mask="prefix")
    with pytest.raises(ValueError, match=r"prefix_lengths is only used with mask='prefix'"):
        ours(ids, mask="causal", prefix_lengths=[1, 1])
    with pytest.raises(ValueError, match="mask must be one of"):
        ours(ids, mask="bidirectional")
    with pytest.raises(
        ValueError, match=r"attention_mask must have shape \[B, N\] = \(2, 5\).*got \(2, 4\)"
    ):
        ours(ids, attention_mask=torch.ones(2, 4))
    with pytest.raises(ValueError, match=r"inputs_embeds must be \[B, N, 64\], got shape"):
        ours(inputs_embeds=torch.zeros(2, 5, 32))
    with pytest.raises(ValueError, match=r"position_ids must have shape"):
        ours(ids, position_ids=torch.arange(4))
    with pytest.raises(ValueError, match="one entry per row"):
        ours(ids, mask="prefix", prefix_lengths=[1, 2, 3])
