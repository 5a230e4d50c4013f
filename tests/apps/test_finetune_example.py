"""The fine-tuning example's whole pipeline at toy size: a fake 28 px IDX dataset, 2 LoRA steps
of batch 4 on the shipped FUDOKI model, then every evaluation it reports."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from kineflow.apps.finetune_example import bootstrap_interval, main, pad_picture

pytestmark = pytest.mark.usefixtures("one_thread")


def fake_fashion(root: Path, n_train: int = 30, n_test: int = 20) -> None:
    from kineflow.data.idx import write_idx

    root.mkdir()
    rng = np.random.default_rng(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        write_idx(root / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28), np.uint8))
        write_idx(root / f"{prefix}-labels-idx1-ubyte", (np.arange(n) % 10).astype(np.uint8))


def test_bootstrap_and_padding() -> None:
    lo, hi = bootstrap_interval(np.array([1] * 80 + [0] * 20))
    assert lo < 0.8 < hi and hi - lo < 0.2 and bootstrap_interval(np.ones(10)) == [1.0, 1.0]
    picture = pad_picture(torch.ones(3, 28, 28))
    assert picture.shape == (32, 32, 3) and picture[2:30, 2:30].min() == 255
    assert picture[:2].max() == 0 and picture[:, :2].max() == 0


def test_example_end_to_end_at_toy_size(tmp_path, capsys) -> None:
    fake_fashion(tmp_path / "data")
    raw = yaml.safe_load(Path("configs/finetune_fudoki_fashion.yaml").read_text())
    raw["optim"].update(batch_size=4, warmup=1)
    raw["lora"]["rank"] = 2
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(raw))
    argv = ["--root", str(tmp_path / "data"), "--out", str(tmp_path / "out"), "--config",
            str(tmp_path / "config.yaml"), "--steps", "2", "--per-class", "1", "--answers", "4",
            "--per-prompt", "1", "--classifier-train", "30"]  # fmt: skip
    assert main(argv) == 0
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results == json.loads(capsys.readouterr().out)
    lines = (tmp_path / "out" / "data" / "manifest.jsonl").read_text().splitlines()
    assert len(lines) == 2 * 10  # one caption and one VQA record per picture, 1 per class
    assert results["generation"]["n"] == 10 and results["answers_after"]["n"] == 4
    assert results["classifier"]["n"] == 20
    assert 0 < results["trainable_share"] < 0.2
    for key in ("classifier", "answers_before", "answers_after", "generation"):
        lo, hi = results[key]["ci95"]
        assert lo <= results[key]["accuracy"] <= hi
    assert (tmp_path / "out" / "grid.png").is_file()
    assert (tmp_path / "out" / "run" / "adapter" / "adapter_model.safetensors").is_file()
