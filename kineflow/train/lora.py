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

**Swapped modules** (``prepare_lora(..., swap=, swap_tables=)``): a FUDOKI run whose ``vq``
folder holds another VQ than the base's (e.g. one trained on the new data, which the base's
cannot draw) keeps the run's VQ and the ``gen_embed`` that :func:`~kineflow.train.fudoki.
build_model` initialised from its codebook, instead of the base's; the run's metric tables are
then the base's with the image table replaced by the new codebook (the path must be the VQ's
own). The swapped modules' weights and the tables travel in the adapter folder
(``metric.safetensors``; ``swapped`` in its config), so
:func:`~kineflow.pipelines.adapters.load_adapter` rebuilds the same model. When the run's
VQ equals the base's nothing is swapped.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from kineflow.io import atomic_save_safetensors, atomic_write_json
from kineflow.models.lora import apply_lora, lora_state_dict, merge_lora
from kineflow.pipelines.adapters import (
    ADAPTER_CONFIG,
    ADAPTER_FORMAT,
    ADAPTER_WEIGHTS,
    base_digest,
    load_adapter,
    merge_adapter,
)
from kineflow.train.run_folder import process_rank
from kineflow.train.start_weights import check_start

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
    # Inside a joined group only; before it, every rank counts as 0 (see prepare_lora).
    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0


def _load_base(model: nn.Module, base: str, swap: tuple[str, ...] = ()) -> list[str]:
    """Copy the weights of the pipeline folder ``base`` into ``model`` (through
    :func:`kineflow.load`, which reads every folder format), in float32. When the weights of
    module ``swap[0]`` differ from the base's, every module in ``swap`` keeps the run's weights;
    returns the modules kept that way (``[]`` or ``list(swap)``).

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
    own_swap = [k for k in own if swap and _under(k, swap[0])]
    swapped = list(swap) if any(not torch.equal(own[k], weights[k]) for k in own_swap) else []
    model.load_state_dict(
        {k: v for k, v in weights.items() if not any(_under(k, m) for m in swapped)}, strict=False
    )
    return swapped


def _under(key: str, module: str) -> bool:
    return key == module or key.startswith(module + ".")


def _also_train(model: nn.Module, names: list[str]) -> dict[str, nn.Module]:
    modules = dict(model.named_modules())
    missing = [n for n in names if n not in modules]
    if missing:
        raise ValueError(f"lora.also_train names no module of the model: {missing}")
    return {n: modules[n] for n in names}


def prepare_lora(
    model: nn.Module,
    settings: LoraSettings,
    out: Path,
    swap: tuple[str, ...] = (),
    swap_tables: dict[str, torch.Tensor] | None = None,
) -> list[str]:
    """Steps (1)–(3) of the module docstring, in place, before the loop starts; returns the
    wrapped linears' paths. A FUDOKI base's ``metric.safetensors`` is copied to ``out`` (the
    path's tables must be the base's, not recomputed from its trained embeddings); when the
    ``swap`` modules keep the run's weights (:func:`_load_base`, "swapped modules" in the module
    docstring), its entries named in ``swap_tables`` are replaced by those tensors.
    ``model.lora_swapped`` records the swapped modules for :func:`finish_lora`."""
    swapped: list[str] = []
    if settings.base is not None:
        swapped = _load_base(model, settings.base, swap)
        check_start(out, "lora.base", settings.base)  # a resumed run needs the same base
        tables = Path(settings.base) / "metric.safetensors"
        if tables.is_file() and not (out / "metric.safetensors").exists() and _rank0():
            # Under `torchrun -m kineflow train` no rank has joined the group yet, so every
            # rank writes: each through its own temporary file.
            replaced = load_file(str(tables))
            if swapped:
                replaced.update({k: v.detach().float().contiguous() for k, v in
                                 (swap_tables or {}).items()})  # fmt: skip
            out.mkdir(parents=True, exist_ok=True)
            atomic_save_safetensors(out / "metric.safetensors", replaced)
        if torch.distributed.is_initialized():
            torch.distributed.barrier()
    model.lora_swapped = swapped
    model.requires_grad_(False)
    g = torch.Generator().manual_seed(settings.seed)
    wrapped = apply_lora(
        model, settings.targets, settings.rank, settings.alpha, settings.dropout, generator=g
    )
    for module in _also_train(model, settings.also_train).values():
        module.requires_grad_(True)
    return wrapped


def adapter_weights(
    model: nn.Module, settings: LoraSettings, swapped: list[str] | tuple[str, ...] = ()
) -> dict[str, torch.Tensor]:
    """The adapter tensors plus the ``also_train`` and ``swapped`` modules' (full-name keys)."""
    weights = lora_state_dict(model)
    for name, module in _also_train(model, [*settings.also_train, *swapped]).items():
        for k, v in module.state_dict().items():
            weights[f"{name}.{k}"] = v.detach().cpu().contiguous()
    return weights


def save_adapter(
    model: nn.Module,
    settings: LoraSettings,
    folder: str | os.PathLike[str],
    kineflow_type: str,
    tables: Path | None = None,
) -> Path:
    """Write ``adapter_model.safetensors`` + ``adapter_config.json`` in ``folder`` (rank 0
    only; the weights first, the config last, each atomically). With swapped modules
    (``model.lora_swapped``) their weights join the adapter's and the run's metric ``tables``
    file is copied beside them."""
    folder = Path(folder)
    if process_rank() != 0:  # after training the loop has left its process group
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    swapped = list(getattr(model, "lora_swapped", []))
    weights = adapter_weights(model, settings, swapped)
    atomic_save_safetensors(folder / ADAPTER_WEIGHTS, weights)
    if swapped and tables is not None and tables.is_file():
        shutil.copyfile(tables, folder / "metric.safetensors.tmp")
        os.replace(folder / "metric.safetensors.tmp", folder / "metric.safetensors")
    frozen = {f"{m}.{k}" for m in swapped if m not in settings.also_train
              for k in _also_train(model, [m])[m].state_dict()}  # fmt: skip
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
        "swapped": swapped,
        "trainable_parameters": sum(v.numel() for k, v in weights.items() if k not in frozen),
    }
    atomic_write_json(folder / ADAPTER_CONFIG, config)
    return folder


def finish_lora(model: nn.Module, settings: LoraSettings, out: Path, kineflow_type: str) -> None:
    """After training: ``out/adapter`` (:func:`save_adapter`), then the adapters merged into
    ``model`` in place, so the run's ``out/model`` is an ordinary folder."""
    save_adapter(model, settings, out / "adapter", kineflow_type, out / "metric.safetensors")
    merge_lora(model)
