"""Does each image token hold its own grid cell's object, or a mixture of the whole scene?

For a FUDOKI model folder (its understanding tower and aligner), a logistic probe reads the
colour and the shape of the object in a grid cell from only the tokens whose patch overlaps
that cell (*local*) or from only the other tokens (*remote*), at each depth: the patch
embeddings (before any block), after every tower block, and the aligner's output (what the
language model reads). Cells: the top-left corner, the centre and the bottom-right corner
(the mean is reported). ShapesWorld VQA scenes: ``--train`` from the train split (the last
20 % validate the weight decay) and ``--test`` from the test split
(:func:`kineflow.eval.probe.fit_probe`, weight decay from {0.001, 0.01}, 40 L-BFGS
iterations).

A token grid that lines up with the objects gives local ≈ 1 and remote near chance at the
embeddings; a remote score that rises with depth says the blocks spread every cell over every
token. ``docs/understanding.md`` reads the result.

With one token per grid cell (9 tokens), a second probe reads *which cell a token is* from
that one token's features (9 classes, chance 1/9), for tokens over an object
(``own_cell_occupied``) and over an empty cell (``own_cell_empty``): the position a language
model with rotary positions can only take from the token itself when a question asks where
something is.

Usage: ``python bench/token_locality.py --model checkpoints/fudoki-shapes``; JSON on stdout.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

CELLS_PROBED = (0, 4, 8)  # top left, centre, bottom right (reading order)


def overlapping_tokens(cell: int, image_size: int, patch: int, render_size: int = 32) -> list[int]:
    """Indices (row-major) of the tower's patches that overlap grid cell ``cell`` by more than
    one pixel along each axis, measured on the ``render_size`` picture (the tower sees it
    resized to ``image_size`` and cut in ``patch`` px squares): a sliver left by the resize
    does not count."""
    from kineflow.data.shapes.render import cell_bounds
    from kineflow.data.shapes.scene import CELLS

    r, c = CELLS[cell]
    edges = cell_bounds(render_size)
    side = image_size // patch
    step = patch * render_size / image_size  # a patch's side on the rendered picture

    def overlaps(lo: float, hi: float, k: int) -> bool:
        return min(hi, (k + 1) * step) - max(lo, k * step) > 1

    return [pr * side + pc for pr in range(side) for pc in range(side)
            if overlaps(edges[r], edges[r + 1], pr)
            and overlaps(edges[c], edges[c + 1], pc)]  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--model", default="checkpoints/fudoki-shapes")
    p.add_argument("--train", type=int, default=2000)
    p.add_argument("--test", type=int, default=500)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    import kineflow
    from kineflow.data.shapes import ShapesWorld
    from kineflow.data.shapes.dataset import draw_item
    from kineflow.data.shapes.render import render_image
    from kineflow.data.shapes.scene import Scene
    from kineflow.eval.probe import ProbeConfig, fit_probe, scene_labels
    from kineflow.inputs.images import preprocess_understanding

    started = time.perf_counter()
    pipe = kineflow.load(args.model)
    world = ShapesWorld()
    n = args.train + args.test
    scenes = [Scene.from_key(draw_item(world, "vqa", "train" if i < args.train else "test",
                                       i).scene_key) for i in range(n)]  # fmt: skip
    vision = pipe.model.config.vision
    pixels = preprocess_understanding([render_image(s) for s in scenes], vision.image_size)
    tower = pipe.model.vision_model.vision_tower
    depths: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        x = tower.patch_embed(pixels) + tower.pos_embed
        depths["embeddings"] = x
        for i, block in enumerate(tower.blocks):
            x = block(x)
            depths[f"block {i + 1}"] = x
        depths["aligner"] = pipe.model.encode_images(pixels)
    labels = scene_labels(scenes)
    # A smaller weight-decay grid and fewer L-BFGS steps than the probe command's: 60 fits.
    probe = ProbeConfig(weight_decays=(1e-3, 1e-2), iterations=40)
    train, test = np.arange(args.train), np.arange(args.train, n)
    tokens = (vision.image_size // vision.patch_size) ** 2
    result: dict[str, dict[str, float]] = {}
    for name, feats in depths.items():
        row = {}
        for target, classes in (("colour", 6), ("shape", 3)):
            for where in ("local", "remote"):
                accs = []
                for cell in CELLS_PROBED:
                    local = overlapping_tokens(cell, vision.image_size, vision.patch_size)
                    keep = local if where == "local" else [t for t in range(tokens)
                                                           if t not in local]  # fmt: skip
                    fit = fit_probe(feats[:, keep].flatten(1), labels[target][:, cell : cell + 1],
                                    train, test, classes, probe)  # fmt: skip
                    accs.append(fit["accuracy"])
                row[f"{target}_{where}"] = round(float(np.mean(accs)), 3)
        if tokens == labels["occupied"].shape[1]:  # one token per cell: token k is cell k
            cell = np.tile(np.arange(tokens), n)  # row s * tokens + k is scene s, token k

            def rows_of(scenes: np.ndarray) -> np.ndarray:
                return (scenes[:, None] * tokens + np.arange(tokens)).ravel()

            for name_, on in (("own_cell_occupied", 1), ("own_cell_empty", 0)):
                y = np.where(labels["occupied"].ravel() == on, cell, -1)[:, None]
                fit = fit_probe(feats.flatten(0, 1), y, rows_of(train), rows_of(test), tokens,
                                probe)  # fmt: skip
                row[name_] = round(float(fit["accuracy"]), 3)
        result[name] = row
        print(f"[token_locality] {name} {row}", file=sys.stderr, flush=True)
    report = {"model": str(Path(args.model)), "image_size": vision.image_size,
              "patch_size": vision.patch_size, "tokens": tokens, "cells": list(CELLS_PROBED),
              "train_scenes": args.train, "test_scenes": args.test,
              "seconds": round(time.perf_counter() - started, 1), "accuracy": result}  # fmt: skip
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
