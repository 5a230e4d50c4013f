"""The tokenizer trainer: configs, exact resume, atomic checkpoints, NaN stop, eval report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from kineflow.cli import main
from kineflow.eval.reconstruction import psnr
from kineflow.train.checkpoint import load_checkpoint, save_checkpoint
from kineflow.train.schedule import warmup_cosine
from kineflow.train.tokenizer import (
    PictureStream,
    TokenizerTrainConfig,
    build_tokenizer,
    train_tokenizer,
)

TINY = {
    "vq": {
        "type": "vq",
        "image_size": 32,
        "channels": 32,
        "channel_mult": [1, 2],
        "num_res_blocks": 1,
        "z_channels": 32,
        "codebook_size": 64,
        "codebook_dim": 4,
    },
    "kl": {
        "type": "kl",
        "image_size": 32,
        "channels": 32,
        "channel_mult": [1, 2],
        "num_res_blocks": 1,
        "z_channels": 4,
        "patch_size": 2,
    },
}


def _config(kind: str, out: Path, steps: int = 6) -> TokenizerTrainConfig:
    return TokenizerTrainConfig.from_dict(
        {
            "model": TINY[kind],
            "out": str(out),
            "optim": {"steps": steps, "batch_size": 4, "lr": 1e-3, "warmup": 2},
            "log_every": 1,
            "ckpt_every": 3,
            "eval_images": 20,
        }
    )


def _losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("kind", ["vq", "kl"])
def test_resumed_run_reproduces_the_uninterrupted_losses(kind, tmp_path):
    straight = tmp_path / "straight"
    report = train_tokenizer(_config(kind, straight), progress=False)
    # The interrupted run dies at step 5 (after its step-3 checkpoint), then continues from it.
    resumed = tmp_path / "resumed"
    real_picture = PictureStream.picture

    def dies_at_step_5(self, index):
        if index == 4 * 4:  # the first picture of step 5 (batch size 4)
            raise KeyboardInterrupt
        return real_picture(self, index)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(PictureStream, "picture", dies_at_step_5)
        with pytest.raises(KeyboardInterrupt):
            train_tokenizer(_config(kind, resumed), progress=False)
    assert len(_losses(resumed)) == 4  # steps 1-4 were logged, only 1-3 checkpointed
    train_tokenizer(_config(kind, resumed), progress=False)
    assert _losses(resumed) == _losses(straight)
    assert len(_losses(straight)) == 6
    saved = json.loads((straight / "eval.json").read_text())
    assert saved["pictures"] == 20 and 0 <= saved["scene_preserved"] <= 1
    assert saved["heldout"]["pictures"] == 20 and 0 <= saved["heldout"]["scene_preserved"] <= 1
    assert saved["token_grid"] == ([16, 16] if kind == "vq" else [8, 8])  # f = 2; KL: 2x2 patches
    assert report["psnr"] == pytest.approx(saved["psnr"])
    assert (straight / "model" / "model.safetensors").is_file()


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    model = torch.nn.Linear(2, 2)
    folder = save_checkpoint(tmp_path / "ckpt", model, {"a": 1}, {"step": 1})
    before = (folder / "model.safetensors").read_bytes()

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with torch.no_grad():
        model.weight.add_(1)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path / "ckpt", model, {"a": 2}, {"step": 2})
    # The previous checkpoint is untouched and still loads.
    assert (folder / "model.safetensors").read_bytes() == before
    config, state = load_checkpoint(folder, torch.nn.Linear(2, 2))
    assert config == {"a": 1} and state == {"step": 1}


def test_checkpoint_mismatch_names_keys(tmp_path):
    save_checkpoint(tmp_path / "c", torch.nn.Linear(2, 2), {}, {"step": 0})
    with pytest.raises(ValueError, match=r"weight: expected \(3, 2\), got \(2, 2\)"):
        load_checkpoint(tmp_path / "c", torch.nn.Linear(2, 3))
    with pytest.raises(FileNotFoundError, match=r"trainer\.pt is missing"):
        (tmp_path / "c" / "trainer.pt").unlink()
        load_checkpoint(tmp_path / "c", torch.nn.Linear(2, 2))


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    config = _config("vq", tmp_path, steps=6)
    model_cls = type(build_tokenizer(TINY["vq"]))
    real = model_cls.training_losses
    calls = {"n": 0}

    def poisoned(self, images):
        calls["n"] += 1
        losses = real(self, images)
        if calls["n"] == 5:
            losses["loss"] = losses["loss"] * float("nan")
        return losses

    monkeypatch.setattr(model_cls, "training_losses", poisoned)
    # The 5th call is step 5, as metrics.jsonl counts steps (from 1).
    kept = r"nan at step 5; the last good checkpoint \(step 3\)"
    with pytest.raises(FloatingPointError, match=kept):
        train_tokenizer(config, progress=False)
    _, state = load_checkpoint(tmp_path / "checkpoint", build_tokenizer(TINY["vq"]))
    assert state["step"] == 3


def test_resume_refuses_another_model(tmp_path):
    train_tokenizer(_config("vq", tmp_path, steps=3), progress=False)
    other = _config("vq", tmp_path, steps=6)
    other.model = {**other.model, "codebook_size": 32}
    with pytest.raises(ValueError, match="another model config"):
        train_tokenizer(other, progress=False)


def test_config_errors_name_the_key(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"model": TINY["vq"], "out": "x", "optim": {"stepz": 3}}))
    with pytest.raises(ValueError, match=r"c\.yaml: unknown config key\(s\) \['optim\.stepz'\]"):
        TokenizerTrainConfig.from_yaml(path)
    path.write_text(yaml.safe_dump({"model": {"type": "gan"}, "out": "x"}))
    with pytest.raises(ValueError, match=r"model\.type must be 'vq' or 'kl'"):
        TokenizerTrainConfig.from_yaml(path)
    path.write_text("model: [unclosed")
    with pytest.raises(ValueError, match="not valid YAML"):
        TokenizerTrainConfig.from_yaml(path)
    path.write_text(yaml.safe_dump({"model": TINY["vq"], "out": "x", "optim": {"steps": 0}}))
    with pytest.raises(ValueError, match=r"optim\.steps must be an integer >= 1"):
        TokenizerTrainConfig.from_yaml(path)


@pytest.mark.parametrize("name", ["vq_shapes.yaml", "kl_shapes.yaml"])
def test_shipped_configs_build(name):
    config = TokenizerTrainConfig.from_yaml(Path(__file__).parents[2] / "configs" / name)
    model = build_tokenizer(config.model)
    assert sum(p.numel() for p in model.parameters()) > 0


def test_cli_train_tokenizer(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    cfg = _config("kl", tmp_path / "run", steps=2).to_dict()
    path.write_text(yaml.safe_dump(cfg))
    assert main(["train", "tokenizer", "--config", str(path), "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out)["pictures"] == 20
    args = ["--out", str(tmp_path / "quick"), "--eval-images", "8", "--no-progress"]
    assert main(["train", "tokenizer", "--config", str(path), *args]) == 0
    report = json.loads(capsys.readouterr().out)  # --eval-images overrides eval_images
    assert (report["pictures"], report["heldout"]["pictures"]) == (8, 8)
    assert main(["train", "tokenizer", "--config", str(tmp_path / "missing.yaml")]) == 2


def test_compositions_all_shows_held_out_pictures_but_never_test_ones():
    from kineflow.data.shapes.scene import ShapesWorld, WorldConfig
    from kineflow.train.tokenizer import ImageData

    default = ShapesWorld(WorldConfig())  # the split owner the text models and the eval use
    n = 400
    train_only = [PictureStream(ImageData()).scene(i) for i in range(n)]
    assert {default.split_of(s) for s in train_only} == {"train"}
    every = [PictureStream(ImageData(compositions="all")).scene(i) for i in range(n)]
    owners = [default.split_of(s) for s in every]
    # Red triangles and blue circles appear (about a third of the pictures show one);
    # test and validation scenes never do.
    assert 0.1 < owners.count("heldout") / n < 0.4
    assert set(owners) == {"train", "heldout"}
    with pytest.raises(ValueError, match=r"data\.compositions must be 'train' or 'all'"):
        ImageData(compositions="heldout")
    with pytest.raises(ValueError, match=r"data\.split 'heldout' needs data\.compositions 'train'"):
        ImageData(split="heldout", compositions="all")


def test_schedule_and_psnr():
    import numpy as np

    assert warmup_cosine(0, 100, 10) == pytest.approx(0.1)
    assert warmup_cosine(9, 100, 10) == pytest.approx(1.0)
    assert warmup_cosine(100, 100, 10, min_ratio=0.1) == pytest.approx(0.1)
    a = np.zeros((1, 4, 4, 3), np.uint8)
    b = a.copy()
    b[0, 0, 0, 0] = 255  # MSE = 255^2 / 48
    assert psnr(a, b)[0] == pytest.approx(10 * np.log10(48))
    assert psnr(a, a)[0] == 100.0


def test_training_device_names():
    from kineflow.train.loop import resolve_device, to_device

    assert resolve_device("cpu") == torch.device("cpu")
    want = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == want
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            resolve_device("cuda")
    with pytest.raises(ValueError, match="unknown device 'gpu0'"):
        resolve_device("gpu0")
    batch = {"x": torch.ones(2), "rows": [torch.zeros(1), 3], "name": "a"}
    moved = to_device(batch, torch.device("cpu"))
    assert moved["rows"][1] == 3 and moved["name"] == "a" and torch.equal(moved["x"], batch["x"])
