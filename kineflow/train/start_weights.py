"""The weights a run started from, recorded so that resuming never mixes two starting points.

A stage that starts from a saved folder (``init_from``, or a LoRA run's ``lora.base``) copies
that folder's weights once, at step 0; from then on every checkpoint carries them. If the
folder's weights change while the run sits half-trained or finished (a retrained earlier
stage, a newly shipped base), running the same command again would resume — or report the run
complete — on the *old* weights, while the outputs name the new folder. Nothing would say so.

``out/start.json`` therefore records, per role, the folder and the SHA-256 of its
``model.safetensors`` when the run starts fresh; a resumed run compares the folder's current
file with the record and refuses to go on when they differ. Runs started before this record
existed have no ``start.json`` and resume unchecked.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch.distributed as dist

from kineflow.io import atomic_write_json, read_json_object
from kineflow.train.checkpoint import has_checkpoint

__all__ = ["START_FILE", "check_start", "weights_digest"]

START_FILE = "start.json"


def weights_digest(folder: str | Path) -> str:
    """SHA-256 (hex) of ``folder/model.safetensors``, read in 1 MiB pieces."""
    digest = hashlib.sha256()
    with open(Path(folder) / "model.safetensors", "rb") as f:
        for piece in iter(lambda: f.read(1 << 20), b""):
            digest.update(piece)
    return digest.hexdigest()


def check_start(out: Path, role: str, folder: str | Path | None) -> None:
    """Record (fresh run) or check (resumed run) that ``role``'s starting ``folder`` is the one
    the run in ``out`` started from.

    A fresh run (no checkpoint in ``out/checkpoint``) writes ``folder``'s digest under ``role``
    in ``out/start.json`` (nothing when ``folder`` holds no ``model.safetensors``: the caller
    that needs the weights says so). A resumed run compares the digest of ``folder`` as it is
    now with the record; no record for ``role``, or a folder that has gone (resuming does not
    read it), passes.

    Raises:
        ValueError: the folder's ``model.safetensors`` differs from the one the run started
            from — naming the run folder, the role and both folders; on a resume, a
            ``start.json`` that is not such a record (naming it; a fresh run replaces it).
    """
    if folder is None:
        return
    record_file = Path(out) / START_FILE
    weights = Path(folder) / "model.safetensors"
    if not has_checkpoint(Path(out) / "checkpoint"):
        if not weights.is_file():
            return
        try:
            record = read_json_object(record_file) if record_file.is_file() else {}
        except ValueError:  # left damaged by a run that never saved a checkpoint: replaced
            record = {}
        if not dist.is_initialized() or dist.get_rank() == 0:
            # Under torchrun every rank may get here before the group forms: each one writes the
            # same record through its own temporary file.
            record_file.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_json(record_file, {**record, role: _entry(folder)})
        return
    record = read_json_object(record_file) if record_file.is_file() else {}
    started = record.get(role)
    if started is None or not weights.is_file():
        return
    if not isinstance(started, dict) or not isinstance(started.get("sha256"), str):
        raise ValueError(f"{record_file}: {role!r} holds no 'sha256' string; delete the file to "
                         "resume unchecked")  # fmt: skip
    now = weights_digest(folder)
    if now != started["sha256"]:
        raise ValueError(
            f"{out}: this run started from {role} {started.get('folder', '?')} (model.safetensors "
            f"sha256 {started['sha256'][:12]}), but {folder} now holds other weights "
            f"({now[:12]}); resuming would go on from the old ones: delete {out} to start "
            "again from the new weights, or set another 'out'"
        )


def _entry(folder: str | Path) -> dict[str, str]:
    return {"folder": str(folder), "sha256": weights_digest(folder)}
