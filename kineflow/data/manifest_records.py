"""The JSONL manifest format: records, reading and writing (no image is opened here).

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

:func:`read_manifest` parses and checks the structure and raises on the first problem;
:func:`write_manifest` writes records atomically, checked by the same rules. Every problem
with a manifest is a :class:`ManifestError` whose message is ``"{manifest}:{line}: {problem}"``,
so the offending line is one click away in an editor. The images themselves are checked and
decoded by :mod:`kineflow.data.manifest`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kineflow.data.example import TASK_FIELDS, TASKS
from kineflow.io import NESTING_PROBLEM, atomic_write

__all__ = ["ManifestError", "ManifestRecord", "read_manifest", "write_manifest"]

_IMAGE_FIELDS = ("image", "target")  # fields holding paths; the rest of TASK_FIELDS are text
_OPTIONAL = ("id", "meta")
_REQUIRED: dict[str, tuple[str, ...]] = {task: ("image", *TASK_FIELDS[task]) for task in TASKS}
# The keys that identify a task: its fields besides "image", which every task shares.
_TASK_KEYS: dict[str, frozenset[str]] = {task: frozenset(TASK_FIELDS[task]) for task in TASKS}
_KNOWN = frozenset({"image", *_OPTIONAL}.union(*_TASK_KEYS.values()))
# Canonical key order of a written record.
_ORDER = ("id", "image", *dict.fromkeys(f for task in TASKS for f in TASK_FIELDS[task]), "meta")


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
