"""The worked fine-tuning example (``make finetune-example``): LoRA on Fashion-MNIST.

The shipped ShapesWorld FUDOKI model (``checkpoints/fudoki-shapes``) is fine-tuned with LoRA on
Fashion-MNIST pictures written as an own-data manifest, so that it draws the ten classes from
captions ("a photo of a sneaker") and answers "what is this?" with the class name:

1. a manifest of ``per_class`` training pictures per class, each 28 px picture padded with 2 px
   of black to the model's 32 px, as a caption record and a VQA record;
2. the frozen VQ's reconstruction of test pictures (MSE, and what the judge reads in them);
3. the judge: a small CNN trained on the whole train split
   (:mod:`kineflow.eval.fashion_classifier`), its own test accuracy;
4. LoRA training through the shared loop (``configs/finetune_fudoki_fashion.yaml``);
5. the answer accuracy on ``answers`` test pictures, before and after fine-tuning, and the
   judge's accuracy on ``per_prompt`` pictures drawn per class, each with a bootstrap 95 %
   interval; a sample grid (one row per class).

``--measure lora|full`` instead trains ``--steps`` steps with LoRA or with every parameter in
this process and prints its peak resident memory and seconds per step (run each in its own
process). Everything lands in ``--out`` (``results.json``, ``grid.png``, the run folder).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from PIL import Image

from kineflow.data.idx import FASHION_MNIST_CLASSES, IdxDataset, fashion_mnist
from kineflow.data.manifest import write_manifest
from kineflow.eval.fashion_classifier import (
    classify,
    load_classifier,
    save_classifier,
    to_classifier_input,
    train_classifier,
)
from kineflow.io import atomic_write_json

__all__ = ["bootstrap_interval", "main", "pad_picture", "run_example"]

CONFIG = "configs/finetune_fudoki_fashion.yaml"
QUESTION = "what is this?"
PAD = 2  # 28 px + 2 × 2 px = the model's 32 px


def pad_picture(image: torch.Tensor) -> np.ndarray:
    """A dataset picture float ``[3, 28, 28]`` in ``[−1, 1]`` -> uint8 ``[32, 32, 3]``, padded
    with black (Fashion-MNIST's background)."""
    x = torch.nn.functional.pad(image, (PAD,) * 4, value=-1.0)
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()


def bootstrap_interval(correct: np.ndarray, samples: int = 2000, seed: int = 0) -> list[float]:
    """The 2.5 % and 97.5 % quantiles of the mean of ``correct`` over ``samples`` resamples
    with replacement (the percentile bootstrap)."""
    rng = np.random.default_rng(seed)
    correct = np.asarray(correct, dtype=float)
    means = correct[rng.integers(0, len(correct), (samples, len(correct)))].mean(1)
    return [round(float(np.quantile(means, 0.025)), 4), round(float(np.quantile(means, 0.975)), 4)]


def _score(correct: np.ndarray) -> dict[str, Any]:
    return {
        "accuracy": round(float(np.mean(correct)), 4),
        "ci95": bootstrap_interval(correct),
        "n": len(correct),
    }


def write_fashion_manifest(train: IdxDataset, folder: Path, per_class: int) -> Path:
    """The first ``per_class`` pictures of each class as PNGs + a caption and a VQA record."""
    folder.mkdir(parents=True, exist_ok=True)
    taken = dict.fromkeys(range(10), 0)
    records = []
    for i, label in enumerate(train.labels.tolist()):
        if taken[label] >= per_class:
            continue
        taken[label] += 1
        item = train[i]
        name = f"{i:05d}.png"
        Image.fromarray(pad_picture(item["image"])).save(folder / name)
        records.append({"image": name, "caption": item["caption"], "id": f"{i}c"})
        records.append(
            {
                "image": name,
                "question": QUESTION,
                "answer": FASHION_MNIST_CLASSES[label],
                "id": f"{i}q",
            }
        )
        if all(v >= per_class for v in taken.values()):
            break
    return write_manifest(folder / "manifest.jsonl", records)


def _stack(ds: IdxDataset, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``n`` pictures as classifier inputs and their labels."""
    images = torch.from_numpy(ds.images[:n]).float().div(255.0)[:, None]
    return images, torch.from_numpy(ds.labels[:n].astype(np.int64))


def run_config(settings: argparse.Namespace, manifest: Path, out: Path, lora: bool) -> Any:
    from kineflow.train.fudoki import FudokiTrainConfig

    raw = yaml.safe_load(Path(settings.config).read_text())
    raw["out"] = str(out)
    raw["data"]["manifest"] = str(manifest)
    raw["optim"]["steps"] = settings.steps
    if not lora:  # full fine-tuning of the same base, every parameter trained
        raw["init_from"] = raw.pop("lora")["base"]
    return FudokiTrainConfig.from_dict(raw)


def measure(settings: argparse.Namespace) -> dict[str, Any]:
    """Train ``settings.steps`` steps (LoRA or full) here; peak RSS and seconds per step."""
    from kineflow.train.fudoki import train_fudoki

    out = Path(settings.out)
    manifest = write_fashion_manifest(fashion_mnist(settings.root), out / "data", 20)
    config = run_config(
        settings, manifest, out / f"measure_{settings.measure}", settings.measure == "lora"
    )
    start = time.perf_counter()
    train_fudoki(config, progress=False)
    return {
        "mode": settings.measure,
        "steps": settings.steps,
        "seconds_per_step": round((time.perf_counter() - start) / settings.steps, 3),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


def _answers(pipe: Any, test: IdxDataset, n: int) -> np.ndarray:
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


def _generate(pipe: Any, judge: Any, per_prompt: int) -> tuple[np.ndarray, list[np.ndarray]]:
    correct, rows = [], []
    for label, name in enumerate(FASHION_MNIST_CLASSES):
        caption = f"a photo of {'an' if name[0] in 'aeiou' else 'a'} {name}"
        images = pipe.text_to_image(
            [caption] * per_prompt, steps=16, cfg_scale=3.0, seed=label
        ).images
        pixels = np.stack([np.asarray(im.convert("RGB")) for im in images])
        predicted = classify(judge, to_classifier_input(pixels, crop=PAD))
        correct += (predicted == label).tolist()
        rows.append(pixels)
    return np.array(correct), rows


def _grid(rows: list[np.ndarray], path: Path, columns: int = 8, scale: int = 3) -> None:
    grid = np.concatenate([np.concatenate(list(r[:columns]), axis=1) for r in rows], axis=0)
    Image.fromarray(grid).resize(
        (grid.shape[1] * scale, grid.shape[0] * scale), Image.Resampling.NEAREST
    ).save(path)


def run_example(settings: argparse.Namespace) -> dict[str, Any]:
    """Steps 1–5 of the module docstring; returns (and writes) ``results.json``."""
    import kineflow
    from kineflow.train.fudoki import train_fudoki

    out = Path(settings.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    train, test = fashion_mnist(settings.root), fashion_mnist(settings.root, split="test")
    manifest = write_fashion_manifest(train, out / "data", settings.per_class)
    results: dict[str, Any] = {"per_class": settings.per_class, "steps": settings.steps}
    # The judge.
    judge_file = out / "classifier.safetensors"
    x_test, y_test = _stack(test, len(test))
    if judge_file.is_file():
        judge = load_classifier(judge_file)
    else:
        x, y = _stack(train, settings.classifier_train or len(train))
        judge = train_classifier(x, y, epochs=settings.classifier_epochs)
        save_classifier(judge, judge_file)
    results["classifier"] = _score((classify(judge, x_test) == y_test).numpy())
    # What the frozen VQ keeps of the pictures.
    base = kineflow.load(yaml.safe_load(Path(settings.config).read_text())["lora"]["base"])
    n = min(1000, len(test))
    padded = torch.stack([torch.from_numpy(pad_picture(test[i]["image"])) for i in range(n)])
    x = padded.permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        vq = base.model.gen_vision_model
        recon = vq.decode(vq.encode(x)).clamp(-1, 1)
    read = classify(judge, to_classifier_input(recon, crop=PAD)) == y_test[:n]
    results["vq_reconstruction"] = {
        "mse": round(float(((recon - x) ** 2).mean()), 5),
        "judge_on_reconstructions": _score(read.numpy()),
    }
    results["answers_before"] = _score(_answers(base, test, settings.answers))
    # LoRA fine-tuning.
    run = out / "run"
    t_train = time.perf_counter()
    summary = train_fudoki(run_config(settings, manifest, run, True), progress=settings.progress)
    results["train_seconds"] = round(time.perf_counter() - t_train, 1)
    results["train_last"] = summary["last"]
    adapter = json.loads((run / "adapter" / "adapter_config.json").read_text())
    total = sum(p.numel() for p in base.model.parameters())
    results["trainable_parameters"] = adapter["trainable_parameters"]
    results["total_parameters"] = total
    results["trainable_share"] = round(adapter["trainable_parameters"] / total, 4)
    tuned = kineflow.load(run / "model")
    results["answers_after"] = _score(_answers(tuned, test, settings.answers))
    correct, rows = _generate(tuned, judge, settings.per_prompt)
    results["generation"] = _score(correct)
    _grid(rows, out / "grid.png")
    results["total_seconds"] = round(time.perf_counter() - t0, 1)
    atomic_write_json(out / "results.json", results)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="outputs/finetune_example")
    parser.add_argument("--root", default="/usr/share/datasets/fashion-mnist")
    parser.add_argument("--config", default=CONFIG)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--per-class", type=int, default=100)
    parser.add_argument("--answers", type=int, default=300)
    parser.add_argument("--per-prompt", type=int, default=10)
    parser.add_argument("--classifier-epochs", type=int, default=1)
    parser.add_argument("--classifier-train", type=int, default=20000, help="0: the whole split")
    parser.add_argument("--measure", choices=("lora", "full"), default=None)
    parser.add_argument("--progress", action="store_true")
    settings = parser.parse_args(argv)
    try:
        result = measure(settings) if settings.measure else run_example(settings)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
