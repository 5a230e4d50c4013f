"""Training curves from ``metrics.jsonl`` files, drawn with PIL (no plotting dependency).

Each run is one line per metric key on a shared set of axes: x = ``step``, y = the metric
(log scale when every value is positive and they span more than a factor of 20). Runs are told
apart by colour, keys by panel (one panel per key, side by side).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from kineflow.io import atomic_write, read_jsonl

__all__ = ["plot_metrics", "read_metrics"]

COLOURS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14), (148, 103, 189),
           (140, 86, 75), (227, 119, 194), (127, 127, 127)]  # fmt: skip


def read_metrics(path: str | os.PathLike[str]) -> list[dict[str, float]]:
    """The rows of a ``metrics.jsonl`` file; a missing file or a bad line is a clear error."""
    rows = []
    for n, row in read_jsonl(path):
        if not isinstance(row, dict) or "step" not in row:
            raise ValueError(f"{path}:{n}: a metrics row must be an object with a 'step'")
        rows.append(row)
    if not rows:
        raise ValueError(f"{path}: no metrics rows")
    return rows


def _ticks(lo: float, hi: float, log: bool) -> list[float]:
    if log:
        return [10.0**k for k in range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1)]
    span = hi - lo or 1.0
    step = 10 ** math.floor(math.log10(span / 4))
    for mult in (1, 2, 5, 10):
        if span / (step * mult) <= 6:
            step *= mult
            break
    first = math.ceil(lo / step) * step
    return [first + i * step for i in range(int((hi - first) / step) + 1)]


class _Axes:
    """Data -> pixel coordinates of one panel (x linear, y linear or log10)."""

    MARGIN = (52, 12, 22, 30)  # left, right, top, bottom

    def __init__(self, x0: int, size: tuple[int, int], xs: list[float], ys: list[float]) -> None:
        self.x0, (self.W, self.H) = x0, size
        self.x_lo, self.x_hi = min(xs), max(max(xs), min(xs) + 1)
        self.y_lo, self.y_hi = min(ys), max(ys)
        self.log = self.y_lo > 0 and self.y_hi / self.y_lo > 20
        self.f_lo, self.f_hi = self.f(self.y_lo), self.f(self.y_hi)
        if self.f_hi == self.f_lo:
            self.f_lo, self.f_hi = self.f_lo - 1, self.f_hi + 1

    def f(self, y: float) -> float:
        return math.log10(y) if self.log else y

    def __call__(self, x: float, y: float) -> tuple[float, float]:
        left, right, top, bottom = self.MARGIN
        px = self.x0 + left + (x - self.x_lo) / (self.x_hi - self.x_lo) * (self.W - left - right)
        frac = (self.f(y) - self.f_lo) / (self.f_hi - self.f_lo)
        return px, top + (1 - frac) * (self.H - top - bottom)


def plot_metrics(
    runs: Mapping[str, Sequence[Mapping[str, float]]],
    keys: Sequence[str],
    out: str | os.PathLike[str],
    size: tuple[int, int] = (420, 300),
) -> Path:
    """Write a PNG with one panel per ``keys`` entry and one line per run (name -> rows)."""
    if not runs:
        raise ValueError("no runs to plot")
    if not keys:
        raise ValueError("no metric keys to plot")
    for name, rows in runs.items():
        missing = [k for k in keys if not any(k in r for r in rows)]
        if missing:
            have = sorted({k for r in rows for k in r} - {"step"})
            raise ValueError(f"run {name!r} has no metric {missing}; it has {have}")
    font = ImageFont.load_default()
    W, H = size
    image = Image.new("RGB", (W * len(keys), H + 14 * len(runs) + 8), "white")
    draw = ImageDraw.Draw(image)
    left, right, top, bottom = _Axes.MARGIN
    black = (0, 0, 0)
    for p, key in enumerate(keys):
        x0 = p * W
        series = [
            [(r["step"], float(r[key])) for r in rows if key in r and math.isfinite(r[key])]
            for rows in runs.values()
        ]
        xs = [x for pts in series for x, _ in pts]
        ys = [y for pts in series for _, y in pts]
        at = _Axes(x0, size, xs, ys)
        draw.rectangle((x0 + left, top, x0 + W - right, H - bottom), outline=black)
        for t in _ticks(at.y_lo, at.y_hi, at.log):
            if at.f_lo <= at.f(t) <= at.f_hi:
                _, py = at(at.x_lo, t)
                draw.line((x0 + left - 3, py, x0 + left, py), fill=black)
                draw.text((x0 + 2, py - 6), f"{t:.3g}", fill=black, font=font)
        for t in _ticks(at.x_lo, at.x_hi, False):
            px, _ = at(t, at.y_lo)
            draw.line((px, H - bottom, px, H - bottom + 3), fill=black)
            draw.text((px - 10, H - bottom + 5), f"{t:g}", fill=black, font=font)
        draw.text((x0 + left, 5), f"{key}{' (log)' if at.log else ''} vs step", fill=black,
                  font=font)  # fmt: skip
        for i, pts in enumerate(series):
            colour = COLOURS[i % len(COLOURS)]
            if len(pts) > 1:
                draw.line([at(x, y) for x, y in pts], fill=colour, width=2)
            elif pts:
                px, py = at(*pts[0])
                draw.ellipse((px - 2, py - 2, px + 2, py + 2), fill=colour)
    for i, name in enumerate(runs):
        y = H + 4 + 14 * i
        draw.line((10, y + 6, 30, y + 6), fill=COLOURS[i % len(COLOURS)], width=3)
        draw.text((36, y), name, fill=black, font=font)
    return atomic_write(out, lambda temp: image.save(temp, format="PNG"))
