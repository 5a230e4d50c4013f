"""The measurements of the fine-tuning example (:mod:`kineflow.apps.finetune_example`).

Each score is a list of per-item hits (1 right, 0 wrong) reported as its mean with a
percentile-bootstrap 95 % interval: the 2.5 % and 97.5 % quantiles of the mean over resamples
of the items with replacement.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

from kineflow.data.idx import FASHION_MNIST_CLASSES, IdxDataset
from kineflow.eval.fashion_classifier import FashionClassifier, classify, to_classifier_input
from kineflow.eval.stats import bootstrap_ci

__all__ = [
    "PAD", "QUESTION", "answer_hits", "bootstrap_interval", "caption", "generation_hits",
    "labelled_grid", "pad_picture", "padded_tensor", "reconstruction", "score",
]  # fmt: skip

QUESTION = "what is this?"
PAD = 2  # 28 px + 2 × 2 px = the model's 32 px


def pad_picture(image: torch.Tensor) -> np.ndarray:
    """A dataset picture float ``[3, 28, 28]`` in ``[−1, 1]`` -> uint8 ``[32, 32, 3]``, padded
    with black (Fashion-MNIST's background)."""
    x = torch.nn.functional.pad(image, (PAD,) * 4, value=-1.0)
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()


def padded_tensor(ds: IdxDataset, n: int) -> torch.Tensor:
    """The first ``n`` pictures of ``ds``, padded, as float ``[n, 3, 32, 32]`` in ``[−1, 1]``
    (the VQ's input)."""
    pixels = torch.stack([torch.from_numpy(pad_picture(ds[i]["image"])) for i in range(n)])
    return pixels.permute(0, 3, 1, 2).float() / 127.5 - 1


def caption(label: int) -> str:
    """The caption of class ``label``: "a photo of a sneaker", "an ankle boot"."""
    name = FASHION_MNIST_CLASSES[label]
    return f"a photo of {'an' if name[0] in 'aeiou' else 'a'} {name}"


def bootstrap_interval(correct: np.ndarray, samples: int = 2000, seed: int = 0) -> list[float]:
    """The 2.5 % and 97.5 % quantiles of the mean of ``correct`` over ``samples`` resamples
    with replacement (:func:`kineflow.eval.stats.bootstrap_ci`), rounded to 4 digits."""
    _, low, high = bootstrap_ci(correct, draws=samples, seed=seed)
    return [round(low, 4), round(high, 4)]


def score(correct: np.ndarray) -> dict[str, Any]:
    """``{"accuracy", "ci95", "n"}`` of the hits ``correct``."""
    return {
        "accuracy": round(float(np.mean(correct)), 4),
        "ci95": bootstrap_interval(correct),
        "n": len(correct),
    }


@torch.no_grad()
def reconstruction(
    vq: torch.nn.Module, x: torch.Tensor, labels: torch.Tensor, judge: FashionClassifier
) -> dict[str, Any]:
    """What a VQ keeps of pictures ``x`` ``[n, 3, 32, 32]``: the MSE of ``decode(encode(x))``
    (pixels in ``[−1, 1]``) and the judge's accuracy on the reconstructions (their 28 px centre),
    the ceiling of any generator that draws through this VQ."""
    recon = torch.cat([vq.decode(vq.encode(x[i : i + 250])) for i in range(0, len(x), 250)])
    recon = recon.clamp(-1, 1)
    read = classify(judge, to_classifier_input(recon, crop=PAD)) == labels
    return {
        "mse": round(float(((recon - x) ** 2).mean()), 5),
        "judge_on_reconstructions": score(read.numpy()),
    }


def answer_hits(pipe: Any, test: IdxDataset, n: int) -> np.ndarray:
    """Whether ``pipe`` answers "what is this?" about each of the first ``n`` test pictures with
    exactly its class name."""
    correct = []
    for start in range(0, n, 100):
        idx = range(start, min(start + 100, n))
        pictures = [Image.fromarray(pad_picture(test[i]["image"])) for i in idx]
        texts = pipe.answer(
            pictures, [QUESTION] * len(pictures), answer_tokens=12, seed=start
        ).texts
        truth = [FASHION_MNIST_CLASSES[int(test.labels[i])] for i in idx]
        correct += [t.strip() == c for t, c in zip(texts, truth, strict=True)]
    return np.array(correct)


def generation_hits(
    pipe: Any, judge: FashionClassifier, per_prompt: int, steps: int = 16, cfg_scale: float = 3.0
) -> tuple[np.ndarray, list[np.ndarray]]:
    """``per_prompt`` pictures drawn from each class's caption (seed = the class); whether the
    judge reads each as its class, and the pictures uint8 ``[per_prompt, 32, 32, 3]`` per class."""
    correct, rows = [], []
    for label in range(len(FASHION_MNIST_CLASSES)):
        images = pipe.text_to_image(
            [caption(label)] * per_prompt, steps=steps, cfg_scale=cfg_scale, seed=label
        ).images
        pixels = np.stack([np.asarray(im.convert("RGB")) for im in images])
        predicted = classify(judge, to_classifier_input(pixels, crop=PAD))
        correct += (predicted == label).tolist()
        rows.append(pixels)
    return np.array(correct), rows


def labelled_grid(rows: list[np.ndarray], path: Path, columns: int = 8, scale: int = 3) -> None:
    """One row per class (its name on the left), ``columns`` pictures each, enlarged
    ``scale`` times (nearest neighbour), saved as a PNG."""
    grid = np.concatenate([np.concatenate(list(r[:columns]), axis=1) for r in rows], axis=0)
    pictures = Image.fromarray(grid).resize(
        (grid.shape[1] * scale, grid.shape[0] * scale), Image.Resampling.NEAREST
    )
    label_w, row_h = 84, rows[0].shape[1] * scale
    canvas = Image.new("RGB", (label_w + pictures.width, pictures.height), (255, 255, 255))
    canvas.paste(pictures, (label_w, 0))
    draw = ImageDraw.Draw(canvas)
    for i, name in enumerate(FASHION_MNIST_CLASSES[: len(rows)]):
        draw.text((4, i * row_h + row_h // 2 - 5), name, fill=(0, 0, 0))
    tmp = path.with_name(path.name + ".tmp.png")
    canvas.save(tmp)
    tmp.replace(path)
