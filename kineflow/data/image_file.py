"""Reading picture files safely: existence, a pixel budget checked before decoding, RGB.

One reader for every place a user's picture enters kineflow (manifests, ``kineflow answer``,
the pipelines), so each refuses the same bad inputs with the same messages.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

from PIL import Image, ImageOps

__all__ = ["ImageFileError", "read_rgb", "to_rgb"]

_RGB_MODES = frozenset({"1", "L", "P", "RGB", "CMYK", "YCbCr"})
_ALPHA_MODES = frozenset({"LA", "PA", "RGBA", "RGBa", "La"})
_WHITE = (255, 255, 255, 255)


class ImageFileError(ValueError):
    """A picture file is missing, unreadable, too large or of an unsupported mode; the message
    names the file."""


def _describe(error: Exception) -> str:
    """An exception's message, or its type when it has none (PIL raises some bare)."""
    return str(error) or type(error).__name__


def _open(path: Path, max_pixels: int) -> Image.Image:
    """Open ``path`` lazily (header only) and check its pixel count."""
    if not path.exists():
        raise ImageFileError(f"image file not found: {path}")
    if not path.is_file():
        raise ImageFileError(f"image path is not a file: {path}")
    try:
        with warnings.catch_warnings():
            # PIL warns (and would decode) above its own limit; max_pixels, checked below,
            # is the limit here, and the warning would only be noise before that error.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(path)
    except Image.DecompressionBombError as e:  # PIL's own, far larger, limit
        raise ImageFileError(f"image {path} is too large: {e}") from e
    except Exception as e:  # PIL raises many types for unreadable files; all mean "unreadable"
        raise ImageFileError(f"cannot read image {path}: {_describe(e)}") from e
    width, height = image.size
    if width * height > max_pixels:
        image.close()
        raise ImageFileError(
            f"image {path} is too large: {width}x{height} = {width * height} pixels "
            f"> max_pixels = {max_pixels}"
        )
    return image


def to_rgb(image: Image.Image) -> Image.Image:
    """An opened image -> upright 8-bit RGB; transparency is composited on white.

    Raises:
        ValueError: a mode that is not 8-bit colour or grey (e.g. 16-bit "I;16", float "F").
    """
    # Photos often store their orientation in EXIF rather than in the pixels; apply it so the
    # model sees the image the way a viewer shows it.
    image = ImageOps.exif_transpose(image)
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, _WHITE), rgba).convert("RGB")
    if image.mode not in _RGB_MODES:
        raise ValueError(f"unsupported image mode {image.mode!r}; save it as 8-bit RGB or gray")
    return image.convert("RGB")


def read_rgb(path: str | os.PathLike[str], max_pixels: int, *, verify: bool = False) -> Image.Image:
    """Decode ``path`` to RGB (see :func:`to_rgb`).

    ``verify=True`` first runs PIL's ``verify()`` (structure and checksums, which a decode of a
    truncated-but-plausible file can miss), then reopens the file for the real decode.

    Raises:
        ImageFileError: naming the file, for every failure.
    """
    path = Path(path)
    image = _open(path, max_pixels)
    try:
        if verify:
            with image:
                image.verify()
            image = Image.open(path)  # verify() leaves the image unusable
        with image:
            image.load()
            return to_rgb(image)
    except Exception as e:  # any failure to decode, whatever PIL's plugin raised
        raise ImageFileError(f"cannot read image {path}: {_describe(e)}") from e
