"""How the ShapesWorld detector degrades: scene-level accuracy under pixel noise and blur.

Draws scenes from all four splits, renders them at 32 and 64 px, corrupts them with Gaussian
pixel noise (sigma in 0-255 units) or Gaussian blur (PIL radius), and reports the fraction of
pictures whose detected scene equals the true one, plus the detector's speed. The clean row is
the ">= 99.5% on clean renders" requirement; the rest shows the degradation is gradual.

    python bench/detector_robustness.py [--scenes 2000] [--out bench/results/detector.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from kineflow.data.shapes.render import render_batch
from kineflow.data.shapes.scene import SPLITS, ShapesWorld
from kineflow.eval.detector import detect

NOISE = (0, 8, 16, 24, 32, 48, 64)
BLUR = (0.5, 0.8, 1.0, 1.5, 2.0)


def accuracy(pictures: np.ndarray, scenes: list) -> float:
    return float(np.mean([a == b for a, b in zip(detect(pictures), scenes, strict=True)]))


def blur(pictures: np.ndarray, radius: float) -> np.ndarray:
    return np.stack(
        [np.asarray(Image.fromarray(p).filter(ImageFilter.GaussianBlur(radius))) for p in pictures]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenes", type=int, default=2000)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    world = ShapesWorld()
    per_split = args.scenes // len(SPLITS)
    scenes = [world.scene(s, i) for s in SPLITS for i in range(per_split)]
    rng = np.random.default_rng(0)
    results = {"scenes": len(scenes), "machine": platform.processor() or platform.machine()}
    for size in (32, 64):
        pictures = render_batch(scenes, size)
        t0 = time.perf_counter()
        clean = accuracy(pictures, scenes)
        ms = (time.perf_counter() - t0) / len(scenes) * 1e3
        row = {"clean": clean, "ms_per_picture": round(ms, 3), "noise": {}, "blur": {}}
        for sigma in NOISE[1:]:
            noisy = np.clip(pictures + rng.normal(0, sigma, pictures.shape), 0, 255)
            row["noise"][str(sigma)] = accuracy(noisy.astype(np.uint8), scenes)
        for radius in BLUR:
            row["blur"][str(radius)] = accuracy(blur(pictures, radius), scenes)
        results[f"{size}px"] = row
    text = json.dumps(results, indent=1)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
