"""A tiny deterministic training task, and a script running it through ``run_training``.

Used by ``tests/train/test_distributed.py``: the test imports :class:`TinyTask` / :func:`train` for
single-process runs, and launches this file under ``torchrun`` for DDP / FSDP runs::

    torchrun --standalone --nproc-per-node 2 tests/distributed_worker.py OUT PARALLEL [...]

Each sample ``i`` is drawn from :func:`sample_generator` (its input, its target noise and a
per-sample input mask drawn inside :meth:`TinyTask.batch`), so a step's gradient does not
depend on how the global batch is split over processes or accumulation pieces.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
from torch import Tensor, nn

from kineflow.models.llama import LlamaConfig, LlamaModel
from kineflow.train.loop import Optim, run_training, sample_generator

DIM = 6
SEED = 3
BATCH = 8  # the global batch


class TinyTask:
    """A 2-layer MLP regressing ``sin`` of a masked, noisy input; loss = mean over samples.

    ``fail_at``: :meth:`batch` raises on any sample index >= it (a simulated crash);
    ``delay``: seconds :meth:`batch` sleeps (a slow data path).
    """

    def __init__(self, fail_at: int | None = None, delay: float = 0.0) -> None:
        torch.manual_seed(0)
        self.model = nn.Sequential(nn.Linear(DIM, 16), nn.Tanh(), nn.Linear(16, 1))
        self.fail_at = fail_at
        self.delay = delay

    def batch(self, indices: list[int]) -> tuple[Tensor, Tensor]:
        time.sleep(self.delay)
        xs, ys = [], []
        for i in indices:
            if self.fail_at is not None and i >= self.fail_at:
                raise RuntimeError(f"simulated crash at sample {i}")
            g = sample_generator(SEED, i)
            x = torch.randn(DIM, generator=g)
            y = torch.sin(2 * x).sum(0, keepdim=True) + 0.1 * torch.randn(1, generator=g)
            keep = (torch.rand(DIM, generator=g) > 0.2).float()  # per-sample random mask
            xs.append(x * keep)
            ys.append(y)
        return torch.stack(xs), torch.stack(ys)

    def losses(self, batch: tuple[Tensor, Tensor], model: nn.Module) -> dict[str, Tensor]:
        x, y = batch
        err = model(x) - y
        return {"loss": err.square().mean(), "mae": err.abs().mean()}


class TinyLlama(nn.Module):
    """Two Llama decoder layers (FSDP units, checkpointable blocks) and a regression head."""

    def __init__(self) -> None:
        super().__init__()
        config = LlamaConfig(vocab_size=11, hidden_size=16, intermediate_size=24,
                             num_hidden_layers=2, num_attention_heads=2,
                             max_position_embeddings=16)  # fmt: skip
        self.body = LlamaModel(config)
        self.head = nn.Linear(16, 1)

    def forward(self, ids: Tensor) -> Tensor:
        return self.head(self.body(ids, mask="full").mean(1))


class TinyLlamaTask(TinyTask):
    """:class:`TinyTask`'s per-sample draws turned into token ids (``DIM`` per sample, in
    [0, 11)) for :class:`TinyLlama`."""

    def __init__(self, fail_at: int | None = None, delay: float = 0.0) -> None:
        super().__init__(fail_at, delay)
        torch.manual_seed(0)
        self.model = TinyLlama()

    def batch(self, indices: list[int]) -> tuple[Tensor, Tensor]:
        x, y = super().batch(indices)
        return (x * 2 + 5).round().clamp(0, 10).long(), y


def optim(grad_accum: int = 1, steps: int = 6, **extra: object) -> Optim:
    # grad_clip is small enough to clip on most steps, so the clipping path matters.
    return Optim(steps=steps, batch_size=BATCH, lr=3e-2, warmup=2, grad_clip=0.5,
                 grad_accum=grad_accum, ema=0.5, seed=1, **extra)  # fmt: skip


def train(
    out: str | Path,
    parallel: str = "none",
    grad_accum: int = 1,
    fail_at: int | None = None,
    steps: int = 6,
    skew_init: bool = False,
    llama: bool = False,
    delay: float = 0.0,
    **extra: object,
) -> dict[str, Tensor]:
    """Train :class:`TinyTask` (:class:`TinyLlamaTask` with ``llama``); returns the final
    (EMA) weights of ``task.model``. ``extra``: more :class:`Optim` settings."""
    task = (TinyLlamaTask if llama else TinyTask)(fail_at, delay)
    if skew_init and int(os.environ.get("RANK", "0")) != 0:
        with torch.no_grad():
            for p in task.model.parameters():
                p.add_(1.0)
    config = {"model": {"name": "tiny-mlp", "dim": DIM}}
    run_training(task, optim(grad_accum, steps, **extra), out, config, log_every=1, ckpt_every=2,
                 parallel=parallel, progress=False)  # fmt: skip
    return {k: v.detach().clone() for k, v in task.model.state_dict().items()}


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("parallel", choices=["none", "ddp", "fsdp"])
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--fail-at", type=int, default=None)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--check-refusals", action="store_true")
    # Rank != 0 builds other initial weights: the loop must start every rank from rank 0's.
    p.add_argument("--skew-init", action="store_true")
    # As `torchrun -m kineflow train ...`: nobody but run_training joins the process group.
    p.add_argument("--loop-joins", action="store_true")
    p.add_argument("--llama", action="store_true")  # TinyLlamaTask
    p.add_argument("--workers", type=int, default=0)  # optim.loader_workers
    p.add_argument("--checkpointing", action="store_true")  # optim.activation_checkpointing
    p.add_argument("--delay", type=float, default=0.0)  # seconds per batch
    args = p.parse_args(argv)
    import torch.distributed as dist

    torch.set_num_threads(1)
    if args.parallel != "none" and not args.loop_joins:
        dist.init_process_group("gloo")
    try:
        if args.check_refusals:
            # parallel="none" in a process group would train unsynchronised copies.
            try:
                run_training(TinyTask(), optim(), args.out, {"model": {}}, parallel="none")
            except ValueError as e:
                assert "parallel='ddp' or 'fsdp'" in str(e), e
            else:
                raise AssertionError("parallel='none' under torchrun was not refused")
        weights = train(args.out, args.parallel, args.grad_accum, args.fail_at, args.steps,
                        args.skew_init, args.llama, args.delay, loader_workers=args.workers,
                        activation_checkpointing=args.checkpointing)  # fmt: skip
        if dist.is_initialized():
            # Tearing gloo down while the peer is still in its last collective aborts the
            # process ("terminate called without an active exception"): meet first.
            dist.barrier()
        if int(os.environ.get("RANK", "0")) == 0:
            torch.save(weights, Path(args.out) / "final.pt")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
