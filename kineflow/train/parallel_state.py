"""Model, optimizer and EMA state under each parallel mode of :mod:`kineflow.train.loop`.

Without FSDP (one process, or DDP) every rank holds whole weights and these are plain
``state_dict`` calls. Under FSDP each rank holds a shard of every parameter: saving gathers
the whole weights (a collective: every rank must call it), loading scatters them back, and
the EMA shadow, kept per shard, is gathered the same way.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "Ema",
    "full_ema",
    "full_state_dict",
    "load_optim_state",
    "local_shards",
    "optim_state",
]


@contextlib.contextmanager
def fsdp_full_state(model: nn.Module, wrapped: nn.Module) -> Any:
    """FSDP's full (gathered on every rank) state-dict mode for weights and optimizer state."""
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
            FullStateDictConfig(offload_to_cpu=offload, rank0_only=False),
            FullOptimStateDictConfig(offload_to_cpu=offload, rank0_only=False),
        ):
            yield


def full_state_dict(model: nn.Module, wrapped: nn.Module, parallel: str) -> dict[str, Tensor]:
    """The whole model's weights on every rank (a collective under FSDP)."""
    if parallel != "fsdp":
        return model.state_dict()
    with fsdp_full_state(model, wrapped):
        return wrapped.state_dict()


def optim_state(model: nn.Module, wrapped: nn.Module, opt: Any, parallel: str) -> dict:
    """The optimizer state to save: under FSDP gathered and keyed by parameter name (each rank
    only holds the state of its shard)."""
    if parallel != "fsdp":
        return opt.state_dict()
    from torch.distributed.fsdp import FullyShardedDataParallel

    with fsdp_full_state(model, wrapped):
        return FullyShardedDataParallel.optim_state_dict(wrapped, opt)


def load_optim_state(
    model: nn.Module, wrapped: nn.Module, opt: Any, state: dict, parallel: str
) -> None:
    """Load a state :func:`optim_state` saved into ``opt`` (under FSDP: this rank's shards)."""
    if parallel == "fsdp":
        from torch.distributed.fsdp import FullyShardedDataParallel

        with fsdp_full_state(model, wrapped):
            state = FullyShardedDataParallel.optim_state_dict_to_load(wrapped, opt, state)
    opt.load_state_dict(state)


@contextlib.contextmanager
def _params_set_to(model: nn.Module, values: Mapping[str, Tensor]) -> Any:
    """Temporarily copy ``values`` into the (local, under FSDP sharded) parameters."""
    params = dict(model.named_parameters())
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


def full_ema(ema: Ema, model: nn.Module, wrapped: nn.Module, parallel: str) -> dict:
    """The whole EMA weights (under FSDP the shadow holds this rank's shards: gathered)."""
    if parallel != "fsdp":
        return ema.shadow
    with _params_set_to(model, ema.shadow):
        full = full_state_dict(model, wrapped, parallel)
    return {n: full[n].float().clone() for n in ema.shadow}


def local_shards(model: nn.Module, wrapped: nn.Module, full: Mapping[str, Tensor]) -> dict:
    """This rank's FSDP shards of whole weights ``full`` (by parameter name)."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    saved = {n: p.detach().clone() for n, p in model.named_parameters()}
    with FullyShardedDataParallel.summon_full_params(wrapped, writeback=True), torch.no_grad():
        params = dict(model.named_parameters())
        for n, v in full.items():
            params[n].copy_(v)
    shards = {n: p.detach().float().clone() for n, p in model.named_parameters() if n in full}
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(saved[n])
    return shards


class Ema:
    """``ema ← d·ema + (1 − d)·θ`` over the trainable parameters (float32 copies)."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.shadow = {
            n: p.detach().float().clone() for n, p in model.named_parameters() if p.requires_grad
        }

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for n, p in model.named_parameters():
            if n in self.shadow:
                self.shadow[n].lerp_(p.detach().float(), 1 - self.decay)
