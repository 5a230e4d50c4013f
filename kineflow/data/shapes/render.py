"""Deterministic ShapesWorld renderer: a scene -> an RGB picture, no anti-aliasing.

Geometry for an ``S x S`` canvas (``S`` = 32 or 64) and a 3 x 3 grid: cell ``k`` spans pixels
``[round(k S / 3), round((k + 1) S / 3))`` on each axis. An object is a square stamp of odd side

    large: round(0.8 S / 3)   (9 px at 32, 17 px at 64)
    small: round(0.5 S / 3)   (5 px at 32, 11 px at 64)

centred in its cell (odd sides keep circles and triangles left-right symmetric). Circles fill
the stamp's inscribed disc, squares the whole stamp, triangles point up with the base on the
stamp's bottom row. Stamps are drawn once by PIL and pasted with numpy, so rendering costs a few
microseconds per object; the same scene always gives the same bytes.
"""

from __future__ import annotations

from functools import cache

import numpy as np
from PIL import Image, ImageDraw

from kineflow.data.shapes.scene import BACKGROUND, COLOURS, GRID, SHAPES, Scene

IMAGE_SIZES: tuple[int, ...] = (32, 64)
#: Stamp side per canvas size and object size. At 32 px a 5 px "circle" would differ from a
#: 5 px square by its four corner pixels only, which any tokenizer blurs away; at 7 px the
#: two differ by 12 pixels, while 9 px large objects still leave a gap between cells.
STAMP_SIDES: dict[int, dict[str, int]] = {
    32: {"small": 7, "large": 9},
    64: {"small": 11, "large": 17},
}


def _check_size(image_size: int) -> None:
    if image_size not in IMAGE_SIZES:
        raise ValueError(f"image_size must be one of {IMAGE_SIZES}, got {image_size}")


def cell_bounds(image_size: int) -> tuple[int, ...]:
    """Pixel edges of the grid cells: ``GRID + 1`` increasing integers from 0 to S."""
    _check_size(image_size)
    return tuple(round(k * image_size / GRID) for k in range(GRID + 1))


def stamp_side(size: str, image_size: int) -> int:
    """Side in pixels of an object of ``size`` (odd)."""
    _check_size(image_size)
    return STAMP_SIDES[image_size][size]


@cache
def stamp(shape: str, size: str, image_size: int) -> np.ndarray:
    """Boolean mask ``[s, s]`` of an object (read-only; cached)."""
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}")
    s = stamp_side(size, image_size)
    canvas = Image.new("1", (s, s), 0)
    draw = ImageDraw.Draw(canvas)
    if shape == "circle":
        draw.ellipse((0, 0, s - 1, s - 1), fill=1)
    elif shape == "square":
        draw.rectangle((0, 0, s - 1, s - 1), fill=1)
    else:
        draw.polygon(((s - 1) // 2, 0, s - 1, s - 1, 0, s - 1), fill=1)
    mask = np.array(canvas, dtype=bool)
    mask.setflags(write=False)
    return mask


def stamp_origin(row: int, col: int, size: str, image_size: int) -> tuple[int, int]:
    """Top-left pixel ``(y, x)`` of an object's stamp in cell ``(row, col)``."""
    edges = cell_bounds(image_size)
    side = stamp_side(size, image_size)
    y = edges[row] + (edges[row + 1] - edges[row] - side) // 2
    x = edges[col] + (edges[col + 1] - edges[col] - side) // 2
    return y, x


def render(scene: Scene, image_size: int = 32) -> np.ndarray:
    """The picture of ``scene``: uint8 array ``[S, S, 3]``."""
    _check_size(image_size)
    out = np.empty((image_size, image_size, 3), dtype=np.uint8)
    out[:] = BACKGROUND
    for o in scene:
        mask = stamp(o.shape, o.size, image_size)
        y, x = stamp_origin(o.row, o.col, o.size, image_size)
        s = mask.shape[0]
        out[y : y + s, x : x + s][mask] = COLOURS[o.colour]
    return out


def render_image(scene: Scene, image_size: int = 32) -> Image.Image:
    """The picture of ``scene`` as a PIL RGB image."""
    return Image.fromarray(render(scene, image_size))


def render_batch(scenes: list[Scene], image_size: int = 32) -> np.ndarray:
    """Pictures of several scenes: uint8 array ``[B, S, S, 3]``."""
    if not scenes:
        return np.empty((0, image_size, image_size, 3), dtype=np.uint8)
    return np.stack([render(s, image_size) for s in scenes])
