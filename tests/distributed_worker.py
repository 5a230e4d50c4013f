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
from pathlib import Path

import torch
from torch import Tensor, nn

from kineflow.train.loop import Optim, run_training, sample_generator

DIM = 6
SEED = 3
BATCH = 8  # the global batch


class TinyTask:
    """A 2-layer MLP regressing ``sin`` of a masked, noisy input; loss = mean over samples.

    ``fail_at``: :meth:`batch` raises on any sample index >= it (a simulated crash).
    """

    def __init__(self, fail_at: int | None = None) -> None:
        torch.manual_seed(0)
        self.model = nn.Sequential(nn.Linear(DIM, 16), nn.Tanh(), nn.Linear(16, 1))
        self.fail_at = fail_at

    def batch(self, indices: list[int]) -> tuple[Tensor, Tensor]:
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


def optim(grad_accum: int = 1, steps: int = 6) -> Optim:
    # grad_clip is small enough to clip on most steps, so the clipping path matters.
    return Optim(steps=steps, batch_size=BATCH, lr=3e-2, warmup=2, grad_clip=0.5,
                 grad_accum=grad_accum, ema=0.5, seed=1)  # fmt: skip


def train(
    out: str | Path,
    parallel: str = "none",
    grad_accum: int = 1,
    fail_at: int | None = None,
    steps: int = 6,
    skew_init: bool = False,
) -> dict[str, Tensor]:
    """Train :class:`TinyTask`; returns the final (EMA) weights of ``task.model``."""
    task = TinyTask(fail_at)
    if skew_init and int(os.environ.get("RANK", "0")) != 0:
        with torch.no_grad():
            for p in task.model.parameters():
                p.add_(1.0)
    config = {"model": {"name": "tiny-mlp", "dim": DIM}}
    run_training(task, optim(grad_accum, steps), out, config, log_every=1, ckpt_every=2,
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
                        args.skew_init)  # fmt: skip
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
