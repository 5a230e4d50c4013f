"""Drawing the demo: token pictures, the refinement GIF (``x_t`` and the drawn ``x̂_1`` of every
path, one frame per solver step) and the refinement strip (one sample per path at a few times).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

from kineflow.apps.demo.sampling import PathRun
from kineflow.apps.demo.world import IMAGE_SIZE, PATH_LABELS, Palette

__all__ = ["render_frame", "strip_times", "token_image", "write_gif", "write_strip"]

# Mask pixels are drawn as a grey checkerboard; neither grey is a palette colour (levels are
# multiples of 255 / (levels - 1)), so a masked pixel can never be mistaken for a colour.
_CHECKER = ((112, 112, 112), (200, 200, 200))
_BACKGROUND = (255, 255, 255)
_INK = (20, 20, 20)


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has only the fixed bitmap font
        return ImageFont.load_default()


def token_image(ids: Tensor, palette: Palette, scale: int) -> np.ndarray:
    """uint8 [S·scale, S·scale, 3] picture of one image's tokens Long[S²], nearest upscaling.

    Ids beyond the palette (the mask) are drawn as a checkerboard of two greys.
    """
    side = math.isqrt(ids.numel())
    grid = ids.reshape(side, side).cpu().numpy()
    masked = grid >= palette.size
    rgb = palette.rgb[np.where(masked, 0, grid)]
    rgb = rgb.repeat(scale, axis=0).repeat(scale, axis=1)
    masked = masked.repeat(scale, axis=0).repeat(scale, axis=1)
    cell = max(1, scale // 2)
    yy, xx = np.indices(masked.shape)
    checker = np.where(
        (((yy // cell) + (xx // cell)) % 2 == 0)[..., None], *map(np.array, _CHECKER)
    )
    return np.where(masked[..., None], checker, rgb).astype(np.uint8)


def _grid_image(batch: Tensor, palette: Palette, scale: int, gap: int = 2) -> Image.Image:
    """The images of ``batch`` (Long[B, S²]) in a grid two wide."""
    cols = min(2, batch.shape[0])
    rows = math.ceil(batch.shape[0] / cols)
    side = IMAGE_SIZE * scale
    size = (cols * side + (cols - 1) * gap, rows * side + (rows - 1) * gap)
    canvas = Image.new("RGB", size, _BACKGROUND)
    for j, ids in enumerate(batch):
        tile = Image.fromarray(token_image(ids, palette, scale))
        canvas.paste(tile, ((j % cols) * (side + gap), (j // cols) * (side + gap)))
    return canvas


def _gif_palette(palette: Palette) -> Image.Image:
    """A fixed "P"-mode palette: the token colours, the checker, and a grey ramp for text.

    Quantising every frame to the same exact palette keeps token colours exact (no dithering)
    and lets the GIF encoder store only the changed rectangle of each frame.
    """
    colours = [tuple(int(v) for v in c) for c in palette.rgb]
    colours += [*_CHECKER, _BACKGROUND, _INK]
    colours += [(v, v, v) for v in range(0, 256, 17)]
    flat = [v for c in colours[:256] for v in c]
    image = Image.new("P", (1, 1))
    image.putpalette(flat + flat[:3] * (256 - len(flat) // 3))
    return image


def render_frame(
    runs: Sequence[PathRun], palette: Palette, k: int, shown: int, big: int = 6, small: int = 3
) -> Image.Image:
    """Frame ``k``: for every path, ``x_t`` at grid time k and the ``x̂_1`` drawn from it."""
    title_font, font = _font(14), _font(12)
    n = runs[0].result.nfe
    t = float(runs[0].result.times[k])
    columns = []
    for run in runs:
        states, predictions = run.result.states, run.result.predictions
        # At t = 1 there is nothing left to predict: the state is its own x̂_1.
        predicted = predictions[k] if k < n else states[k]
        columns.append(
            (
                PATH_LABELS[run.kind],
                _grid_image(states[k, :shown], palette, big),
                _grid_image(predicted[:shown], palette, small),
            )
        )
    margin, header, caption, footer = 12, 26, 16, 40
    col_w = max(max(a.width, b.width) for _, a, b in columns) + 20
    body = caption + columns[0][1].height + caption + 4 + columns[0][2].height
    width = margin + len(columns) * (col_w + margin)
    frame = Image.new("RGB", (width, header + body + footer), _BACKGROUND)
    draw = ImageDraw.Draw(frame)
    draw.text((margin, 6), f"step {k}/{n}    t = {t:.3f}", fill=_INK, font=title_font)
    for j, (label, current, predicted) in enumerate(columns):
        x0 = margin + j * (col_w + margin)
        y = header
        draw.text((x0, y), label, fill=_INK, font=title_font)
        y += caption + 2
        frame.paste(current, (x0, y))
        y += current.height + 3
        draw.text((x0, y), "x1 drawn by the solver", fill=_INK, font=font)
        frame.paste(predicted, (x0, y + caption))
    notes = (
        "large: x_t of the first samples.  small: the x1 the solver drew per pixel from the",
        "exact posterior p(x1 | x_t) at this step.  grey checkerboard: mask token.",
    )
    for i, note in enumerate(notes):
        draw.text((margin, header + body + 6 + 14 * i), note, fill=_INK, font=font)
    return frame


def write_gif(runs: Sequence[PathRun], palette: Palette, path: Path, shown: int) -> int:
    """Write the refinement animation; returns its number of frames."""
    pal = _gif_palette(palette)
    count = runs[0].result.nfe + 1
    frames = [
        render_frame(runs, palette, k, shown).quantize(palette=pal, dither=Image.Dither.NONE)
        for k in range(count)
    ]
    # Hold the start and the result long enough to look at them.
    durations = [900] + [140] * (count - 2) + [2500]  # count >= 2: steps >= 1
    frames[0].save(
        path, save_all=True, append_images=frames[1:], duration=durations, loop=0, disposal=1
    )
    return count


def strip_times(steps: int) -> list[int]:
    """Grid indices of the strip's columns: quarters of the run, then its end in more detail,
    since the metric path resolves near-identical colours only as β_t blows up near t = 1."""
    fractions = (0, 1 / 4, 1 / 2, 3 / 4, 7 / 8)
    return sorted({round(f * steps) for f in fractions} | {max(steps - 1, 0), steps})


def write_strip(runs: Sequence[PathRun], palette: Palette, path: Path, scale: int = 5) -> None:
    """One row per path: sample 0 at the grid times of :func:`strip_times`, labelled with t."""
    font = _font(12)
    ks = strip_times(runs[0].result.nfe)
    side, gap, label_w, header = IMAGE_SIZE * scale, 6, 170, 22
    width = label_w + len(ks) * (side + gap)
    strip = Image.new("RGB", (width, header + len(runs) * (side + gap) + gap), _BACKGROUND)
    draw = ImageDraw.Draw(strip)
    for i, k in enumerate(ks):
        t = float(runs[0].result.times[k])
        draw.text((label_w + i * (side + gap), 4), f"t = {t:.2f}", fill=_INK, font=font)
    for r, run in enumerate(runs):
        y = header + r * (side + gap)
        draw.text((8, y + side // 2 - 7), PATH_LABELS[run.kind], fill=_INK, font=font)
        for i, k in enumerate(ks):
            tile = Image.fromarray(token_image(run.result.states[k, 0], palette, scale))
            strip.paste(tile, (label_w + i * (side + gap), y))
    strip.save(path, optimize=True)
