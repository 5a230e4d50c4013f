"""JSONL manifests over local image folders: how users bring their own data.

The format (records, tasks, ids, paths) is :mod:`kineflow.data.manifest_records`. Entry points:

- :func:`read_manifest` parses and checks the structure (no image is opened) and raises on the
  first problem;
- :func:`validate_manifest` checks everything, decoding every image, and collects the problems
  into a :class:`ValidationReport`;
- :func:`write_manifest` writes records atomically, checked by the same rules;
- :class:`ManifestDataset` yields the example dicts of :mod:`kineflow.data.example`, decoding
  images lazily.

Every problem with a manifest is a :class:`ManifestError` whose message is
``"{manifest}:{line}: {problem}"``, so the offending line is one click away in an editor. A
manifest with no records at all (where one is needed) is reported on line 1.
Image sizes are written ``WxH`` and stored as ``(width, height)``, PIL's convention.
"""

from __future__ import annotations

import copy
import operator
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from kineflow.data.example import TASKS, image_to_tensor
from kineflow.data.image_file import ImageFileError, read_rgb
from kineflow.data.manifest_records import (
    ManifestError,
    ManifestRecord,
    _check_task,
    _LineError,
    _scan,
    read_manifest,
    write_manifest,
)

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "ManifestDataset",
    "ManifestError",
    "ManifestRecord",
    "ValidationReport",
    "read_manifest",
    "validate_manifest",
    "write_manifest",
]

#: Largest image (width * height) accepted unless told otherwise; checked from the file's header
#: before any pixel is decoded, so a huge or hostile file costs nothing.
DEFAULT_MAX_PIXELS = 4096 * 4096

# Modes converted by PIL's own RGB conversion. Others (16-bit "I;16", 32-bit "I", float "F")
# have no agreed mapping to 8 bits, and PIL's conversion clips them, so they are refused.

# -- images ----------------------------------------------------------------------------------


def _load_rgb(path: Path, max_pixels: int, *, verify: bool = False) -> Image.Image:
    """:func:`read_rgb`, its error turned into a :class:`_LineError`."""
    try:
        return read_rgb(path, max_pixels, verify=verify)
    except ImageFileError as e:
        raise _LineError(str(e)) from e


def _center_square(image: Image.Image, size: int) -> Image.Image:
    """Centre-crop to the largest square, then resize to ``size x size`` (bicubic).

    Cropping first keeps the aspect ratio; resizing the crop alone (not a box of the full
    image) keeps pixels outside the crop from bleeding in. A square image of the right size
    comes back unchanged.
    """
    width, height = image.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    square = image.crop((left, top, left + side, top + side))
    if side == size:
        return square
    return square.resize((size, size), Image.Resampling.BICUBIC)


def _size_text(size: tuple[int, int]) -> str:
    return f"{size[0]}x{size[1]}"


def _check_image_size(image_size: int | None) -> None:
    if image_size is not None and (
        isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1
    ):
        raise ValueError(f"image_size must be a positive int or None, got {image_size!r}")


def _check_max_pixels(max_pixels: int) -> None:
    if isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels < 1:
        raise ValueError(f"max_pixels must be a positive int, got {max_pixels!r}")


# -- validation ------------------------------------------------------------------------------


@dataclass
class ValidationReport:
    """What :func:`validate_manifest` found.

    Attributes:
        path: the manifest.
        num_records: records whose structure is valid (their images may still be bad).
        tasks: such records per task, every task listed (zero included).
        image_sizes: every ``(width, height)`` decoded, sources and edit targets alike.
        errors: one ``"{path}:{line}: {problem}"`` message per problem, in line order.
        truncated: True if there were more than ``max_errors`` problems: checking stopped at
            the next one, so lines after it were neither checked nor counted.
    """

    path: Path
    num_records: int = 0
    tasks: dict[str, int] = field(default_factory=lambda: dict.fromkeys(TASKS, 0))
    image_sizes: set[tuple[int, int]] = field(default_factory=set)
    errors: list[str] = field(default_factory=list)
    truncated: bool = False

    @property
    def ok(self) -> bool:
        """True if no problem was found."""
        return not self.errors

    def format(self, max_sizes: int = 8) -> str:
        """A human-readable multi-line summary (errors listed in full)."""
        counts = ", ".join(f"{task} {self.tasks[task]}" for task in TASKS)
        lines = [f"manifest {self.path}: {self.num_records} records ({counts})"]
        sizes = sorted(self.image_sizes, key=lambda s: (s[0] * s[1], s))
        shown = ", ".join(_size_text(s) for s in sizes[:max_sizes])
        if len(sizes) > max_sizes:
            shown += f", and {len(sizes) - max_sizes} more"
        lines.append(f"image sizes: {shown or 'none decoded'}")
        if self.errors:
            plural = "s" if len(self.errors) > 1 else ""
            lines.append(f"{len(self.errors)} error{plural}:")
            lines.extend(f"  {error}" for error in self.errors)
        if self.truncated:
            lines.append(
                f"more than {len(self.errors)} errors: checking stopped, later lines were not "
                "checked or counted"
            )
        lines.append("OK" if self.ok else "FAILED")
        return "\n".join(lines)


def validate_manifest(
    path: str | os.PathLike[str],
    *,
    image_size: int | None = None,
    max_errors: int = 50,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> ValidationReport:
    """Check a manifest completely, decoding every image, and report every problem found.

    Beyond :func:`read_manifest`'s checks: each image (and edit target) must exist, have at most
    ``max_pixels`` pixels (read from the header, before decoding), pass PIL's ``verify()`` and
    decode to RGB. With ``image_size=None`` every image must have the size of the first image
    decoded (each differing one is reported); with an ``image_size`` any size is fine, since
    :class:`ManifestDataset` will crop and resize. A manifest without records is an error,
    reported on line 1.

    Args:
        path: the JSONL manifest.
        image_size: the size :class:`ManifestDataset` will be given, or None.
        max_errors: report at most this many errors; at one more, checking stops and
            ``report.truncated`` is set.
        max_pixels: the largest image accepted, in pixels.

    Raises:
        FileNotFoundError: if there is no manifest. Problems inside it go into the report.
    """
    _check_image_size(image_size)
    _check_max_pixels(max_pixels)
    if isinstance(max_errors, bool) or not isinstance(max_errors, int) or max_errors < 1:
        raise ValueError(f"max_errors must be a positive int, got {max_errors!r}")
    path = Path(path)
    report = ValidationReport(path=path)
    # Per file: its size, or the problem it has. An image used by several records is decoded
    # once, and its problem is reported on every line that uses it.
    seen: dict[Path, tuple[int, int] | str] = {}
    reference: tuple[tuple[int, int], int] | None = None  # the first size decoded, its line

    def image_problems(record: ManifestRecord) -> Iterator[str]:
        nonlocal reference
        for file in (record.image, record.target):
            if file is None:
                continue
            if file not in seen:
                try:
                    seen[file] = _load_rgb(file, max_pixels, verify=True).size
                except _LineError as e:
                    seen[file] = str(e)
            size = seen[file]
            if isinstance(size, str):
                yield size
                continue
            report.image_sizes.add(size)
            if reference is None:
                reference = (size, record.line)
            elif image_size is None and size != reference[0]:
                yield (
                    f"image {file} is {_size_text(size)}, but the first image "
                    f"(line {reference[1]}) is {_size_text(reference[0])}; "
                    "images of different sizes need image_size"
                )

    for line, result in _scan(path):
        if isinstance(result, str):
            problems: Iterable[str] = [result]
        else:
            report.num_records += 1
            report.tasks[result.task] += 1
            problems = image_problems(result)
        for problem in problems:
            if len(report.errors) == max_errors:
                report.truncated = True
                return report
            report.errors.append(str(ManifestError(path, line, problem)))
    if report.num_records == 0 and not report.errors:
        report.errors.append(str(ManifestError(path, 1, "manifest has no records")))
    return report


# -- dataset ---------------------------------------------------------------------------------


class ManifestDataset(Dataset[dict[str, Any]]):
    """The records of a manifest as example dicts (:mod:`kineflow.data.example`).

    The manifest is read once, here, so structural problems raise at construction, as does a
    manifest with no records (of ``task``, if given). Images are decoded in ``__getitem__``; a
    bad image raises :class:`ManifestError` naming the manifest line (from a DataLoader worker,
    torch re-raises it as a ``RuntimeError`` holding the same text).

    Images become RGB: gray (L), palette (P) and others through PIL's conversion; images with
    transparency (RGBA, LA, PA, or a palette/gray transparent colour) are composited on white.
    EXIF orientation is applied. Then:

    - ``image_size`` given: centre-crop to the largest square, resize to
      ``image_size x image_size`` with PIL bicubic (the usual preprocessing for training
      generators). A square image of that size is used unchanged.
    - ``image_size=None``: images are used as they are, and every image (and edit target)
      must have the size of the first record's image, else :class:`ManifestError` names both.

    Items: ``{"task", "id", "image", <text fields>}``; an edit's ``"target"`` is an image
    tensor like ``"image"``; ``"meta"`` (a copy) is present only for records that have one.
    ``default_collate`` batches items of one task (filter with ``task``); items whose ``meta``
    differs in keys or shapes need a custom collate function.

    Attributes:
        path: the manifest.
        records: the records served, in file order.
        tasks: the number of records per task, every task listed (zero included).
        image_size: as given.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        task: str | None = None,
        image_size: int | None = None,
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ) -> None:
        _check_task(task)
        _check_image_size(image_size)
        _check_max_pixels(max_pixels)
        self.path = Path(path)
        self.records: tuple[ManifestRecord, ...] = tuple(read_manifest(self.path, task=task))
        if not self.records:
            which = f"{task} records" if task else "records"
            raise ManifestError(self.path, 1, f"manifest has no {which}")
        self.tasks: dict[str, int] = dict.fromkeys(TASKS, 0)
        for record in self.records:
            self.tasks[record.task] += 1
        self.image_size = image_size
        self.max_pixels = max_pixels
        self._reference_size: tuple[int, int] | None = None  # see _reference

    def __len__(self) -> int:
        return len(self.records)

    def __repr__(self) -> str:
        counts = ", ".join(f"{task} {n}" for task, n in self.tasks.items() if n)
        return (
            f"{type(self).__name__}({str(self.path)!r}, {len(self)} records: {counts}, "
            f"image_size={self.image_size})"
        )

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = operator.index(index)
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} is out of range for {len(self)} records")
        record = self.records[index]
        item: dict[str, Any] = {
            "task": record.task,
            "id": record.id,
            "image": self._load(record, record.image),
        }
        item.update(record.texts())
        if record.target is not None:
            item["target"] = self._load(record, record.target)
        if record.meta is not None:
            item["meta"] = copy.deepcopy(record.meta)  # callers may mutate; the record must not
        return item

    def _load(self, record: ManifestRecord, file: Path) -> torch.Tensor:
        """Decode one image of ``record`` to a float32 ``[3, H, W]`` tensor in ``[-1, 1]``."""
        try:
            image = _load_rgb(file, self.max_pixels)
        except _LineError as e:
            raise ManifestError(self.path, record.line, str(e)) from None
        if self._reference_size is None and file == self.records[0].image:
            self._reference_size = image.size  # spares _reference a second decode
        if self.image_size is not None:
            image = _center_square(image, self.image_size)
        else:
            size, line = self._reference()
            if image.size != size:
                raise ManifestError(
                    self.path,
                    record.line,
                    f"image {file} is {_size_text(image.size)}, but the first image "
                    f"(line {line}) is {_size_text(size)}; pass image_size to crop and resize",
                )
        # np.array copies into a writable array (np.asarray of a PIL image is read-only, which
        # torch.from_numpy warns about).
        return image_to_tensor(np.array(image, dtype=np.uint8))

    def _reference(self) -> tuple[tuple[int, int], int]:
        """The first record's image size and line, which every image must match without
        ``image_size``. Taken from the first record (not the first item loaded), so that every
        DataLoader worker and every shuffle order agree on it."""
        first = self.records[0]
        if self._reference_size is None:
            try:
                self._reference_size = _load_rgb(first.image, self.max_pixels).size
            except _LineError as e:
                raise ManifestError(self.path, first.line, str(e)) from None
        return self._reference_size, first.line
