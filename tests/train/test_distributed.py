"""run_training gives the same run however the global batch is split.

One process, two processes under DDP or FSDP (gloo, CPU, launched with torchrun), gradient
accumulation and a crash + resume all train :class:`distributed_worker.TinyTask` to the same
per-step losses and the same final (EMA) weights, up to float rounding.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from distributed_worker import BATCH, TinyTask, optim, train

from kineflow.train.loop import run_training

WORKER = Path(__file__).resolve().parents[1] / "distributed_worker.py"
REPO = WORKER.parent.parent
STEPS = 6
RTOL = 1e-5

needs_gloo = pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
    reason="torch.distributed with the gloo backend is not available",
)


def torchrun(out: Path, parallel: str, *args: str) -> subprocess.CompletedProcess:
    """Run the worker in 2 processes (``--standalone`` rendezvous picks a free port)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           "--nproc-per-node", "2", str(WORKER), str(out), parallel, *args]  # fmt: skip
    return subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=180)


#: What gloo prints when a process aborts in its C++ teardown (a joinable thread destroyed):
#: seen on CPU under load in about one full-suite run of three, never when the test runs
#: alone (10 runs); not a wrong result, so a run that started from an empty folder is
#: repeated once from an empty folder (a resumed run is not: its checkpoint is the input).
GLOO_ABORT = "terminate called without an active exception"


def run_ok(out: Path, parallel: str, *args: str) -> None:
    fresh = not any(out.iterdir())
    proc = torchrun(out, parallel, *args)
    if fresh and proc.returncode != 0 and GLOO_ABORT in proc.stdout + proc.stderr:
        warnings.warn(f"torchrun aborted in gloo ({GLOO_ABORT!r}); running it again", stacklevel=2)
        for entry in out.iterdir():
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
        proc = torchrun(out, parallel, *args)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    return torch.load(out / "final.pt", weights_only=True)


def assert_same_run(
    rows: list[dict], weights: dict, ref_rows: list[dict], ref_weights: dict, atol: float = 1e-6
):
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    for row, ref in zip(rows, ref_rows, strict=True):
        assert row["lr"] == pytest.approx(ref["lr"], rel=1e-12), row["step"]
        for name in ("loss", "mae"):
            assert row[name] == pytest.approx(ref[name], rel=RTOL), (row["step"], name)
    assert weights.keys() == ref_weights.keys()
    for name, ref in ref_weights.items():
        assert weights[name].shape == ref.shape, name
        torch.testing.assert_close(weights[name], ref, rtol=RTOL, atol=atol, msg=name)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[list[dict], dict]:
    """The single-process run everything is compared with."""
    out = tmp_path_factory.mktemp("single")
    weights = train(out, "none", steps=STEPS)
    rows = metrics(out)
    # The run must actually move: otherwise equal losses would prove little.
    assert rows[-1]["loss"] < 0.8 * rows[0]["loss"]
    return rows, weights


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory) -> tuple[list[dict], dict]:
    out = tmp_path_factory.mktemp("ddp")
    run_ok(out, "ddp", "--steps", str(STEPS), "--check-refusals", "--skew-init")
    return metrics(out), final_weights(out)


def test_grad_accum_matches_one_piece(tmp_path, reference):
    for k in (2, 4):
        weights = train(tmp_path / f"accum{k}", "none", grad_accum=k, steps=STEPS)
        assert_same_run(metrics(tmp_path / f"accum{k}"), weights, *reference)


def test_batch_draws_depend_on_sample_index_only():
    task = TinyTask()
    x, y = task.batch(list(range(BATCH)))
    x2, y2 = task.batch(list(range(BATCH // 2, BATCH)))
    assert torch.equal(x[BATCH // 2 :], x2) and torch.equal(y[BATCH // 2 :], y2)
    assert (x == 0).any(), "the per-sample mask should zero some inputs"


@needs_gloo
@pytest.mark.slow  # a torchrun launch of two processes: end to end
def test_ddp_two_processes_match_one(reference, ddp_run):
    assert_same_run(*ddp_run, *reference)


@needs_gloo
@pytest.mark.slow  # a torchrun launch of two processes: end to end
def test_run_training_joins_torchruns_group_itself(tmp_path, reference):
    """Launched by torchrun with no init_process_group of its own (the CLI's case)."""
    run_ok(tmp_path, "ddp", "--steps", str(STEPS), "--loop-joins")
    assert_same_run(metrics(tmp_path), final_weights(tmp_path), *reference)


@needs_gloo
@pytest.mark.slow  # a torchrun launch of two processes: end to end
def test_fsdp_two_processes_match_one(tmp_path, reference):
    run_ok(tmp_path, "fsdp", "--steps", str(STEPS), "--skew-init")
    assert_same_run(metrics(tmp_path), final_weights(tmp_path), *reference)


@needs_gloo
@pytest.mark.slow  # a torchrun launch of two processes: end to end
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_resume_after_crash_matches_uninterrupted(tmp_path, parallel, reference, ddp_run):
    # Checkpoints every 2 steps; the crash comes in step 6 (samples 40..47), so rows 1-5 are
    # logged, the checkpoint is at step 4 and row 5 must be dropped and logged again.
    # grad_accum=2 under DDP also covers the no_sync path of the accumulation pieces.
    accum = "2" if parallel == "ddp" else "1"
    crashed = torchrun(tmp_path, parallel, "--steps", str(STEPS), "--grad-accum", accum,
                       "--fail-at", str(5 * BATCH))  # fmt: skip
    assert crashed.returncode != 0
    assert "simulated crash at sample 40" in crashed.stdout + crashed.stderr
    assert [r["step"] for r in metrics(tmp_path)] == [1, 2, 3, 4, 5]
    trainer = torch.load(tmp_path / "checkpoint" / "trainer.pt", weights_only=True)
    assert trainer["step"] == 4
    assert not (tmp_path / "final.pt").exists()

    run_ok(tmp_path, parallel, "--steps", str(STEPS), "--grad-accum", accum)
    rows, weights = metrics(tmp_path), final_weights(tmp_path)
    assert_same_run(rows, weights, *ddp_run)
    assert_same_run(rows, weights, *reference)


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_parallel_without_process_group_names_torchrun(tmp_path, parallel):
    assert not (torch.distributed.is_available() and torch.distributed.is_initialized())
    with pytest.raises(ValueError, match="torchrun"):
        run_training(TinyTask(), optim(), tmp_path, {"model": {}}, parallel=parallel,
                     progress=False)  # fmt: skip
    assert not (tmp_path / "checkpoint").exists()


@pytest.fixture(scope="module")
def llama_reference(tmp_path_factory) -> tuple[list[dict], dict]:
    """One process training TinyLlamaTask (two decoder layers: two FSDP units)."""
    out = tmp_path_factory.mktemp("llama_single")
    weights = train(out, "none", steps=STEPS, llama=True)
    return metrics(out), weights


@needs_gloo
@pytest.mark.slow  # torchrun launches of two processes: end to end
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_per_block_fsdp_with_workers_and_resume_match_one_process(
    tmp_path, parallel, llama_reference
):
    """Decoder layers as their own FSDP units, loader workers, activation checkpointing, and a
    crash + resume (rank-0-only checkpoint gathers): the single-process run again."""
    args = ("--steps", str(STEPS), "--llama", "--workers", "2", "--checkpointing")
    crashed = torchrun(tmp_path, parallel, *args, "--fail-at", str(5 * BATCH))
    assert crashed.returncode != 0
    assert "simulated crash at sample 40" in crashed.stdout + crashed.stderr
    assert [r["step"] for r in metrics(tmp_path)] == [1, 2, 3, 4, 5]
    run_ok(tmp_path, parallel, *args, "--skew-init")
    # AdamW turns the rounding of near-zero gradients into updates of their own (the
    # weights differ by up to ~1e-5 at a scale of 0.15 after 6 steps; the losses by ~1e-7).
    assert_same_run(metrics(tmp_path), final_weights(tmp_path), *llama_reference, atol=3e-5)
