"""The fine-tuning example's whole pipeline at toy size: a fake 28 px IDX dataset, a few VQ
steps, 2 LoRA steps of batch 4 on the shipped FUDOKI model with the new VQ swapped in, then
every evaluation it reports; values checked against independent recomputations."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from kineflow.apps.finetune_eval import bootstrap_interval, caption, pad_picture, padded_tensor
from kineflow.apps.finetune_example import main

pytestmark = pytest.mark.usefixtures("one_thread")
BASE = Path("checkpoints/fudoki-shapes")


def fake_fashion(root: Path, n_train: int = 30, n_test: int = 20) -> None:
    """Class ``k``: a bright 8 × 8 square at column ``2k + 2`` on black, plus a little noise
    (structure a VQ can learn in a few steps)."""
    from kineflow.data.idx import write_idx

    root.mkdir()
    rng = np.random.default_rng(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = (np.arange(n) % 10).astype(np.uint8)
        images = rng.integers(0, 30, (n, 28, 28)).astype(np.uint8)
        for i, k in enumerate(labels):
            images[i, 10:18, 2 * k + 2 : 2 * k + 10] = 220
        write_idx(root / f"{prefix}-images-idx3-ubyte", images)
        write_idx(root / f"{prefix}-labels-idx1-ubyte", labels)


def test_bootstrap_padding_and_captions() -> None:
    lo, hi = bootstrap_interval(np.array([1] * 80 + [0] * 20))
    assert lo < 0.8 < hi and hi - lo < 0.2 and bootstrap_interval(np.ones(10)) == [1.0, 1.0]
    picture = pad_picture(torch.ones(3, 28, 28))
    assert picture.shape == (32, 32, 3) and picture[2:30, 2:30].min() == 255
    assert picture[:2].max() == 0 and picture[:, :2].max() == 0
    assert caption(9) == "a photo of an ankle boot" and caption(7) == "a photo of a sneaker"


def test_example_end_to_end_at_toy_size(tmp_path, capsys) -> None:
    import kineflow
    from kineflow.data.idx import fashion_mnist
    from kineflow.tokenizers.vq import VQModel
    from kineflow.train.lora import load_adapter
    from kineflow.train.tokenizer import build_tokenizer

    fake_fashion(tmp_path / "data")
    raw = yaml.safe_load(Path("configs/finetune_fudoki_fashion.yaml").read_text())
    raw["optim"].update(batch_size=4, warmup=1)
    raw["lora"]["rank"] = 2
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(raw))
    out = tmp_path / "out"
    argv = ["--root", str(tmp_path / "data"), "--out", str(out), "--config",
            str(tmp_path / "config.yaml"), "--steps", "2", "--per-class", "1", "--answers", "4",
            "--per-prompt", "1", "--classifier-train", "30", "--vq-steps", "6",
            "--measure-steps", "0"]  # fmt: skip
    assert main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    assert results == json.loads(capsys.readouterr().out)
    lines = (out / "data" / "manifest.jsonl").read_text().splitlines()
    assert len(lines) == 2 * 10  # one caption and one VQA record per picture, 1 per class
    assert results["generation"]["n"] == 10 and results["answers_after"]["n"] == 4
    assert results["classifier"]["n"] == 20
    for key in ("classifier", "answers_before", "answers_after", "generation"):
        lo, hi = results[key]["ci95"]
        assert lo <= results[key]["accuracy"] <= hi
    for vq in ("base", "fashion"):
        judged = results["vq_reconstruction"][vq]["judge_on_reconstructions"]
        assert judged["n"] == 20 and judged["ci95"][0] <= judged["accuracy"] <= judged["ci95"][1]
    assert set(results["seconds"]) >= {"classifier", "vq", "fine_tune", "evaluate_after"}
    assert (out / "grid.png").is_file()

    # The VQ stage lowers the reconstruction error of test pictures below the same VQ untrained
    # (same seed, same architecture) and below the shipped ShapesWorld VQ.
    vq_cfg = yaml.safe_load(Path("configs/vq_fashion.yaml").read_text())
    torch.manual_seed(0)
    untrained = build_tokenizer(vq_cfg["model"]).eval()
    x = padded_tensor(fashion_mnist(str(tmp_path / "data"), split="test"), 20)
    with torch.no_grad():
        before = float(((untrained.decode(untrained.encode(x)).clamp(-1, 1) - x) ** 2).mean())
    after = results["vq_reconstruction"]["fashion"]["mse"]
    assert after < 0.5 * before and after < results["vq_reconstruction"]["base"]["mse"]

    # The fine-tuned model: the new VQ in place of the base's, the image table its codebook,
    # the text table the base's; outside the adapted linears, also_train and the swapped
    # modules every weight is the base's.
    new_vq = VQModel.from_pretrained(out / "vq" / "model")
    tuned, base = kineflow.load(out / "run" / "model"), kineflow.load(BASE)
    assert results["swapped"] == ["gen_vision_model", "gen_embed"]
    assert torch.equal(tuned.image_embeddings, new_vq.quantize.codebook())
    assert torch.equal(tuned.text_embeddings, base.text_embeddings)
    for k, v in new_vq.state_dict().items():
        assert torch.equal(tuned.model.state_dict()[f"gen_vision_model.{k}"], v)
    adapter = json.loads((out / "run" / "adapter" / "adapter_config.json").read_text())
    trained = (*adapter["also_train"], *adapter["swapped"], *adapter["modules"])
    changed = {k for k, v in base.model.state_dict().items()
               if not torch.equal(v, tuned.model.state_dict()[k])}  # fmt: skip
    assert changed and all(k.startswith(trained) for k in changed)
    assert any(k.startswith("gen_head") for k in changed)
    weights = load_file(str(out / "run" / "adapter" / "adapter_model.safetensors"))
    assert all(k.endswith(("lora_A", "lora_B")) or k.startswith(trained) for k in weights)
    # share = adapters + also_train over the base's parameter count (the frozen VQ not counted)
    lora_n = sum(v.numel() for k, v in weights.items() if k.endswith(("lora_A", "lora_B")))
    whole = sum(p.numel() for m in adapter["also_train"]
                for p in tuned.model.get_submodule(m).parameters())  # fmt: skip
    assert results["trainable_parameters"] == lora_n + whole
    # Base + adapter (unmerged, then merged) rebuild the run's model and its tables.
    again = load_adapter(out / "run" / "adapter", merge=True)
    assert torch.equal(again.image_embeddings, tuned.image_embeddings)
    for k, v in tuned.model.state_dict().items():
        assert torch.allclose(again.model.state_dict()[k], v, atol=1e-6), k
