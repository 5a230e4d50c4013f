"""The one training loop every kineflow model goes through.

A *task* says what to train and how a batch is made; :func:`run_training` does the rest:

    for step s = start .. steps − 1:
        global batch s = samples [s·B, (s + 1)·B)           (B = optim.batch_size)
        rank r of W takes samples s·B + r·B/W … (its share), split into ``grad_accum`` pieces
        loss = task.losses(task.batch(indices))["loss"]      (a mean over its samples)
        AdamW step on the average gradient, LR = warm-up + cosine, gradient clipping, EMA

Samples are addressed by a global index and every random draw belonging to a sample (its
noise level, its corrupted tokens, its prompt dropout) is seeded by that index, so the
gradient of a step does not depend on how the batch is split: one process, two processes
(DDP / FSDP over ``torch.distributed``), or gradient accumulation give the same losses up to
float rounding, and resuming needs only the step number.

Checkpoints (``out/checkpoint``) are atomic folders (:mod:`kineflow.train.checkpoint`) with
the weights, the optimizer / scheduler / EMA state and the RNG states; a run started again
with the same config continues exactly where it stopped (the metrics file is cut back to the
checkpoint). A non-finite loss stops the run and leaves the last good checkpoint in place.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import Tensor, nn

from kineflow.io import read_json_object
from kineflow.train.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from kineflow.train.schedule import warmup_cosine

__all__ = ["Optim", "Task", "run_training", "sample_generator"]

PRECISIONS = ("fp32", "bf16")
PARALLEL = ("none", "ddp", "fsdp")


@dataclass
class Optim:
    """Optimisation settings (the ``optim`` section of a training YAML).

    ``batch_size`` is the *global* batch (all processes, all accumulation pieces together);
    it must divide by ``world_size · grad_accum``. ``ema`` is the decay of an exponential
    moving average of the weights (0: none; the EMA weights are what gets saved at the end).
    ``precision="bf16"`` runs forward passes under bfloat16 autocast (for GPUs; weights and
    optimizer stay float32). ``device``: where the model trains: ``"cpu"``, ``"cuda"``
    (``cuda:LOCAL_RANK`` under torchrun), ``"cuda:1"``…, or ``"auto"`` (CUDA when there is one).
    Batches are built on the CPU and moved there.
    """

    steps: int = 2000
    batch_size: int = 32
    lr: float = 2e-4
    min_lr_ratio: float = 0.1
    warmup: int = 100
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    grad_accum: int = 1
    ema: float = 0.0
    precision: str = "fp32"
    seed: int = 0
    device: str = "cpu"

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)
        for name in ("steps", "batch_size", "grad_accum"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"optim.{name} must be an integer >= 1, got {value!r}")
        if not self.lr > 0:
            raise ValueError(f"optim.lr must be > 0, got {self.lr}")
        if not 0 <= self.ema < 1:
            raise ValueError(f"optim.ema must be in [0, 1), got {self.ema}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"optim.precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.batch_size % self.grad_accum:
            raise ValueError(
                f"optim.batch_size {self.batch_size} must be divisible by grad_accum "
                f"{self.grad_accum}"
            )
        if not (self.warmup >= 0 and 0 <= self.min_lr_ratio <= 1 and self.grad_clip >= 0):
            raise ValueError("optim.warmup, grad_clip must be >= 0 and min_lr_ratio in [0, 1]")


class Task(Protocol):
    """What :func:`run_training` trains.

    ``model`` holds every trainable parameter (frozen parts have ``requires_grad=False``);
    ``batch(indices)`` builds the inputs of those global sample indices (deterministic in the
    indices, see :func:`sample_generator`); ``losses(batch, model)`` returns a dict of scalar
    tensors with ``"loss"``, each a *mean over the batch's samples* (so that averaging over
    processes and pieces gives the global mean). ``model`` is passed in because under DDP /
    FSDP it is the wrapped module.
    """

    model: nn.Module

    def batch(self, indices: list[int]) -> Any: ...

    def losses(self, batch: Any, model: nn.Module) -> dict[str, Tensor]: ...


def resolve_device(name: str) -> torch.device:
    """The training device for ``Optim.device`` (see there); a clear error for CUDA without
    a GPU or an unknown name."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ValueError(f"optim.device: unknown device {name!r} ({e})") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"optim.device is {name!r} but torch finds no CUDA device")
        if device.index is None:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return device


def to_device(batch: Any, device: torch.device) -> Any:
    """``batch`` with every tensor (in dicts, lists, tuples, or objects with ``.to``) on
    ``device``; anything else is returned as it is."""
    if isinstance(batch, Tensor) or (hasattr(batch, "to") and not isinstance(batch, type)):
        return batch.to(device)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def sample_generator(seed: int, index: int, device: torch.device | str = "cpu") -> torch.Generator:
    """The generator owning every random draw of sample ``index`` (the same in any process)."""
    g = torch.Generator(device)
    g.manual_seed((seed * 1_000_003 + index * 7_919 + 17) % (2**63 - 1))
    return g


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _join_process_group(parallel: str) -> bool:
    """Under torchrun (``WORLD_SIZE`` set) join its process group if nobody has yet, as
    ``kineflow train ... `` launched by torchrun needs: gloo on CPU, NCCL with CUDA. Returns
    whether this call created the group (then :func:`run_training` also ends it)."""
    if parallel == "none" or "WORLD_SIZE" not in os.environ:
        return False
    if not dist.is_available() or dist.is_initialized():
        return False
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return True


def _wrap(model: nn.Module, parallel: str) -> nn.Module:
    if parallel == "none":
        return model
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError(
            f"parallel={parallel!r} needs torch.distributed: launch with torchrun (e.g. "
            "'torchrun --nproc-per-node 2 -m kineflow train ...')"
        )
    if parallel == "ddp":
        return nn.parallel.DistributedDataParallel(model)
    from torch.distributed.fsdp import FullyShardedDataParallel

    # Like DDP, every rank starts from rank 0's weights (FSDP's sync_module_states refuses
    # CPU modules, hence the explicit broadcast).
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            dist.broadcast(t.data, src=0)
    # FSDP computes on the device the weights are on (without ``device_id`` it refuses CPU).
    device = next(model.parameters()).device
    return FullyShardedDataParallel(model, use_orig_params=True, device_id=device)


@contextlib.contextmanager
def _fsdp_full_state(model: nn.Module, wrapped: nn.Module) -> Any:
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


def _full_state_dict(model: nn.Module, wrapped: nn.Module, parallel: str) -> dict[str, Tensor]:
    """The whole model's weights on every rank (a collective under FSDP)."""
    if parallel != "fsdp":
        return model.state_dict()
    with _fsdp_full_state(model, wrapped):
        return wrapped.state_dict()


def _optim_state(model: nn.Module, wrapped: nn.Module, opt: Any, parallel: str) -> dict:
    """The optimizer state to save: under FSDP gathered and keyed by parameter name (each rank
    only holds the state of its shard)."""
    if parallel != "fsdp":
        return opt.state_dict()
    from torch.distributed.fsdp import FullyShardedDataParallel

    with _fsdp_full_state(model, wrapped):
        return FullyShardedDataParallel.optim_state_dict(wrapped, opt)


def _load_optim_state(
    model: nn.Module, wrapped: nn.Module, opt: Any, state: dict, parallel: str
) -> None:
    if parallel == "fsdp":
        from torch.distributed.fsdp import FullyShardedDataParallel

        with _fsdp_full_state(model, wrapped):
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


def _full_ema(ema: _Ema, model: nn.Module, wrapped: nn.Module, parallel: str) -> dict:
    """The whole EMA weights (under FSDP the shadow holds this rank's shards: gathered)."""
    if parallel != "fsdp":
        return ema.shadow
    with _params_set_to(model, ema.shadow):
        full = _full_state_dict(model, wrapped, parallel)
    return {n: full[n].float().clone() for n in ema.shadow}


def _local_shards(model: nn.Module, wrapped: nn.Module, full: Mapping[str, Tensor]) -> dict:
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


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop rows logged after the checkpoint a run resumes from (they will be logged again)."""
    if path.exists():
        keep = [
            line
            for line in path.read_text().splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= step
        ]
        path.write_text("".join(line + "\n" for line in keep))


class _Ema:
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


def run_training(
    task: Task,
    optim: Optim,
    out: str | Path,
    config: Mapping[str, Any],
    *,
    log_every: int = 25,
    ckpt_every: int = 250,
    parallel: str = "none",
    progress: bool = True,
    desc: str = "train",
    on_log: Callable[[dict[str, float]], None] | None = None,
    on_step: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Train ``task.model`` in place (see the module docstring); returns a summary dict.

    ``on_log(row)`` sees every metrics row; ``on_step(done)`` runs on every process after each
    optimizer step (and its checkpoint), e.g. to export the weights at given steps.
    ``config`` is the run's full config (saved in every checkpoint; resuming with a different
    ``config["model"]`` is refused). With an EMA, ``task.model`` holds the EMA weights on
    return.

    Raises:
        ValueError: a batch that does not split over processes and accumulation pieces, a
            checkpoint of another model, ``parallel`` without ``torch.distributed``,
            ``parallel="none"`` in a process group of several processes.
        FloatingPointError: a non-finite loss (the last good checkpoint is kept).
    """
    if parallel not in PARALLEL:
        raise ValueError(f"parallel must be one of {PARALLEL}, got {parallel!r}")
    owns_group = _join_process_group(parallel)
    try:
        result = _run(task, optim, Path(out), config, log_every, ckpt_every, parallel, progress,
                      desc, on_log, on_step)  # fmt: skip
        if owns_group:
            dist.barrier()  # gloo aborts the process when a peer leaves mid-collective
        return result
    finally:
        if owns_group:
            dist.destroy_process_group()


def _run(
    task: Task,
    optim: Optim,
    out: Path,
    config: Mapping[str, Any],
    log_every: int,
    ckpt_every: int,
    parallel: str,
    progress: bool,
    desc: str,
    on_log: Callable[[dict[str, float]], None] | None,
    on_step: Callable[[int], None] | None,
) -> dict[str, Any]:
    from tqdm.auto import tqdm

    rank, world = _world()
    if parallel == "none" and world > 1:
        # Every process would train its own copy on its share and write the same files.
        raise ValueError(
            f"parallel='none' but torch.distributed runs {world} processes: use "
            "parallel='ddp' or 'fsdp' (or launch a single process)"
        )
    share = optim.batch_size // world
    if optim.batch_size % world or share % optim.grad_accum:
        raise ValueError(
            f"optim.batch_size {optim.batch_size} must split into {world} process(es) x "
            f"{optim.grad_accum} accumulation piece(s)"
        )
    piece = share // optim.grad_accum
    out.mkdir(parents=True, exist_ok=True)
    model = task.model
    home = next(model.parameters()).device  # the model goes back there at the end
    device = resolve_device(optim.device)
    model.to(device)
    ckpt = out / "checkpoint"
    start, state = 0, None
    if ckpt.exists():
        saved_path = ckpt / "config.json"
        saved = read_json_object(saved_path) if saved_path.is_file() else {}
        if saved.get("model") != config.get("model"):
            raise ValueError(
                f"{ckpt}: checkpoint was trained with another model config; use a new 'out' "
                "folder or delete the checkpoint"
            )
        _, state = load_checkpoint(ckpt, model)
        start = int(state["step"])
    wrapped = _wrap(model, parallel)
    params = [p for p in wrapped.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=optim.lr, betas=optim.betas, weight_decay=optim.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: warmup_cosine(s, optim.steps, optim.warmup, optim.min_lr_ratio)
    )
    ema = _Ema(model, optim.ema) if optim.ema else None
    if state is not None:
        _load_optim_state(model, wrapped, opt, state["optimizer"], parallel)
        sched.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
        if ema is not None and "ema" in state:
            saved_ema = {k: v.float() for k, v in state["ema"].items()}
            ema.shadow = (
                _local_shards(model, wrapped, saved_ema) if parallel == "fsdp" else saved_ema
            )
        if rank == 0:
            _truncate_metrics(out / "metrics.jsonl", start)
    else:
        torch.manual_seed(optim.seed)
    autocast = (
        torch.autocast(device.type, dtype=torch.bfloat16)
        if optim.precision == "bf16"
        else contextlib.nullcontext()
    )
    t0 = time.perf_counter()
    last: dict[str, float] = {}
    metrics = (out / "metrics.jsonl").open("a") if rank == 0 else None
    try:
        wrapped.train()
        bar = tqdm(range(start, optim.steps), initial=start, total=optim.steps,
                   disable=not progress or rank != 0, desc=desc)  # fmt: skip
        for step in bar:
            first = step * optim.batch_size + rank * share
            sums: dict[str, Tensor] = {}
            opt.zero_grad(set_to_none=True)
            for k in range(optim.grad_accum):
                indices = list(range(first + k * piece, first + (k + 1) * piece))
                batch = task.batch(indices)
                if device.type != "cpu":
                    batch = to_device(batch, device)
                sync = k == optim.grad_accum - 1 or parallel != "ddp"
                with contextlib.nullcontext() if sync else wrapped.no_sync(), autocast:
                    losses = task.losses(batch, wrapped)
                loss = losses["loss"]
                (loss / optim.grad_accum).backward()
                for name, value in losses.items():
                    sums[name] = sums.get(name, 0.0) + value.detach().float() / optim.grad_accum
            if world > 1:
                stacked = torch.stack([sums[n] for n in sorted(sums)])
                dist.all_reduce(stacked)
                sums = dict(zip(sorted(sums), stacked / world, strict=True))
            if not all(math.isfinite(float(v)) for v in sums.values()):
                raise FloatingPointError(
                    f"non-finite loss {float(sums['loss'])} at step {step}; the last good "
                    f"checkpoint is {ckpt if ckpt.exists() else 'not written yet'}"
                )
            if optim.grad_clip:
                if parallel == "fsdp":
                    wrapped.clip_grad_norm_(optim.grad_clip)
                else:
                    nn.utils.clip_grad_norm_(params, optim.grad_clip)
            opt.step()
            sched.step()
            if ema is not None:
                ema.update(model)
            done = step + 1
            last = {n: float(v) for n, v in sums.items()}
            if done % log_every == 0 or done == optim.steps:
                row = {"step": done, "lr": sched.get_last_lr()[0],
                       "seconds": round(time.perf_counter() - t0, 2), **last}  # fmt: skip
                if metrics is not None:
                    metrics.write(json.dumps(row) + "\n")
                    metrics.flush()
                if on_log is not None:
                    on_log(row)
                bar.set_postfix(loss=f"{last['loss']:.4f}")
            if done % ckpt_every == 0 or done == optim.steps:
                trainer_state = {
                    "optimizer": _optim_state(model, wrapped, opt, parallel),
                    "scheduler": sched.state_dict(),
                    "rng": rng_state(),
                    "step": done,
                }
                if ema is not None:
                    trainer_state["ema"] = _full_ema(ema, model, wrapped, parallel)
                weights = _full_state_dict(model, wrapped, parallel)
                if rank == 0:
                    save_checkpoint(ckpt, weights, dict(config), trainer_state)
                if world > 1:
                    dist.barrier()
            if on_step is not None:
                on_step(done)
    finally:
        if metrics is not None:
            metrics.close()
    wrapped.eval()
    final_ema = _full_ema(ema, model, wrapped, parallel) if ema is not None else None
    if parallel == "fsdp":
        # FSDP leaves each rank's parameters holding its shard: give task.model whole weights.
        full = _full_state_dict(model, wrapped, parallel)
        for n, p in model.named_parameters():
            p.data, p.grad = full[n].detach().clone(), None
    if final_ema is not None:
        with torch.no_grad():
            params_by_name = dict(model.named_parameters())
            for n, v in final_ema.items():
                params_by_name[n].copy_(v)
    model.to(home)  # the trainers evaluate and save where the model was built
    return {
        "steps": optim.steps,
        "resumed_from": start,
        "seconds_this_run": round(time.perf_counter() - t0, 1),
        "last": last,
        "optim": asdict(optim),
    }
