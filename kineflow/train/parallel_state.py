"""Model, optimizer and EMA state under each parallel mode of :mod:`kineflow.train.loop`.

Without FSDP (one process, or DDP) every rank holds whole weights and these are plain
``state_dict`` calls. Under FSDP each rank holds a shard of every parameter: saving gathers
the whole weights (a collective: every rank must call it), loading scatters them back, and
the EMA shadow, kept per shard, is gathered the same way. Checkpoints gather with
``rank0_only``: only rank 0, the one that writes, ever holds the whole weights, optimizer
state and EMA (moved to the CPU as they arrive when training on a GPU); the other ranks get
empty dicts. Loading the optimizer state scatters rank 0's copy the same way.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

FSDP_PREFIX = "_fsdp_wrapped_module."

__all__ = [
    "Ema",
    "full_ema",
    "full_state_dict",
    "load_optim_state",
    "local_shards",
    "named_parameters",
    "optim_state",
]


def named_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """``model``'s parameters by their state-dict names (without the prefixes of the FSDP
    units that auto-wrapping put inside it)."""
    return {n.replace(FSDP_PREFIX, ""): p for n, p in model.named_parameters()}


@contextlib.contextmanager
def fsdp_full_state(model: nn.Module, wrapped: nn.Module, rank0_only: bool = True) -> Any:
    """FSDP's full state-dict mode for weights and optimizer state: gathered on rank 0 only
    (the others get ``{}``), or on every rank with ``rank0_only=False``."""
    import warnings

    from torch.distributed.fsdp import (
        FullOptimStateDictConfig,
        FullStateDictConfig,
        FullyShardedDataParallel,
        StateDictType,
    )

    # offload_to_cpu on weights that already are on the CPU crashes (segfault) in torch 2.13.
    offload = next(model.parameters()).device.type != "cpu"
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "FSDP.state_dict_type", FutureWarning)
        with FullyShardedDataParallel.state_dict_type(
            wrapped,
            StateDictType.FULL_STATE_DICT,
            FullStateDictConfig(offload_to_cpu=offload, rank0_only=rank0_only),
            FullOptimStateDictConfig(offload_to_cpu=offload, rank0_only=rank0_only),
        ):
            yield


def full_state_dict(
    model: nn.Module, wrapped: nn.Module, parallel: str, rank0_only: bool = True
) -> dict[str, Tensor]:
    """The whole model's weights (a collective under FSDP, where ranks other than 0 get
    ``{}`` unless ``rank0_only=False``)."""
    if parallel != "fsdp":
        return model.state_dict()
    with fsdp_full_state(model, wrapped, rank0_only):
        return wrapped.state_dict()


def optim_state(model: nn.Module, wrapped: nn.Module, opt: Any, parallel: str) -> dict:
    """The optimizer state to save: under FSDP gathered on rank 0 (the others get ``{}``) and
    keyed by parameter name (each rank only holds the state of its shard)."""
    if parallel != "fsdp":
        return opt.state_dict()
    from torch.distributed.fsdp import FullyShardedDataParallel

    with fsdp_full_state(model, wrapped):
        return FullyShardedDataParallel.optim_state_dict(wrapped, opt)


def load_optim_state(
    model: nn.Module, wrapped: nn.Module, opt: Any, state: dict, parallel: str
) -> None:
    """Load a state :func:`optim_state` saved into ``opt`` (under FSDP: this rank's shards,
    scattered from rank 0's ``state``; the other ranks' ``state`` is not read)."""
    if parallel == "fsdp":
        from torch.distributed.fsdp import FullyShardedDataParallel

        with fsdp_full_state(model, wrapped):
            state = FullyShardedDataParallel.optim_state_dict_to_load(wrapped, opt, state)
    opt.load_state_dict(state)


@contextlib.contextmanager
def _params_set_to(model: nn.Module, values: Mapping[str, Tensor]) -> Any:
    """Temporarily copy ``values`` into the (local, under FSDP sharded) parameters."""
    params = named_parameters(model)
    saved = {n: params[n].detach().clone() for n in values}
    with torch.no_grad():
        for n, v in values.items():
            params[n].copy_(v)
    try:
        yield
    finally:
        with torch.no_grad():
            for n, v in saved.items():
                params[n].copy_(v)


def full_ema(
    ema: Ema, model: nn.Module, wrapped: nn.Module, parallel: str, rank0_only: bool = True
) -> dict:
    """The whole EMA weights (under FSDP the shadow holds this rank's shards: gathered, on
    rank 0 only unless ``rank0_only=False``; ``{}`` elsewhere)."""
    if parallel != "fsdp":
        return ema.shadow
    with _params_set_to(model, ema.shadow):
        full = full_state_dict(model, wrapped, parallel, rank0_only)
    return {n: full[n].float().clone() for n in ema.shadow if n in full}


def local_shards(model: nn.Module, wrapped: nn.Module, full: Mapping[str, Tensor]) -> dict:
    """This rank's FSDP shards of whole weights ``full`` (by parameter name)."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    saved = {n: p.detach().clone() for n, p in named_parameters(model).items()}
    with FullyShardedDataParallel.summon_full_params(wrapped, writeback=True), torch.no_grad():
        params = named_parameters(model)
        for n, v in full.items():
            params[n].copy_(v)
    shards = {n: p.detach().float().clone() for n, p in named_parameters(model).items()
              if n in full}  # fmt: skip
    with torch.no_grad():
        for n, p in named_parameters(model).items():
            p.copy_(saved[n])
    return shards


class Ema:
    """``ema ← d·ema + (1 − d)·θ`` over the trainable parameters (float32 copies)."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.shadow = {
            n: p.detach().float().clone()
            for n, p in named_parameters(model).items()
            if p.requires_grad
        }

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for n, p in named_parameters(model).items():
            if n in self.shadow:
                self.shadow[n].lerp_(p.detach().float(), 1 - self.decay)
