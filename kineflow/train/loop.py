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
checkpoint), from the newest complete checkpoint even when a kill interrupted a save. A
non-finite loss stops the run and leaves the last good checkpoint in place; SIGINT / SIGTERM
stop it after the current step with a checkpoint there (:mod:`kineflow.train.stop`); a run
holds its folder against a second one (:mod:`kineflow.train.run_folder`).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import Tensor, nn

from kineflow.train.checkpoint import (
    load_checkpoint,
    resume_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from kineflow.train.fsdp import (
    activation_checkpointing,
    join_process_group,
    unwrap_fsdp,
    wrap_model,
)
from kineflow.train.loader import PieceLayout, step_batches
from kineflow.train.parallel_state import (
    Ema,
    full_ema,
    full_state_dict,
    load_optim_state,
    local_shards,
    optim_state,
)
from kineflow.train.run_config import check_intervals
from kineflow.train.run_folder import hold_run_folder, last_metrics, truncate_metrics
from kineflow.train.schedule import warmup_cosine
from kineflow.train.stop import CheckpointClock, StopSignals, TrainingInterrupted

__all__ = ["Optim", "Task", "TrainingInterrupted", "run_training", "sample_generator"]

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

    ``loader_workers`` processes build the batches ahead of the loop, ``prefetch_factor``
    each (0: in the training process, one at a time; the run is the same either way, see
    :mod:`kineflow.train.loader`; on a CPU-only run give them spare cores: OpenMP training
    threads competing with them can make steps several times slower).
    ``activation_checkpointing`` recomputes each transformer block in the backward pass instead
    of keeping its activations; ``compile`` runs the (wrapped) model through ``torch.compile``
    (:mod:`kineflow.train.fsdp`). ``fused`` updates every parameter in one AdamW kernel
    (CPU and CUDA; false: torch's loop over tensors, ~5× slower on the CPU).
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
    loader_workers: int = 0
    prefetch_factor: int = 2
    activation_checkpointing: bool = False
    compile: bool = False
    fused: bool = True

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
        if not self.weight_decay >= 0:
            raise ValueError(f"optim.weight_decay must be >= 0, got {self.weight_decay}")
        for name, low in (("loader_workers", 0), ("prefetch_factor", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"optim.{name} must be an integer >= {low}, got {value!r}")
        for name in ("activation_checkpointing", "compile"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"optim.{name} must be true or false, got {getattr(self, name)!r}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"optim.betas must be two numbers in [0, 1), got {list(self.betas)}")


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


def to_device(batch: Any, device: torch.device, non_blocking: bool = False) -> Any:
    """``batch`` with every tensor (in dicts, lists, tuples, or objects with ``.to``) on
    ``device``; anything else is returned as it is. ``non_blocking`` copies tensors
    asynchronously (from pinned memory)."""
    if isinstance(batch, Tensor):
        return batch.to(device, non_blocking=non_blocking)
    if hasattr(batch, "to") and not isinstance(batch, type):
        return batch.to(device)
    if isinstance(batch, dict):
        return {k: to_device(v, device, non_blocking) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device, non_blocking) for v in batch)
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


def run_training(
    task: Task,
    optim: Optim,
    out: str | Path,
    config: Mapping[str, Any],
    *,
    log_every: int = 25,
    ckpt_every: int = 250,
    ckpt_minutes: float | None = None,
    parallel: str = "none",
    progress: bool = True,
    desc: str = "train",
    on_log: Callable[[dict[str, float]], None] | None = None,
    on_step: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Train ``task.model`` in place (see the module docstring); returns a summary dict.

    Checkpoints are written every ``ckpt_every`` steps, after a step that ends
    ``ckpt_minutes`` or more after the last one (None: never by time), at the last step,
    and after the step in which SIGINT / SIGTERM arrived (:mod:`kineflow.train.stop`). The
    run holds ``out`` for its whole duration (:func:`~kineflow.train.run_folder.hold_run_folder`).
    ``on_log(row)`` sees every metrics row; ``on_step(done)`` runs on every process after each
    optimizer step (and its checkpoint), e.g. to export the weights at given steps.
    ``config`` is the run's full config (saved in every checkpoint; resuming with a different
    ``config["model"]`` is refused). With an EMA, ``task.model`` holds the EMA weights on
    return. The summary's ``already_complete_at`` is the checkpoint's step when it had already
    reached ``optim.steps`` (nothing trained; ``last`` then holds its last logged losses).

    Raises:
        ValueError: a batch that does not split over processes and accumulation pieces, a
            checkpoint of another model, ``parallel`` without ``torch.distributed``,
            ``parallel="none"`` in a process group of several processes, intervals < 1, a
            folder another run holds (:class:`~kineflow.train.run_folder.RunFolderInUseError`), a
            damaged checkpoint with no older complete one
            (:class:`~kineflow.train.checkpoint.CheckpointError`).
        FloatingPointError: a non-finite loss (the last good checkpoint is kept).
        TrainingInterrupted: SIGINT / SIGTERM; the checkpoint is at the step reached.
    """
    if parallel not in PARALLEL:
        raise ValueError(f"parallel must be one of {PARALLEL}, got {parallel!r}")
    check_intervals(log_every, ckpt_every, ckpt_minutes)
    owns_group = join_process_group(parallel)
    try:
        with hold_run_folder(out):
            result = _run(task, optim, Path(out), config, log_every, ckpt_every, ckpt_minutes,
                          parallel, progress, desc, on_log, on_step)  # fmt: skip
        if owns_group:
            dist.barrier()  # gloo aborts the process when a peer leaves mid-collective
        return result
    finally:
        if owns_group:
            dist.destroy_process_group()


def _resume(
    ckpt: Path, model: nn.Module, config: Mapping[str, Any], world: int, device: torch.device
) -> dict[str, Any] | None:
    """The trainer state of the checkpoint to resume from (its weights loaded into ``model``)
    or None. Rank 0 alone recovers it (renaming folders); the other ranks learn the outcome
    from it and then load what it chose, so that every rank fails or resumes alike."""
    rank = dist.get_rank() if world > 1 else 0
    state, error = None, None
    if rank == 0:
        try:
            state = resume_checkpoint(ckpt, model, config.get("model"))
        except (ValueError, FileNotFoundError) as err:
            error = err
    if world > 1:
        outcome = torch.tensor([float(error is not None), float(state is not None)], device=device)
        dist.broadcast(outcome, src=0)
        if outcome[0] and error is None:
            raise ValueError(f"rank 0 could not resume from {ckpt} (its error says why)")
        if rank != 0 and outcome[1]:  # mapped: FSDP's other ranks never touch the optimizer
            _, state = load_checkpoint(ckpt, model, model_config=config.get("model"), mmap=True)
    if error is not None:
        raise error
    return state


def _run(
    task: Task,
    optim: Optim,
    out: Path,
    config: Mapping[str, Any],
    log_every: int,
    ckpt_every: int,
    ckpt_minutes: float | None,
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
    state = _resume(ckpt, model, config, world, device)
    saved_step = int(state["step"]) if state is not None else None  # the last checkpoint
    start = saved_step or 0
    wrapped = wrap_model(model, parallel, optim.precision)
    # The compiled module shares wrapped's parameters; no_sync / clip_grad_norm_ stay on it.
    runner = torch.compile(wrapped) if optim.compile else wrapped
    params = [p for p in wrapped.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=optim.lr, betas=optim.betas,
                            weight_decay=optim.weight_decay, fused=optim.fused)  # fmt: skip
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: warmup_cosine(s, optim.steps, optim.warmup, optim.min_lr_ratio)
    )
    ema = Ema(model, optim.ema) if optim.ema else None
    if state is not None:
        load_optim_state(model, wrapped, opt, state["optimizer"], parallel)
        sched.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
        if ema is not None and "ema" in state:
            saved_ema = {k: v.float() for k, v in state["ema"].items()}
            ema.shadow = (
                local_shards(model, wrapped, saved_ema) if parallel == "fsdp" else saved_ema
            )
        if rank == 0:
            truncate_metrics(out / "metrics.jsonl", start)
    else:
        torch.manual_seed(optim.seed)
    autocast = (
        torch.autocast(device.type, dtype=torch.bfloat16)
        if optim.precision == "bf16"
        else contextlib.nullcontext()
    )
    t0 = time.perf_counter()
    last: dict[str, float] = {}
    done = start
    stopped_by: int | None = None
    clock = CheckpointClock(ckpt_minutes)
    metrics = (out / "metrics.jsonl").open("a") if rank == 0 else None
    layout = PieceLayout(optim.batch_size, share, piece, rank)
    pin = device.type == "cuda"
    data_seconds = 0.0  # building batches, or waiting for the loader workers to
    batches = None
    bar = tqdm(range(start, optim.steps), initial=start, total=optim.steps,
               disable=not progress or rank != 0, desc=desc)  # fmt: skip
    try:
        wrapped.train()
        with (
            StopSignals() as signals,
            activation_checkpointing(model, optim.activation_checkpointing),
        ):
            batches = step_batches(
                task.batch,
                layout,
                start,
                optim.steps,
                workers=optim.loader_workers,
                prefetch_factor=optim.prefetch_factor,
                pin_memory=pin,
            )
            for step in bar:
                sums: dict[str, Tensor] = {}
                opt.zero_grad(set_to_none=True)
                for k in range(optim.grad_accum):
                    waited = time.perf_counter()
                    batch = next(batches)
                    if device.type != "cpu":
                        batch = to_device(batch, device, non_blocking=pin)
                    data_seconds += time.perf_counter() - waited
                    sync = k == optim.grad_accum - 1 or parallel != "ddp"
                    with contextlib.nullcontext() if sync else wrapped.no_sync(), autocast:
                        losses = task.losses(batch, runner)
                    loss = losses["loss"]
                    (loss / optim.grad_accum).backward()
                    for name, value in losses.items():
                        sums[name] = sums.get(name, 0.0) + value.detach().float() / optim.grad_accum
                agreed = None
                if world > 1:
                    # The stop and time-to-save flags ride along with the losses: every rank
                    # stops or saves after the same step, at no extra collective.
                    names = sorted(sums)
                    flags = [float(signals.signum is not None), float(clock.due())]
                    stacked = torch.stack([sums[n] for n in names])
                    stacked = torch.cat([stacked, torch.tensor(flags, device=stacked.device)])
                    dist.all_reduce(stacked)
                    sums = dict(zip(names, stacked[: len(names)] / world, strict=True))
                    agreed = [bool(f > 0) for f in stacked[len(names) :].tolist()]
                done = step + 1  # steps count from 1, as in metrics.jsonl
                if not all(math.isfinite(float(v)) for v in sums.values()):
                    kept = "no checkpoint was written yet"
                    if saved_step is not None:
                        kept = f"the last good checkpoint (step {saved_step}) is kept in {ckpt}"
                    raise FloatingPointError(
                        f"non-finite loss {float(sums['loss'])} at step {done}; {kept}"
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
                stop, due = agreed or (signals.signum is not None, clock.due())
                if done % ckpt_every == 0 or done == optim.steps or due or stop:
                    # Under FSDP only rank 0, which writes, gathers the whole state.
                    trainer_state = {
                        "optimizer": optim_state(model, wrapped, opt, parallel),
                        "scheduler": sched.state_dict(),
                        "rng": rng_state(),
                        "step": done,
                    }
                    if ema is not None:
                        trainer_state["ema"] = full_ema(ema, model, wrapped, parallel)
                    weights = full_state_dict(model, wrapped, parallel)
                    if rank == 0:
                        save_checkpoint(ckpt, weights, dict(config), trainer_state)
                    if world > 1:
                        dist.barrier()
                    saved_step = done
                    clock.reset()
                if on_step is not None:
                    on_step(done)
                if stop:
                    # A rank that saw no signal itself stops because another one did.
                    stopped_by = signals.signum or signal.SIGTERM
                    bar.update(1)  # tqdm counts a step when the next one starts: count it now
                    break
    finally:
        if batches is not None:
            batches.close()  # stops the loader workers (before the run folder is let go)
        bar.close()
        if metrics is not None:
            metrics.close()
    if stopped_by is not None:
        raise TrainingInterrupted(stopped_by, done, ckpt)
    wrapped.eval()
    final_ema = full_ema(ema, model, wrapped, parallel, False) if ema is not None else None
    if parallel == "fsdp":
        # FSDP leaves each rank's parameters holding its shard, and its units in place of the
        # blocks: give task.model its blocks back, with whole weights, on every rank.
        full = full_state_dict(model, wrapped, parallel, rank0_only=False)
        unwrap_fsdp(model)
        for n, p in model.named_parameters():
            p.data, p.grad = full[n].detach().clone(), None
    if final_ema is not None:
        with torch.no_grad():
            params_by_name = dict(model.named_parameters())
            for n, v in final_ema.items():
                params_by_name[n].copy_(v)
    model.to(home)  # the trainers evaluate and save where the model was built
    complete = start >= optim.steps
    return {
        "steps": optim.steps,
        "resumed_from": start,
        "steps_this_run": done - start,
        "already_complete_at": start if complete else None,
        "seconds_this_run": round(time.perf_counter() - t0, 1),
        "data_seconds": round(data_seconds, 3),
        "last": last_metrics(out / "metrics.jsonl", start) if complete else last,
        "optim": asdict(optim),
    }
