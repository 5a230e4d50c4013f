"""A small CNN classifier of Fashion-MNIST, the judge of generated Fashion-MNIST pictures.

    [B, 1, 28, 28] in [0, 1] → conv3×3(32) ReLU maxpool2 → conv3×3(64) ReLU maxpool2
    → linear(64·7·7 → 128) ReLU → linear(128 → 10) logits

Trained with Adam and cross-entropy on the train split (seeded, so the same run gives the
same weights); :func:`to_classifier_input` turns any picture (an RGB [−1, 1] tensor or a uint8
array, 28 px or padded / larger) into its input: grey level, resized to 28 × 28 when needed.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import Tensor, nn

from kineflow.io import atomic_save_safetensors

__all__ = [
    "FashionClassifier", "classify", "load_classifier", "save_classifier", "to_classifier_input",
    "train_classifier",
]  # fmt: skip


class FashionClassifier(nn.Module):
    """The CNN of the module docstring: ``forward(x [B, 1, 28, 28]) -> logits [B, 10]``."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )  # fmt: skip
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(64 * 7 * 7, 128), nn.ReLU(),
                                  nn.Linear(128, classes))  # fmt: skip

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


def to_classifier_input(images: Tensor | np.ndarray, crop: int = 0) -> Tensor:
    """Pictures -> ``[B, 1, 28, 28]`` grey levels in ``[0, 1]``.

    ``images``: float ``[B, C, H, W]`` in ``[−1, 1]`` or uint8 ``[B, H, W, C]`` (C = 1 or 3;
    grey = the channel mean); ``crop`` pixels are cut from each border first (the padding a
    28 px picture got to fill 32 px), then the rest is resized to 28 × 28 (bilinear) if needed.
    """
    if isinstance(images, np.ndarray):
        x = torch.from_numpy(images).float().div(255.0).permute(0, 3, 1, 2)
    else:
        x = (images.float() + 1) / 2
    x = x.mean(1, keepdim=True).clamp(0, 1)
    if crop:
        x = x[..., crop:-crop, crop:-crop]
    if x.shape[-2:] != (28, 28):
        x = F.interpolate(x, size=(28, 28), mode="bilinear", align_corners=False)
    return x


def train_classifier(
    images: Tensor, labels: Tensor, epochs: int = 2, batch_size: int = 128, lr: float = 2e-3,
    seed: int = 0,
) -> FashionClassifier:  # fmt: skip
    """A :class:`FashionClassifier` trained on ``images`` ``[N, 1, 28, 28]`` / ``labels``
    ``[N]`` (seeded shuffling and initialisation)."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = FashionClassifier()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    steps = epochs * ((len(images) + batch_size - 1) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(images), generator=g)
        for start in range(0, len(images), batch_size):
            at = order[start : start + batch_size]
            loss = F.cross_entropy(model(images[at]), labels[at])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


@torch.no_grad()
def classify(model: FashionClassifier, x: Tensor, batch_size: int = 1024) -> Tensor:
    """The predicted class ``Long[B]`` of classifier inputs ``x`` ``[B, 1, 28, 28]``."""
    model.eval()
    return torch.cat(
        [model(x[i : i + batch_size]).argmax(-1) for i in range(0, len(x), batch_size)]
    )


def save_classifier(model: FashionClassifier, path: str | os.PathLike[str]) -> None:
    """The weights as one safetensors file (atomic)."""
    atomic_save_safetensors(Path(path), {k: v.contiguous() for k, v in model.state_dict().items()})


def load_classifier(path: str | os.PathLike[str]) -> FashionClassifier:
    model = FashionClassifier()
    model.load_state_dict(load_file(str(path)))
    return model.eval()
