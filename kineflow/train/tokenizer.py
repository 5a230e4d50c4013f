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
   PSNR and the fraction of test pictures whose reconstruction the ShapesWorld detector reads
   as the same scene (:func:`kineflow.eval.reconstruction.evaluate_reconstruction`), and the
   same for pictures of the ``heldout`` split (under ``heldout``).

An interrupted run started again with the same config continues from ``checkpoint/`` and
produces the same losses as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
from torch import nn

from kineflow.io import atomic_write_json
from kineflow.train.common import held_run, train_task
from kineflow.train.loop import Optim
from kineflow.train.run_config import TrainRunConfig

if TYPE_CHECKING:
    from kineflow.data.shapes.scene import Scene


@dataclass
class ImageData:
    """Where training pictures come from: ``shapes`` (ShapesWorld ``split``) or ``manifest``
    (``path`` to a JSONL manifest; every record's ``image`` is used).

    ``compositions`` (ShapesWorld only): ``train`` draws only scenes without a held-out
    composition (the split as the text models see it); ``all`` lifts the held-out set, so the
    pictures also show the red triangles and blue circles that no caption, prompt or question
    of the training split names. A tokenizer is an image codec trained without text: with
    ``all`` the ``heldout`` prompts measure whether the generator composes, not whether the
    codec can draw the picture at all (a VQ trained with ``train`` keeps 0.70 of held-out
    scenes against 1.00 of test scenes; ``docs/generation.md``). Test and validation scenes
    stay out either way (their split is a hash of the scene).
    """

    source: str = "shapes"
    path: str | None = None
    split: str = "train"
    image_size: int = 32
    seed: int = 0
    compositions: str = "train"

    def __post_init__(self) -> None:
        if self.source not in ("shapes", "manifest"):
            raise ValueError(f"data.source must be 'shapes' or 'manifest', got {self.source!r}")
        if self.source == "manifest" and not self.path:
            raise ValueError("data.path (a JSONL manifest) is required when data.source=manifest")
        if self.compositions not in ("train", "all"):
            raise ValueError(
                f"data.compositions must be 'train' or 'all', got {self.compositions!r}"
            )
        if self.compositions == "all" and self.split == "heldout":
            raise ValueError("data.split 'heldout' needs data.compositions 'train' ('all' holds "
                             "no composition out, so no scene belongs to that split)")  # fmt: skip
        for name in ("image_size", "seed"):
            value, low = getattr(self, name), 1 if name == "image_size" else 0
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"data.{name} must be an integer >= {low}, got {value!r}")


@dataclass
class TokenizerTrainConfig(TrainRunConfig):
    """A tokenizer training run (the YAML file's sections)."""

    SECTIONS: ClassVar[dict[str, type]] = {"data": ImageData, "optim": Optim}
    REQUIRED: ClassVar[tuple[str, ...]] = ("model", "out")

    model: dict[str, Any]
    out: str
    data: ImageData = field(default_factory=ImageData)
    optim: Optim = field(default_factory=Optim)
    log_every: int = 25
    ckpt_every: int = 250
    ckpt_minutes: float | None = None
    eval_images: int = 1000
    threads: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.eval_images, bool) or self.eval_images < 1:
            raise ValueError(f"eval_images must be an integer >= 1, got {self.eval_images!r}")

    def check(self) -> None:
        if not isinstance(self.model, dict) or self.model.get("type") not in ("vq", "kl"):
            raise ValueError("model.type must be 'vq' or 'kl'")

    def model_types(self) -> tuple[type, ...]:
        # The YAML lists the encoder / decoder fields flat, beside the codebook's.
        kind = self.model.get("type")
        if kind == "vq":
            from kineflow.tokenizers.autoencoder import AutoencoderConfig
            from kineflow.tokenizers.vq import VQConfig

            return (VQConfig, AutoencoderConfig)
        if kind == "kl":
            from kineflow.tokenizers.kl_vae import KLConfig

            return (KLConfig,)
        return ()


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
            from kineflow.data.shapes.scene import HeldOut, ShapesWorld, WorldConfig

            world = WorldConfig(seed=data.seed, image_size=data.image_size)
            if data.compositions == "all":
                world = dataclasses.replace(world, heldout=HeldOut(pairs=(), relations=()))
            self.world = ShapesWorld(world)
            self.world.rng(data.split, 0)  # validates the split
        else:
            from kineflow.data.manifest import ManifestDataset

            self.dataset = ManifestDataset(data.path, image_size=data.image_size)

    def scene(self, index: int) -> Scene:
        """The ShapesWorld scene of picture ``index`` (``source: shapes`` only)."""
        return self.world.scene(self.data.split, index)

    def picture(self, index: int) -> torch.Tensor:
        from kineflow.data.example import image_to_tensor

        if self.data.source == "shapes":
            from kineflow.data.shapes.render import render

            return image_to_tensor(render(self.scene(index), self.data.image_size))
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


class _TokenizerTask:
    """Pictures by global index; the tokenizer's own ``training_losses``."""

    def __init__(self, model: nn.Module, stream: PictureStream) -> None:
        self.model = model
        self.stream = stream

    def batch(self, indices: list[int]) -> torch.Tensor:
        return torch.stack([self.stream.picture(i) for i in indices])

    def losses(self, batch: torch.Tensor, model: nn.Module) -> dict[str, torch.Tensor]:
        return model.training_losses(batch)


def train_tokenizer(config: TokenizerTrainConfig, progress: bool = True) -> dict:
    """Run (or resume) the training described by ``config``; returns the final eval report
    (with the loop's ``resumed_from`` and ``already_complete_at``). ``out`` is held for the
    whole run (:func:`~kineflow.train.run_folder.hold_run_folder`)."""
    with held_run(config) as out:
        torch.manual_seed(config.optim.seed)
        model = build_tokenizer(config.model)
        task = _TokenizerTask(model, PictureStream(config.data))
        summary = train_task(task, config, out, progress, f"train {config.model['type']}")
        model.save_pretrained(out / "model")
        from kineflow.eval.reconstruction import evaluate_reconstruction

        report = evaluate_reconstruction(
            model, n=config.eval_images, image_size=config.data.image_size
        )
        # Held-out compositions too: what the codec cannot draw, no generator on it can.
        heldout = evaluate_reconstruction(
            model, n=config.eval_images, image_size=config.data.image_size, split="heldout"
        )
        report["heldout"] = {k: heldout[k] for k in ("pictures", "psnr", "scene_preserved")}
        report["train_seconds_this_run"] = summary["seconds_this_run"]
        report["steps"] = config.optim.steps
        report["resumed_from"] = summary["resumed_from"]
        report["already_complete_at"] = summary["already_complete_at"]
        atomic_write_json(out / "eval.json", report)
    return report
