"""``kineflow.load`` of a LoRA adapter folder: the base with the adapter merged in (checked
against ``W + (α / r) B A`` computed here from the adapter file), the recorded base hash
refused on mismatch, and a CLI command (``kineflow answer``) on an adapter folder."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import kineflow
from kineflow.cli import main
from kineflow.data.shapes.render import render_image
from kineflow.data.shapes.scene import Obj, Scene
from kineflow.models.lora import apply_lora
from kineflow.pipelines.adapters import is_adapter_folder, load_adapter, merge_adapter
from kineflow.train.lora import LoraSettings, save_adapter

REPO = Path(__file__).resolve().parents[2]
BASE = REPO / "checkpoints" / "fudoki-shapes"
TARGETS = ["q_proj", "v_proj", "down_proj"]
RANK, ALPHA = 2, 6.0

pytestmark = pytest.mark.usefixtures("one_thread")


def write_adapter(base: Path, folder: Path, seed: int = 1) -> Path:
    """An adapter with random ``A`` / ``B`` and a perturbed ``gen_head`` (``also_train``),
    saved as a training run saves it."""
    pipe = kineflow.load(base, dtype=torch.float32)
    settings = LoraSettings(rank=RANK, alpha=ALPHA, targets=TARGETS, also_train=["gen_head"],
                            base=str(base))  # fmt: skip
    apply_lora(pipe.model, TARGETS, RANK, ALPHA)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pipe.model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
            elif name.startswith("gen_head."):
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return save_adapter(pipe.model, settings, folder, "fudoki")


@pytest.fixture(scope="module")
def adapter(tmp_path_factory) -> Path:
    return write_adapter(BASE, tmp_path_factory.mktemp("adapter") / "adapter")


def test_load_merges_the_adapter_into_its_base(adapter: Path) -> None:
    assert is_adapter_folder(adapter) and not is_adapter_folder(BASE)
    meta = json.loads((adapter / "adapter_config.json").read_text())
    assert Path(meta["base"]) == BASE.resolve() and len(meta["modules"]) == 3 * 4
    pipe = kineflow.load(adapter)
    assert pipe.kineflow_type == "fudoki"
    got = pipe.model.state_dict()
    base = load_file(str(BASE / "model.safetensors"))
    file = load_file(str(adapter / "adapter_model.safetensors"))
    assert set(got) == set(base)  # merged: the base's key names, no wrapped ones
    for key, value in base.items():
        module = key.removesuffix(".weight")
        if module in meta["modules"]:
            want = (
                value.float() + (ALPHA / RANK) * file[f"{module}.lora_B"] @ file[f"{module}.lora_A"]
            )
        elif key.startswith("gen_head."):
            want = file[key]
        else:
            want = value.float()
        torch.testing.assert_close(got[key].float(), want, atol=1e-6, rtol=1e-6, msg=key)
    assert any(not torch.equal(got[k].float(), base[k].float()) for k in base if "q_proj" in k)
    # Unmerged (base + adapter on the side) computes what the merged model computes.
    unmerged = load_adapter(adapter)
    ids = torch.randint(0, 300, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = unmerged.model.language_model.model(ids)
        b = pipe.model.language_model.model(ids)
    # The merge rounds W + s·BA to float32, and the trained layers amplify that rounding
    # (measured: 5.6e-6 of the largest activation), so the float32 tolerance follows the
    # activations' size; in float64, with the merge done in float64 too, the two are exact.
    torch.testing.assert_close(a, b, atol=1e-5 * float(b.abs().max()), rtol=1e-5)
    exact = kineflow.load(adapter, dtype=torch.float64)
    weights = exact.model.state_dict()
    with torch.no_grad():
        for module in meta["modules"]:
            lora_b, lora_a = (file[f"{module}.lora_{x}"].double() for x in "BA")
            weights[f"{module}.weight"].copy_(
                base[f"{module}.weight"].double() + (ALPHA / RANK) * lora_b @ lora_a
            )
        a64 = unmerged.model.double().language_model.model(ids)
        b64 = exact.model.language_model.model(ids)
    torch.testing.assert_close(a64, b64, atol=1e-12, rtol=1e-12)
    # Device / dtype apply after the merge, as for any folder.
    half = kineflow.load(adapter, dtype=torch.bfloat16)
    key = f"{meta['modules'][0]}.weight"
    assert half.model.state_dict()[key].dtype == torch.bfloat16
    torch.testing.assert_close(half.model.state_dict()[key].float(), got[key].float(),
                               atol=1e-2, rtol=1e-2)  # fmt: skip


def test_cli_answer_on_an_adapter_folder(adapter: Path, tmp_path: Path) -> None:
    """``kineflow answer --model ADAPTER`` answers what the merged folder answers."""
    merged = merge_adapter(adapter, tmp_path / "merged")
    picture = tmp_path / "p.png"
    render_image(Scene((Obj(1, 1, "circle", "red", "large"),))).save(picture)
    answers = {}
    for name, model in (("adapter", adapter), ("merged", merged)):
        out = tmp_path / name
        argv = ["answer", "--model", str(model), "--image", str(picture),
                "what colour is the circle?", "--steps", "4", "--out", str(out),
                "--no-progress"]  # fmt: skip
        assert main(argv) == 0
        answers[name] = json.loads((out / "answers.json").read_text())
    assert answers["adapter"] == answers["merged"] and answers["adapter"][0]["answer"]


def test_a_changed_base_is_refused_naming_both(tmp_path: Path, capsys) -> None:
    base = tmp_path / "base"
    shutil.copytree(BASE, base)
    adapter = write_adapter(base, tmp_path / "adapter")
    weights = load_file(str(base / "model.safetensors"))
    key = next(k for k in weights if k.endswith("q_proj.weight"))
    weights[key] = weights[key] + 1e-3
    save_file(weights, str(base / "model.safetensors"))
    with pytest.raises(ValueError, match="sha256 differs") as err:
        kineflow.load(adapter)
    assert str(base) in str(err.value) and str(adapter) in str(err.value)
    assert main(["answer", "--model", str(adapter), "hello", "--no-progress"]) == 2
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1].startswith("error: ") and "sha256 differs" in out[-1]
    # An explicit, unchecked base still loads (the caller's choice).
    pipe = load_adapter(adapter, base, check_base=False, merge=True)
    assert pipe.kineflow_type == "fudoki"


def test_adapter_of_another_family_or_damaged_is_refused(adapter: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    shutil.copytree(adapter, other)
    meta = json.loads((other / "adapter_config.json").read_text())
    (other / "adapter_config.json").write_text(json.dumps({**meta, "kineflow_type": "unifluid"}))
    with pytest.raises(ValueError, match=r"unifluid adapter but its base .* fudoki model"):
        kineflow.load(other)
    (other / "adapter_config.json").write_text(json.dumps({**meta, "format": "peft"}))
    with pytest.raises(ValueError, match="not a kineflow LoRA adapter"):
        kineflow.load(other)
    (other / "adapter_config.json").write_text(json.dumps({**meta, "rank": 3}))
    with pytest.raises(ValueError, match=r"adapter_model\.safetensors|lora_A"):
        kineflow.load(other)
