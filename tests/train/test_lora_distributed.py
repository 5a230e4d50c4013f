"""A FUDOKI LoRA run under DDP and FSDP (2 processes, gloo, launched as ``torchrun -m kineflow
train fudoki``) gives the one-process run's losses and adapter; ``export_steps`` with ``lora``
exports merged weights (base key names) and leaves the run as it was."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from test_lora_train import assets, config, lora_section, losses  # noqa: F401 (the fixture)

import kineflow
from kineflow.train.fudoki import train_fudoki

REPO = Path(__file__).resolve().parents[2]
STEPS = 4
RTOL = 1e-5  # as tests/train/test_distributed.py

pytestmark = pytest.mark.usefixtures("one_thread")
needs_gloo = pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
    reason="torch.distributed with the gloo backend is not available",
)


def adapter(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "adapter" / "adapter_model.safetensors"))


#: The data mix of the 2-process runs: mixed batches, so that some rank's share may hold no
#: understanding sample (the SigLIP tower must not be an FSDP unit of its own: see
#: kineflow/train/fsdp.py).
MIXES = {"ddp": {"t2i": 0.5, "vqa": 0.3, "caption": 0.2},
         "fsdp": {"t2i": 0.5, "vqa": 0.3, "caption": 0.2}}  # fmt: skip


def lora_config(assets, out: Path, parallel: str):  # noqa: F811
    cfg = config(assets, out, steps=STEPS, lora=lora_section(assets))
    cfg.data.mix = MIXES[parallel]
    return cfg


@pytest.fixture(scope="module")
def one_process(assets, tmp_path_factory) -> dict[str, Path]:  # noqa: F811
    """The one-process runs the 2-process ones must equal, per mix."""
    runs = {}
    for parallel in MIXES:
        out = tmp_path_factory.mktemp(f"lora_one_{parallel}")
        train_fudoki(lora_config(assets, out, parallel), progress=False)
        assert len(losses(out)) == STEPS
        # The adapters moved (B starts at 0): equal adapters across process counts mean
        # something.
        assert all(v.abs().max() > 1e-4 for k, v in adapter(out).items() if k.endswith("lora_B"))
        runs[parallel] = out
    return runs


def torchrun_train(assets, out: Path, parallel: str) -> None:  # noqa: F811
    raw = lora_config(assets, out, parallel).to_dict()
    raw["parallel"] = parallel
    path = out.parent / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(raw))  # sorted keys: the mix's order must not matter
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
           "2", "-m", "kineflow", "train", "fudoki", "--config", str(path),
           "--no-progress"]  # fmt: skip
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]


@needs_gloo
@pytest.mark.slow  # torchrun launches of two processes: end to end
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_lora_two_processes_match_one(assets, one_process, tmp_path, parallel) -> None:  # noqa: F811
    out, reference = tmp_path / parallel, one_process[parallel]
    torchrun_train(assets, out, parallel)
    assert losses(out) == pytest.approx(losses(reference), rel=RTOL)
    mine, ref = adapter(out), adapter(reference)
    assert mine.keys() == ref.keys() and any(k.endswith("lora_B") for k in ref)
    for k, v in ref.items():
        torch.testing.assert_close(mine[k], v, rtol=RTOL, atol=3e-5, msg=k)
    meta = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert meta == json.loads((reference / "adapter" / "adapter_config.json").read_text())
    # The merged folder of the 2-process run is an ordinary model of the base's keys.
    merged = load_file(str(out / "model" / "model.safetensors"))
    assert merged.keys() == load_file(str(Path(assets["base"]) / "model.safetensors")).keys()


def test_export_steps_with_lora_export_merged_weights(assets, tmp_path) -> None:  # noqa: F811
    lora = lora_section(assets)
    plain = tmp_path / "plain"
    train_fudoki(config(assets, plain, steps=STEPS, lora=lora), progress=False)
    out = tmp_path / "export"
    cfg = config(assets, out, steps=STEPS, lora=lora)
    cfg.export_steps = [2, STEPS]
    train_fudoki(cfg, progress=False)
    assert losses(out) == losses(plain)  # exporting mid-run changes nothing
    mine, ref = adapter(out), adapter(plain)
    assert mine.keys() == ref.keys() and all(torch.equal(mine[k], ref[k]) for k in ref)
    final = load_file(str(out / "model" / "model.safetensors"))
    last = load_file(str(out / f"model_step{STEPS}" / "model.safetensors"))
    early = load_file(str(out / "model_step2" / "model.safetensors"))
    assert last.keys() == final.keys() == early.keys()  # base key names: no lora_A / base.
    # No EMA: the last export is the run's merged model, bit for bit.
    assert all(torch.equal(last[k], final[k]) for k in final)
    meta = json.loads((out / "adapter" / "adapter_config.json").read_text())
    moved = [f"{m}.weight" for m in meta["modules"]]
    assert all(not torch.equal(early[k], last[k]) for k in moved)
    base = load_file(str(Path(assets["base"]) / "model.safetensors"))
    assert all(not torch.equal(early[k], base[k]) for k in moved)  # step 2's adapters are in
    kineflow.load(out / "model_step2")  # an ordinary folder
