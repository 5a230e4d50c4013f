"""``init_from``: start a run's weights from a saved model folder (stages of one recipe).

A stage of a recipe (AR → DFM, then an understanding-heavy stage; UniFluid's stages the same
way) builds its model from its own config, then copies every tensor the saved folder shares
with it. The optimizer, the schedule and the data draws start fresh; resuming an interrupted
run (``out/checkpoint``) is a different thing and wins over ``init_from``.
"""

from __future__ import annotations

from pathlib import Path

from safetensors.torch import load_file
from torch import nn

from kineflow.train.checkpoint import has_checkpoint


def init_weights_from(
    model: nn.Module, folder: str | Path | None, out: Path, fresh: tuple[str, ...] = ()
) -> None:
    """Copy every tensor of ``folder/model.safetensors`` that ``model`` has, unless ``folder``
    is None or the run in ``out`` has a checkpoint to resume (resuming wins).

    ``fresh``: key prefixes the run may lack in the folder (they keep their initial values, e.g.
    a table that starts at zero, or a frozen part loaded from the run's own config).

    Raises:
        ValueError: no ``model.safetensors`` in ``folder``, a shared tensor of another shape,
            or a tensor of ``model`` (outside ``fresh``) the folder does not hold — naming it.
    """
    if folder is None or has_checkpoint(out / "checkpoint"):
        return
    file = Path(folder) / "model.safetensors"
    if not file.is_file():
        raise ValueError(f"init_from {folder}: no model.safetensors there (train that model first)")
    weights = load_file(str(file))
    own = model.state_dict()
    bad = [k for k, v in weights.items() if k in own and own[k].shape != v.shape]
    missing = [k for k in own if k not in weights and not k.startswith(fresh)]
    if bad or missing:
        detail = f"mis-shaped {bad[:5]}, missing {missing[:5]}"
        raise ValueError(f"init_from {folder} does not fit the model: {detail}")
    model.load_state_dict({k: v for k, v in weights.items() if k in own}, strict=False)
