"""Text-to-image samples in the folder tree GenEval's ``evaluate_images.py`` reads.

GenEval (github.com/djghosh13/geneval) ships its prompts as ``evaluation_metadata.jsonl``: one
JSON object per line with at least ``prompt`` and ``tag`` (its scorer reads both; ``include``
/ ``exclude`` describe what the picture must show). Its scorer walks ``DIR``'s sub-folders
whose names are all digits and, in each, reads ``metadata.jsonl`` (one JSON object) and every
``samples/<digits>.png``. This module writes, for the i-th prompt line:

    DIR/{i:05d}/metadata.jsonl     that line, verbatim (every field kept, byte for byte)
    DIR/{i:05d}/samples/{k:04d}.png    k = 0 .. N-1, at the model's resolution
    DIR/{i:05d}/grid.png           the N samples side by side (optional in GenEval's tree)
    DIR/run.json                   the run card: model, family, kineflow version, options,
                                   seed scheme, N, batch size, date (to reproduce the run)

Seeds: prompts are sampled in fixed chunks of ``batch_size`` prompts (chunk c holds prompts
``c·batch_size …``), each prompt repeated N times in one ``text_to_image`` call seeded with
``seed + c·batch_size``. A folder's pictures therefore depend only on the run card's settings,
not on which folders an earlier, interrupted run finished: a resumed run regenerates whole
chunks and writes only the folders missing. Each folder is filled beside its final name and
renamed into place when complete, so a folder that exists is whole.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from kineflow.io import atomic_write_json
from kineflow.pipelines.base import Pipeline

__all__ = [
    "RUN_CARD",
    "GenevalPrompt",
    "folder_complete",
    "read_geneval_prompts",
    "write_geneval",
]

RUN_CARD = "run.json"
#: Run-card fields that must match on resume (the rest, e.g. the date, may differ).
_SETTINGS = ("model", "kineflow_type", "prompts_sha256", "n_samples", "batch_size", "seed",
             "options", "pipeline_config")  # fmt: skip


@dataclass(frozen=True)
class GenevalPrompt:
    """One prompt line: ``line`` as read (no line break), ``record`` its parsed object."""

    line: str
    record: Mapping[str, Any]

    @property
    def prompt(self) -> str:
        return self.record["prompt"]


def read_geneval_prompts(path: str | os.PathLike[str]) -> list[GenevalPrompt]:
    """The prompts of a GenEval ``evaluation_metadata.jsonl``, in file order (blank lines
    skipped; the i-th prompt is the i-th non-blank line).

    Raises:
        FileNotFoundError: no such file.
        ValueError: ``FILE:LINE: ...`` for a line that is not UTF-8, not a JSON object, or has
            no non-empty string ``prompt`` or no string ``tag``; or a file with no prompt.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no prompts file at {path}")
    prompts = []
    with path.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            where = f"{path}:{number}"
            try:
                line = raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError:
                raise ValueError(f"{where}: not UTF-8 text") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(record, dict):
                raise ValueError(f"{where}: a line must be a JSON object, got "
                                 f"{type(record).__name__}")  # fmt: skip
            text = record.get("prompt")
            if not isinstance(text, str) or not text.strip():
                raise ValueError(f"{where}: 'prompt' must be a non-empty string, got {text!r}")
            if not isinstance(record.get("tag"), str):
                raise ValueError(f"{where}: 'tag' must be a string (GenEval's scorer reads it), "
                                 f"got {record.get('tag')!r}")  # fmt: skip
            prompts.append(GenevalPrompt(line, record))
    if not prompts:
        raise ValueError(f"{path}: no prompts (one JSON object per line)")
    return prompts


def folder_complete(folder: Path, n_samples: int) -> bool:
    """Whether ``folder`` holds ``metadata.jsonl`` and ``samples/0000.png`` … ``{N-1}.png``."""
    if not (folder / "metadata.jsonl").is_file():
        return False
    return all((folder / "samples" / f"{k:04d}.png").is_file() for k in range(n_samples))


def _grid(images: Sequence[Image.Image]) -> Image.Image:
    """The pictures side by side, in one row."""
    w, h = images[0].size
    grid = Image.new("RGB", (w * len(images), h))
    for k, image in enumerate(images):
        grid.paste(image.convert("RGB"), (k * w, 0))
    return grid


def _write_folder(folder: Path, prompt: GenevalPrompt, images: Sequence[Image.Image]) -> None:
    """Fill a hidden sibling of ``folder`` and rename it into place (an incomplete folder of
    an earlier run, say with fewer samples, is replaced)."""
    temp = folder.with_name(f".{folder.name}.partial")
    shutil.rmtree(temp, ignore_errors=True)
    (temp / "samples").mkdir(parents=True)
    (temp / "metadata.jsonl").write_text(prompt.line + "\n", encoding="utf-8")
    for k, image in enumerate(images):
        image.save(temp / "samples" / f"{k:04d}.png")
    _grid(images).save(temp / "grid.png")
    if folder.exists():
        shutil.rmtree(folder)
    os.rename(temp, folder)


def _check_resume(card_path: Path, card: Mapping[str, Any]) -> None:
    """A folder resumed with other settings would mix two runs: refuse (naming a field)."""
    if not card_path.is_file():
        return
    try:
        old = json.loads(card_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"{card_path}: unreadable run card ({e}); remove it or use a new "
                         "--out") from None  # fmt: skip
    for key in _SETTINGS:
        if old.get(key) != card.get(key):
            raise ValueError(
                f"{card_path} was written with {key}={old.get(key)!r}, this run has "
                f"{card.get(key)!r}: resume with the same settings or use a new --out"
            )


def write_geneval(
    pipe: Pipeline,
    prompts: Sequence[GenevalPrompt],
    out: str | os.PathLike[str],
    *,
    n_samples: int = 4,
    batch_size: int = 8,
    seed: int = 0,
    options: Mapping[str, Any] | None = None,
    card: Mapping[str, Any] | None = None,
    scale: int = 1,
    progress: bool = False,
    on_folder: Callable[[Path, bool], None] | None = None,
) -> dict[str, Any]:
    """Sample ``n_samples`` pictures per prompt with ``pipe.text_to_image`` and write the
    GenEval tree under ``out`` (see the module docstring), skipping complete folders.

    ``options`` are ``text_to_image`` keywords (``cfg_scale``, ``temperature``, ``steps``, …;
    None values mean the checkpoint's default; ``seed`` is set here); the caller refuses the
    ones the family does not use first (:meth:`Pipeline.refuse_options`), this keeps only the
    ones it uses. ``card`` adds fields to ``run.json`` (e.g. ``model``). ``scale`` enlarges
    the pictures (nearest neighbour; 1: the model's resolution). ``progress``: the pipeline's
    progress bar. ``on_folder(path,
    written)`` is called per prompt (``written`` False: it was already complete).

    Returns:
        the run card written to ``out/run.json``, plus ``written`` / ``skipped`` counts and
        ``card`` (its path).

    Raises:
        ValueError: a bad prompt (checked before any sampling, named by its index), or an
            ``out/run.json`` from a run with other settings.
    """
    import kineflow

    out = Path(out)
    # Only what the family uses is sampled with, so only that goes on the card.
    options = pipe.select_options("text_to_image", {**(options or {}), "seed": seed})
    pipe.check_prompts([p.prompt for p in prompts])
    listing = "".join(p.line + "\n" for p in prompts).encode("utf-8")
    run = {
        **dict(card or {}),
        "layout": "geneval",
        "kineflow_type": pipe.kineflow_type,
        "kineflow_version": kineflow.__version__,
        "prompts": len(prompts),
        "prompts_sha256": hashlib.sha256(listing).hexdigest(),
        "n_samples": n_samples,
        "batch_size": batch_size,
        "seed": seed,
        "seed_scheme": "prompts sampled in fixed chunks of batch_size prompts, each repeated "
        "n_samples times, one text_to_image call per chunk with seed + (index of the chunk's "
        "first prompt); samples/{k}.png is the k-th repeat",
        "options": {k: v for k, v in sorted(options.items()) if k != "seed"},
        "pipeline_config": pipe.config.to_dict(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    out.mkdir(parents=True, exist_ok=True)
    _check_resume(out / RUN_CARD, run)
    atomic_write_json(out / RUN_CARD, run)
    written = skipped = 0
    for start in range(0, len(prompts), batch_size):
        chunk = range(start, min(start + batch_size, len(prompts)))
        folders = {i: out / f"{i:05d}" for i in chunk}
        todo = [i for i in chunk if not folder_complete(folders[i], n_samples)]
        for i in chunk:
            if i not in todo and on_folder is not None:
                on_folder(folders[i], False)
        skipped += len(chunk) - len(todo)
        if not todo:
            continue
        rows = [prompts[i].prompt for i in chunk for _ in range(n_samples)]
        call = {**options, "seed": seed + start, "progress": progress}
        result = pipe.text_to_image(rows, **pipe.select_options("text_to_image", call))
        for j, i in enumerate(chunk):
            if i in todo:
                images = result.images[j * n_samples : (j + 1) * n_samples]
                if scale != 1:
                    images = [im.resize((im.width * scale, im.height * scale),
                                        Image.Resampling.NEAREST) for im in images]  # fmt: skip
                _write_folder(folders[i], prompts[i], images)
                written += 1
                if on_folder is not None:
                    on_folder(folders[i], True)
    return {**run, "written": written, "skipped": skipped, "card": str(out / RUN_CARD)}
