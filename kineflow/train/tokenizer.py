"""Training the image tokenizers (VQ and KL-VAE) from a YAML config; resumable.

``kineflow train tokenizer --config configs/vq_shapes.yaml`` runs :func:`train_tokenizer`:

1. builds the model from ``model`` (``type: vq`` -> :class:`~kineflow.tokenizers.vq.VQModel`,
   ``type: kl`` -> :class:`~kineflow.tokenizers.kl_vae.AutoencoderKL``; the other keys are the
   model's config fields);
2. streams pictures from ``data`` (ShapesWorld by index, or a JSONL manifest in a seeded order
   per epoch), so batch ``s`` is always the same pictures and resuming needs only the step;
3. runs AdamW with linear warm-up + cosine decay and gradient clipping on the model's
   ``training_losses`` (reconstruction + codebook / commitment / entropy, or + KL), logging
   to ``metrics.jsonl`` and checkpointing atomically to ``checkpoint/`` every ``ckpt_every``
   steps (a non-finite loss stops the run and leaves the last good checkpoint);
4. saves the final model with ``save_pretrained`` to ``model/`` and writes ``eval.json``:
   PSNR and the fraction of held-out test pictures whose reconstruction the ShapesWorld
   detector reads as the same scene (:func:`kineflow.eval.reconstruction.evaluate_reconstruction`).

An interrupted run started again with the same config continues from ``checkpoint/`` and
produces the same losses as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import nn

from kineflow.config import check_config_keys
from kineflow.io import atomic_write_json, read_json_object
from kineflow.train.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from kineflow.train.schedule import warmup_cosine


@dataclass
class ImageData:
    """Where training pictures come from: ``shapes`` (ShapesWorld ``split``) or ``manifest``
    (``path`` to a JSONL manifest; every record's ``image`` is used)."""

    source: str = "shapes"
    path: str | None = None
    split: str = "train"
    image_size: int = 32
    seed: int = 0

    def __post_init__(self) -> None:
        if self.source not in ("shapes", "manifest"):
            raise ValueError(f"data.source must be 'shapes' or 'manifest', got {self.source!r}")
        if self.source == "manifest" and not self.path:
            raise ValueError("data.path (a JSONL manifest) is required when data.source=manifest")


@dataclass
class Optim:
    """AdamW with warm-up + cosine decay (see :func:`kineflow.train.schedule.warmup_cosine`)."""

    steps: int = 2000
    batch_size: int = 32
    lr: float = 2e-4
    min_lr_ratio: float = 0.1
    warmup: int = 100
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)
        for name in ("steps", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"optim.{name} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"optim.lr must be > 0, got {self.lr}")


@dataclass
class TokenizerTrainConfig:
    """A tokenizer training run (the YAML file's sections)."""

    model: dict[str, Any]
    out: str
    data: ImageData = field(default_factory=ImageData)
    optim: Optim = field(default_factory=Optim)
    log_every: int = 25
    ckpt_every: int = 250
    eval_images: int = 1000
    threads: int | None = None

    @classmethod
    def from_dict(cls, raw: dict) -> TokenizerTrainConfig:
        raw = dict(raw)
        check_config_keys(raw, cls, "config")
        for key, sub in (("data", ImageData), ("optim", Optim)):
            if key in raw:
                if not isinstance(raw[key], dict):
                    raise ValueError(f"{key} must be a mapping, got {raw[key]!r}")
                check_config_keys(raw[key], sub, "config", prefix=f"{key}.")
                raw[key] = sub(**raw[key])
        if "model" not in raw or "out" not in raw:
            raise ValueError("the config needs 'model' (with a 'type') and 'out'")
        if not isinstance(raw["model"], dict) or raw["model"].get("type") not in ("vq", "kl"):
            raise ValueError("model.type must be 'vq' or 'kl'")
        return cls(**raw)

    @classmethod
    def from_yaml(cls, path: str | os.PathLike[str]) -> TokenizerTrainConfig:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such config file")
        try:
            raw = yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            raise ValueError(f"{path}: not valid YAML ({err})") from None
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: expected a mapping at the top level")
        try:
            return cls.from_dict(raw)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{path}: {err}") from None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop rows logged after the checkpoint a run resumes from (they will be logged again)."""
    if path.exists():
        rows = [r for r in path.read_text().splitlines() if r and json.loads(r)["step"] <= step]
        path.write_text("".join(r + "\n" for r in rows))


def build_tokenizer(model: dict[str, Any]) -> nn.Module:
    """The tokenizer a ``model`` config section describes (``type`` + config fields)."""
    fields = {k: v for k, v in model.items() if k != "type"}
    if model.get("type") == "vq":
        from kineflow.tokenizers.autoencoder import AutoencoderConfig
        from kineflow.tokenizers.vq import VQConfig, VQModel

        # The YAML may list the encoder/decoder fields flat, beside the codebook's.
        shape = {f.name for f in dataclasses.fields(AutoencoderConfig)}
        nested = dict(fields.pop("autoencoder", {}))
        nested.update({k: fields.pop(k) for k in list(fields) if k in shape})
        return VQModel(VQConfig.from_dict({**fields, "autoencoder": nested}))
    if model.get("type") == "kl":
        from kineflow.tokenizers.kl_vae import AutoencoderKL, KLConfig

        return AutoencoderKL(KLConfig.from_dict(fields))
    raise ValueError(f"model.type must be 'vq' or 'kl', got {model.get('type')!r}")


class PictureStream:
    """Batch ``s`` of a run: pictures ``[s * B, (s + 1) * B)`` of a deterministic stream."""

    def __init__(self, data: ImageData) -> None:
        self.data = data
        if data.source == "shapes":
            from kineflow.data.shapes.scene import ShapesWorld, WorldConfig

            self.world = ShapesWorld(WorldConfig(seed=data.seed, image_size=data.image_size))
            self.world.rng(data.split, 0)  # validates the split
        else:
            from kineflow.data.manifest import ManifestDataset

            self.dataset = ManifestDataset(data.path, image_size=data.image_size)

    def picture(self, index: int) -> torch.Tensor:
        from kineflow.data.example import image_to_tensor

        if self.data.source == "shapes":
            from kineflow.data.shapes.render import render

            scene = self.world.scene(self.data.split, index)
            return image_to_tensor(render(scene, self.data.image_size))
        epoch, k = divmod(index, len(self.dataset))
        return self.dataset[int(self._order(epoch)[k])]["image"]

    def _order(self, epoch: int) -> np.ndarray:
        """The manifest's seeded order in ``epoch``, drawn once per epoch rather than per
        picture (an O(N) permutation for every picture would dominate large manifests)."""
        if getattr(self, "_epoch", None) != epoch:
            self._epoch = epoch
            self._epoch_order = np.random.default_rng((self.data.seed, epoch)).permutation(
                len(self.dataset)
            )
        return self._epoch_order

    def batch(self, step: int, batch_size: int) -> torch.Tensor:
        start = step * batch_size
        return torch.stack([self.picture(i) for i in range(start, start + batch_size)])


def train_tokenizer(config: TokenizerTrainConfig, progress: bool = True) -> dict:
    """Run (or resume) the training described by ``config``; returns the final eval report."""
    from tqdm.auto import tqdm

    if config.threads:
        torch.set_num_threads(config.threads)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.optim.seed)
    model = build_tokenizer(config.model)
    opt = torch.optim.AdamW(
        model.parameters(),
        lr=config.optim.lr,
        betas=config.optim.betas,
        weight_decay=config.optim.weight_decay,
    )
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: warmup_cosine(
            s, config.optim.steps, config.optim.warmup, config.optim.min_lr_ratio
        ),
    )
    start = 0
    ckpt = out / "checkpoint"
    if ckpt.exists():
        # Compare configs before weights: "another model" says more than a list of shapes.
        saved_path = ckpt / "config.json"
        saved = read_json_object(saved_path) if saved_path.is_file() else {}
        if saved.get("model") != config.to_dict()["model"]:
            raise ValueError(
                f"{ckpt}: checkpoint was trained with another model config; "
                "use a new 'out' folder or delete the checkpoint"
            )
        _, state = load_checkpoint(ckpt, model)
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
        start = int(state["step"])
        _truncate_metrics(out / "metrics.jsonl", start)
    stream = PictureStream(config.data)
    # Closed on any exit (an interrupt included), so logged rows are never lost.
    with (out / "metrics.jsonl").open("a") as metrics:
        model.train()
        t0 = time.perf_counter()
        bar = tqdm(
            range(start, config.optim.steps),
            initial=start,
            total=config.optim.steps,
            disable=not progress,
            desc=f"train {config.model['type']}",
        )
        for step in bar:
            images = stream.batch(step, config.optim.batch_size)
            losses = model.training_losses(images)
            loss = losses["loss"]
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"non-finite loss {loss.item()} at step {step}; the last good checkpoint is "
                    f"{ckpt if ckpt.exists() else 'not written yet'}"
                )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if config.optim.grad_clip:
                nn.utils.clip_grad_norm_(model.parameters(), config.optim.grad_clip)
            opt.step()
            sched.step()
            done = step + 1
            if done % config.log_every == 0 or done == config.optim.steps:
                row = {
                    "step": done,
                    "lr": sched.get_last_lr()[0],
                    "seconds": round(time.perf_counter() - t0, 2),
                }
                row.update({k: float(v.detach()) for k, v in losses.items()})
                metrics.write(json.dumps(row) + "\n")
                metrics.flush()
                bar.set_postfix(loss=f"{row['loss']:.4f}")
            if done % config.ckpt_every == 0 or done == config.optim.steps:
                state = {
                    "optimizer": opt.state_dict(),
                    "scheduler": sched.state_dict(),
                    "rng": rng_state(),
                    "step": done,
                }
                save_checkpoint(ckpt, model, config.to_dict(), state)
    model.eval()
    model.save_pretrained(out / "model")
    from kineflow.eval.reconstruction import evaluate_reconstruction

    report = evaluate_reconstruction(model, n=config.eval_images, image_size=config.data.image_size)
    report["train_seconds_this_run"] = round(time.perf_counter() - t0, 1)
    report["steps"] = config.optim.steps
    atomic_write_json(out / "eval.json", report)
    return report
