"""Can an image tokenizer draw each composition? Scene preservation per (colour, shape) pair.

A text-to-image model writes tokens; the tokenizer's decoder draws them. A composition the
decoder cannot draw caps every generator trained on that tokenizer, whatever it learnt. The
``heldout`` prompts of ShapesWorld name compositions (a red triangle, a blue circle) that no
training item shows, so a tokenizer trained on training pictures only never saw them either.

For each tokenizer folder (``--models NAME=PATH``; a VQ or a KL-VAE, told apart by its
``config.json``'s ``kineflow_type``) this reports:

- ``pairs``: for every (colour, shape), the share of its one-object scenes (9 cells × 2 sizes)
  whose reconstruction the ShapesWorld detector reads back as the same scene;
- ``test`` and ``heldout``: PSNR and the scene-preservation rate of ``--pictures`` pictures
  of each split (:func:`kineflow.eval.reconstruction.evaluate_reconstruction`).

``docs/generation.md`` (finding 4) reads the result. Usage:
``python bench/tokenizer_compositions.py --models vq=checkpoints/vq-shapes
kl=checkpoints/kl-shapes``; JSON on stdout (one thread, ~1 min per tokenizer).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def pair_scenes(colour: str, shape: str) -> list:
    """Every one-object scene of ``colour`` ``shape``: one per cell and size."""
    from kineflow.data.shapes.scene import CELLS, SIZES, Obj, Scene

    return [Scene((Obj(r, c, shape, colour, size),)) for r, c in CELLS for size in SIZES]


def preserved(model: torch.nn.Module, scenes: list) -> float:
    """The share of ``scenes`` whose reconstruction the detector reads back unchanged."""
    from kineflow.eval.reconstruction import evaluate_reconstruction

    return evaluate_reconstruction(model, scenes=scenes)["scene_preserved"]


def load_tokenizer(path: str) -> torch.nn.Module:
    from kineflow.tokenizers.kl_vae import AutoencoderKL
    from kineflow.tokenizers.vq import VQModel

    kind = json.loads((Path(path) / "config.json").read_text()).get("kineflow_type")
    return (VQModel if kind == "vq" else AutoencoderKL).from_pretrained(path).eval()


def report(path: str, pictures: int) -> dict:
    from kineflow.data.shapes.scene import COLOURS, SHAPES, HeldOut
    from kineflow.eval.reconstruction import evaluate_reconstruction

    model = load_tokenizer(path)
    held = HeldOut()
    started = time.perf_counter()
    out: dict = {"folder": path, "pairs": {}}
    for colour in COLOURS:
        for shape in SHAPES:
            name = f"{colour} {shape}" + (" (held out)" if held.pair_held(colour, shape) else "")
            out["pairs"][name] = preserved(model, pair_scenes(colour, shape))
    for split in ("test", "heldout"):
        r = evaluate_reconstruction(model, n=pictures, split=split)
        out[split] = {k: r[k] for k in ("pictures", "psnr", "scene_preserved")}
    out["seconds"] = round(time.perf_counter() - started, 1)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", metavar="NAME=PATH",
                   default=["vq=checkpoints/vq-shapes", "kl=checkpoints/kl-shapes"])  # fmt: skip
    p.add_argument("--pictures", type=int, default=1000)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    models = dict(m.split("=", 1) for m in args.models)
    reports = {name: report(path, args.pictures) for name, path in models.items()}
    print(json.dumps(reports, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
