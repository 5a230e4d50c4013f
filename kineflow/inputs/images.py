"""Pictures in and out of the pipelines: understanding-image preprocessing and trajectory files.

Understanding input (FUDOKI's ``resize_pad``, docs/design.md §1.7): an RGB picture of
``w x h`` becomes ``S x S`` by

    scale = S / max(w, h),   (w', h') = (max(1, int(w·scale)), max(1, int(h·scale)))   (bilinear)
    pasted at ((S − w') // 2, (S − h') // 2) on a canvas of colour (127, 127, 127),
    x = (pixel / 255 − mean) / std,   mean = std = 0.5  ->  x in [−1, 1].

``int`` truncation and the integer centring are the official ones, so a picture lands on the
same pixels as in the reference code.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from kineflow.data.image_file import read_rgb, to_rgb
from kineflow.io import atomic_write

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "as_image_list",
    "load_image",
    "pair_images",
    "preprocess_understanding",
    "resize_pad",
    "save_gif",
    "save_strip",
]

#: Pictures larger than this (w·h) are refused before decoding: a decompression bomb or a
#: photo far beyond any model input is a mistake, not something to resize silently.
DEFAULT_MAX_PIXELS = 8192 * 8192


def load_image(
    source: str | os.PathLike[str] | Image.Image | np.ndarray,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> Image.Image:
    """An upright RGB PIL picture from a path, a PIL image (alpha composited on white) or a
    uint8 array ``[H, W, 3]`` / ``[H, W]``.

    Raises:
        ImageFileError (a ValueError): a missing or unreadable file, or one of more than
            ``max_pixels`` pixels (checked before decoding); ValueError for such a PIL image
            or an array of another dtype or shape; TypeError for anything else.
    """
    if isinstance(source, np.ndarray):
        if source.dtype != np.uint8 or not (
            source.ndim == 2 or (source.ndim == 3 and source.shape[2] == 3)
        ):
            raise ValueError(
                f"an image array must be uint8 [H, W, 3] or [H, W], got {source.dtype} "
                f"{list(source.shape)}"
            )
        source = Image.fromarray(source)
    if isinstance(source, (str, os.PathLike)):
        return read_rgb(source, max_pixels)
    if not isinstance(source, Image.Image):
        raise TypeError(
            f"unsupported image {type(source).__name__}: give a file path, a PIL image or a "
            "uint8 array [H, W, 3]"
        )
    w, h = source.size
    if w < 1 or h < 1 or w * h > max_pixels:
        raise ValueError(f"image of {w}x{h} pixels: expected 1 to {max_pixels} pixels")
    return to_rgb(source)


def as_image_list(images: object) -> list:
    """One picture (a path or a PIL image) as a one-item list; a sequence of them as a list."""
    single = not isinstance(images, Sequence) or isinstance(images, str)
    return [images] if single else list(images)


def pair_images(images: object, texts: str | Sequence[str], what: str) -> tuple[list, list[str]]:
    """Pictures and their texts (questions, instructions…) as two lists of equal length; one
    picture or one text becomes a one-item list. Raises ValueError naming both counts, and
    TypeError for texts that are not a str or a sequence (bytes: decode them first)."""
    images = as_image_list(images)
    if isinstance(texts, (bytes, bytearray)) or not isinstance(texts, (str, Sequence)):
        raise TypeError(f"{what}s must be a str or a list of str, got {type(texts).__name__}")
    texts = [texts] if isinstance(texts, str) else list(texts)
    if len(images) != len(texts):
        raise ValueError(f"got {len(images)} image(s) for {len(texts)} {what}(s)")
    return images, texts


def resize_pad(
    image: Image.Image, size: int, background: tuple[int, int, int] = (127, 127, 127)
) -> Image.Image:
    """Long side to ``size`` (bilinear, truncated), centred on a ``size x size`` canvas."""
    w, h = image.size
    scale = size / max(w, h)
    new_w, new_h = max(1, int(w * scale)), max(1, int(h * scale))
    canvas = Image.new("RGB", (size, size), tuple(background))
    canvas.paste(
        image.resize((new_w, new_h), Image.Resampling.BILINEAR),
        ((size - new_w) // 2, (size - new_h) // 2),
    )
    return canvas


def preprocess_understanding(
    images: Sequence[Image.Image],
    size: int,
    mean: Sequence[float] = (0.5, 0.5, 0.5),
    std: Sequence[float] = (0.5, 0.5, 0.5),
    background: tuple[int, int, int] = (127, 127, 127),
) -> torch.Tensor:
    """RGB pictures -> Float[I, 3, size, size] normalised as in the module docstring."""
    arrays = [np.asarray(resize_pad(im, size, background), dtype=np.float32) for im in images]
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) / 255.0
    mean_t = torch.tensor(mean, dtype=torch.float32)[None, :, None, None]
    std_t = torch.tensor(std, dtype=torch.float32)[None, :, None, None]
    return (x - mean_t) / std_t


def save_gif(
    frames: Sequence[Image.Image],
    path: str | os.PathLike[str],
    duration_ms: int = 120,
    hold_last_ms: int = 1200,
    scale: int = 1,
) -> Path:
    """An animated GIF of ``frames`` (the last one held longer so the result can be seen),
    written atomically; ``scale`` enlarges tiny pictures with nearest-neighbour pixels."""
    if not frames:
        raise ValueError("no frames to write")
    frames = [_enlarge(f, scale) for f in frames]
    durations = [duration_ms] * (len(frames) - 1) + [hold_last_ms]

    def write(temp: Path) -> None:
        frames[0].save(
            temp,
            format="GIF",
            save_all=True,
            append_images=list(frames[1:]),
            duration=durations,
            loop=0,
        )

    return atomic_write(path, write)


def save_strip(
    frames: Sequence[Image.Image], path: str | os.PathLike[str], scale: int = 1, gap: int = 2
) -> Path:
    """The frames side by side in one PNG, separated by ``gap`` white pixels."""
    if not frames:
        raise ValueError("no frames to write")
    frames = [_enlarge(f, scale) for f in frames]
    w = max(f.width for f in frames)
    h = max(f.height for f in frames)
    strip = Image.new("RGB", (len(frames) * (w + gap) - gap, h), (255, 255, 255))
    for i, frame in enumerate(frames):
        strip.paste(frame, (i * (w + gap), 0))
    return atomic_write(path, lambda temp: strip.save(temp, format="PNG"))


def _enlarge(image: Image.Image, scale: int) -> Image.Image:
    if scale == 1:
        return image
    return image.resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST)
