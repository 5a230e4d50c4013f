"""Replacing a whole folder atomically: a model save is all old files or all new ones.

:func:`replace_folder` hands out an empty temporary sibling of the target to write into; only
once everything is written is the swap made::

    rename target  -> .target.replaced-PID-XXXXXXXX     (old folder set aside)
    rename .target.saving-PID-XXXXXXXX -> target         (new folder in)
    delete .target.replaced-...                          (old folder gone)

A failure while writing deletes the temporary sibling and leaves the target untouched. A
process killed between the two renames leaves no target but a complete old folder beside it;
:func:`recover_interrupted_save` (run by the next save and by ``kineflow.load``) moves it back,
so the previous save is what survives, as with a kill at any other point. Leftovers of dead
processes are removed by the next save.

A folder is only replaced if it holds nothing but the files kineflow's savers write
(:data:`KINEFLOW_FILES`), so that a save aimed at a user's own folder (their home, a project)
raises instead of deleting it.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path

__all__ = ["KINEFLOW_FILES", "fsync_dir", "recover_interrupted_save", "replace_folder"]

#: The files kineflow's savers write into a model folder (config, weights, metric tables,
#: tokenizer, model card). A folder holding anything else is not replaced.
KINEFLOW_FILES = frozenset(
    {
        "config.json",
        "model.safetensors",
        "metric.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "README.md",  # the model card (kineflow.pipelines.model_card)
    }
)
_SAVING, _REPLACED = "saving", "replaced"
_SIBLING = re.compile(r"^\.(?P<name>.+)\.(?P<what>saving|replaced)-(?P<pid>\d+)-[0-9a-f]{8}$")
# atomic_write's temporary files, left inside a folder by a kill mid-write.
_TEMP_FILE = re.compile(r"^\..+\.\d+\.[0-9a-f]{8}\.tmp$")
_MAX_NAMED = 5


def _sibling(folder: Path, what: str) -> Path:
    return folder.with_name(f".{folder.name}.{what}-{os.getpid()}-{secrets.token_hex(4)}")


def _alive(pid: int) -> bool:
    """Whether process ``pid`` may still be running (then its siblings are left alone)."""
    if pid == os.getpid() or os.name == "nt":  # on Windows os.kill(pid, 0) would kill it
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: another user's live process
        return True
    return True


def _dead_siblings(folder: Path, what: str) -> list[Path]:
    """``folder``'s temporary siblings of kind ``what`` whose writer has died."""
    if not folder.parent.is_dir():
        return []
    found = []
    for entry in folder.parent.iterdir():
        m = _SIBLING.match(entry.name)
        if m and m["name"] == folder.name and m["what"] == what and not _alive(int(m["pid"])):
            found.append(entry)
    return sorted(found)


def recover_interrupted_save(folder: str | os.PathLike[str]) -> Path | None:
    """Undo a save killed between setting ``folder`` aside and moving the new one in: when
    ``folder`` is missing and one old copy of a dead process lies beside it, move it back.

    Returns:
        The restored folder, or None when there was nothing to restore.

    Raises:
        OSError: the rename failed (e.g. a read-only parent folder).
    """
    folder = Path(folder)
    if folder.exists() or folder.is_symlink():
        return None
    old = _dead_siblings(folder, _REPLACED)
    if len(old) != 1:  # none, or an ambiguity this function will not guess about
        return None
    os.rename(old[0], folder)
    return folder


def _check_replaceable(folder: Path) -> None:
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"cannot save to {folder}: it is a file, not a folder")
    if not folder.is_dir():
        return
    foreign = sorted(
        entry.name
        for entry in folder.iterdir()
        if entry.name not in KINEFLOW_FILES and not _TEMP_FILE.match(entry.name)
    )
    if foreign:
        shown = ", ".join(foreign[:_MAX_NAMED]) + (" …" if len(foreign) > _MAX_NAMED else "")
        raise ValueError(
            f"cannot save to {folder}: it holds {shown}, which a kineflow save does not write, "
            "and a save replaces the whole folder; save to a new or empty folder"
        )


def fsync_dir(path: Path) -> None:
    """Make renames in ``path`` durable (POSIX; a no-op where folders cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def replace_folder(folder: str | os.PathLike[str]) -> Iterator[Path]:
    """Write a new ``folder`` atomically: yields an empty temporary sibling to fill, which
    replaces ``folder`` when the ``with`` block ends without an exception (see the module
    docstring). The parent folders are created as needed.

    Raises:
        ValueError: ``folder`` (or a parent) is a file, or ``folder`` holds files other than
            :data:`KINEFLOW_FILES` (naming them).
    """
    folder = Path(folder).absolute()  # "." has no name to derive a sibling's from
    if folder.is_symlink():
        folder = folder.resolve()  # replace the folder the link points at, keep the link
    _check_replaceable(folder)
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise ValueError(f"cannot save to {folder}: a parent of it is a file") from None
    recover_interrupted_save(folder)
    for stale in _dead_siblings(folder, _SAVING):
        shutil.rmtree(stale, ignore_errors=True)
    temp = _sibling(folder, _SAVING)
    temp.mkdir()
    try:
        yield temp
        fsync_dir(temp)
        _swap(temp, folder)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    # The swap is done: old copies of dead processes (a kill during a deletion) can go.
    for stale in _dead_siblings(folder, _REPLACED):
        shutil.rmtree(stale, ignore_errors=True)


def _swap(temp: Path, folder: Path) -> None:
    """Move ``temp`` to ``folder``, setting an existing ``folder`` aside first and deleting
    it after; if moving ``temp`` in fails, the old folder is put back."""
    old = None
    if folder.exists():
        old = _sibling(folder, _REPLACED)
        os.rename(folder, old)
    try:
        os.rename(temp, folder)
    except BaseException:
        if old is not None:
            os.rename(old, folder)
        raise
    fsync_dir(folder.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
