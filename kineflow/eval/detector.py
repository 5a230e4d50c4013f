"""A deterministic ShapesWorld detector: pictures -> scenes, the judge of every benchmark.

For a batch of RGB pictures ``[B, S, S, 3]`` it works per grid cell (cells as in
:mod:`kineflow.data.shapes.render`), vectorised over the batch:

1. **Colour labels.** Each pixel gets the nearest of the palette colours and the background
   (squared RGB distance); pixels farther than ``max_colour_distance`` from every colour count
   as background, so muddy decoder output does not invent objects.
2. **Colour.** In each cell the most frequent non-background label is the object's colour
   ``c``.
3. **Coverage.** Each pixel ``x`` of the cell gets the fraction of it that colour ``c`` covers,
   by projecting on the segment from the background ``g`` to ``c``:
   ``alpha(x) = <x - g, c - g> / |c - g|^2``, set to 0 on pixels farther than
   ``max_colour_distance`` from the segment (a dark or foreign pixel is not "fully covered"
   just because it projects far along it). Blur moves coverage around but keeps its sum, so
   this survives soft edges that a hard mask loses. Pixels are *not* zeroed for being labelled
   another colour: near neighbours in the palette (blue / cyan / purple) are closer than pixel
   noise or a blurred edge can tell apart, and dropping those pixels punched holes in objects
   (32 px scenes read right with / without that rule: noise sigma = 64, 39% / 91%; blur
   radius 1.5, 69% / 93%). Truly foreign colours are off the segment anyway. Nor is ``alpha``
   clipped to [0, 1] (see :func:`_coverage`).
4. **Shape and size by template matching.** The renderer's six stamps (3 shapes x 2 sizes),
   each also blurred with Gaussians of widths ``template_blurs``, are slid over every offset
   inside the cell; the object is the stamp and offset of least squared error
   ``sum (alpha - T)^2``. Squared error is the maximum-likelihood match under pixel noise, and
   the blurred templates absorb a decoder's softness. The cell holds an object when the best
   template removes at least ``min_gain`` of its own energy from the error of an empty cell
   *and* the mean coverage on the template's support exceeds the mean coverage of the rest of
   the cell by ``min_contrast`` (the gain alone ignores pixels outside the template, so a cell
   of uniform noise, covered about equally everywhere, would pass it).

On clean renders this recovers every scene exactly (tests require >= 99.5% on 2,000+ scenes;
100% measured); noise and blur degrade it gradually (``bench/detector_robustness.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache

import numpy as np
import torch
from PIL import Image

from kineflow.data.example import tensor_to_array
from kineflow.data.shapes.render import IMAGE_SIZES, cell_bounds, stamp
from kineflow.data.shapes.scene import BACKGROUND, COLOURS, GRID, SHAPES, SIZES, Obj, Scene

_COLOUR_NAMES = tuple(COLOURS)
_PALETTE = np.array([*COLOURS.values(), BACKGROUND], dtype=np.float32)  # background last


@dataclass(frozen=True)
class DetectorConfig:
    """Thresholds of :class:`ShapesDetector` (see the module docstring for their roles)."""

    max_colour_distance: float = 110.0
    min_gain: float = 0.5
    min_contrast: float = 0.5
    template_blurs: tuple[float, ...] = (0.0, 0.6, 1.0, 1.5)


def as_uint8_images(images: np.ndarray | torch.Tensor | Sequence[Image.Image]) -> np.ndarray:
    """Pictures in any common form -> uint8 ``[B, S, S, 3]``.

    Accepts uint8 arrays ``[B, S, S, 3]`` or ``[S, S, 3]``, float tensors ``[B, 3, S, S]`` /
    ``[3, S, S]`` in ``[-1, 1]`` (decoder output), or a sequence of PIL RGB images.
    """
    if isinstance(images, torch.Tensor):
        if not images.is_floating_point():
            raise ValueError(
                f"tensor pictures must be float in [-1, 1] ([B, 3, S, S]), got {images.dtype}; "
                "pass uint8 pictures as numpy arrays [B, S, S, 3]"
            )
        array = tensor_to_array(images if images.ndim == 4 else images[None])
    elif isinstance(images, np.ndarray):
        array = images if images.ndim == 4 else images[None]
        if array.dtype != np.uint8:
            raise ValueError(f"numpy pictures must be uint8, got {array.dtype}")
    else:
        pictures = list(images)
        for i, p in enumerate(pictures):
            if not isinstance(p, Image.Image) or p.mode != "RGB":
                raise ValueError(f"picture {i} is not a PIL RGB image: {p!r}")
        if not pictures:
            return np.empty((0, IMAGE_SIZES[0], IMAGE_SIZES[0], 3), dtype=np.uint8)
        array = np.stack([np.asarray(p) for p in pictures])
    if array.ndim != 4 or array.shape[-1] != 3 or array.shape[1] != array.shape[2]:
        raise ValueError(f"expected square RGB pictures [B, S, S, 3], got {array.shape}")
    if array.shape[1] not in IMAGE_SIZES:
        raise ValueError(
            f"ShapesWorld pictures are {IMAGE_SIZES[0]} or {IMAGE_SIZES[1]} pixels wide, got "
            f"{array.shape[1]}; resize before detecting"
        )
    return array


class ShapesDetector:
    """Reads ShapesWorld scenes back from pictures; see the module docstring."""

    def __init__(self, config: DetectorConfig | None = None) -> None:
        self.config = config or DetectorConfig()

    def labels(self, images: np.ndarray) -> np.ndarray:
        """Colour label per pixel ``[B, S, S]``: palette index, or ``len(COLOURS)`` for
        background (including pixels far from every colour)."""
        x = images.astype(np.float32)
        d2 = ((x[..., None, :] - _PALETTE) ** 2).sum(-1)  # [B, S, S, C + 1]
        label = d2.argmin(-1)
        far = d2.min(-1) > self.config.max_colour_distance**2
        label[far] = len(_COLOUR_NAMES)
        return label

    def detect(self, images: np.ndarray | torch.Tensor | Sequence[Image.Image]) -> list[Scene]:
        """One :class:`Scene` per picture."""
        array = as_uint8_images(images)
        B, S = array.shape[0], array.shape[1]
        label = self.labels(array)
        pixels = array.astype(np.float32)
        edges = cell_bounds(S)
        templates = _templates(S, self.config.template_blurs)
        C = len(_COLOUR_NAMES)
        found: list[list[Obj]] = [[] for _ in range(B)]
        for row in range(GRID):
            for col in range(GRID):
                ys, xs = slice(edges[row], edges[row + 1]), slice(edges[col], edges[col + 1])
                cell = label[:, ys, xs]
                counts = np.stack([(cell == c).sum((1, 2)) for c in range(C)], 1)  # [B, C]
                colour = counts.argmax(1)
                # A shortcut, not a rule: a cell without one coloured pixel never passes the
                # gain anyway (its pixels are nearer the background than any colour).
                candidate = counts.max(1) > 0
                if not candidate.any():
                    continue
                alpha = _coverage(
                    pixels[candidate][:, ys, xs], colour[candidate], self.config.max_colour_distance
                )  # [b, h, w]
                best, gain, contrast = _match(alpha, templates, S)
                present = (gain >= self.config.min_gain) & (contrast >= self.config.min_contrast)
                for b, k in zip(np.flatnonzero(candidate)[present], best[present], strict=True):
                    shape, size, _ = templates[k]
                    found[b].append(Obj(row, col, shape, _COLOUR_NAMES[colour[b]], size))
        return [Scene(tuple(objs)) for objs in found]


def _coverage(pixels: np.ndarray, colour: np.ndarray, max_distance: float) -> np.ndarray:
    """``alpha`` of the module docstring: pixels ``[B, h, w, 3]``, colour index per picture
    ``[B]`` -> coverage ``[B, h, w]``."""
    g = _PALETTE[-1]
    direction = (_PALETTE[colour] - g)[:, None, None, :]  # [B, 1, 1, 3]
    offset = pixels - g
    # Not clipped to [0, 1]: under pixel noise the unclipped projection is unbiased, as the
    # least-squares match assumes. Clipping at 1 cost 15 points of accuracy at noise sigma = 64
    # and helped in none of the degradations measured; clipping at 0 changes nothing measured
    # (the contrast condition already rejects noise around the background).
    alpha = (offset * direction).sum(-1) / (direction**2).sum(-1)
    off_segment = ((offset - np.clip(alpha, 0, 1)[..., None] * direction) ** 2).sum(-1)
    alpha[off_segment > max_distance**2] = 0.0
    return alpha


def _gaussian_blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of a 2-D array with zero padding (the output is larger by
    ``2 * ceil(3 sigma)`` on each axis, so no mass is lost)."""
    if sigma == 0:
        return image.astype(np.float32)
    radius = int(np.ceil(3 * sigma))
    x = np.arange(-radius, radius + 1)
    k = np.exp(-(x**2) / (2 * sigma**2))
    k /= k.sum()
    padded = np.pad(image.astype(np.float64), radius)
    out = np.apply_along_axis(lambda v: np.convolve(v, k, mode="same"), 0, padded)
    out = np.apply_along_axis(lambda v: np.convolve(v, k, mode="same"), 1, out)
    return out.astype(np.float32)


@cache
def _templates(image_size: int, blurs: tuple[float, ...]) -> list[tuple[str, str, np.ndarray]]:
    """``(shape, size, template)`` for every stamp and blur width (templates are float
    coverage maps, larger than the stamp when blurred)."""
    return [
        (shape, size, _gaussian_blur(stamp(shape, size, image_size), sigma))
        for shape in SHAPES
        for size in SIZES
        for sigma in blurs
    ]


def _match(
    alpha: np.ndarray, templates: list[tuple[str, str, np.ndarray]], image_size: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Best template per cell ``alpha [B, h, w]`` over all placements whose stamp lies inside
    the cell, with its *gain* and *contrast*.

    ``|alpha - T|^2 = |alpha|^2 - 2 <alpha, T> + |T|^2``; the first term is common to all
    templates, so a placement scores ``|T|^2 - 2 <alpha, T>``. The gain
    ``(2 <alpha, T> - |T|^2) / |T|^2`` is the error removed by the template relative to an
    empty cell, in units of the template's energy: 1 for an exact match, about -1 for noise.
    The contrast is ``mean(alpha | T > 1/2) - mean(alpha | T < 1/20)`` within the cell.
    """
    B, h, w = alpha.shape
    best = np.full(B, np.inf, dtype=np.float32)
    gain = np.zeros(B, dtype=np.float32)
    index = np.zeros(B, dtype=np.int64)
    where = np.zeros((B, 2), dtype=np.int64)
    pad = max(t.shape[0] for _, _, t in templates)
    padded = np.pad(alpha, ((0, 0), (pad, pad), (pad, pad)))
    for k, (shape, size, t) in enumerate(templates):
        s = t.shape[0]
        margin = (s - stamp(shape, size, image_size).shape[0]) // 2  # blur margin
        energy = float((t**2).sum())
        for y in range(pad - margin, pad + h - s + margin + 1):
            for x in range(pad - margin, pad + w - s + margin + 1):
                score = energy - 2 * (padded[:, y : y + s, x : x + s] * t).sum((1, 2))
                better = score < best
                best[better] = score[better]
                gain[better] = -score[better] / energy
                index[better] = k
                where[better] = (y, x)
    contrast = np.empty(B, dtype=np.float32)
    for b in range(B):
        t = templates[index[b]][2]
        y, x = where[b]
        placed = np.zeros(padded.shape[1:], dtype=np.float32)
        placed[y : y + t.shape[0], x : x + t.shape[1]] = t
        placed = placed[pad : pad + h, pad : pad + w]
        inside, outside = placed > 0.5, placed < 0.05
        rest = alpha[b][outside].mean() if outside.any() else 0.0
        contrast[b] = alpha[b][inside].mean() - rest
    return index, gain, contrast


def detect(images: np.ndarray | torch.Tensor | Sequence[Image.Image]) -> list[Scene]:
    """:meth:`ShapesDetector.detect` with the default thresholds."""
    return ShapesDetector().detect(images)
