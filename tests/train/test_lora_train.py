"""LoRA fine-tuning through the shared loop on your own manifest: what trains, the adapter
folder, merged = base + adapter, exact resume, and `kineflow merge`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import kineflow
from kineflow.data.manifest import write_manifest
from kineflow.data.shapes.dataset import corpus
from kineflow.tokenizers.autoencoder import AutoencoderConfig
from kineflow.tokenizers.text import train_text_tokenizer
from kineflow.tokenizers.vq import VQConfig, VQModel
from kineflow.train.fudoki import FudokiTask, FudokiTrainConfig, train_fudoki
from kineflow.train.lora import load_adapter, merge_adapter

MODEL = {
    "language": {"hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
                 "num_attention_heads": 4, "max_position_embeddings": 256},
    "vision": {"image_size": 32, "patch_size": 16, "hidden_size": 16, "intermediate_size": 32,
               "num_hidden_layers": 1, "num_attention_heads": 2, "select_layer": -1},
    "aligner_hidden": 32, "gen_aligner_hidden": 32, "gen_head_hidden": 24,
}  # fmt: skip
TARGETS = ["q_proj", "v_proj", "up_proj"]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("lora")
    torch.manual_seed(0)
    auto = AutoencoderConfig(channels=8, channel_mult=(1, 2, 2, 2), num_res_blocks=1,
                             z_channels=8, norm_groups=4)  # fmt: skip
    VQModel(VQConfig(autoencoder=auto, codebook_size=32, codebook_dim=4, image_size=32)) \
        .save_pretrained(root / "vq")  # fmt: skip
    train_text_tokenizer(corpus(n=200), vocab_size=400).save(root / "text")
    rng = np.random.default_rng(0)
    records = []
    for i, name in enumerate(["red", "green", "blue", "yellow"]):
        file = root / f"{name}.png"
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(file)
        records.append({"image": file.name, "caption": f"a {name} square"})
        records.append({"image": file.name, "question": "what is this?", "answer": name})
        del i
    write_manifest(root / "manifest.jsonl", records)
    paths = {"vq": str(root / "vq"), "text": str(root / "text"),
             "manifest": str(root / "manifest.jsonl")}  # fmt: skip
    base = train_fudoki(config(paths, root / "base", steps=1), progress=False)
    assert base["steps"] == 1
    paths["base"] = str(root / "base" / "model")
    return paths


def config(assets, out: Path, steps: int = 4, lora: dict | None = None) -> FudokiTrainConfig:
    raw = {
        "model": MODEL, "vq": assets["vq"], "text_tokenizer": assets["text"], "out": str(out),
        "data": {"vqa_answer_tokens": 4, "caption_tokens": 12, "text_budget": 64,
                 "manifest": assets["manifest"], "mix": {"t2i": 0.5, "vqa": 0.3, "caption": 0.2}},
        "optim": {"steps": steps, "batch_size": 4, "lr": 1e-2, "warmup": 1},
        "log_every": 1, "ckpt_every": 2,
    }  # fmt: skip
    if lora is not None:
        raw["lora"] = lora
    return FudokiTrainConfig.from_dict(raw)


def lora_section(assets) -> dict:
    return {"rank": 2, "alpha": 4, "targets": TARGETS, "also_train": ["gen_head"],
            "base": assets["base"]}  # fmt: skip


def losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def hidden(pipe, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return pipe.model.language_model.model(ids)


def test_lora_run_trains_only_adapters_and_merges(assets, tmp_path) -> None:
    out = tmp_path / "run"
    train_fudoki(config(assets, out, lora=lora_section(assets)), progress=False)
    adapter = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    meta = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert meta["rank"] == 2 and meta["targets"] == TARGETS and len(meta["modules"]) == 2 * 3
    assert meta["base_weights_sha256"] and Path(meta["base"]) == Path(assets["base"]).resolve()
    lora_keys = {k for k in adapter if k.endswith((".lora_A", ".lora_B"))}
    assert len(lora_keys) == 12 and all(k.startswith("gen_head.") for k in set(adapter) - lora_keys)
    # Only the adapted linears and gen_head differ from the base; the merged weight is
    # W + (alpha / rank) B A exactly as the adapter file says.
    base = load_file(str(Path(assets["base"]) / "model.safetensors"))
    merged = load_file(str(out / "model" / "model.safetensors"))
    assert set(base) == set(merged)
    changed = {k for k in base if not torch.equal(base[k], merged[k])}
    adapted = {f"{m}.weight" for m in meta["modules"]}
    assert adapted <= changed and any(k.startswith("gen_head.") for k in changed)
    assert changed <= adapted | {k for k in base if k.startswith("gen_head.")}
    for m in meta["modules"]:
        delta = adapter[f"{m}.lora_B"] @ adapter[f"{m}.lora_A"] * 2.0
        torch.testing.assert_close(merged[f"{m}.weight"], base[f"{m}.weight"] + delta)
    for k in base:
        if k.startswith("gen_head."):
            assert torch.equal(merged[k], adapter[k])
    # Round trip: base + adapter (unmerged) computes what the merged folder computes.
    ids = torch.randint(0, 300, (2, 12))
    unmerged = load_adapter(out / "adapter")
    torch.testing.assert_close(hidden(unmerged, ids), hidden(kineflow.load(out / "model"), ids),
                               atol=1e-5, rtol=1e-5)  # fmt: skip
    # kineflow merge: the same weights as the run's merged folder.
    folded = merge_adapter(out / "adapter", tmp_path / "merged")
    again = load_file(str(folded / "model.safetensors"))
    for k in merged:
        torch.testing.assert_close(again[k].float(), merged[k].float(), atol=1e-6, rtol=1e-6)


def test_lora_resume_is_exact(assets, tmp_path) -> None:
    lora = lora_section(assets)
    train_fudoki(config(assets, tmp_path / "once", lora=lora), progress=False)
    real = FudokiTask.batch

    def dies_at_step_4(self, indices):  # after the checkpoint at step 2, before step 4
        if indices[0] == 3 * 4:
            raise KeyboardInterrupt
        return real(self, indices)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(FudokiTask, "batch", dies_at_step_4)
        with pytest.raises(KeyboardInterrupt):
            train_fudoki(config(assets, tmp_path / "twice", lora=lora), progress=False)
    train_fudoki(config(assets, tmp_path / "twice", lora=lora), progress=False)
    assert losses(tmp_path / "once") == losses(tmp_path / "twice")
    one = load_file(str(tmp_path / "once" / "adapter" / "adapter_model.safetensors"))
    two = load_file(str(tmp_path / "twice" / "adapter" / "adapter_model.safetensors"))
    assert all(torch.equal(one[k], two[k]) for k in one)


def test_lora_refuses_to_resume_on_a_changed_base(assets, tmp_path) -> None:
    """A LoRA run's checkpoints carry the base it began on; when ``lora.base`` now holds other
    weights (a newly shipped base), running the command again is refused, not resumed."""
    shutil.copytree(assets["base"], tmp_path / "base")
    lora = {**lora_section(assets), "base": str(tmp_path / "base")}
    train_fudoki(config(assets, tmp_path / "run", steps=2, lora=lora), progress=False)
    assert train_fudoki(config(assets, tmp_path / "run", steps=2, lora=lora),
                        progress=False)["already_complete_at"] == 2  # fmt: skip
    file = tmp_path / "base" / "model.safetensors"
    weights = load_file(str(file))
    key = "gen_head.output_mlp_projector.weight"
    weights[key] = weights[key] * 2
    save_file(weights, str(file))
    with pytest.raises(ValueError, match=r"run: this run started from lora.base .* delete"):
        train_fudoki(config(assets, tmp_path / "run", steps=2, lora=lora), progress=False)


def test_adapter_errors(assets, tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match=r"adapter_config\.json"):
        load_adapter(tmp_path)
    with pytest.raises(ValueError, match=r"lora\.also_train names no module"):
        lora = {**lora_section(assets), "also_train": ["no_such_module"]}
        train_fudoki(config(assets, tmp_path / "x", lora=lora), progress=False)
    with pytest.raises(ValueError, match=r"lora\.rank"):
        config(assets, tmp_path / "y", lora={"rank": 0})
