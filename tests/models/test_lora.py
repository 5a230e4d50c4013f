"""LoRA adapters: zero-init identity, the update formula, merge, state-dict round trip, and
parity with the real ``peft`` package on the same kineflow backbone."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from kineflow.models.llama import LlamaConfig, LlamaModel
from kineflow.models.lora import (
    LoRALinear,
    apply_lora,
    load_lora_state_dict,
    lora_state_dict,
    match_target,
    merge_lora,
)

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_backbone(seed: int = 0) -> LlamaModel:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=48,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         head_dim=8, max_position_embeddings=32)  # fmt: skip
    return LlamaModel(config).eval()


def randomise_adapters(model: nn.Module, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in (p for n, p in model.named_parameters() if "lora_" in n):
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def test_lora_linear_formula_and_zero_init() -> None:
    torch.manual_seed(0)
    base = nn.Linear(6, 5)
    x = torch.randn(3, 6)
    ref = base(x)
    lora = LoRALinear(copy.deepcopy(base), rank=2, alpha=8.0)
    assert torch.equal(lora(x), ref)  # B = 0: the wrapped layer is the base layer
    randomise_adapters(lora)
    expected = x @ base.weight.T + base.bias + 4.0 * (x @ lora.lora_A.T @ lora.lora_B.T)
    torch.testing.assert_close(lora(x), expected)
    assert not lora.base.weight.requires_grad and lora.lora_A.requires_grad


def test_match_target() -> None:
    assert match_target("layers.0.self_attn.q_proj", ["q_proj"])
    assert match_target("layers.0.mlp.up_proj", ["mlp.up_proj"])
    assert not match_target("layers.0.self_attn.qq_proj", ["q_proj"])
    assert match_target("layers.1.mlp.down_proj", [r"re:layers\.1\..*"])
    assert not match_target("layers.0.mlp.down_proj", [r"re:layers\.1\..*"])


def test_apply_merge_and_round_trip() -> None:
    model = tiny_backbone()
    ids = torch.randint(0, 50, (2, 9))
    base_out = model(ids)
    replaced = apply_lora(model, TARGETS, rank=4, alpha=8)
    assert len(replaced) == 2 * 7
    assert torch.equal(model(ids), base_out)
    randomise_adapters(model)
    adapted = model(ids)
    assert (adapted - base_out).abs().max() > 1e-3
    # Round trip: a fresh copy of the base with the saved adapter gives the same outputs.
    other = tiny_backbone()
    apply_lora(other, TARGETS, rank=4, alpha=8)
    load_lora_state_dict(other, lora_state_dict(model))
    assert torch.equal(other(ids), adapted)
    # Merged = base + adapter, and plain nn.Linear layers again.
    assert merge_lora(other) == 14
    assert not any(isinstance(m, LoRALinear) for m in other.modules())
    assert set(other.state_dict()) == set(tiny_backbone().state_dict())
    torch.testing.assert_close(other(ids), adapted, atol=1e-5, rtol=1e-5)


def test_bad_targets_and_bad_adapter() -> None:
    with pytest.raises(ValueError, match=r"match no nn\.Linear"):
        apply_lora(tiny_backbone(), ["nothing_here"], rank=2, alpha=2)
    with pytest.raises(ValueError, match=r"not an nn\.Linear"):
        apply_lora(tiny_backbone(), ["mlp"], rank=2, alpha=2)
    model = tiny_backbone()
    apply_lora(model, ["q_proj"], rank=2, alpha=2)
    weights = lora_state_dict(model)
    weights["layers.0.self_attn.q_proj.lora_A"] = torch.zeros(3, 32)
    with pytest.raises(ValueError, match=r"q_proj\.lora_A"):
        load_lora_state_dict(model, weights)
    with pytest.raises(ValueError, match="missing"):
        load_lora_state_dict(model, {})


def test_parity_with_peft() -> None:
    """The same A / B in peft's LoRA and in kineflow's give the same outputs and merged weights."""
    peft = pytest.importorskip("peft")
    ours = tiny_backbone()
    theirs = peft.get_peft_model(
        tiny_backbone(),
        peft.LoraConfig(r=4, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS),
    ).eval()
    apply_lora(ours, TARGETS, rank=4, alpha=16)
    randomise_adapters(ours)
    mine = lora_state_dict(ours)
    theirs_params = dict(theirs.named_parameters())
    with torch.no_grad():
        for key, value in mine.items():
            module, kind = key.rsplit(".", 1)
            theirs_params[f"base_model.model.{module}.{kind}.default.weight"].copy_(value)
    adapted = [n for n in theirs_params if "lora_" in n]
    assert len(adapted) == len(mine)  # peft adapted exactly the same modules
    ids = torch.randint(0, 50, (2, 11))
    out = ours(ids)
    torch.testing.assert_close(theirs(ids), out, atol=1e-6, rtol=1e-5)
    merged_theirs = theirs.merge_and_unload().state_dict()
    merge_lora(ours)
    merged_ours = ours.state_dict()
    assert set(merged_ours) == set(merged_theirs)
    for k, v in merged_ours.items():
        torch.testing.assert_close(merged_theirs[k], v, atol=1e-6, rtol=1e-5)
