"""Readers for the weight files of Hugging-Face-style checkpoint folders (Janus, FUDOKI, …).

A folder holds its weights in one of these forms, looked for in this order
(:data:`WEIGHT_FILES`):

- ``model.safetensors``: one safetensors file;
- ``model.safetensors.index.json``: a JSON object whose ``"weight_map"`` maps every tensor name
  to the shard file (next to the index) holding it, e.g. ``model-00001-of-00002.safetensors``;
- ``pytorch_model.bin``: one ``torch.save``-d state dict (a mapping of names to tensors);
- ``pytorch_model.bin.index.json``: as the safetensors index, with ``.bin`` shards.

Besides, :func:`load_embedding_table` reads a lone token-embedding table, as FUDOKI ships its
``text_embedding.pt`` / ``image_embedding.pt`` (pickled ``torch.nn.Embedding`` modules).

Safety rule: a pickle is a program, so kineflow never unpickles arbitrary objects. ``.bin`` /
``.pt`` files are read with ``torch.load(weights_only=True)``, whose unpickler builds only
tensors, plain containers and primitive values; :func:`load_embedding_table` allows one class
more, ``torch.nn.Embedding``, and nothing else. A file that needs anything beyond that is
refused with a :class:`ValueError` naming it (and the refused global, when torch says which),
before any of its code runs. safetensors files hold no code at all.
"""

from __future__ import annotations

import os
import pickle
import re
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path, PurePath
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from torch import Tensor, nn

from kineflow.io import read_json_object

#: The files holding a folder's weights, in order of preference.
WEIGHT_FILES: tuple[str, ...] = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
#: Suffixes :func:`load_embedding_table` reads with ``torch.load``.
PICKLE_SUFFIXES: tuple[str, ...] = (".pt", ".pth", ".bin")

__all__ = [
    "PICKLE_SUFFIXES",
    "WEIGHT_FILES",
    "load_embedding_table",
    "read_weights",
    "safetensors_dtypes",
    "tensor_file",
    "weight_files",
]

#: safetensors' dtype names (the header's "dtype" field) as torch dtypes.
_SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "BOOL": torch.bool,
    "U8": torch.uint8,
    "I8": torch.int8,
    "I16": torch.int16,
    "I32": torch.int32,
    "I64": torch.int64,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F32": torch.float32,
    "F64": torch.float64,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
_INDEX_SUFFIX = ".index.json"
_MAX_LISTED_FILES = 10
_MAX_NAMED_KEYS = 5


# -- finding the files ----------------------------------------------------------------------------
def weight_files(folder: str | os.PathLike[str]) -> list[Path]:
    """The files holding the weights of checkpoint folder ``folder``.

    The first of :data:`WEIGHT_FILES` present decides: a single weights file is returned alone;
    for an index, the shards its ``"weight_map"`` names (sorted, each once). Only the index is
    read, not the shards.

    Raises:
        FileNotFoundError: ``folder`` is not a folder, or holds none of :data:`WEIGHT_FILES`
            (the message lists what it does hold, up to 10 names).
        ValueError: the index is not a JSON object with a non-empty ``"weight_map"`` object of
            file names, or names a shard that is missing (naming the shard and the index) or
            that lies outside ``folder`` (``"../x"``, an absolute path).
    """
    return _locate(Path(folder))[1]


def _locate(folder: Path) -> tuple[dict[str, Path] | None, list[Path], Path]:
    """``(shard_of, files, source)`` for ``folder``: ``shard_of`` maps each tensor name the
    index lists to its shard (None without an index); ``source`` is the index or the single
    file."""
    if not folder.is_dir():
        raise FileNotFoundError(f"no checkpoint folder at {folder} (no such folder)")
    for name in WEIGHT_FILES:
        path = folder / name
        if not path.is_file():
            continue
        if not name.endswith(_INDEX_SUFFIX):
            return None, [path], path
        weight_map = _read_weight_map(path)
        paths = {shard: _shard_path(folder, shard, path) for shard in set(weight_map.values())}
        shard_of = {key: paths[shard] for key, shard in weight_map.items()}
        return shard_of, sorted(paths.values()), path
    raise FileNotFoundError(
        f"{folder} holds no weights: looked for {', '.join(WEIGHT_FILES)}; "
        f"it holds {_describe_contents(folder)}"
    )


def _describe_contents(folder: Path) -> str:
    names = sorted(os.listdir(folder))
    if not names:
        return "nothing"
    shown = ", ".join(names[:_MAX_LISTED_FILES])
    more = len(names) - _MAX_LISTED_FILES
    return shown + (f" and {more} more" if more > 0 else "")


def _read_weight_map(index: Path) -> dict[str, str]:
    data = read_json_object(index)
    weight_map = data.get("weight_map")
    if not isinstance(weight_map, dict):
        got = "no such field" if weight_map is None else type(weight_map).__name__
        raise ValueError(f'{index} must hold a "weight_map" object, got {got}')
    if not weight_map:
        raise ValueError(f'{index} has an empty "weight_map": it names no tensors')
    for key, shard in weight_map.items():
        if not isinstance(shard, str) or not shard:
            raise ValueError(
                f'{index}: "weight_map" entry {key!r} must name a shard file, got {shard!r}'
            )
    return weight_map


def _shard_path(folder: Path, name: str, index: Path) -> Path:
    # A lexical check, not resolve(): in a Hugging Face cache the shards are symlinks into a
    # blobs folder elsewhere, and those are fine; a name that climbs out of the folder is not.
    parts = PurePath(name).parts
    if PurePath(name).is_absolute() or ".." in parts:
        raise ValueError(f"{index} names shard {name!r}, which lies outside {folder}")
    path = folder.joinpath(*parts)
    if not path.is_file():
        raise ValueError(f"{index} names shard {name!r}, which is missing from {folder}")
    return path


def tensor_file(folder: str | os.PathLike[str]) -> Callable[[str], Path]:
    """A function naming the file of ``folder`` (see :func:`weight_files`) that holds a
    tensor: the shard its index lists, or the single weights file. For messages.

    Raises:
        FileNotFoundError, ValueError: as :func:`weight_files`.
    """
    shard_of, _, source = _locate(Path(folder))
    if shard_of is None:
        return lambda key: source
    return lambda key: shard_of.get(key, source)


def safetensors_dtypes(path: str | os.PathLike[str]) -> dict[str, torch.dtype]:
    """The dtype of every tensor of the safetensors file ``path``, read from its header alone
    (no tensor data), so weights can be checked before they are loaded. Tensors of dtypes
    not in this module's table (rare unsigned and float8 kinds) are left out.

    Raises:
        ValueError: the file is not a readable safetensors file.
    """
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            # safe_open objects are not iterable: keys() is the only way to list them.
            stored = {key: f.get_slice(key).get_dtype() for key in f.keys()}  # noqa: SIM118
    except (SafetensorError, OSError) as e:
        raise ValueError(
            f"{path} is not a readable safetensors file (corrupt or truncated?): {e}"
        ) from e
    return {key: _SAFETENSORS_DTYPES[d] for key, d in stored.items() if d in _SAFETENSORS_DTYPES}


# -- reading the files ----------------------------------------------------------------------------
def read_weights(folder: str | os.PathLike[str]) -> dict[str, Tensor]:
    """All tensors of checkpoint folder ``folder`` (see :func:`weight_files`), on the CPU, dtypes
    kept.

    safetensors files are read with ``safetensors.torch.load_file``; ``.bin`` files with
    ``torch.load(map_location="cpu", weights_only=True)``, memory-mapped when the file is in
    torch's zip format (the legacy format cannot be).

    Raises:
        FileNotFoundError, ValueError: as :func:`weight_files`.
        ValueError: a file is corrupt or truncated (naming it); a ``.bin`` holds pickled Python
            objects beyond tensors and containers (naming it and, when known, the refused
            global), or is not a flat mapping of names to tensors (naming the first bad key and
            its type); with an index, a tensor the index lists is not in the shard it names, or
            a shard holds a tensor the index does not list or puts in another shard (one error
            naming up to 5 keys of each kind, their count, the shards and the index).
    """
    shard_of, files, source = _locate(Path(folder))
    loaded = {path: _read_weights_file(path) for path in files}
    if shard_of is None:
        return loaded[source]
    _check_shards(source, shard_of, loaded)
    return {key: loaded[path][key] for key, path in shard_of.items()}


def _read_weights_file(path: Path) -> dict[str, Tensor]:
    if path.name.endswith(".safetensors"):
        return _load_safetensors(path)
    data = _torch_load(path)
    if not isinstance(data, Mapping):
        raise ValueError(
            f"{path} holds a {type(data).__name__}, expected a mapping of names to tensors"
        )
    for key, value in data.items():
        if not isinstance(key, str):
            raise ValueError(
                f"{path}: key {key!r} is a {type(key).__name__}, expected str (tensor names)"
            )
        if not isinstance(value, Tensor):
            raise ValueError(
                f"{path}: key {key!r} holds a {type(value).__name__}, expected a tensor "
                "(a flat state dict)"
            )
    # detach(): a saved nn.Parameter comes back as one; callers get plain tensors.
    return {key: value.detach() for key, value in data.items()}


def _check_shards(
    index: Path, shard_of: Mapping[str, Path], loaded: Mapping[Path, Mapping[str, Tensor]]
) -> None:
    problems = []
    for path, tensors in loaded.items():
        expected = {k for k, shard in shard_of.items() if shard == path}
        missing = sorted(expected - set(tensors))
        extra = sorted(set(tensors) - expected)
        unlisted = [k for k in extra if k not in shard_of]
        elsewhere = [f"{k} (listed in {shard_of[k].name})" for k in extra if k in shard_of]
        if missing:
            problems.append(f"{path.name} lacks {_some(missing)} that the index puts there")
        if unlisted:
            problems.append(f"{path.name} holds {_some(unlisted)} that the index does not list")
        if elsewhere:
            problems.append(
                f"{path.name} holds {_some(elsewhere)} that the index puts in another shard"
            )
    if problems:
        raise ValueError(f"{index} does not match its shards:\n  " + "\n  ".join(problems))


def _some(keys: list[str]) -> str:
    """``"3 keys: a, b, c"``, naming at most :data:`_MAX_NAMED_KEYS` of them."""
    shown = ", ".join(keys[:_MAX_NAMED_KEYS])
    more = len(keys) - _MAX_NAMED_KEYS
    noun = "key" if len(keys) == 1 else "keys"
    return f"{len(keys)} {noun}: {shown}" + (f" and {more} more" if more > 0 else "")


def _load_safetensors(path: Path) -> dict[str, Tensor]:
    try:
        return load_file(str(path), device="cpu")
    except SafetensorError as e:
        raise ValueError(
            f"{path} is not a readable safetensors file (corrupt or truncated?): {e}"
        ) from e


def _torch_load(path: Path, allowed: Iterable[type] = ()) -> Any:
    """``torch.load`` with ``weights_only=True``, allowing the classes ``allowed`` besides the
    defaults; every failure becomes a ValueError naming ``path``."""
    with open(path, "rb") as f:
        # mmap needs torch's zip format; torch recognises it by these first bytes.
        is_zip = f.read(4) == b"PK\x03\x04"
    with torch.serialization.safe_globals(list(allowed)):
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=is_zip)
        except pickle.UnpicklingError as e:
            raise ValueError(_refusal(path, e)) from None
        except Exception as e:  # torch reports damage as RuntimeError, EOFError, KeyError, …
            detail = str(e).split("\n")[0][:200] or type(e).__name__
            raise ValueError(
                f"{path} is not a readable PyTorch checkpoint (corrupt or truncated?): {detail}"
            ) from e


def _refusal(path: Path, error: pickle.UnpicklingError) -> str:
    """The message for a file ``torch.load(weights_only=True)`` refused, naming the refused
    globals when they can be known."""
    try:
        # Reads the pickle's opcodes without running them; zip-format files only.
        names = sorted(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:
        names = []
    found = re.search(r"GLOBAL (\S+) was not an allowed global", str(error))
    if not names and found:
        names = [found.group(1)]
    if names:
        return (
            f"{path} holds pickled Python objects that kineflow will not execute "
            f"(refused: {', '.join(names[:_MAX_NAMED_KEYS])})"
        )
    # No global to name: an opcode the safe unpickler lacks (pickle protocol 4+) or plain
    # damage look alike. torch's own reason comes last, after a long advice text.
    reason = str(error).rpartition("WeightsUnpickler error:")[2].strip().split("\n")[0]
    return (
        f"{path} cannot be read safely: torch.load(weights_only=True) refused it "
        f"({reason[:200]}); it is corrupt, or holds pickled Python objects that kineflow will "
        "not execute"
    )


# -- embedding tables -----------------------------------------------------------------------------
def load_embedding_table(path: str | os.PathLike[str]) -> Tensor:
    """A token-embedding table ``Float[V, D]`` read from ``path``.

    - ``.pt`` / ``.pth`` / ``.bin``: a pickled ``torch.nn.Embedding`` (as FUDOKI's
      ``text_embedding.pt`` / ``image_embedding.pt``), a plain tensor, or a mapping holding
      exactly one tensor or a ``"weight"`` tensor (an Embedding's state dict). Read with
      ``torch.load(weights_only=True)`` allowing ``torch.nn.Embedding`` as the one class beyond
      torch's defaults, so no other code can run.
    - ``.safetensors``: its one tensor, or the one named ``"weight"``.

    Returns:
        A detached, contiguous CPU tensor (``requires_grad`` False), dtype kept.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: an unknown suffix; a corrupt file; pickled objects other than an
            ``nn.Embedding`` (naming the refused global); no single candidate tensor; a table
            that is not 2-D, is empty, or is not floating-point. Each message names ``path``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        table = _pick_table(path, _load_safetensors(path))
    elif suffix in PICKLE_SUFFIXES:
        data = _torch_load(path, allowed=[nn.Embedding])
        if isinstance(data, nn.Embedding):
            table = data.weight
        elif isinstance(data, Tensor):
            table = data
        elif isinstance(data, Mapping):
            table = _pick_table(path, data)
        else:
            raise ValueError(
                f"{path} holds a {type(data).__name__}; expected an nn.Embedding, a tensor or "
                "a mapping of tensors"
            )
    else:
        raise ValueError(
            f"{path}: unknown suffix {path.suffix!r}; an embedding table is a .safetensors "
            f"file or a {' / '.join(PICKLE_SUFFIXES)} file"
        )
    if table.dim() != 2:
        raise ValueError(
            f"{path}: the embedding table has shape {tuple(table.shape)}; expected 2-D [V, D]"
        )
    if table.numel() == 0:
        raise ValueError(f"{path}: the embedding table is empty, shape {tuple(table.shape)}")
    if not table.is_floating_point():
        raise ValueError(f"{path}: the embedding table has dtype {table.dtype}; expected floats")
    return table.detach().cpu().contiguous()


def _pick_table(path: Path, data: Mapping[Any, Any]) -> Tensor:
    """The ``"weight"`` tensor of ``data``, else its only tensor."""
    if isinstance(data.get("weight"), Tensor):
        return data["weight"]
    tensors = {k: v for k, v in data.items() if isinstance(v, Tensor)}
    if len(tensors) == 1:
        return next(iter(tensors.values()))
    if not tensors:
        raise ValueError(f"{path} holds no tensor; expected an embedding table")
    names = sorted(str(k) for k in tensors)
    raise ValueError(
        f'{path} holds {_some(names)}, none named "weight"; expected one embedding table'
    )
