"""Parameter counts from configs (kineflow.models.size) and the size limit kineflow.load applies
before building a model."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from janus_fixture import write_janus_checkpoint
from torch import nn

import kineflow
from kineflow.interop.gemma import llama_config_from_gemma2
from kineflow.models import size
from kineflow.models.diffusion_head import DiffusionHead, DiffusionHeadConfig
from kineflow.models.fudoki import FudokiConfig, FudokiModel
from kineflow.models.llama import LlamaConfig, LlamaModel
from kineflow.models.siglip import SiglipConfig, SiglipVisionModel
from kineflow.models.unifluid import UnifluidConfig, UnifluidModel
from kineflow.pipelines import loading
from kineflow.tokenizers.autoencoder import AutoencoderConfig, Decoder, Encoder
from kineflow.tokenizers.kl_vae import AutoencoderKL, KLConfig
from kineflow.tokenizers.vq import VQConfig, VQModel

ROOT = Path(__file__).resolve().parents[2]
CHECKPOINTS = ROOT / "checkpoints"


def count(model: nn.Module) -> int:
    """What loading fills: every tensor of the state dict."""
    return sum(t.numel() for t in model.state_dict().values())


# -- small configs of every family ----------------------------------------------------------------
def llama(**kw) -> LlamaConfig:
    base = dict(vocab_size=50, hidden_size=24, intermediate_size=40, num_hidden_layers=3,
                num_attention_heads=4)  # fmt: skip
    return LlamaConfig(**{**base, **kw})


def gemma() -> LlamaConfig:
    hf = dict(vocab_size=60, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
              num_attention_heads=4, num_key_value_heads=2, head_dim=12)  # fmt: skip
    return llama_config_from_gemma2(hf)


def siglip(**kw) -> SiglipConfig:
    base = dict(image_size=16, patch_size=4, hidden_size=16, intermediate_size=24,
                num_hidden_layers=3, num_attention_heads=2)  # fmt: skip
    return SiglipConfig(**{**base, **kw})


def autoencoder(**kw) -> AutoencoderConfig:
    base = dict(channels=8, channel_mult=(1, 2, 2), num_res_blocks=2, z_channels=6, norm_groups=4)
    return AutoencoderConfig(**{**base, **kw})


def vq() -> VQConfig:
    return VQConfig(autoencoder=autoencoder(), codebook_size=30, codebook_dim=5, image_size=16)


def kl(**kw) -> KLConfig:
    base = dict(channels=8, channel_mult=(1, 2), num_res_blocks=1, z_channels=3, norm_groups=4,
                image_size=8, patch_size=2)  # fmt: skip
    return KLConfig(**{**base, **kw})


def fudoki(**kw) -> FudokiConfig:
    base = dict(language=llama(num_key_value_heads=2), gen_vision=vq(), vision=siglip(),
                aligner_hidden=24, gen_aligner_hidden=24, gen_head_hidden=20)  # fmt: skip
    return FudokiConfig(**{**base, **kw})


def unifluid(**kw) -> UnifluidConfig:
    base = dict(language=gemma(), vae=kl(), vision=siglip(), head={"width": 20, "depth": 2})
    return UnifluidConfig(**{**base, **kw})


def shipped(name: str) -> dict:
    return json.loads((CHECKPOINTS / name / "config.json").read_text())["model"]


#: name -> (config, its count from the config, the model built from it)
CASES = {
    "llama": (llama, size.llama_params, LlamaModel),
    "llama gqa+bias": (
        lambda: llama(num_key_value_heads=2, attention_bias=True),
        size.llama_params,
        LlamaModel,
    ),
    "llama head_dim": (lambda: llama(head_dim=10), size.llama_params, LlamaModel),
    "gemma2": (gemma, size.llama_params, LlamaModel),
    "siglip": (siglip, size.siglip_params, SiglipVisionModel),
    "siglip select_layer": (
        lambda: siglip(select_layer=-2, num_channels=1),
        size.siglip_params,
        SiglipVisionModel,
    ),
    "autoencoder lowest": (
        autoencoder,
        size.autoencoder_params,
        lambda c: nn.ModuleList([Encoder(c), Decoder(c)]),
    ),
    "autoencoder mid double_z": (
        lambda: autoencoder(attn_resolutions="mid", double_z=True),
        size.autoencoder_params,
        lambda c: nn.ModuleList([Encoder(c), Decoder(c)]),
    ),
    "vq": (vq, size.vq_params, VQModel),
    "kl-vae": (kl, size.kl_vae_params, AutoencoderKL),
    "kl-vae no quant convs": (
        lambda: kl(use_quant_conv=False, use_post_quant_conv=False),
        size.kl_vae_params,
        AutoencoderKL,
    ),
    "diffusion head": (
        lambda: DiffusionHeadConfig(7, 12, width=16, depth=3),
        size.diffusion_head_params,
        DiffusionHead,
    ),
    "fudoki": (fudoki, size.fudoki_params, FudokiModel),
    "fudoki generation-only, mask token, deep aligner": (
        lambda: fudoki(vision=None, image_mask_token=True, gen_aligner_depth=3),
        size.fudoki_params,
        FudokiModel,
    ),
    "fudoki-shapes": (
        lambda: FudokiConfig.from_dict(shipped("fudoki-shapes")),
        size.fudoki_params,
        FudokiModel,
    ),
    "unifluid": (unifluid, size.unifluid_params, UnifluidModel),
    "unifluid no vision": (lambda: unifluid(vision=None), size.unifluid_params, UnifluidModel),
    "unifluid-shapes": (
        lambda: UnifluidConfig(**shipped("unifluid-shapes")),
        size.unifluid_params,
        UnifluidModel,
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_counts_equal_the_built_models(case: str) -> None:
    make_config, estimate, build = CASES[case]
    config = make_config()
    assert estimate(config) == count(build(config))


# -- the limit ------------------------------------------------------------------------------------
def test_limit_comes_from_the_argument_the_variable_or_the_machine(monkeypatch) -> None:
    monkeypatch.delenv(size.MAX_BYTES_ENV, raising=False)
    monkeypatch.setattr(size, "_physical_memory", lambda: 8 * 2**30)
    assert size.max_model_bytes() == (8 * 2**30, "the machine's RAM")
    monkeypatch.setattr(size, "_physical_memory", lambda: 2**40)
    assert size.max_model_bytes() == (size.DEFAULT_MAX_MODEL_BYTES, "the default cap")
    monkeypatch.setenv(size.MAX_BYTES_ENV, "1.5GiB")
    assert size.max_model_bytes() == (3 * 2**29, size.MAX_BYTES_ENV)
    monkeypatch.setenv(size.MAX_BYTES_ENV, "123")
    assert size.max_model_bytes() == (123, size.MAX_BYTES_ENV)
    assert size.max_model_bytes(7) == (7, "max_bytes=")
    monkeypatch.setenv(size.MAX_BYTES_ENV, "64 gigs")
    with pytest.raises(ValueError, match=f"{size.MAX_BYTES_ENV}='64 gigs' is not a size"):
        size.max_model_bytes()
    with pytest.raises(ValueError, match="max_bytes must be a positive int"):
        size.max_model_bytes(0)


def test_check_model_size_names_the_count_the_limit_and_the_knobs() -> None:
    config = fudoki()
    need = size.fudoki_params(config) * 4  # built in float32
    assert size.check_model_size(config, "x/config.json", max_bytes=need) == need
    with pytest.raises(ValueError) as info:
        size.check_model_size(config, "x/config.json", max_bytes=need - 1)
    message = str(info.value)
    assert message.startswith(f"x/config.json describes a model of {need // 4:,} parameters")
    assert "max_bytes=" in message and size.MAX_BYTES_ENV in message


@pytest.mark.parametrize("make_config", [vq, kl, siglip, gemma], ids=["vq", "kl", "siglip", "lm"])
def test_towers_are_checked_alone_too(make_config) -> None:
    config = make_config()
    need = size.check_model_size(config, "tower.json", max_bytes=2**30)
    assert need == size._COUNTERS[type(config)](config) * 4
    with pytest.raises(ValueError, match=r"tower\.json describes a model of"):
        size.check_model_size(config, "tower.json", max_bytes=need - 1)


def test_diffusion_head_steps_count_towards_the_size() -> None:
    few, many = unifluid(), unifluid(head={"width": 20, "depth": 2, "steps": 10**9})
    limit = size.check_model_size(few, "c.json", max_bytes=2**40)
    with pytest.raises(ValueError, match=r"c\.json describes"):
        size.check_model_size(many, "c.json", max_bytes=limit * 100)


# -- kineflow.load refuses before building --------------------------------------------------------
def copy_checkpoint(name: str, dst: Path, **language) -> Path:
    folder = shutil.copytree(CHECKPOINTS / name, dst)
    config = json.loads((folder / "config.json").read_text())
    config["model"]["language"].update(language)
    config["model"]["language"].pop("layer_types", None)  # one per layer: let it follow
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def never_built(monkeypatch) -> None:
    """Make building any model fail loudly, so a test proves the refusal came first."""

    def refuse(*args, **kwargs):
        raise AssertionError("the model was built")

    for cls in (LlamaModel,):
        monkeypatch.setattr(cls, "__init__", refuse)


@pytest.mark.parametrize("name", ["fudoki-shapes", "unifluid-shapes"])
def test_load_refuses_a_million_layers_before_building(name, tmp_path, monkeypatch) -> None:
    folder = copy_checkpoint(name, tmp_path / "m", num_hidden_layers=10**6)
    never_built(monkeypatch)
    source = re.escape(str(folder / "config.json"))
    with pytest.raises(ValueError, match=rf"{source} describes a model of .* limit"):
        kineflow.load(folder)


def test_load_refuses_a_huge_janus_config_before_building(tmp_path, monkeypatch) -> None:
    folder, _, _ = write_janus_checkpoint(tmp_path / "janus")
    config = json.loads((folder / "config.json").read_text())
    H = 10**9  # every width that must agree with it, so only the size is wrong
    config["language_config"]["hidden_size"] = H
    config["language_config"].pop("head_dim", None)
    for section in ("aligner_config", "gen_aligner_config"):
        config[section]["params"]["n_embed"] = H
    config["gen_head_config"]["params"]["n_embed"] = H
    (folder / "config.json").write_text(json.dumps(config))
    never_built(monkeypatch)
    with pytest.raises(ValueError, match=r"describes a model of .* parameters"):
        loading.load_janus_folder(folder)


def test_load_limit_can_be_raised_or_lowered(tmp_path, monkeypatch) -> None:
    folder = CHECKPOINTS / "fudoki-shapes"
    with pytest.raises(ValueError, match=r"limit of 1\.0 MiB \(max_bytes=\)"):
        kineflow.load(folder, max_bytes=2**20)
    monkeypatch.setenv(size.MAX_BYTES_ENV, "1MiB")
    with pytest.raises(ValueError, match=rf"limit of 1\.0 MiB \({size.MAX_BYTES_ENV}\)"):
        kineflow.load(folder)
    assert kineflow.load(folder, max_bytes=2**30).model is not None  # the argument wins


def test_cli_names_the_size_limit(tmp_path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), size.MAX_BYTES_ENV: "1MiB"}
    cmd = [sys.executable, "-m", "kineflow", "answer", "--model",
           str(CHECKPOINTS / "fudoki-shapes"), "--no-progress", "how many shapes?"]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert done.returncode == 2, done.stdout + done.stderr
    errors = [line for line in done.stdout.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "config.json describes a model of" in errors[0]
    assert size.MAX_BYTES_ENV in errors[0]
    assert "Traceback" not in done.stderr


def test_meta_device_state_has_the_real_dtypes() -> None:
    """load_checks builds models on the meta device to learn their dtypes: it must match."""
    from kineflow.interop.load_checks import expected_state

    real = FudokiModel(fudoki()).state_dict()
    meta = expected_state(FudokiModel, fudoki())
    assert {k: (v.dtype, v.shape) for k, v in meta.items()} == {
        k: (v.dtype, v.shape) for k, v in real.items()
    }
    assert all(v.device == torch.device("meta") for v in meta.values())
