"""The worked fine-tuning example (``make finetune-example``): Fashion-MNIST on FUDOKI.

The shipped ShapesWorld FUDOKI model (``checkpoints/fudoki-shapes``) learns to draw the ten
Fashion-MNIST classes from captions ("a photo of a sneaker") and to answer "what is this?"
with the class name. Its VQ, trained on flat coloured shapes, cannot represent clothing (the
judge reads its reconstructions at chance), so the example first gives it a VQ that can:

1. a manifest of ``per_class`` training pictures per class, each 28 px picture padded with 2 px
   of black to the model's 32 px, as a caption record and a VQA record;
2. the judge: a small CNN trained on the train split (:mod:`kineflow.eval.fashion_classifier`),
   its own test accuracy;
3. a VQ of the shipped architecture trained on the manifest's pictures
   (``configs/vq_fashion.yaml``); the base's and the new VQ's reconstructions of test pictures
   (MSE, what the judge reads in them: the ceiling for generation);
4. fine-tuning through the shared loop (``configs/finetune_fudoki_fashion.yaml`` with ``vq``
   set to the new VQ, which replaces the base's: ``gen_embed`` restarts from its codebook and
   the metric path's image table is that codebook; LoRA on the backbone, ``gen_embed``,
   ``gen_aligner``, ``gen_head`` and ``aligner`` trained whole);
5. answer accuracy on ``answers`` test pictures before and after, the judge's accuracy on
   ``per_prompt`` pictures drawn per class, each with a bootstrap 95 % interval
   (:mod:`kineflow.apps.finetune_eval`); a labelled sample grid;
6. peak memory and seconds per step, LoRA vs full fine-tuning, each in its own process
   (``--measure lora|full``; ``--measure-steps 0`` skips this).

Everything lands in ``--out`` (``results.json``, ``grid.png``, ``vq/``, ``run/``).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from PIL import Image

from kineflow.apps.finetune_eval import (
    QUESTION,
    answer_hits,
    bootstrap_interval,
    generation_hits,
    labelled_grid,
    pad_picture,
    padded_tensor,
    reconstruction,
    score,
)
from kineflow.data.idx import FASHION_MNIST_CLASSES, IdxDataset, fashion_mnist
from kineflow.data.manifest import write_manifest
from kineflow.eval.fashion_classifier import (
    classify,
    load_classifier,
    save_classifier,
    train_classifier,
)
from kineflow.io import atomic_write_json

__all__ = ["bootstrap_interval", "main", "pad_picture", "run_example", "write_fashion_manifest"]

CONFIG = "configs/finetune_fudoki_fashion.yaml"
VQ_CONFIG = "configs/vq_fashion.yaml"


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
        answer = FASHION_MNIST_CLASSES[label]
        records.append({"image": name, "question": QUESTION, "answer": answer, "id": f"{i}q"})
        if all(v >= per_class for v in taken.values()):
            break
    return write_manifest(folder / "manifest.jsonl", records)


def _stack(ds: IdxDataset, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``n`` pictures as classifier inputs and their labels."""
    images = torch.from_numpy(ds.images[:n]).float().div(255.0)[:, None]
    return images, torch.from_numpy(ds.labels[:n].astype(np.int64))


def run_config(
    settings: argparse.Namespace, manifest: Path, out: Path, lora: bool, vq: str | None
) -> Any:
    """The FUDOKI run: ``settings.config`` with this manifest, output folder, step count and
    (when given) VQ folder; without ``lora``, full fine-tuning of the same base."""
    from kineflow.train.fudoki import FudokiTrainConfig

    raw = yaml.safe_load(Path(settings.config).read_text())
    raw["out"] = str(out)
    raw["data"]["manifest"] = str(manifest)
    raw["optim"]["steps"] = settings.steps
    if vq is not None:
        raw["vq"] = vq
    if not lora:  # every parameter trained, starting from the base's weights
        raw["init_from"] = raw.pop("lora")["base"]
    return FudokiTrainConfig.from_dict(raw)


def train_vq(settings: argparse.Namespace, manifest: Path, out: Path) -> Path:
    """Stage 3: the VQ of ``settings.vq_config`` trained on the manifest's pictures; its folder."""
    from kineflow.train.tokenizer import TokenizerTrainConfig, train_tokenizer

    raw = yaml.safe_load(Path(settings.vq_config).read_text())
    raw["data"]["path"], raw["out"] = str(manifest), str(out)
    if settings.vq_steps is not None:
        raw["optim"]["steps"] = settings.vq_steps
        raw["optim"]["warmup"] = min(raw["optim"].get("warmup", 0), settings.vq_steps)
    train_tokenizer(TokenizerTrainConfig.from_dict(raw), progress=settings.progress)
    return out / "model"


def _status_mib(field: str = "VmRSS") -> float:
    """``field`` of ``/proc/self/status`` in MiB: ``VmRSS`` (resident memory now) or ``VmHWM``
    (its peak since this process started its program)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def measure(settings: argparse.Namespace) -> dict[str, Any]:
    """Train ``settings.steps`` steps (LoRA or full) here; seconds per step, this process's
    peak RSS (``VmHWM``; not ``ru_maxrss``, which a child inherits from the parent it was
    forked from) and, sampled every 20 ms from a thread, its RSS just before the run and its
    peak during the run (model building, optimiser state and the steps)."""
    import threading

    from kineflow.train.fudoki import train_fudoki

    out = Path(settings.out)
    manifest = (
        Path(settings.manifest)
        if settings.manifest
        else write_fashion_manifest(fashion_mnist(settings.root), out / "data", 20)
    )
    mode = settings.measure
    config = run_config(settings, manifest, out / f"measure_{mode}", mode == "lora", settings.vq)
    before, peak, done = _status_mib(), [0.0], threading.Event()

    def sample() -> None:
        while not done.wait(0.02):
            peak[0] = max(peak[0], _status_mib())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    train_fudoki(config, progress=False)
    seconds = time.perf_counter() - start
    done.set()
    sampler.join()
    found = {
        "mode": mode,
        "steps": settings.steps,
        "batch_size": config.optim.batch_size,
        "seconds_per_step": round(seconds / settings.steps, 3),
        "rss_before_run_mib": round(before, 1),
        "peak_rss_during_run_mib": round(peak[0], 1),
        "peak_rss_mib": round(_status_mib("VmHWM"), 1),
    }
    atomic_write_json(out / f"measure_{mode}.json", found)
    return found


def _measure_both(settings: argparse.Namespace, out: Path, vq: str) -> dict[str, Any]:
    """Stage 6: ``--measure lora`` and ``--measure full``, each in a fresh process."""
    found = {}
    for mode in ("lora", "full"):
        argv = [sys.executable, "-m", "kineflow.apps.finetune_example", "--measure", mode,
                "--steps", str(settings.measure_steps), "--root", settings.root,
                "--config", settings.config, "--vq", vq, "--out", str(out / "measure"),
                "--manifest", str(out / "data" / "manifest.jsonl")]  # fmt: skip
        done = subprocess.run(argv, capture_output=True, text=True)
        if done.returncode != 0:
            raise ValueError(f"--measure {mode} failed: {done.stderr.strip()[-300:]}")
        found[mode] = json.loads((out / "measure" / f"measure_{mode}.json").read_text())
    return found


def run_example(settings: argparse.Namespace) -> dict[str, Any]:
    """Stages 1–6 of the module docstring; returns (and writes) ``results.json``."""
    import kineflow
    from kineflow.tokenizers.vq import VQModel
    from kineflow.train.fudoki import train_fudoki

    out = Path(settings.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    seconds: dict[str, float] = {}

    def lap(stage: str, since: float) -> float:
        seconds[stage] = round(time.perf_counter() - since, 1)
        return time.perf_counter()

    train, test = fashion_mnist(settings.root), fashion_mnist(settings.root, split="test")
    manifest = write_fashion_manifest(train, out / "data", settings.per_class)
    results: dict[str, Any] = {"per_class": settings.per_class, "steps": settings.steps}
    t = lap("manifest", t0)
    judge_file = out / "classifier.safetensors"
    x_test, y_test = _stack(test, len(test))
    if judge_file.is_file():
        judge = load_classifier(judge_file)
    else:
        x, y = _stack(train, settings.classifier_train or len(train))
        judge = train_classifier(x, y, epochs=settings.classifier_epochs)
        save_classifier(judge, judge_file)
    results["classifier"] = score((classify(judge, x_test) == y_test).numpy())
    t = lap("classifier", t)
    vq_folder = Path(settings.vq) if settings.vq else train_vq(settings, manifest, out / "vq")
    t = lap("vq", t)
    base_folder = yaml.safe_load(Path(settings.config).read_text())["lora"]["base"]
    base = kineflow.load(base_folder)
    n = min(1000, len(test))
    x = padded_tensor(test, n)
    results["vq_reconstruction"] = {
        "base": reconstruction(base.model.gen_vision_model, x, y_test[:n], judge),
        "fashion": reconstruction(VQModel.from_pretrained(vq_folder).eval(), x, y_test[:n], judge),
        "vq_folder": str(vq_folder),
    }
    results["answers_before"] = score(answer_hits(base, test, settings.answers))
    t = lap("evaluate_before", t)
    run = out / "run"
    summary = train_fudoki(
        run_config(settings, manifest, run, True, str(vq_folder)), progress=settings.progress
    )
    t = lap("fine_tune", t)
    results["train_last"] = summary["last"]
    adapter = json.loads((run / "adapter" / "adapter_config.json").read_text())
    total = sum(p.numel() for p in base.model.parameters())
    results["swapped"] = adapter["swapped"]
    results["trainable_parameters"] = adapter["trainable_parameters"]
    results["total_parameters"] = total
    results["trainable_share"] = round(adapter["trainable_parameters"] / total, 4)
    tuned = kineflow.load(run / "model")
    results["answers_after"] = score(answer_hits(tuned, test, settings.answers))
    correct, rows = generation_hits(tuned, judge, settings.per_prompt)
    results["generation"] = score(correct)
    labelled_grid(rows, out / "grid.png")
    t = lap("evaluate_after", t)
    if settings.measure_steps:
        results["memory"] = _measure_both(settings, out, str(vq_folder))
        t = lap("measure", t)
    results["seconds"] = seconds
    results["total_seconds"] = round(time.perf_counter() - t0, 1)
    atomic_write_json(out / "results.json", results)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="outputs/finetune_example")
    parser.add_argument("--root", default="/usr/share/datasets/fashion-mnist")
    parser.add_argument("--config", default=CONFIG)
    parser.add_argument("--vq-config", default=VQ_CONFIG)
    parser.add_argument("--vq", default=None, help="a trained VQ folder: skip stage 3")
    parser.add_argument("--vq-steps", type=int, default=None, help="default: the VQ config's")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--per-class", type=int, default=300)
    parser.add_argument("--answers", type=int, default=300)
    parser.add_argument("--per-prompt", type=int, default=10)
    parser.add_argument("--classifier-epochs", type=int, default=1)
    parser.add_argument("--classifier-train", type=int, default=20000, help="0: the whole split")
    parser.add_argument("--measure", choices=("lora", "full"), default=None)
    parser.add_argument("--measure-steps", type=int, default=5, help="0: skip stage 6")
    parser.add_argument("--manifest", default=None, help="--measure: this manifest")
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
