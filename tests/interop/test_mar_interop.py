"""MAR DiffLoss weights in kineflow's diffusion head (:mod:`kineflow.interop.mar`), and the
affine block norms that make it possible, with old checkpoints (no norm parameters) still
loading as the identity.

The MAR state dicts here are built by hand with MAR's key names and shapes (LTH14/mar,
``models/diffloss.py``), and MAR's ``SimpleMLPAdaLN`` forward pass is written out from its
formulas below, independently of kineflow's modules."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

import kineflow
from kineflow.interop.mar import config_from_mar, from_mar, head_from_mar, to_mar
from kineflow.models.diffusion_head import DiffusionHead, DiffusionHeadConfig, add_identity_norms

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[2]
C, DZ, W, DEPTH, FREQ = 4, 6, 16, 2, 256  # token, condition, width, blocks, MAR's t-embedding


def mar_state(seed: int = 0, prefix: str = "net.") -> dict[str, Tensor]:
    """Random tensors under MAR's DiffLoss names and shapes (non-identity norms, non-zero
    modulations and output, so every parameter matters)."""
    g = torch.Generator().manual_seed(seed)
    shapes = {
        "time_embed.mlp.0": (W, FREQ),
        "time_embed.mlp.2": (W, W),
        "cond_embed": (W, DZ),
        "input_proj": (W, C),
        "final_layer.linear": (2 * C, W),
        "final_layer.adaLN_modulation.1": (2 * W, W),
    }
    for i in range(DEPTH):
        shapes[f"res_blocks.{i}.mlp.0"] = (W, W)
        shapes[f"res_blocks.{i}.mlp.2"] = (W, W)
        shapes[f"res_blocks.{i}.adaLN_modulation.1"] = (3 * W, W)
    state = {}
    for name, (out, inp) in shapes.items():
        state[f"{prefix}{name}.weight"] = torch.randn(out, inp, generator=g) / math.sqrt(inp)
        state[f"{prefix}{name}.bias"] = 0.1 * torch.randn(out, generator=g)
    for i in range(DEPTH):
        state[f"{prefix}res_blocks.{i}.in_ln.weight"] = 1 + 0.5 * torch.randn(W, generator=g)
        state[f"{prefix}res_blocks.{i}.in_ln.bias"] = 0.3 * torch.randn(W, generator=g)
    return state


def mar_forward(s: dict[str, Tensor], x: Tensor, t: Tensor, c: Tensor) -> Tensor:
    """MAR's ``SimpleMLPAdaLN.forward(x, t, c)`` from its formulas, reading MAR's keys."""

    def linear(name: str, h: Tensor) -> Tensor:
        return h @ s[f"net.{name}.weight"].T + s[f"net.{name}.bias"]

    def norm(h: Tensor) -> Tensor:  # LayerNorm, eps 1e-6, biased variance
        mean = h.mean(-1, keepdim=True)
        return (h - mean) / torch.sqrt(((h - mean) ** 2).mean(-1, keepdim=True) + 1e-6)

    half = FREQ // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
    args = t[:, None].float() * freqs[None]
    t_freq = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    y = linear("time_embed.mlp.2", F.silu(linear("time_embed.mlp.0", t_freq)))
    y = y + linear("cond_embed", c)
    h = linear("input_proj", x)
    for i in range(DEPTH):
        b = f"res_blocks.{i}"
        shift, scale, gate = linear(f"{b}.adaLN_modulation.1", F.silu(y)).chunk(3, dim=-1)
        n = norm(h) * s[f"net.{b}.in_ln.weight"] + s[f"net.{b}.in_ln.bias"]
        h = h + gate * linear(f"{b}.mlp.2", F.silu(linear(f"{b}.mlp.0", n * (1 + scale) + shift)))
    shift, scale = linear("final_layer.adaLN_modulation.1", F.silu(y)).chunk(2, dim=-1)
    return linear("final_layer.linear", norm(h) * (1 + scale) + shift)


def head_built_from(s: dict[str, Tensor]) -> DiffusionHead:
    """A head with MAR's tensors copied in module by module (no key renaming involved)."""
    head = DiffusionHead(DiffusionHeadConfig(token_dim=C, cond_dim=DZ, width=W, depth=DEPTH))
    net = head.net
    pairs = [
        (net.time_embed[0], "time_embed.mlp.0"),
        (net.time_embed[2], "time_embed.mlp.2"),
        (net.cond_embed, "cond_embed"),
        (net.input_proj, "input_proj"),
        (net.output, "final_layer.linear"),
        (net.final_modulation[1], "final_layer.adaLN_modulation.1"),
    ]
    for i, block in enumerate(net.blocks):
        pairs += [
            (block.norm, f"res_blocks.{i}.in_ln"),
            (block.mlp[0], f"res_blocks.{i}.mlp.0"),
            (block.mlp[2], f"res_blocks.{i}.mlp.2"),
            (block.modulation[1], f"res_blocks.{i}.adaLN_modulation.1"),
        ]
    with torch.no_grad():
        for module, name in pairs:
            module.weight.copy_(s[f"net.{name}.weight"])
            module.bias.copy_(s[f"net.{name}.bias"])
    return head


def test_loaded_head_computes_mars_network() -> None:
    s = mar_state()
    head = head_from_mar(s)
    assert head.config == DiffusionHeadConfig(token_dim=C, cond_dim=DZ, width=W, depth=DEPTH)
    g = torch.Generator().manual_seed(3)
    x, z = torch.randn(8, C, generator=g), torch.randn(8, DZ, generator=g)
    t = torch.tensor([0, 1, 10, 99, 250, 500, 998, 999])
    with torch.no_grad():
        torch.testing.assert_close(head.net(x, t, z), mar_forward(s, x, t, z))


def test_loaded_head_loss_and_sampler_equal_a_head_built_from_the_same_tensors() -> None:
    s = mar_state()
    loaded, direct = head_from_mar(s), head_built_from(s)
    g = torch.Generator().manual_seed(4)
    x0, z, z_null = (torch.randn(6, n, generator=g) for n in (C, DZ, DZ))
    seed = lambda: torch.Generator().manual_seed(5)  # noqa: E731
    assert torch.equal(loaded.loss(x0, z, seed()), direct.loss(x0, z, seed()))
    for kwargs in ({}, {"z_uncond": z_null, "cfg_scale": 2.5, "temperature": 0.9}):
        a = loaded.sample(z, generator=seed(), **kwargs)
        assert torch.isfinite(a).all()
        assert torch.equal(a, direct.sample(z, generator=seed(), **kwargs))


def test_whole_mar_model_and_round_trip() -> None:
    s = mar_state()
    # A whole MAR model's state dict: the DiffLoss under "diffloss.", other modules ignored.
    whole = {"diffloss." + k: v for k, v in s.items()}
    whole["encoder_blocks.0.attn.qkv.weight"] = torch.zeros(3, 3)
    a, b = head_from_mar(s), head_from_mar(whole, sample_steps=50, draws=2)
    assert (b.config.sample_steps, b.config.draws) == (50, 2)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb)
    back = to_mar(a)
    assert back.keys() == s.keys() and all(torch.equal(back[k], s[k]) for k in s)
    assert to_mar(a, prefix="diffloss.net.").keys() == {k for k in whole if "diffloss" in k}
    assert from_mar(s).keys() == a.state_dict().keys()
    assert config_from_mar(whole).depth == DEPTH


def test_bad_mar_state_dicts_are_named() -> None:
    s = mar_state()
    missing = {k: v for k, v in s.items() if k != "net.res_blocks.1.in_ln.bias"}
    with pytest.raises(ValueError, match=r"1 missing: net\.res_blocks\.1\.in_ln\.bias"):
        head_from_mar(missing)
    extra = {**s, "net.res_blocks.0.extra.weight": torch.zeros(W)}
    with pytest.raises(ValueError, match=r"unexpected: net\.res_blocks\.0\.extra\.weight"):
        head_from_mar(extra)
    with pytest.raises(ValueError, match=r"not in MAR's DiffLoss network: net\.res_blocks\.0\.ex"):
        from_mar(extra)
    narrow = {**s, "net.final_layer.linear.weight": torch.zeros(C, W)}
    with pytest.raises(ValueError, match=r"net\.final_layer\.linear\.weight: expected \(8, 16\)"):
        head_from_mar(narrow)
    with pytest.raises(ValueError, match="not a MAR DiffLoss state dict"):
        head_from_mar({"blocks.0.weight": torch.zeros(2)})
    with pytest.raises(ValueError, match="MAR has no name for: extra"):
        to_mar({"extra": torch.zeros(1)})


def test_head_state_dict_without_norms_loads_as_identity() -> None:
    """A head saved before the block norms had parameters: ``load_state_dict`` (strict) and
    :func:`add_identity_norms` give weight 1, bias 0, i.e. the plain norm it computed."""
    config = DiffusionHeadConfig(token_dim=C, cond_dim=DZ, width=W, depth=DEPTH)
    donor = head_from_mar(mar_state())
    old = {k: v for k, v in donor.state_dict().items() if ".norm." not in k}
    assert len(old) == len(donor.state_dict()) - 2 * DEPTH
    head = DiffusionHead(config)
    with torch.no_grad():
        for block in head.net.blocks:
            block.norm.weight.fill_(7.0)
    head.load_state_dict(old)  # strict
    for block in head.net.blocks:
        assert torch.equal(block.norm.weight, torch.ones(W))
        assert torch.equal(block.norm.bias, torch.zeros(W))
    filled = add_identity_norms(old)
    assert filled.keys() == donor.state_dict().keys()
    assert torch.equal(filled["net.blocks.1.norm.weight"], torch.ones(W))
    # Half a pair is not an old checkpoint: the strict load still reports the missing half.
    half = {k: v for k, v in donor.state_dict().items() if k != "net.blocks.0.norm.bias"}
    assert "net.blocks.0.norm.bias" not in add_identity_norms(half)
    with pytest.raises(RuntimeError, match=r"net\.blocks\.0\.norm\.bias"):
        DiffusionHead(config).load_state_dict(half)


def test_a_unifluid_folder_without_affine_norms_still_loads(tmp_path: Path) -> None:
    """A UniFluid folder saved before the head's norms were affine (the shipped one until
    2026-12-07) loads, with identity norms: built here from the shipped folder, norms dropped."""
    import shutil

    from safetensors.torch import load_file, save_file

    folder = tmp_path / "old"
    shutil.copytree(ROOT / "checkpoints" / "unifluid-shapes", folder)
    weights = load_file(str(folder / "model.safetensors"))
    is_norm = lambda k: k.startswith("diffusion_head.net.blocks.") and ".norm." in k  # noqa: E731
    dropped = [k for k in weights if is_norm(k)]
    assert dropped  # the shipped folder has them now
    kept = {k: v for k, v in weights.items() if not is_norm(k)}
    save_file(kept, str(folder / "model.safetensors"), metadata={"kineflow_type": "unifluid"})
    pipe = kineflow.load(folder)
    blocks = pipe.model.diffusion_head.net.blocks
    assert len(blocks) > 0
    for block in blocks:
        assert torch.equal(block.norm.weight, torch.ones_like(block.norm.weight))
        assert torch.equal(block.norm.bias, torch.zeros_like(block.norm.bias))
