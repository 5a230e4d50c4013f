"""LoRA fine-tuning through the shared loop: the ``lora`` section, freezing, adapter folders.

With a ``lora`` section a FUDOKI or UniFluid run (1) loads the base model's weights from
``lora.base`` (any folder :func:`kineflow.load` reads; for FUDOKI also its metric tables), (2)
wraps the linears named by ``lora.targets`` (:func:`kineflow.models.lora.apply_lora`) and (3)
trains only the adapters and the modules listed in ``lora.also_train`` (whole, e.g. UniFluid's
``diffusion_head`` or FUDOKI's ``gen_head``); everything else is frozen. The loop's
checkpoints hold the whole wrapped model, so exact resume, DDP and FSDP work as for any run.

At the end the run writes ``out/adapter/`` — ``adapter_model.safetensors`` (the ``lora_A`` /
``lora_B`` tensors and the ``also_train`` modules' weights) and ``adapter_config.json`` (rank,
alpha, dropout, targets, wrapped modules, ``also_train``, the base folder and the sha256 of its
``model.safetensors``) — and then merges the adapters, so ``out/model`` is an ordinary folder.
:func:`~kineflow.pipelines.adapters.load_adapter` (also :func:`kineflow.load` of the folder)
gives base + adapter back as a pipeline; :func:`~kineflow.pipelines.adapters.merge_adapter`
(``kineflow merge``) folds them into a new folder (both re-exported here).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from kineflow.io import atomic_save_safetensors, atomic_write, atomic_write_json
from kineflow.models.lora import apply_lora, lora_state_dict, merge_lora
from kineflow.pipelines.adapters import (
    ADAPTER_CONFIG,
    ADAPTER_FORMAT,
    ADAPTER_WEIGHTS,
    base_digest,
    load_adapter,
    merge_adapter,
)

__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
    "LoraSettings",
    "finish_lora",
    "load_adapter",
    "merge_adapter",
    "prepare_lora",
    "save_adapter",
]

DEFAULT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class LoraSettings:
    """The ``lora`` section of a FUDOKI / UniFluid training YAML (module docstring).
    ``targets``: module names (or ``re:`` patterns) of the linears to adapt
    (:func:`~kineflow.models.lora.match_target`); ``also_train``: module paths trained whole;
    ``seed`` seeds the ``A`` initialisation."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    also_train: list[str] = field(default_factory=list)
    base: str | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"lora.rank must be an integer >= 1, got {self.rank!r}")
        if not self.alpha > 0:
            raise ValueError(f"lora.alpha must be > 0, got {self.alpha!r}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"lora.dropout must be in [0, 1), got {self.dropout!r}")
        if not self.targets:
            raise ValueError("lora.targets must name at least one module")


def _rank0() -> bool:
    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0


def _load_base(model: nn.Module, base: str) -> None:
    """Copy the weights of the pipeline folder ``base`` into ``model`` (through
    :func:`kineflow.load`, which reads every folder format), in float32.

    Raises:
        ValueError: the base is another architecture (naming the differing tensors).
    """
    from kineflow.pipelines.loading import load

    base_model = load(base, dtype=torch.float32).model
    mine, theirs = (getattr(m.config, "to_dict", dict)() for m in (model, base_model))
    differ = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
    if differ:
        raise ValueError(
            f"lora.base {base} is another model: its config differs in {differ} "
            "(copy its config.json's model section; UniFluid: its vae "
            "scaling_factor as token_scale)"
        )
    weights = base_model.state_dict()
    own = model.state_dict()
    bad = sorted(k for k in own if k not in weights or weights[k].shape != own[k].shape)
    extra = sorted(set(weights) - set(own))
    if bad or extra:
        raise ValueError(
            f"lora.base {base} does not fit the run's model: missing or mis-shaped "
            f"{bad[:4]}, unknown {extra[:4]}; copy its config.json's model section"
        )
    model.load_state_dict(weights)


def _also_train(model: nn.Module, names: list[str]) -> dict[str, nn.Module]:
    modules = dict(model.named_modules())
    missing = [n for n in names if n not in modules]
    if missing:
        raise ValueError(f"lora.also_train names no module of the model: {missing}")
    return {n: modules[n] for n in names}


def prepare_lora(model: nn.Module, settings: LoraSettings, out: Path) -> list[str]:
    """Steps (1)–(3) of the module docstring, in place, before the loop starts; returns the
    wrapped linears' paths. A FUDOKI base's ``metric.safetensors`` is copied to ``out`` (the
    path's tables must be the base's, not recomputed from its trained embeddings)."""
    if settings.base is not None:
        _load_base(model, settings.base)
        tables = Path(settings.base) / "metric.safetensors"
        if tables.is_file() and not (out / "metric.safetensors").exists() and _rank0():
            # Under `torchrun -m kineflow train` no rank has joined the group yet, so every
            # rank copies: each through its own temporary file.
            out.mkdir(parents=True, exist_ok=True)
            atomic_write(out / "metric.safetensors", lambda tmp: shutil.copyfile(tables, tmp))
        if torch.distributed.is_initialized():
            torch.distributed.barrier()
    model.requires_grad_(False)
    g = torch.Generator().manual_seed(settings.seed)
    wrapped = apply_lora(
        model, settings.targets, settings.rank, settings.alpha, settings.dropout, generator=g
    )
    for module in _also_train(model, settings.also_train).values():
        module.requires_grad_(True)
    return wrapped


def adapter_weights(model: nn.Module, settings: LoraSettings) -> dict[str, torch.Tensor]:
    """The adapter tensors plus the ``also_train`` modules' (full-name keys)."""
    weights = lora_state_dict(model)
    for name, module in _also_train(model, settings.also_train).items():
        for k, v in module.state_dict().items():
            weights[f"{name}.{k}"] = v.detach().cpu().contiguous()
    return weights


def save_adapter(
    model: nn.Module, settings: LoraSettings, folder: str | os.PathLike[str], kineflow_type: str
) -> Path:
    """Write ``adapter_model.safetensors`` + ``adapter_config.json`` in ``folder`` (rank 0
    only; the weights first, the config last, each atomically)."""
    folder = Path(folder)
    if not _rank0():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    weights = adapter_weights(model, settings)
    atomic_save_safetensors(folder / ADAPTER_WEIGHTS, weights)
    wrapped = sorted({k.rsplit(".", 1)[0] for k in weights if k.endswith(".lora_A")})
    digest = None if settings.base is None else base_digest(settings.base)
    config = {
        "format": ADAPTER_FORMAT,
        "version": 1,
        "kineflow_type": kineflow_type,
        **asdict(settings),
        "base": None if settings.base is None else str(Path(settings.base).resolve()),
        "base_weights_sha256": digest,
        "modules": wrapped,
        "trainable_parameters": sum(v.numel() for v in weights.values()),
    }
    atomic_write_json(folder / ADAPTER_CONFIG, config)
    return folder


def finish_lora(model: nn.Module, settings: LoraSettings, out: Path, kineflow_type: str) -> None:
    """After training: ``out/adapter`` (:func:`save_adapter`), then the adapters merged into
    ``model`` in place, so the run's ``out/model`` is an ordinary folder."""
    save_adapter(model, settings, out / "adapter", kineflow_type)
    merge_lora(model)
