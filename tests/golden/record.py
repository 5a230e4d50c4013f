"""Re-record the golden showcase of a shipped model after it is retrained.

``python tests/golden/record.py fudoki-shapes`` (or ``unifluid-shapes``) runs the showcase with
the arguments of ``tests/apps/test_showcase.py`` — in float64, on one thread — and stores
``tests/golden/{model}.npz`` (every shown picture at the model's resolution, uint8) and the
model's entry of ``tests/golden/showcase.json`` (the answers and the showcase's counts); the
other model's entry is kept. Run it only when a checkpoint in ``checkpoints/`` changed on
purpose, and say so in the commit.

Why float64: in float32 the matrix products round differently on different instruction sets
(AVX-512, AVX2, none), and a sampler's categorical draw that lands near a boundary flips,
which redraws the rest of the picture: the float32 showcase passes a few pictures more or
fewer from one CPU to another (measured: 6, 9 and 6 of 14 on one machine under three
instruction-set settings). In float64 all three drew the same pictures; what is left is a
pixel value at a rounding boundary (UniFluid's continuous tokens: one value off by 1), which
the test tolerates.
"""

from __future__ import annotations

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
#: The showcase saves pictures enlarged 4x (nearest neighbour); the golden keeps one pixel of 16.
ENLARGED = 4


def showcase_argv(model: str, out: Path) -> list[str]:
    """The golden showcase's command line (``kineflow showcase ...``, float64)."""
    return ["showcase", "--model", str(ROOT / "checkpoints" / model), "--out", str(out),
            "--dtype", "float64", *ARGS[model]]  # fmt: skip


def shown_pictures(out: Path) -> dict[str, np.ndarray]:
    """Every ``sample_*`` / ``edit_*`` picture of a showcase folder at the model's resolution."""
    return {path.name: np.asarray(Image.open(path).convert("RGB"))[::ENLARGED, ::ENLARGED]
            for path in sorted(out.glob("*.png"))
            if path.name.startswith(("sample_", "edit_"))}  # fmt: skip


def counts(out: Path) -> dict[str, int]:
    """What the showcase got right: pictures passing their prompt, answers, edits."""
    summary = json.loads((out / "summary.json").read_text())
    got = {"pictures": summary["t2i"]["passed"], "answers": summary["vqa"]["correct"]}
    if "edit" in summary:
        got["edits"] = summary["edit"]["correct"]
    return got


def record(model: str) -> dict[str, object]:
    from kineflow.cli import main

    torch.set_num_threads(1)  # as the test's one_thread fixture
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "show"
        if main(showcase_argv(model, out)) != 0:
            raise SystemExit(f"the showcase of {model} failed")
        np.savez_compressed(GOLDEN.parent / f"{model}.npz", **shown_pictures(out))
        answers = [a["answer"] for a in json.loads((out / "answers.json").read_text())]
        return {"answers": answers, "counts": counts(out)}


if __name__ == "__main__":
    golden = json.loads(GOLDEN.read_text())
    for name in sys.argv[1:] or sorted(ARGS):
        golden[name] = record(name)
    GOLDEN.write_text(json.dumps(golden, indent=1) + "\n")
