"""Pre-tokenised training data: safetensors shards with a JSON index.

A shard folder (``kineflow data encode``) holds

    shard-00000.safetensors   the records of samples [0, n₀), stacked and padded per key
    shard-00001.safetensors   samples [n₀, n₀ + n₁) ...
    index.json                {"format": "kineflow-shards", "version", "kind", "meta",
                               "samples", "shards": [{"file", "samples"}, ...]}

A *record* is one sample's ``dict[str, Tensor]`` (each tensor at least 1-d; its first
dimension may differ between samples, e.g. prompt lengths). In a shard, key ``k`` is stored as
``k`` = ``[n, max_len, ...]`` (zero-padded) and ``k.len`` = Long[n], the first-dimension length
of each sample's tensor (−1: the sample has no such key).

Why safetensors + an index: every sample is read by its global index (training seeds each
sample by it, and an exact resume or another process count must read exactly the same samples),
so the format must give random access; safetensors files are memory-mapped (a record is a
slice read, no decode of the whole shard), hold no pickle (nothing executes when loaded), and
are read as they are by numpy, HF ``safetensors`` and the Hub tooling. A tar stream
(webdataset) reads sequentially and would need its own index for the same access.

Writes are atomic file by file and ``index.json`` is removed first and written last, so a folder
whose encode was interrupted has no index and is refused, never read half-written.
"""

from __future__ import annotations

import bisect
import hashlib
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import Tensor

from kineflow.io import atomic_save_safetensors, atomic_write_json, read_json_object

__all__ = ["FORMAT", "VERSION", "ShardReader", "file_digest", "pack", "write_shards"]

FORMAT = "kineflow-shards"
VERSION = 1
INDEX = "index.json"


def file_digest(paths: Iterable[str | os.PathLike[str]]) -> str:
    """sha256 over the contents of ``paths`` (in the given order): identifies the tokenizer or
    frozen encoder a shard folder was made with, wherever it is stored."""
    h = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def pack(records: list[Mapping[str, Tensor]]) -> dict[str, Tensor]:
    """Records -> the tensors of one shard (``k`` padded ``[n, max_len, ...]``, ``k.len``).

    Raises:
        ValueError: a 0-d tensor, or a key whose trailing shape or dtype differs between records.
    """
    keys = sorted({k for r in records for k in r})
    out: dict[str, Tensor] = {}
    for key in keys:
        present = [r[key] for r in records if key in r]
        like = present[0]
        if any(t.ndim == 0 or t.shape[1:] != like.shape[1:] or t.dtype != like.dtype
               for t in present):  # fmt: skip
            raise ValueError(f"record key {key!r}: tensors need ndim >= 1, one trailing shape, "
                             "one dtype")  # fmt: skip
        size = max(t.shape[0] for t in present)
        stacked = torch.zeros(len(records), size, *like.shape[1:], dtype=like.dtype)
        lengths = torch.full((len(records),), -1, dtype=torch.long)
        for i, r in enumerate(records):
            if key in r:
                stacked[i, : r[key].shape[0]] = r[key]
                lengths[i] = r[key].shape[0]
        out[key], out[f"{key}.len"] = stacked, lengths
    return out


def write_shards(
    out: str | os.PathLike[str],
    chunks: Iterable[list[Mapping[str, Tensor]]],
    kind: str,
    meta: Mapping[str, Any],
) -> dict[str, Any]:
    """Write each chunk of records as one shard, then ``index.json``; returns the index.

    ``kind`` names the trainer (``fudoki`` / ``unifluid``); ``meta`` is what the data depends on
    (checked by :class:`ShardReader`). Shards of an earlier encode in ``out`` are removed first.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / INDEX).unlink(missing_ok=True)  # from here on the folder is not a complete one
    for old in out.glob("shard-*.safetensors"):
        old.unlink()
    shards: list[dict[str, Any]] = []
    for k, records in enumerate(chunks):
        name = f"shard-{k:05d}.safetensors"
        atomic_save_safetensors(out / name, pack(records))
        shards.append({"file": name, "samples": len(records)})
    index = {"format": FORMAT, "version": VERSION, "kind": kind, "meta": dict(meta),
             "samples": sum(s["samples"] for s in shards), "shards": shards}  # fmt: skip
    atomic_write_json(out / INDEX, index)
    return index


def _mismatch(want: Any, got: Any, prefix: str) -> str | None:
    """The first dotted key where ``got`` differs from ``want`` (None: they agree)."""
    if isinstance(want, Mapping) and isinstance(got, Mapping):
        for key in sorted(set(want) | set(got)):
            bad = _mismatch(want.get(key), got.get(key), f"{prefix}.{key}" if prefix else key)
            if bad is not None:
                return bad
        return None
    return None if want == got else prefix


class ShardReader:
    """Random access to the records of a shard folder by global sample index.

    Args:
        folder: the folder ``kineflow data encode`` wrote.
        kind: the trainer that reads it; the index must name the same.
        meta: what the run's data depends on; every key must equal the index's.

    Raises:
        ValueError: no folder, no (complete) index, another format / version / kind, or a
            ``meta`` key that differs (named, with both values).

    Picklable and fork-safe (files are opened lazily, per process).
    """

    def __init__(self, folder: str | os.PathLike[str], kind: str, meta: Mapping[str, Any]):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise ValueError(f"data.shards: {self.folder} is not a folder")
        if not (self.folder / INDEX).is_file():
            raise ValueError(f"data.shards: {self.folder} has no {INDEX} (not a shard folder, or "
                             "its encode did not finish): run 'kineflow data encode'")  # fmt: skip
        index = read_json_object(self.folder / INDEX)
        if index.get("format") != FORMAT or index.get("version") != VERSION:
            raise ValueError(f"data.shards: {self.folder / INDEX} is not a {FORMAT} index of "
                             f"version {VERSION}")  # fmt: skip
        if index.get("kind") != kind:
            raise ValueError(f"data.shards: {self.folder} holds {index.get('kind')} data, this "
                             f"run trains {kind}")  # fmt: skip
        bad = _mismatch(dict(meta), index.get("meta", {}), "")
        if bad is not None:
            want, got = _lookup(meta, bad), _lookup(index.get("meta", {}), bad)
            raise ValueError(f"data.shards: {self.folder} was encoded with {bad}={got!r} but "
                             f"this run has {bad}={want!r}: encode it again")  # fmt: skip
        self.files = [self.folder / s["file"] for s in index["shards"]]
        missing = [str(f) for f in self.files if not f.is_file()]
        if missing:
            raise ValueError(f"data.shards: missing shard file(s) {missing[:3]}")
        counts = [int(s["samples"]) for s in index["shards"]]
        self.starts = [sum(counts[:k]) for k in range(len(counts) + 1)]
        self.samples = self.starts[-1]
        self._open: dict[int, Any] = {}
        self._pid = os.getpid()

    def __len__(self) -> int:
        return self.samples

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_open": {}}

    def _shard(self, k: int) -> tuple[Any, dict[str, Tensor]]:
        if self._pid != os.getpid():  # a forked worker: open its own handles
            self._open, self._pid = {}, os.getpid()
        if k not in self._open:
            f = safe_open(str(self.files[k]), framework="pt")
            names = [n for n in f.keys() if n.endswith(".len")]  # noqa: SIM118 (not a dict)
            lengths = {n[: -len(".len")]: f.get_tensor(n) for n in names}
            self._open[k] = (f, lengths)
        return self._open[k]

    def get(self, index: int) -> dict[str, Tensor]:
        """The record of sample ``index``.

        Raises:
            ValueError: an index at or past the encoded sample count.
        """
        if not 0 <= index < self.samples:
            raise ValueError(f"data.shards: {self.folder} holds {self.samples} samples, training "
                             f"asked for sample {index}: encode more (--samples)")  # fmt: skip
        k = bisect.bisect_right(self.starts, index) - 1
        f, lengths = self._shard(k)
        i = index - self.starts[k]
        out = {}
        for key, n in lengths.items():
            if int(n[i]) >= 0:
                out[key] = f.get_slice(key)[i : i + 1][0, : int(n[i])]
        return out


def _lookup(tree: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        tree = tree.get(part) if isinstance(tree, Mapping) else None
    return tree
