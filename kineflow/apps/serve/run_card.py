"""The run card: the exact settings of one result of ``kineflow serve``, as JSON.

Every result the web app shows comes with a card naming the model (path as given, family,
a fingerprint of its files), the kineflow version, the device and dtype, the task, its inputs
(prompts, question, instruction, infill box; a picture the user uploaded by the SHA-256 of its
RGB pixels, since the card does not carry the picture) and every sampling option with the
value actually used (defaults resolved, never "the checkpoint's"). The outputs are recorded
too (each picture's pixel hash, each answer), so feeding a card back (the page's "Reproduce"
tab, :func:`kineflow.apps.serve.handlers.Session.replay`) can say whether the same pixels
came out.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

__all__ = ["CARD_FORMAT", "TASKS", "RunCard", "model_fingerprint", "pixel_hash"]

#: The ``format`` field of every card; a card of another format is refused.
CARD_FORMAT = "kineflow-run-card/1"
#: The tasks a card can describe, and the inputs each one records.
TASKS: Mapping[str, frozenset[str]] = {
    "text_to_image": frozenset({"prompts"}),
    "answer": frozenset({"question", "image_sha256"}),
    "caption": frozenset({"image_sha256"}),
    "edit": frozenset({"instruction", "image_sha256"}),
    "infill": frozenset({"prompt", "box", "image_sha256"}),
}


def pixel_hash(picture: Image.Image) -> str:
    """The first 16 hex digits of SHA-256 over the picture's RGB pixels (uint8, row-major):
    equal for equal pixels, whatever the file format the picture came in."""
    pixels = np.asarray(picture.convert("RGB"))
    header = f"{pixels.shape[1]}x{pixels.shape[0]}:".encode()
    return hashlib.sha256(header + pixels.tobytes()).hexdigest()[:16]


def model_fingerprint(model: str) -> str | None:
    """The first 16 hex digits of SHA-256 over a checkpoint folder's ``config.json`` and
    ``*.safetensors`` files (name and bytes, sorted by name); None when ``model`` is not a
    local folder (a hub id): then a card names the model by its id only."""
    folder = Path(model)
    if not folder.is_dir():
        return None
    digest = hashlib.sha256()
    for path in sorted([*folder.glob("config.json"), *folder.glob("*.safetensors")]):
        digest.update(path.name.encode() + b"\0")
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:16]


@dataclass
class RunCard:
    """One result's settings (module docstring). ``inputs`` holds the task's inputs
    (:data:`TASKS`), ``options`` the keyword options passed to the pipeline's method,
    ``outputs`` either ``{"image_sha256": [...]}`` or ``{"texts": [...]}``."""

    model: str
    model_type: str
    model_fingerprint: str | None
    kineflow_version: str
    device: str
    dtype: str
    task: str
    inputs: dict[str, Any]
    options: dict[str, Any]
    outputs: dict[str, Any] = field(default_factory=dict)
    format: str = CARD_FORMAT

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        """The card as indented JSON (what the page shows and the download holds)."""
        return json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n"

    @classmethod
    def from_json(cls, text: str) -> RunCard:
        """Parse a card written by :meth:`to_json`.

        Raises:
            ValueError: not JSON, not an object, another format, a missing or unknown field,
                an unknown task, or inputs that are not the task's (each named).
        """
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"the run card is not JSON ({err.msg} at line {err.lineno})") from None
        if not isinstance(data, dict):
            raise ValueError("the run card must be a JSON object")
        if data.get("format") != CARD_FORMAT:
            raise ValueError(f"the run card's format is {data.get('format')!r}, expected "
                             f"{CARD_FORMAT!r}")  # fmt: skip
        names = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"the run card has unknown field(s) {unknown}")
        missing = sorted(n for n in names - set(data) if n != "outputs")
        if missing:
            raise ValueError(f"the run card lacks field(s) {missing}")
        if data["task"] not in TASKS:
            raise ValueError(f"the run card's task {data['task']!r} is not one of {sorted(TASKS)}")
        for name in ("inputs", "options", "outputs"):
            if not isinstance(data.get(name, {}), dict):
                raise ValueError(f"the run card's {name} must be a JSON object")
        if set(data["inputs"]) != TASKS[data["task"]]:
            want, got = sorted(TASKS[data["task"]]), sorted(data["inputs"])
            raise ValueError(f"the run card's inputs for {data['task']} must be {want}, got {got}")
        return cls(**data)
