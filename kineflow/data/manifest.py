"""JSONL manifests over local image folders: how users bring their own data.

A manifest is a text file with one JSON object per line, one record per object. The task is
inferred from the record's keys (the fields of :mod:`kineflow.data.example`):

=========  ===================================================================
task       record
=========  ===================================================================
caption    ``{"image": path, "caption": str}``
vqa        ``{"image": path, "question": str, "answer": str}``
edit       ``{"image": path, "instruction": str, "target": path}``
=========  ===================================================================

Every record may also hold ``"id"`` (a string, unique in the manifest; default: the record's
1-based line number as a string) and ``"meta"`` (any JSON object, handed through untouched as
``item["meta"]``). Any other key is an error, and so is a record whose keys match no task or
mix two tasks. Blank lines are skipped but still counted, so line numbers are those an editor
shows. Paths are taken literally (no ``~`` expansion) and are relative to the manifest's
folder unless absolute. Text fields must be non-empty after stripping whitespace; they are
kept exactly as written.

Entry points:

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
import json
import operator
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from kineflow.data.example import TASK_FIELDS, TASKS, image_to_tensor
from kineflow.data.image_file import ImageFileError, read_rgb
from kineflow.io import NESTING_PROBLEM, atomic_write

#: Largest image (width * height) accepted unless told otherwise; checked from the file's header
#: before any pixel is decoded, so a huge or hostile file costs nothing.
DEFAULT_MAX_PIXELS = 4096 * 4096

_IMAGE_FIELDS = ("image", "target")  # fields holding paths; the rest of TASK_FIELDS are text
_OPTIONAL = ("id", "meta")
_REQUIRED: dict[str, tuple[str, ...]] = {task: ("image", *TASK_FIELDS[task]) for task in TASKS}
# The keys that identify a task: its fields besides "image", which every task shares.
_TASK_KEYS: dict[str, frozenset[str]] = {task: frozenset(TASK_FIELDS[task]) for task in TASKS}
_KNOWN = frozenset({"image", *_OPTIONAL}.union(*_TASK_KEYS.values()))
# Canonical key order of a written record.
_ORDER = ("id", "image", *dict.fromkeys(f for task in TASKS for f in TASK_FIELDS[task]), "meta")

# Modes converted by PIL's own RGB conversion. Others (16-bit "I;16", 32-bit "I", float "F")
# have no agreed mapping to 8 bits, and PIL's conversion clips them, so they are refused.


class ManifestError(ValueError):
    """A problem with one line of a manifest.

    The message is always ``"{path}:{line}: {problem}"`` (``line`` 1-based); the three parts
    are also kept as attributes.
    """

    def __init__(self, path: str | os.PathLike[str], line: int, problem: str) -> None:
        self.path = Path(path)
        super().__init__(f"{self.path}:{line}: {problem}")
        self.line = line
        self.problem = problem

    def __reduce__(self) -> tuple[Any, ...]:
        # Pickling (e.g. across processes) must rebuild from the three parts, not the message.
        return (type(self), (self.path, self.line, self.problem))


class _LineError(Exception):
    """Internal: a problem found before the manifest path and line are known."""


@dataclass(frozen=True)
class ManifestRecord:
    """One checked record of a manifest.

    Attributes:
        line: 1-based line of the record in the manifest.
        id: the record's ``"id"``, or its line number as a string.
        task: ``"caption"``, ``"vqa"`` or ``"edit"``.
        image: the image file, resolved against the manifest's folder (absolute).
        caption, question, answer, instruction: the task's text fields (None when absent).
        target: the edited image of an ``edit`` record, resolved like ``image``.
        meta: the record's ``"meta"`` object, or None.
    """

    line: int
    id: str
    task: str
    image: Path
    caption: str | None = None
    question: str | None = None
    answer: str | None = None
    instruction: str | None = None
    target: Path | None = None
    meta: dict[str, Any] | None = field(default=None, hash=False)

    def texts(self) -> dict[str, str]:
        """The task's text fields, in :data:`TASK_FIELDS` order (``target`` excluded)."""
        return {name: getattr(self, name) for name in TASK_FIELDS[self.task] if name != "target"}


# -- record structure ------------------------------------------------------------------------


def _json_type(value: object) -> str:
    """The JSON name of a value's type, for messages about records."""
    if value is None:
        return "null"
    if isinstance(value, bool):  # before int: bool is an int subclass
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, (list, tuple)):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def _quoted(names: Iterable[object]) -> str:
    return ", ".join(repr(name) for name in names)


def _check_record(record: object) -> str:
    """Check a record's keys and value types; return its task. Raises :class:`_LineError`.

    Path values may be strings or (when writing) ``os.PathLike``; JSON only yields strings.
    """
    if not isinstance(record, Mapping):
        raise _LineError(f"expected a JSON object, got {_json_type(record)}")
    unknown = [key for key in record if key not in _KNOWN]
    if unknown:
        plural = "s" if len(unknown) > 1 else ""
        raise _LineError(
            f"unknown field{plural} {_quoted(unknown)} (allowed: {_quoted(sorted(_KNOWN))})"
        )
    tasks = [task for task in TASKS if _TASK_KEYS[task] & record.keys()]
    if not tasks:
        expected = "; ".join(f"{task}: {_quoted(_REQUIRED[task])}" for task in TASKS)
        raise _LineError(f"no task fields, cannot tell the task (expected {expected})")
    if len(tasks) > 1:
        parts = [f"{task} ({_quoted(sorted(_TASK_KEYS[task] & record.keys()))})" for task in tasks]
        raise _LineError(f"mixes fields of {' and '.join(parts)}; a record has exactly one task")
    task = tasks[0]
    missing = [name for name in _REQUIRED[task] if name not in record]
    if missing:
        plural = "s" if len(missing) > 1 else ""
        raise _LineError(f"missing field{plural} {_quoted(missing)} for a {task} record")
    for name in _REQUIRED[task]:
        value = record[name]
        if name in _IMAGE_FIELDS:
            if isinstance(value, os.PathLike):
                value = os.fspath(value)
            if not isinstance(value, str):
                raise _LineError(f"field {name!r} must be a path string, got {_json_type(value)}")
            if not value.strip():
                raise _LineError(f"field {name!r} is an empty path")
        else:
            _check_text(name, value)
    if "id" in record:
        _check_text("id", record["id"])
    if "meta" in record and not isinstance(record["meta"], dict):
        raise _LineError(f"field 'meta' must be a JSON object, got {_json_type(record['meta'])}")
    return task


def _check_text(name: str, value: object) -> None:
    if not isinstance(value, str):
        raise _LineError(f"field {name!r} must be a string, got {_json_type(value)}")
    if not value.strip():
        raise _LineError(f"field {name!r} is empty")


def _make_record(obj: Mapping[str, Any], task: str, line: int, folder: Path) -> ManifestRecord:
    """A checked JSON object -> :class:`ManifestRecord`, paths resolved against ``folder``."""
    paths = {name: folder / obj[name] for name in _IMAGE_FIELDS if name in obj}
    texts = {name: obj[name] for name in TASK_FIELDS[task] if name not in _IMAGE_FIELDS}
    return ManifestRecord(
        line=line,
        id=obj.get("id", str(line)),
        task=task,
        meta=obj.get("meta"),
        **paths,
        **texts,
    )


def _scan(path: Path) -> Iterator[tuple[int, ManifestRecord | str]]:
    """Yield ``(line, record)`` for each good record and ``(line, problem)`` for each bad one.

    Checks the structure only (no file is looked at besides the manifest). Duplicate ids are
    reported on the later line.
    """
    # Absolute, so records stay valid if the working directory changes (e.g. in a worker).
    folder = path.absolute().parent
    first_line: dict[str, int] = {}
    # Binary mode splits on b"\n" only; text mode would also split on U+2028 etc., which JSON
    # strings may contain.
    with open(path, "rb") as f:
        for line, raw in enumerate(f, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield line, f"line is not valid UTF-8 ({e.reason} at byte {e.start})"
                continue
            if line == 1:
                text = text.removeprefix("\ufeff")  # a byte-order mark some editors write
            if not text.strip():
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                yield line, f"invalid JSON ({e.msg} at column {e.colno})"
                continue
            except RecursionError:  # json recurses per nesting level; a hostile line is deep
                yield line, f"invalid JSON ({NESTING_PROBLEM})"
                continue
            try:
                task = _check_record(obj)
            except _LineError as e:
                yield line, str(e)
                continue
            record = _make_record(obj, task, line, folder)
            if record.id in first_line:
                yield (
                    line,
                    f"duplicate id {record.id!r} (first used on line {first_line[record.id]})",
                )
                continue
            first_line[record.id] = line
            yield line, record


def _check_task(task: str | None) -> None:
    if task is not None and task not in TASKS:
        raise ValueError(f"task must be one of {TASKS} or None, got {task!r}")


def read_manifest(path: str | os.PathLike[str], *, task: str | None = None) -> list[ManifestRecord]:
    """Parse a manifest and check its structure; images are not opened.

    Args:
        path: the JSONL manifest.
        task: keep only records of this task (the whole manifest is still checked).

    Returns:
        The records in file order. An empty manifest gives an empty list.

    Raises:
        ManifestError: on the first malformed line. ``FileNotFoundError`` if there is no file.
    """
    _check_task(task)
    path = Path(path)
    records = []
    for line, result in _scan(path):
        if isinstance(result, str):
            raise ManifestError(path, line, result)
        if task is None or result.task == task:
            records.append(result)
    return records


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


# -- writing ---------------------------------------------------------------------------------


def write_manifest(path: str | os.PathLike[str], records: Iterable[Mapping[str, Any]]) -> Path:
    """Write records as a JSONL manifest, atomically.

    Each record is checked by the rules :func:`read_manifest` applies (keys, types, non-empty
    text, unique ids), so a written manifest always reads back. Paths may be ``str`` or
    ``os.PathLike`` and are written as given: relative ones are relative to the manifest's
    folder. Keys are written in a fixed order (id, image, task fields, meta).

    The records go to a temporary file in the same folder, which replaces ``path`` only once
    every record is written: if a record is bad (or ``records`` raises), an existing manifest
    is left untouched and no temporary file remains.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        ManifestError: for a bad record; ``line`` is the line it would have been written to
            (its index + 1) and the problem names the index.
    """
    path = Path(path)

    def write(temp: Path) -> None:
        with open(temp, "w", encoding="utf-8", newline="\n") as f:
            first_line: dict[str, int] = {}
            for index, record in enumerate(records):
                line = index + 1
                f.write(_record_json(path, line, index, record, first_line) + "\n")

    return atomic_write(path, write)


def _record_json(
    path: Path, line: int, index: int, record: object, first_line: dict[str, int]
) -> str:
    """One record -> its JSON line, checked; ``first_line`` tracks ids across records."""
    try:
        _check_record(record)
        out = {key: record[key] for key in _ORDER if key in record}
        for name in _IMAGE_FIELDS:
            if name in out:
                out[name] = os.fspath(out[name])
        record_id = out.get("id", str(line))
        if record_id in first_line:
            raise _LineError(
                f"duplicate id {record_id!r} (first used on line {first_line[record_id]})"
            )
        first_line[record_id] = line
        try:
            # allow_nan=False: NaN/Infinity are not JSON, and other readers would reject them.
            return json.dumps(out, ensure_ascii=False, allow_nan=False)
        except (TypeError, ValueError) as e:
            raise _LineError(f"field 'meta' is not JSON-serialisable: {e}") from e
    except _LineError as e:
        raise ManifestError(path, line, f"record {index}: {e}") from None


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
