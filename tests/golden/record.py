"""Re-record ``tests/golden/showcase.json`` for a shipped model after it is retrained.

``python tests/golden/record.py fudoki-shapes`` (or ``unifluid-shapes``) runs the showcase with
the same arguments as ``tests/apps/test_showcase.py`` on one thread and stores the hash of each
picture's pixels and the answers; the other model's entry is kept. Run it only when a
checkpoint in ``checkpoints/`` changed on purpose, and say so in the commit.
"""

from __future__ import annotations

import hashlib
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
GOLDEN = Path(__file__).resolve().parent / "showcase.json"
ARGS = {
    "fudoki-shapes": ["--seeds", "2", "--vqa", "16"],
    "unifluid-shapes": ["--seeds", "4", "--vqa", "16", "--edits", "24"],
}


def record(model: str) -> dict[str, object]:
    from kineflow.cli import main

    torch.set_num_threads(1)  # as the test's one_thread fixture
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "show"
        argv = ["showcase", "--model", str(ROOT / "checkpoints" / model), "--out", str(out),
                *ARGS[model]]  # fmt: skip
        if main(argv) != 0:
            raise SystemExit(f"the showcase of {model} failed")
        pictures = {}
        for path in sorted(out.glob("*.png")):
            if path.name.startswith(("sample_", "edit_")):
                pixels = np.asarray(Image.open(path).convert("RGB"))
                pictures[path.name] = hashlib.sha256(pixels.tobytes()).hexdigest()[:16]
        answers = [a["answer"] for a in json.loads((out / "answers.json").read_text())]
    return {"pictures": pictures, "answers": answers}


if __name__ == "__main__":
    golden = json.loads(GOLDEN.read_text())
    for name in sys.argv[1:] or sorted(ARGS):
        golden[name] = record(name)
    GOLDEN.write_text(json.dumps(golden, indent=1) + "\n")
