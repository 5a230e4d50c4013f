"""The reproduction's settings: the compared runs (:data:`RUNS`), how each model is evaluated
(:class:`EvalSettings`) and the whole run (:class:`ReproduceConfig`, ``configs/reproduce.yaml``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from kineflow.config import RunConfig

__all__ = ["FLAGSHIP", "PREBUILT", "RUNS", "UNIFLUID_FLAGSHIP", "UNIFLUID_KNOBS", "EvalSettings",
           "ReproduceConfig", "read_yaml"]  # fmt: skip

#: The compared models: name -> (objective, label).
#: The FUDOKI model the targets are read on and that ``ship`` copies: FUDOKI's own recipe
#: (the paper starts from an AR model, Janus), at the same total compute as the others.
FLAGSHIP = "fudoki_from_ar"
RUNS: dict[str, tuple[str, str]] = {
    "ar": ("ar", "AR baseline (causal, KV-cache decoding)"),
    "fudoki": ("metric", "FUDOKI, metric path, from scratch"),
    "fudoki_from_ar": ("metric", "FUDOKI, metric path, N/2 AR + N/2 DFM"),
    "masked": ("masked", "masked-path baseline"),
}
#: The UniFluid run that ``ship`` copies (the others are its ablations).
UNIFLUID_FLAGSHIP = "unifluid"
#: What a UniFluid run may change from the base config, and the config section each lives in:
#: the paper's ablations (λ, order), the batch mix (``understanding_ratio: 0, edit_ratio: 0`` is
#: the generation-only model, ``understanding_ratio: 1`` the understanding-only one), and its own
#: optimizer steps.
UNIFLUID_KNOBS: dict[str, str] = {
    "text_loss_weight": "model",
    "order": "model",
    "understanding_ratio": "data",
    "edit_ratio": "data",
    "steps": "optim",
}
#: The stages ``prebuilt`` may replace with a trained folder: what each folder must hold.
PREBUILT: dict[str, str] = {
    "text_tokenizer": "tokenizer.json",
    "vq": "model.safetensors",
    "siglip": "model.safetensors",
    "kl": "model.safetensors",
}


@dataclass
class EvalSettings:
    """How each model is evaluated (the same for all)."""

    steps: int = 16
    cfg_scale: float = 3.0
    max_prompts_per_category: int = 24
    images_per_prompt: int = 2
    vqa_items: int = 300
    caption_items: int = 100
    edit_items: int = 200
    trajectories: int = 48
    grid_prompts_per_category: int = 2
    grid_samples: int = 4
    seed: int = 0


@dataclass
class ReproduceConfig(RunConfig):
    """The reproduction run (``configs/reproduce.yaml``).

    ``vq``, ``siglip``, ``model``: the stage configs (their ``out`` is replaced by a folder of
    ``out``); ``vq_steps`` / ``siglip_steps`` override their step counts when set. ``steps``: N,
    the optimizer steps of every compared model. ``runs``: which of :data:`RUNS` to train.

    ``unifluid`` (None: no UniFluid stages) and ``kl``: the UniFluid and KL-VAE configs;
    ``unifluid_runs`` maps run names to what each changes (:data:`UNIFLUID_KNOBS`) in the
    UniFluid model config, or its own ``steps``; ``unifluid_steps`` (default N) the optimizer
    steps of the others.

    ``recipes`` maps a shipped folder name (``fudoki-shapes``) to the config of the last stage
    of the recipe that makes it (:mod:`kineflow.apps.reproduce.recipes`): every stage trains
    on this run's encoders, the last one is evaluated, and ``ship`` copies it under that name.
    """

    SECTIONS: ClassVar[dict[str, type]] = {"eval": EvalSettings}
    REQUIRED: ClassVar[tuple[str, ...]] = ()

    out: str = "outputs/reproduce"
    vq: str = "configs/vq_shapes.yaml"
    siglip: str = "configs/siglip_shapes.yaml"
    model: str = "configs/fudoki_shapes.yaml"
    text_vocab_size: int = 512
    text_corpus_items: int = 2000
    vq_steps: int | None = None
    siglip_steps: int | None = None
    steps: int = 3000
    runs: list[str] = field(default_factory=lambda: list(RUNS))
    seeds: list[int] = field(default_factory=lambda: [0])
    prebuilt: dict[str, str] = field(default_factory=dict)
    jobs: int = 2
    eval: EvalSettings = field(default_factory=EvalSettings)
    ship: str | None = None
    kl: str = "configs/kl_shapes.yaml"
    unifluid: str | None = None
    unifluid_runs: dict[str, dict[str, Any]] = field(
        default_factory=lambda: {UNIFLUID_FLAGSHIP: {}}
    )
    unifluid_steps: int | None = None
    recipes: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.unifluid is not None:
            self._check_unifluid_runs()
        recipes = self.recipes
        if not isinstance(recipes, dict) or any(
            not isinstance(k, str) or not k or "/" in k or not isinstance(v, str)
            for k, v in recipes.items()
        ):
            raise ValueError("recipes must map a shipped folder name to its last stage's "
                             f"config file, got {recipes!r}")  # fmt: skip
        unknown = [r for r in self.runs if r not in RUNS]
        if unknown or not isinstance(self.runs, list) or not (self.runs or recipes):
            raise ValueError(f"runs must be a subset of {list(RUNS)} (empty only with "
                             f"recipes), got {self.runs}")  # fmt: skip
        if "fudoki_from_ar" in self.runs and "ar" not in self.runs:
            raise ValueError("fudoki_from_ar starts from the AR run: add 'ar' to runs")
        for name in ("steps", "jobs", "text_vocab_size", "text_corpus_items"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.steps < 2:
            raise ValueError(f"steps must be >= 2 (the AR -> DFM run splits it), got {self.steps}")
        seeds = self.seeds
        if (
            not isinstance(seeds, list)
            or not seeds
            or len(set(seeds)) != len(seeds)
            or any(isinstance(k, bool) or not isinstance(k, int) or k < 0 for k in seeds)
        ):
            raise ValueError(f"seeds must be a non-empty list of distinct integers >= 0, got "
                             f"{seeds!r}")  # fmt: skip
        bad = [k for k in self.prebuilt if k not in PREBUILT]
        if not isinstance(self.prebuilt, dict) or bad:
            raise ValueError(f"prebuilt: {bad or self.prebuilt!r} not among {list(PREBUILT)}")

    def _check_unifluid_runs(self) -> None:
        runs = self.unifluid_runs
        if not isinstance(runs, dict) or not runs:
            raise ValueError(f"unifluid_runs must be a non-empty mapping, got {runs!r}")
        for name, knobs in runs.items():
            if not str(name).isidentifier() or name in RUNS or name in ("kl", "vq", "siglip"):
                raise ValueError(f"unifluid_runs: {name!r} is not a free run name")
            bad = [k for k in (knobs or {}) if k not in UNIFLUID_KNOBS]
            if bad:
                raise ValueError(
                    f"unifluid_runs.{name}: {bad} cannot be changed per run; allowed: "
                    f"{list(UNIFLUID_KNOBS)}"
                )
            own = (knobs or {}).get("steps")
            if own is not None and (isinstance(own, bool) or not isinstance(own, int) or own < 1):
                raise ValueError(f"unifluid_runs.{name}.steps must be a positive integer")
        steps = self.unifluid_steps
        if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int)
                                  or steps < 1):  # fmt: skip
            raise ValueError(f"unifluid_steps must be a positive integer, got {steps!r}")

    def unifluid_run_steps(self, name: str) -> int:
        """The optimizer steps of UniFluid run ``name``."""
        own = (self.unifluid_runs[self.base_run(name)] or {}).get("steps")
        return own or self.unifluid_steps or self.steps

    def seeded(self, run: str) -> list[str]:
        """The folder names of run ``run``, one per seed: ``run`` itself with one seed,
        ``run_s<seed>`` with several."""
        if len(self.seeds) == 1:
            return [run]
        return [f"{run}_s{k}" for k in self.seeds]

    def base_run(self, name: str) -> str:
        """The run a folder name belongs to (``ar_s2`` -> ``ar``)."""
        return name if len(self.seeds) == 1 else name.rsplit("_s", 1)[0]

    @property
    def all_runs(self) -> list[str]:
        """The folder names of every run and seed: the discrete runs, then the UniFluid ones."""
        runs = [*self.runs, *(self.unifluid_runs if self.unifluid else {})]
        return [name for run in runs for name in self.seeded(run)]

    def stage_folder(self, stage: str, out: Path) -> str:
        """Where stage ``stage``'s trained model is: its ``prebuilt`` folder, or under
        ``out`` (``text_tokenizer``, ``vq/model``, ``siglip/vision``, ``kl/model``)."""
        if stage in self.prebuilt:
            return str(self.prebuilt[stage])
        return str(out / {"text_tokenizer": "text_tokenizer", "vq": "vq/model",
                          "siglip": "siglip/vision", "kl": "kl/model"}[stage])  # fmt: skip


def read_yaml(path: str) -> dict[str, Any]:
    """A run config file as a mapping; a missing file or a non-mapping is a named error."""
    import yaml

    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: no such config file")
    with open(path) as f:
        data = yaml.safe_load(f)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a run config must be a mapping")
    return data
