"""``kineflow infill``: regenerate the masked part of a picture for a prompt, with a FUDOKI or
UniFluid checkpoint (the family is read from it; :mod:`kineflow.pipelines.infill`).

User mistakes (a missing file, a mask of the wrong size, an empty mask, an option the family
does not use) print one ``error: ...`` line and exit 2; torch is imported by the handler only.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any

from kineflow.cli.args import finite_float, int_in_range, output_dir
from kineflow.cli.command import Command
from kineflow.cli.sampling import _FLAGS, CLI_ERRORS, DEFAULT_SCALE, _load_for_cli, _model_options

__all__ = ["COMMANDS"]


def _infill_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompt", help="what the masked region should show")
    _model_options(parser)
    parser.add_argument("--image", required=True, help="the picture (square)")
    parser.add_argument(
        "--mask", required=True,
        help="a picture of the same size whose white pixels (luminance >= 128) are regenerated, "
        "or a box X0,Y0,X1,Y1 in pixels (end exclusive); a token is regenerated when any of "
        "its pixels is",
    )  # fmt: skip
    parser.add_argument(
        "--cfg", type=finite_float(0.0), default=None,
        help="classifier-free guidance weight; default: the checkpoint's",
    )  # fmt: skip
    parser.add_argument(
        "--temperature", type=finite_float(0.0), default=None, help="sampling temperature, >= 0"
    )
    parser.add_argument("--out", type=output_dir, default=Path("outputs/infill"),
                        help="folder for infill_0.png and its GIF")  # fmt: skip
    parser.add_argument("--scale", type=int_in_range(1, 32), default=DEFAULT_SCALE,
                        help="enlarge the written pictures (nearest neighbour)")  # fmt: skip
    parser.add_argument("--no-gif", action="store_true", help="skip the refinement GIF")


def _box(text: str, height: int, width: int) -> Any:
    """The Bool[H, W] mask of a box ``X0,Y0,X1,Y1`` (None when ``text`` is not one)."""
    import numpy as np

    if not re.fullmatch(r"\d+,\d+,\d+,\d+", text):
        return None
    x0, y0, x1, y1 = map(int, text.split(","))
    mask = np.zeros((height, width), bool)
    mask[y0:y1, x0:x1] = True
    return mask


def _run_infill(args: argparse.Namespace) -> int:
    try:
        if not Path(args.image).is_file():
            raise FileNotFoundError(f"--image {args.image}: no such file")
        from kineflow.inputs.images import load_image
        from kineflow.pipelines.infill import load_mask

        picture = load_image(args.image)
        mask = _box(args.mask, picture.height, picture.width)
        if mask is None:
            if not Path(args.mask).is_file():
                raise FileNotFoundError(f"--mask {args.mask}: no such file (nor a box X0,Y0,X1,Y1)")
            mask = load_mask(args.mask)
        if mask.shape != (picture.height, picture.width):
            raise ValueError(
                f"the mask is {mask.shape[1]}x{mask.shape[0]} but the picture is "
                f"{picture.width}x{picture.height}: give a mask of the picture's size"
            )
        if not mask.any():
            raise ValueError(f"the mask {args.mask} is empty (no white pixel): nothing to "
                             "regenerate")  # fmt: skip
        pipe = _load_for_cli(args)
        if not pipe.supports("infill"):
            raise ValueError(f"{pipe.display_name} models do not infill")
        pipe.refuse_options("infill", {"steps": args.steps}, _FLAGS)
        options = pipe.select_options("infill", {
            "steps": args.steps, "cfg_scale": args.cfg, "temperature": args.temperature,
            "seed": args.seed, "return_trajectory": not args.no_gif,
            "progress": not args.no_progress,
        })  # fmt: skip
        result = pipe.infill(picture, mask, args.prompt, **options)
        written = result.save(args.out, prefix="infill", scale=args.scale)
    except CLI_ERRORS as err:
        print(f"error: {err}")
        return 2
    for path in written:
        print(path)
    return 0


COMMANDS: list[Command] = [
    Command(
        name="infill",
        help="regenerate the masked part of a picture for a prompt (FUDOKI or UniFluid)",
        description="'kineflow infill --model ckpt --image pic.png --mask mask.png \"a green "
        "square in the middle\"' keeps every token outside the mask and generates the masked "
        "ones conditioned on the prompt and the rest of the picture (FUDOKI: the flow solver on "
        "the masked cells; UniFluid: the masked tokens after the kept ones, in random order). "
        "Writes infill_0.png and its GIF. --steps applies to FUDOKI only.",
        options=_infill_options,
        handler=_run_infill,
    ),
]
