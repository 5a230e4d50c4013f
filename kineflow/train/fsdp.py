"""How :func:`~kineflow.train.loop.run_training` wraps the model: DDP, FSDP, activation
checkpointing and ``torch.compile``.

FSDP shards every parameter over the ranks and gathers a unit's parameters only while that
unit runs. Each decoder layer is its own unit (:data:`SHARDED_BLOCKS`), so only a layer or two
(the running one, the next one prefetched) and the root unit (embeddings, heads, aligners, the
understanding tower, the diffusion head) hold full weights at a time instead of the whole
model. Only blocks that run on every rank at every step may be units: a unit's gather is a
collective, and the understanding tower does not run on a rank whose share of the batch holds
no picture (its blocks in units of their own would leave the other ranks waiting on a gather
that never comes). With
``optim.precision = "bf16"`` FSDP also keeps a bfloat16 copy of the gathered weights for
compute (``MixedPrecision(param_dtype=bf16)``, gradients reduced in float32; the sharded
master weights and the optimizer stay float32).

Activation checkpointing (``optim.activation_checkpointing``) keeps only each block's input
during the forward pass and recomputes the block in the backward pass (memory ~ one block's
activations instead of all of them, for one extra forward). It replaces the block's
``forward`` by an instance attribute, so parameter names (and with them state dicts and
checkpoints) do not change; it works with or without DDP / FSDP. A block's forward is run
again in the backward pass, so it must not have side effects (no KV cache while training).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.checkpoint import checkpoint

from kineflow.models.llama import LlamaDecoderLayer
from kineflow.models.siglip import Block as SiglipBlock

__all__ = [
    "BLOCKS",
    "SHARDED_BLOCKS",
    "activation_checkpointing",
    "fsdp_options",
    "join_process_group",
    "unwrap_fsdp",
    "wrap_model",
]

#: Transformer blocks: what activation checkpointing recomputes.
BLOCKS: tuple[type[nn.Module], ...] = (LlamaDecoderLayer, SiglipBlock)
#: The FSDP units: the blocks every rank runs at every step (module docstring).
SHARDED_BLOCKS: tuple[type[nn.Module], ...] = (LlamaDecoderLayer,)


def join_process_group(parallel: str) -> bool:
    """Under torchrun (``WORLD_SIZE`` set) join its process group if nobody has yet, as
    ``kineflow train ... `` launched by torchrun needs: gloo on CPU, NCCL with CUDA. Returns
    whether this call created the group (then :func:`run_training` also ends it)."""
    if parallel == "none" or "WORLD_SIZE" not in os.environ:
        return False
    if not dist.is_available() or dist.is_initialized():
        return False
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return True


def fsdp_options(model: nn.Module, precision: str) -> dict[str, Any]:
    """The keyword arguments of ``FullyShardedDataParallel`` for ``model``: one unit per
    block of :data:`SHARDED_BLOCKS`, bf16 mixed precision for ``precision="bf16"``, the weights'
    device as FSDP's compute device (without ``device_id`` it refuses CPU modules)."""
    from torch.distributed.fsdp import MixedPrecision
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    blocks = {type(m) for m in model.modules() if isinstance(m, SHARDED_BLOCKS)}
    options: dict[str, Any] = {
        "use_orig_params": True,  # frozen and trainable parameters may share a unit
        "device_id": next(model.parameters()).device,
        "auto_wrap_policy": ModuleWrapPolicy(blocks) if blocks else None,
    }
    if precision == "bf16":
        options["mixed_precision"] = MixedPrecision(
            param_dtype=torch.bfloat16, reduce_dtype=torch.float32, buffer_dtype=torch.float32
        )
    return options


def wrap_model(model: nn.Module, parallel: str, precision: str = "fp32") -> nn.Module:
    """``model`` under DDP or FSDP (``parallel``), or itself for ``"none"``; every rank
    starts from rank 0's weights."""
    if parallel == "none":
        return model
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError(
            f"parallel={parallel!r} needs torch.distributed: launch with torchrun (e.g. "
            "'torchrun --nproc-per-node 2 -m kineflow train ...')"
        )
    if parallel == "ddp":
        # A rank's share may lack a kind of sample (FUDOKI: no image or no text positions),
        # so a head can go unused there; DDP must then not wait for its gradient. Unused on
        # every rank, its grad stays None, as in one process.
        return nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
    from torch.distributed.fsdp import FullyShardedDataParallel

    # Like DDP, every rank starts from rank 0's weights (FSDP's sync_module_states refuses
    # CPU modules, hence the explicit broadcast).
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            dist.broadcast(t.data, src=0)
    return FullyShardedDataParallel(model, **fsdp_options(model, precision))


def unwrap_fsdp(model: nn.Module) -> None:
    """Put the modules back that FSDP's auto-wrapping replaced by its units inside ``model``
    (their parameters still hold what FSDP left in them: shards, until overwritten)."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, FullyShardedDataParallel):
                setattr(parent, name, child.module)


def _checkpointed(forward: Any) -> Any:
    def run(*args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)  # nothing to save memory on
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    return run


@contextmanager
def activation_checkpointing(model: nn.Module, enabled: bool = True) -> Iterator[int]:
    """While active, every block of :data:`BLOCKS` in ``model`` recomputes its forward pass
    in the backward pass (see the module docstring); yields how many blocks it covers. The
    blocks get their own ``forward`` back on exit."""
    blocks = [m for m in model.modules() if isinstance(m, BLOCKS)] if enabled else []
    for block in blocks:
        block.forward = _checkpointed(block.forward)
    try:
        yield len(blocks)
    finally:
        for block in blocks:
            del block.forward  # the instance attribute: the class's forward shows again
