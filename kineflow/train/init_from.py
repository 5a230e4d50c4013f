"""``init_from``: start a run's weights from a saved model folder (stages of one recipe).

A stage of a recipe (AR → DFM, then an understanding-heavy stage; UniFluid's stages the same
way) builds its model from its own config, then copies every tensor the saved folder shares
with it — except the frozen image tokenizer, which the stage loads from its own config (its
``vq`` or ``vae``), so a stage may swap the tokenizer under a trained model. The optimizer, the
schedule and the data draws start fresh; resuming an interrupted run (``out/checkpoint``) is a
different thing and wins over ``init_from``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from kineflow.train.checkpoint import has_checkpoint
from kineflow.train.start_weights import check_start


def init_weights_from(
    model: nn.Module,
    folder: str | Path | None,
    out: Path,
    fresh: tuple[str, ...] = (),
    own: tuple[str, ...] = (),
) -> bool:
    """Copy every tensor of ``folder/model.safetensors`` that ``model`` has, unless ``folder``
    is None or the run in ``out`` has a checkpoint to resume (resuming wins, once
    :func:`~kineflow.train.start_weights.check_start` finds the folder unchanged since the run
    began).

    ``fresh``: key prefixes the run may lack in the folder (they keep their initial values, e.g.
    a table that starts at zero). ``own``: key prefixes the run loaded from its own config (a
    frozen tokenizer): never copied, and the folder need not hold them.

    Returns:
        Whether the folder holds an ``own`` tensor that differs from the run's: the stage swaps
        the tokenizer, and whatever was learnt per code (an input table) means other pictures.

    Raises:
        ValueError: no ``model.safetensors`` in ``folder``, a shared tensor of another shape,
            a tensor of ``model`` (outside ``fresh``) the folder does not hold — naming it; or,
            resuming, a folder whose weights changed since the run began.
    """
    if folder is None:
        return False
    # Fresh: records the folder's weights; resumed: they must still be the ones recorded.
    check_start(out, "init_from", folder)
    if has_checkpoint(out / "checkpoint"):
        return False
    file = Path(folder) / "model.safetensors"
    if not file.is_file():
        raise ValueError(f"init_from {folder}: no model.safetensors there (train that model first)")
    skip = tuple(own)
    mine = model.state_dict()
    weights = load_file(str(file))
    swapped = any(
        k not in mine or mine[k].shape != v.shape or not torch.equal(mine[k], v.to(mine[k]))
        for k, v in weights.items()
        if k.startswith(skip)
    ) if skip else False  # fmt: skip
    weights = {k: v for k, v in weights.items() if not k.startswith(skip)}
    bad = [k for k, v in weights.items() if k in mine and mine[k].shape != v.shape]
    missing = [k for k in mine if k not in weights and not k.startswith(tuple(fresh) + skip)]
    if bad or missing:
        detail = f"mis-shaped {bad[:5]}, missing {missing[:5]}"
        raise ValueError(f"init_from {folder} does not fit the model: {detail}")
    model.load_state_dict({k: v for k, v in weights.items() if k in mine}, strict=False)
    return swapped
