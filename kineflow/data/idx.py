"""IDX files (the MNIST / Fashion-MNIST format) and a captioned dataset over them.

An IDX file is a 4-byte magic, one big-endian uint32 per dimension, then the array's elements
in C order, big-endian:

    00 00 <type code> <ndim> | dim_0 … dim_{ndim-1} (uint32 BE) | data (prod(dims) elements)

=========  =======  ==========
type code  dtype    bytes/elem
=========  =======  ==========
``0x08``   uint8    1
``0x09``   int8     1
``0x0B``   int16    2
``0x0C``   int32    4
``0x0D``   float32  4
``0x0E``   float64  8
=========  =======  ==========

Files may be gzip-compressed (as distributed); :func:`read_idx` recognises gzip by its magic
bytes ``1f 8b``, so a compressed file is read whatever its name. :class:`IdxDataset` pairs an
image file ``[N, H, W]`` (or ``[N, H, W, 3]``) with a label file ``[N]`` and yields ``caption``
examples (see :mod:`kineflow.data.example`) whose caption is built from the class name.
:func:`fashion_mnist` and :func:`mnist` find the standard file names in a folder.
"""

from __future__ import annotations

import errno
import gzip
import math
import operator
import os
import struct
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from kineflow.data.example import image_to_tensor
from kineflow.io import atomic_write

__all__ = [
    "DEFAULT_FASHION_MNIST_ROOT",
    "FASHION_MNIST_CLASSES",
    "MNIST_CLASSES",
    "IdxDataset",
    "IdxError",
    "fashion_mnist",
    "mnist",
    "read_idx",
    "write_idx",
]

#: Type code -> element dtype (big-endian, as stored in the file).
_CODE_TO_DTYPE: dict[int, np.dtype] = {
    0x08: np.dtype("u1"),
    0x09: np.dtype("i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
#: (dtype kind, itemsize) -> type code, for writing arrays of either byte order.
_KIND_TO_CODE: dict[tuple[str, int], int] = {
    (d.kind, d.itemsize): c for c, d in _CODE_TO_DTYPE.items()
}
_KNOWN_CODES = ", ".join(f"0x{c:02X} {d.name}" for c, d in _CODE_TO_DTYPE.items())
_GZIP_MAGIC = b"\x1f\x8b"
# Data is read in bounded chunks so that a corrupt header claiming terabytes fails on the
# missing bytes instead of on a huge up-front allocation.
_CHUNK = 1 << 22

#: The MNIST digits as words, index = label.
MNIST_CLASSES: tuple[str, ...] = (
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
)

#: Fashion-MNIST's ten classes, index = label, in caption-friendly lowercase. Official names:
#: T-shirt/top, Trouser, Pullover, Dress, Coat, Sandal, Shirt, Sneaker, Bag, Ankle boot.
#: "T-shirt/top" becomes "t-shirt" (no slash in a caption) and "Trouser" becomes
#: "pair of trousers" (a single trouser is not what the pictures show, and "a photo of a pair of
#: trousers" reads naturally); the others are the official names lowercased.
FASHION_MNIST_CLASSES: tuple[str, ...] = (
    "t-shirt",
    "pair of trousers",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle boot",
)

#: Where Debian's ``dataset-fashion-mnist`` package installs the four gzipped IDX files.
DEFAULT_FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"

_SPLIT_PREFIX = {"train": "train", "test": "t10k"}


class IdxError(ValueError):
    """A malformed IDX file (or IDX content unfit for its use); the message starts with the
    file's path, which is also kept as ``path``."""

    def __init__(self, path: str | os.PathLike[str], problem: str) -> None:
        self.path = os.fspath(path)
        super().__init__(f"{self.path}: {problem}")


# -- reading ------------------------------------------------------------------------------------
def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an IDX file (plain or gzip) into an array of native byte order.

    Returns:
        An array of the header's shape ``(dim_0, …, dim_{ndim-1})`` and dtype (uint8, int8,
        int16, int32, float32 or float64), writable, in native byte order.

    Raises:
        FileNotFoundError: no file at ``path``.
        IdxError: bad magic, unknown type code, ``ndim`` or a dimension of 0, a header or data
            shorter than the header promises (expected vs found byte counts), bytes after the
            data, or a corrupt gzip stream. The message names the file.
    """
    try:
        raw = open(path, "rb")  # noqa: SIM115 -- closed below, possibly through a GzipFile
    except FileNotFoundError:
        raise FileNotFoundError(errno.ENOENT, "IDX file not found", os.fspath(path)) from None
    with raw:
        compressed = raw.read(2) == _GZIP_MAGIC
        raw.seek(0)
        stream: IO[bytes] = gzip.GzipFile(fileobj=raw, mode="rb") if compressed else raw
        try:
            with stream:
                return _read_stream(path, stream, compressed)
        except (EOFError, zlib.error, gzip.BadGzipFile) as e:
            # EOFError: the gzip stream stops mid-way (a truncated download).
            raise IdxError(path, f"corrupt or truncated gzip data ({e})") from e


def _read_stream(path: str | os.PathLike[str], stream: IO[bytes], compressed: bool) -> np.ndarray:
    magic = _read_upto(stream, 4)
    if len(magic) < 4:
        raise IdxError(path, f"too short for an IDX header: {len(magic)} bytes, need at least 4")
    if magic[:2] != b"\0\0":
        hint = ""
        if not compressed and os.fspath(path).endswith(".gz"):
            hint = " (the name ends in .gz but the content is not gzip-compressed)"
        raise IdxError(
            path,
            f"not an IDX file: magic starts with {magic[:2].hex(' ')}, expected 00 00{hint}",
        )
    code, ndim = magic[2], magic[3]
    if code not in _CODE_TO_DTYPE:
        raise IdxError(path, f"unknown IDX type code 0x{code:02X} (known: {_KNOWN_CODES})")
    if ndim == 0:
        raise IdxError(path, "header declares 0 dimensions; an IDX array needs at least one")
    dims_bytes = _read_upto(stream, 4 * ndim)
    if len(dims_bytes) < 4 * ndim:
        raise IdxError(
            path,
            f"truncated header: {ndim} dimensions need {4 * ndim} bytes of sizes, "
            f"found {len(dims_bytes)}",
        )
    shape = struct.unpack(f">{ndim}I", dims_bytes)
    if 0 in shape:
        raise IdxError(
            path, f"dimension {shape.index(0)} is 0 in shape {shape}; the array would be empty"
        )
    dtype = _CODE_TO_DTYPE[code]
    expected = math.prod(shape) * dtype.itemsize
    data = _read_upto(stream, expected)
    if len(data) < expected:
        raise IdxError(
            path,
            f"truncated data: shape {shape} of {dtype.name} needs {expected} bytes, "
            f"found {len(data)}",
        )
    extra = _count_rest(stream)
    if extra:
        raise IdxError(
            path,
            f"{extra} unexpected trailing bytes after the {expected} data bytes of "
            f"shape {shape} {dtype.name}",
        )
    array = np.frombuffer(data, dtype=dtype).reshape(shape)
    native = dtype.newbyteorder("=")
    if array.dtype != native:
        # Swap in place: the bytearray is ours, so no second copy of the data is made.
        array = array.byteswap(inplace=True).view(native)
    return array


def _read_upto(stream: IO[bytes], n: int) -> bytearray:
    """Up to ``n`` bytes (fewer only at end of stream), read in bounded chunks."""
    out = bytearray()
    while len(out) < n:
        chunk = stream.read(min(n - len(out), _CHUNK))
        if not chunk:
            break
        out += chunk
    return out


def _count_rest(stream: IO[bytes]) -> int:
    count = 0
    while chunk := stream.read(_CHUNK):
        count += len(chunk)
    return count


# -- writing ------------------------------------------------------------------------------------
def write_idx(path: str | os.PathLike[str], array: np.ndarray | Sequence[Any]) -> None:
    """Write ``array`` as an IDX file, gzip-compressed when ``path`` ends in ``.gz``.

    The file appears atomically: the bytes go to a temporary file in the same folder, which
    then replaces ``path`` (``os.replace``), so readers never see a half-written file. The gzip
    header carries no name and mtime 0, so equal arrays give byte-identical files.

    Raises:
        TypeError: a dtype IDX cannot store (int64, uint16, bool, …): convert it first.
        ValueError: a 0-d array, more than 255 dimensions, or a dimension of 0 or ≥ 2³².
    """
    array = np.asarray(array)
    code = _KIND_TO_CODE.get((array.dtype.kind, array.dtype.itemsize))
    if code is None:
        raise TypeError(f"IDX cannot store dtype {array.dtype}; convert to one of: {_KNOWN_CODES}")
    shape = array.shape
    if not 1 <= len(shape) <= 255:
        raise ValueError(f"IDX needs 1 to 255 dimensions, got shape {shape}")
    if any(not 0 < d < 2**32 for d in shape):
        raise ValueError(f"IDX dimensions must be in [1, 2**32), got shape {shape}")
    header = struct.pack(f">BBBB{len(shape)}I", 0, 0, code, len(shape), *shape)
    data = np.ascontiguousarray(array, dtype=_CODE_TO_DTYPE[code]).reshape(-1).view(np.uint8)

    compress = Path(path).name.endswith(".gz")

    def write(temp: Path) -> None:
        with open(temp, "wb") as f:
            if compress:
                # Level 6 (gzip's own default): level 9 is several times slower for ~1% less.
                with gzip.GzipFile(
                    filename="", mode="wb", fileobj=f, compresslevel=6, mtime=0
                ) as g:
                    g.write(header)
                    g.write(data)
            else:
                f.write(header)
                f.write(data)

    atomic_write(path, write)


# -- dataset ------------------------------------------------------------------------------------
def _with_article(name: str) -> str:
    """``name`` with "a" or "an" in front, by its first letter ("an ankle boot", "an eight").

    A spelling heuristic, right for every class name in this module; words that start with a
    vowel letter but a consonant sound ("one", "uniform", "user", "euro") get "a".
    """
    lower = name.lower()
    vowel_sound = lower[:1] in ("a", "e", "i", "o", "u") and not lower.startswith(
        ("one", "uni", "use", "usu", "eu")
    )
    return f"{'an' if vowel_sound else 'a'} {name}"


class IdxDataset(Dataset[dict[str, Any]]):
    """Captioned images from an IDX image file and an IDX label file.

    Item ``i`` is ``{"task": "caption", "id": str(i), "image": Float[3, H, W] in [-1, 1],
    "caption": caption_template.format(name=…, a_name=…), "label": int}``; grayscale images
    are replicated to the three RGB channels. Both files are read into memory once at
    construction (MNIST's 60 000 × 28 × 28 training images take 47 MB).

    Args:
        images_path: IDX file of uint8 images ``[N, H, W]`` (grayscale) or ``[N, H, W, 3]``.
        labels_path: IDX file of integer labels ``[N]``, each in ``[0, len(class_names))``.
        class_names: the caption text of each label.
        image_size: if given, images are resized to ``image_size × image_size`` (PIL bicubic;
            the aspect ratio is not kept, IDX image sets are square). ``None`` keeps ``H × W``.
        caption_template: a :meth:`str.format` template with the fields ``{name}`` (the class
            name) and ``{a_name}`` (the name after "a"/"an", see :func:`_with_article`). The
            default gives "a photo of a coat", "a photo of an ankle boot".

    Raises:
        IdxError: images or labels of the wrong dtype/shape, a label out of range (naming the
            first bad index and its label), or image and label counts that differ.
        ValueError: no class names, a bad ``image_size`` or ``caption_template``.
    """

    def __init__(
        self,
        images_path: str | os.PathLike[str],
        labels_path: str | os.PathLike[str],
        class_names: Sequence[str],
        *,
        image_size: int | None = None,
        caption_template: str = "a photo of {a_name}",
    ) -> None:
        self.class_names = tuple(class_names)
        if not self.class_names:
            raise ValueError("class_names is empty")
        if image_size is not None and (
            isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1
        ):
            raise ValueError(f"image_size must be a positive int or None, got {image_size!r}")
        self.image_size = image_size
        try:
            self.captions = tuple(
                caption_template.format(name=n, a_name=_with_article(n)) for n in self.class_names
            )
        except (KeyError, IndexError, ValueError) as e:
            raise ValueError(
                f"caption_template {caption_template!r} is not a valid template; it may use "
                f"{{name}} and {{a_name}} ({type(e).__name__}: {e})"
            ) from e

        self.images_path, self.labels_path = os.fspath(images_path), os.fspath(labels_path)
        images = read_idx(images_path)
        rgb = images.ndim == 4 and images.shape[-1] == 3
        if images.dtype != np.uint8 or not (images.ndim == 3 or rgb):
            raise IdxError(
                images_path,
                f"expected uint8 images [N, H, W] or [N, H, W, 3], got {images.dtype} "
                f"{images.shape}",
            )
        labels = read_idx(labels_path)
        if labels.dtype.kind not in "iu" or labels.ndim != 1:
            raise IdxError(
                labels_path, f"expected integer labels [N], got {labels.dtype} {labels.shape}"
            )
        if len(labels) != len(images):
            raise IdxError(
                labels_path,
                f"{len(labels)} labels but {images_path} holds {len(images)} images",
            )
        labels = labels.astype(np.int64)
        bad = np.flatnonzero((labels < 0) | (labels >= len(self.class_names)))
        if bad.size:
            i = int(bad[0])
            raise IdxError(
                labels_path,
                f"label {labels[i]} at index {i} is outside [0, {len(self.class_names)}) "
                f"({len(self.class_names)} class names; {bad.size} bad labels in all)",
            )
        self.images: np.ndarray = images
        self.labels: np.ndarray = labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, Any]:
        n = len(self)
        i = operator.index(index)  # ints and integer numpy/torch scalars, not floats
        if not -n <= i < n:
            raise IndexError(f"index {index} is out of range for {n} items")
        i %= n
        image = self.images[i]
        if self.image_size is not None and image.shape[:2] != (self.image_size,) * 2:
            # A grayscale image is resized in mode "L" before replication: bicubic works per
            # channel, so this equals resizing the RGB image, at a third of the cost.
            size = (self.image_size, self.image_size)
            resized = Image.fromarray(image).resize(size, Image.Resampling.BICUBIC)
            image = np.array(resized)  # writable: torch.from_numpy warns on read-only arrays
        if image.ndim == 2:
            image = np.repeat(image[:, :, None], 3, axis=2)
        label = int(self.labels[i])
        return {
            "task": "caption",
            "id": f"{i}",
            "image": image_to_tensor(image),
            "caption": self.captions[label],
            "label": label,
        }

    def __repr__(self) -> str:
        h, w = self.images.shape[1:3]
        size = f", resized to {self.image_size}" if self.image_size is not None else ""
        return (
            f"{type(self).__name__}({len(self)} images {h}x{w}{size}, "
            f"{len(self.class_names)} classes, from {self.images_path})"
        )


# -- standard datasets --------------------------------------------------------------------------
def _split_files(
    root: str | os.PathLike[str], split: str, dataset: str, hint: str
) -> tuple[Path, Path]:
    """The (images, labels) files of ``split`` in ``root``, plain preferred over ``.gz``."""
    if split not in _SPLIT_PREFIX:
        raise ValueError(f"split must be one of {tuple(_SPLIT_PREFIX)}, got {split!r}")
    prefix = _SPLIT_PREFIX[split]
    stems = (f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte")
    root = Path(root)
    found = []
    for stem in stems:
        candidates = [root / stem, root / f"{stem}.gz"]
        found.append(next((p for p in candidates if p.is_file()), None))
    if None in found:
        wanted = " and ".join(f"{s}[.gz]" for s in stems)
        if not root.is_dir():
            where = f"the folder {root} does not exist"
        else:
            missing = [f"{s}[.gz]" for s, p in zip(stems, found, strict=True) if p is None]
            where = f"the folder {root} lacks {' and '.join(missing)}"
        raise FileNotFoundError(
            f"{dataset} {split} split not found: {where} (looked for {wanted}). {hint}"
        )
    images, labels = found
    assert images is not None and labels is not None
    return images, labels


def fashion_mnist(
    root: str | os.PathLike[str] = DEFAULT_FASHION_MNIST_ROOT, split: str = "train", **kwargs: Any
) -> IdxDataset:
    """Fashion-MNIST's ``"train"`` (60 000) or ``"test"`` (10 000) split as an :class:`IdxDataset`
    captioned with :data:`FASHION_MNIST_CLASSES` ("a photo of an ankle boot").

    ``root`` holds ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
    ``t10k-images-idx3-ubyte`` and ``t10k-labels-idx1-ubyte``, each possibly ``.gz``; the
    default is where Debian's ``dataset-fashion-mnist`` package installs them. ``kwargs`` go to
    :class:`IdxDataset` (``image_size``, ``caption_template``, or other ``class_names``).

    Raises:
        FileNotFoundError: the folder or a file is missing; the message names the folder, the
            files looked for, and the Debian package.
    """
    hint = (
        "Debian's `dataset-fashion-mnist` package installs them in "
        f"{DEFAULT_FASHION_MNIST_ROOT} (apt install dataset-fashion-mnist); "
        "or pass root= a folder holding these files."
    )
    images, labels = _split_files(root, split, "Fashion-MNIST", hint)
    kwargs.setdefault("class_names", FASHION_MNIST_CLASSES)
    return IdxDataset(images, labels, **kwargs)


def mnist(root: str | os.PathLike[str], split: str = "train", **kwargs: Any) -> IdxDataset:
    """MNIST's ``"train"`` (60 000) or ``"test"`` (10 000) split as an :class:`IdxDataset`
    captioned with :data:`MNIST_CLASSES` as "a handwritten digit seven".

    ``root`` holds the same four file names as :func:`fashion_mnist`, each possibly ``.gz``.
    ``kwargs`` go to :class:`IdxDataset`.

    Raises:
        FileNotFoundError: the folder or a file is missing; the message names both.
    """
    hint = "Put MNIST's four IDX files there (gzipped or not), or pass root= their folder."
    images, labels = _split_files(root, split, "MNIST", hint)
    kwargs.setdefault("class_names", MNIST_CLASSES)
    kwargs.setdefault("caption_template", "a handwritten digit {name}")
    return IdxDataset(images, labels, **kwargs)
