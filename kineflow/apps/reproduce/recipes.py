"""The shipped models' recipes: a model trained in stages, one run config per stage.

A recipe is named by its **last** stage's config. Each stage that continues an earlier one says
so with ``init_from: <the earlier stage's out>/model`` (or ``model_step<N>``); the stage before
is the config in the same folder whose ``out`` is that folder. Following the links back gives
the whole chain, first stage first, so a recipe is written down once — in the configs
themselves — and ``kineflow reproduce`` (``recipes:`` in ``configs/reproduce.yaml``) trains it
stage by stage, skipping the stages already done::

    configs/ar_shapes.yaml               out: outputs/ar_shapes
    configs/fudoki_from_ar_shapes.yaml   out: outputs/fudoki_from_ar_shapes
                                         init_from: outputs/ar_shapes/model
    ...

A stage's trainer is read from its config: a ``vae`` (continuous tokens) makes it a UniFluid
stage (``kineflow train unifluid``), a ``vq`` a FUDOKI one (``kineflow train fudoki``; the AR
baseline is that trainer with ``objective.kind: ar``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kineflow.apps.reproduce.config import read_yaml

__all__ = ["Stage", "recipe_chain", "recipe_result", "trainer_of"]


@dataclass(frozen=True)
class Stage:
    """One stage of a recipe: ``name`` is its config's ``out`` folder name (``ar_shapes``),
    ``kind`` its trainer (``fudoki`` or ``unifluid``); ``before`` names the stage it starts
    from and ``start`` the folder of that stage it loads (``model``, ``model_step1200``);
    both are None for the first stage."""

    name: str
    kind: str
    path: Path
    config: dict[str, Any]
    before: str | None = None
    start: str | None = None


def trainer_of(path: Path, config: dict[str, Any]) -> str:
    """The trainer of the run config read from ``path``: ``"unifluid"`` when it names a KL-VAE
    (``vae``), ``"fudoki"`` when it names a VQ (``vq``; the AR objective too).

    Raises:
        ValueError: the config names neither, naming ``path``.
    """
    if "vae" in config:
        return "unifluid"
    if "vq" in config:
        return "fudoki"
    raise ValueError(f"{path}: a recipe stage names its image tokenizer: 'vq' (FUDOKI) or "
                     "'vae' (UniFluid)")  # fmt: skip


def _writers(folder: Path) -> dict[Path, Path]:
    """Every config in ``folder`` that names an ``out``: that out folder -> the config file."""
    import yaml

    found: dict[Path, Path] = {}
    for path in sorted(folder.glob("*.yaml")):
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError:
            continue  # not a run config; a recipe link to it is reported below
        if isinstance(data, dict) and isinstance(data.get("out"), str):
            found.setdefault(Path(data["out"]), path)
    return found


def recipe_chain(last: str | Path) -> list[Stage]:
    """The stages of the recipe that ends with config ``last``, first stage first.

    Raises ``FileNotFoundError`` / ``ValueError`` naming the config and its ``init_from`` when a
    link does not lead to a config of the same folder, or when the links go round in a circle.
    """
    path = Path(last)
    writers = _writers(path.parent)
    chain: list[Stage] = []
    seen: set[Path] = set()
    while True:
        config = read_yaml(str(path))
        if not isinstance(config.get("out"), str):
            raise ValueError(f"{path}: a recipe stage needs 'out' (its folder)")
        if path.resolve() in seen:
            raise ValueError(f"{path}: the init_from links go round in a circle")
        seen.add(path.resolve())
        start = config.get("init_from")
        if start is None:
            chain.append(Stage(Path(config["out"]).name, trainer_of(path, config), path, config))
            break
        source = Path(str(start))
        before = writers.get(source.parent)
        if before is None:
            raise ValueError(f"{path}: init_from {start}: no config in {path.parent}/ writes "
                             f"{source.parent}")  # fmt: skip
        chain.append(Stage(Path(config["out"]).name, trainer_of(path, config), path, config,
                           before=source.parent.name, start=source.name))  # fmt: skip
        path = before
    return chain[::-1]


def recipe_result(chain: list[Stage], out: Path, seconds: dict[str, float]) -> dict[str, Any]:
    """What the results record of a trained recipe: its family, stages (config file, training
    seconds from ``seconds``), their sum, and the scores of its last stage (``eval.json``)."""
    import json

    final = chain[-1].name
    stages = [{"name": s.name, "config": str(s.path), "train_seconds": seconds.get(s.name)}
              for s in chain]  # fmt: skip
    return {
        "family": chain[-1].kind,
        "final": final,
        "stages": stages,
        "train_seconds": sum(s["train_seconds"] or 0.0 for s in stages),
        "eval": json.loads((out / final / "eval.json").read_text()),
    }
