"""The demo's colour world: a palette of ``levels³`` colours whose token embeddings are colour
coordinates, images of flat shapes over it, and the three compared paths over its tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from kineflow.flow import DiscretePath, EmbeddingMetric, HammingMetric, MaskedPath, MetricPath

__all__ = ["IMAGE_SIZE", "PATH_KINDS", "PATH_LABELS", "Palette", "build_path",
           "colour_embeddings", "draw_dataset", "make_palette"]  # fmt: skip

#: The paths compared, in display order. Every per-path step of the demo is driven by this tuple.
PATH_KINDS = ("metric", "uniform", "masked")
PATH_LABELS = {
    "metric": "FUDOKI metric path",
    "uniform": "uniform (Hamming) path",
    "masked": "masked path",
}
IMAGE_SIZE = 16


@dataclass(frozen=True)
class Palette:
    """``levels³`` colours; token id ``(r·levels + g)·levels + b`` for channel levels r, g, b.

    Attributes:
        levels: intensity levels per channel.
        grid: Long[V, 3], the channel levels of every token.
        rgb: uint8 array [V, 3], display colours.
        embeddings: Float[V, 4], token embeddings for the metric (see :func:`colour_embeddings`).
    """

    levels: int
    grid: Tensor
    rgb: np.ndarray
    embeddings: Tensor

    @property
    def size(self) -> int:
        return self.grid.shape[0]


def colour_embeddings(grid: Tensor, levels: int) -> Tensor:
    """Float[V, 4] embeddings of colours given by channel levels Long[V, 3].

    The metric L2-normalises embeddings, so only directions count: with centred RGB alone, two
    colours on one ray from the cube's centre (the two darkest greys, say) would be at distance
    0. A constant 4th coordinate lifts the colour cube off the origin, so distinct colours get
    distinct directions, and the angle between two of them roughly follows their RGB distance.
    """
    half = (levels - 1) / 2
    centred = grid.float() - half
    return torch.cat([centred, torch.full_like(centred[:, :1], half)], dim=1)


def make_palette(levels: int = 4) -> Palette:
    """The palette with ``levels`` intensities per RGB channel."""
    if levels < 2:
        raise ValueError(f"levels must be >= 2, got {levels}")
    axis = torch.arange(levels)
    grid = torch.cartesian_prod(axis, axis, axis)
    rgb = (grid.numpy() * 255 // (levels - 1)).astype(np.uint8)
    return Palette(levels, grid, rgb, colour_embeddings(grid, levels))


def _shape_mask(kind: str, cx: float, cy: float, r: float, size: int) -> Tensor:
    """Bool[size, size]: pixels whose centres fall inside a circle / square / triangle."""
    y, x = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
    if kind == "circle":
        return (x - cx) ** 2 + (y - cy) ** 2 <= r**2
    if kind == "square":
        return ((x - cx).abs() <= r) & ((y - cy).abs() <= r)
    if kind == "triangle":  # apex up, base 2r wide
        return (y <= cy + r) & ((x - cx).abs() <= (y - (cy - r)) / 2)
    raise ValueError(f"unknown shape {kind!r}")


def draw_dataset(count: int, palette: Palette, seed: int, size: int = IMAGE_SIZE) -> Tensor:
    """Long[count, size²]: distinct images of one or two flat shapes on a flat background.

    Shape colours differ from the background by at least two levels in some channel so every
    shape stays visible. Deterministic in ``seed``.
    """
    gen = torch.Generator().manual_seed(seed)

    def uniform(lo: float, hi: float) -> float:
        return lo + (hi - lo) * float(torch.rand((), generator=gen))

    images: list[Tensor] = []
    seen: set[bytes] = set()
    while len(images) < count:
        background = int(torch.randint(palette.size, (), generator=gen))
        image = torch.full((size, size), background)
        for _ in range(1 + int(torch.randint(2, (), generator=gen))):
            contrast = (palette.grid - palette.grid[background]).abs().amax(-1) >= 2
            colours = torch.nonzero(contrast).flatten()
            colour = int(colours[torch.randint(colours.numel(), (), generator=gen)])
            kind = ("circle", "square", "triangle")[int(torch.randint(3, (), generator=gen))]
            r = uniform(size * 0.18, size * 0.32)
            cx, cy = uniform(r, size - r), uniform(r, size - r)
            image[_shape_mask(kind, cx, cy, r, size)] = colour
        key = image.numpy().tobytes()
        if key not in seen:  # the exact posterior treats duplicates as one heavier image
            seen.add(key)
            images.append(image.flatten())
    return torch.stack(images)


def build_path(kind: str, embeddings: Tensor) -> DiscretePath:
    """The path ``kind`` (one of :data:`PATH_KINDS`) over tokens with these embeddings.

    The masked path gets one extra state, the mask, with id ``len(embeddings)``.
    """
    V = embeddings.shape[0]
    if kind == "metric":
        return MetricPath(EmbeddingMetric(embeddings))
    if kind == "uniform":
        return MetricPath(HammingMetric(V))
    if kind == "masked":
        return MaskedPath(V + 1, mask_id=V)
    raise ValueError(f"unknown path kind {kind!r}; choose one of {', '.join(PATH_KINDS)}")
