"""The README's infill figure: per row, a ShapesWorld test scene, its mask (one object's cell),
FUDOKI's and UniFluid's infill for the target caption, and the target scene rendered.

    python bench/infill_figure.py --out docs/infill/examples.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

import kineflow
from kineflow.data.shapes.language import caption
from kineflow.data.shapes.render import render_image
from kineflow.eval.infill import infill_items

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--scale", type=int, default=4)
    parser.add_argument("--out", type=Path, default=ROOT / "docs/infill/examples.png")
    args = parser.parse_args()
    items = infill_items(args.rows, seed=3)
    sources = [render_image(i.source) for i in items]
    masks = [Image.fromarray(i.mask.astype(np.uint8) * 255).convert("RGB") for i in items]
    prompts = [caption(i.target) for i in items]
    columns = [sources, masks]
    for name in ("fudoki-shapes", "unifluid-shapes"):
        pipe = kineflow.load(ROOT / "checkpoints" / name)
        columns.append(pipe.infill(sources, [i.mask for i in items], prompts, seed=0).images)
    columns.append([render_image(i.target) for i in items])
    S, gap = 32 * args.scale, 4
    sheet = Image.new("RGB", (len(columns) * (S + gap), args.rows * (S + gap)), "white")
    for c, column in enumerate(columns):
        for r, picture in enumerate(column):
            big = picture.resize((S, S), Image.Resampling.NEAREST)
            sheet.paste(big, (c * (S + gap), r * (S + gap)))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(args.out)
    for r, p in enumerate(prompts):
        print(f"row {r}: {p}")


if __name__ == "__main__":
    main()
