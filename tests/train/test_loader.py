"""Loader workers, activation checkpointing and compile leave a run unchanged.

``optim.loader_workers > 0`` builds the same batches in worker processes: the losses and final
weights equal the in-process run's (the batches are equal, so to the last bit), a resumed
run with workers equals the uninterrupted one, and a Ctrl-C reaching the workers too still
stops the run with a checkpoint.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from distributed_worker import BATCH, TinyLlama, TinyLlamaTask, TinyTask, optim, train

from kineflow.train.fsdp import BLOCKS, activation_checkpointing, fsdp_options
from kineflow.train.loader import PieceLayout, step_batches
from kineflow.train.loop import Optim, run_training

STEPS = 6
WORKER = Path(__file__).resolve().parents[1] / "distributed_worker.py"
REPO = WORKER.parent.parent


def rows(out: Path) -> list[dict]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k != "seconds"} for line in lines]


def assert_equal_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[list[dict], dict]:
    out = tmp_path_factory.mktemp("in_process")
    weights = train(out, steps=STEPS)
    return rows(out), weights


def test_pieces_are_the_loops_index_lists_from_the_resume_step():
    # B = 8 over 2 ranks, 2 accumulation pieces: rank 1's pieces of step 3 are 28..29, 30..31.
    layout = PieceLayout(batch_size=8, share=4, piece=2, rank=1)
    assert layout.accum == 2
    assert layout.indices(6) == [28, 29] and layout.indices(7) == [30, 31]
    for workers in (0, 2):
        batches = step_batches(tuple, layout, 3, 5, workers=workers)
        got = list(batches)
        batches.close()
        assert got == [(28, 29), (30, 31), (36, 37), (38, 39)], workers


def test_workers_give_the_in_process_run(tmp_path, reference):
    weights = train(tmp_path, steps=STEPS, loader_workers=2)
    assert rows(tmp_path) == reference[0]
    assert_equal_weights(weights, reference[1])


def test_workers_with_grad_accum_give_the_in_process_run(tmp_path):
    in_process = train(tmp_path / "a", steps=STEPS, grad_accum=2)
    workers = train(tmp_path / "b", steps=STEPS, grad_accum=2, loader_workers=2,
                    prefetch_factor=1)  # fmt: skip
    assert rows(tmp_path / "b") == rows(tmp_path / "a")
    assert_equal_weights(workers, in_process)


def test_resume_with_workers_matches_the_uninterrupted_run(tmp_path, reference):
    # The crash comes in step 6 (sample 40), raised in a worker and re-raised by the loop
    # when it asks for that batch: the checkpoint is at step 4 and row 5 is logged again.
    with pytest.raises(RuntimeError, match="simulated crash at sample 40"):
        train(tmp_path, steps=STEPS, fail_at=5 * BATCH, loader_workers=2)
    assert [r["step"] for r in rows(tmp_path)] == [1, 2, 3, 4, 5]
    weights = train(tmp_path, steps=STEPS, loader_workers=2)
    assert rows(tmp_path) == reference[0]
    assert_equal_weights(weights, reference[1])


def test_ctrl_c_with_workers_saves_and_the_run_continues(tmp_path, reference):
    """SIGINT to the whole process group (a terminal's Ctrl-C): the workers ignore it, the
    training process finishes its step, saves, and stops with TrainingInterrupted."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, str(WORKER), str(tmp_path), "none", "--workers", "2",
           "--delay", "0.3"]  # fmt: skip
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        metrics = tmp_path / "metrics.jsonl"
        deadline = time.monotonic() + 120
        while not (metrics.exists() and metrics.read_text().strip()):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGINT)
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode != 0
    assert "stopping after this step and saving a checkpoint" in stderr
    assert "TrainingInterrupted: stopped by SIGINT at step" in stderr, stderr[-3000:]
    assert "DataLoader worker" not in stderr, stderr[-3000:]
    stopped = rows(tmp_path)
    assert 1 <= len(stopped) < STEPS
    trainer = torch.load(tmp_path / "checkpoint" / "trainer.pt", weights_only=True)
    assert trainer["step"] == stopped[-1]["step"]
    weights = train(tmp_path, steps=STEPS, loader_workers=2)
    assert rows(tmp_path) == reference[0]
    assert_equal_weights(weights, reference[1])


def test_activation_checkpointing_gives_the_same_gradients():
    task = TinyLlamaTask()
    batch = task.batch(list(range(BATCH)))

    def grads() -> dict[str, torch.Tensor]:
        task.model.zero_grad(set_to_none=True)
        task.losses(batch, task.model)["loss"].backward()
        return {n: p.grad.clone() for n, p in task.model.named_parameters()}

    plain = grads()
    names = list(task.model.state_dict())
    with activation_checkpointing(task.model) as blocks:
        assert blocks == 2
        layer = task.model.body.layers[0]
        assert "forward" in vars(layer)  # the recomputing forward is in place
        checkpointed = grads()
        assert list(task.model.state_dict()) == names  # no wrapper prefix in the names
    assert "forward" not in vars(layer)
    assert checkpointed.keys() == plain.keys()
    for n, g in plain.items():
        torch.testing.assert_close(checkpointed[n], g, rtol=1e-6, atol=1e-7, msg=n)
    assert any(g.abs().sum() > 0 for g in plain.values())


def test_activation_checkpointing_run_matches(tmp_path):
    a = train(tmp_path / "a", steps=3, llama=True)
    b = train(tmp_path / "b", steps=3, llama=True, activation_checkpointing=True)
    ra, rb = rows(tmp_path / "a"), rows(tmp_path / "b")
    for x, y in zip(ra, rb, strict=True):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-5)
    for n in a:
        torch.testing.assert_close(b[n], a[n], rtol=1e-5, atol=1e-6, msg=n)


def test_compile_runs_the_losses_through_the_compiled_model(tmp_path, monkeypatch, reference):
    seen = []

    def fake_compile(module):  # records what would be compiled; runs it eagerly
        seen.append(module)
        return module

    monkeypatch.setattr(torch, "compile", fake_compile)
    task, calls = TinyTask(), []
    losses = task.losses
    task.losses = lambda batch, model: calls.append(model) or losses(batch, model)
    run_training(task, optim(steps=STEPS, compile=True), tmp_path, {"model": {}},
                 log_every=1, ckpt_every=2, progress=False)  # fmt: skip
    assert seen == [task.model] and all(m is task.model for m in calls) and len(calls) == STEPS
    assert rows(tmp_path) == reference[0]


def test_fsdp_options_wrap_each_block_and_cast_to_bf16():
    model = TinyLlama()
    options = fsdp_options(model, "bf16")
    policy = options["auto_wrap_policy"]
    assert set(policy._module_classes) == {BLOCKS[0]}  # the model's Llama decoder layers
    mp = options["mixed_precision"]
    assert (mp.param_dtype, mp.reduce_dtype) == (torch.bfloat16, torch.float32)
    assert options["use_orig_params"] and options["device_id"] == torch.device("cpu")
    assert "mixed_precision" not in fsdp_options(model, "fp32")
    assert fsdp_options(torch.nn.Linear(2, 2), "fp32")["auto_wrap_policy"] is None


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("loader_workers", -1, "optim.loader_workers must be an integer >= 0"),
        ("prefetch_factor", 0, "optim.prefetch_factor must be an integer >= 1"),
        ("loader_workers", True, "optim.loader_workers must be an integer"),
        ("compile", "yes", "optim.compile must be true or false"),
        ("activation_checkpointing", 1, "optim.activation_checkpointing must be true or false"),
    ],
)
def test_optim_checks_the_loader_and_model_settings(field, value, message):
    with pytest.raises(ValueError, match=message):
        Optim(**{field: value})
