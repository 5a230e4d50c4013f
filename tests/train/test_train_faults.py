"""Training faults: a kill at any point of a checkpoint save, damaged checkpoints, SIGINT /
SIGTERM, time-based checkpoints and two runs on one folder.

A SIGKILL is simulated in-process: the file-system calls a save (or a recovery) makes are
counted, and the k-th one raises :class:`Killed` *before* it runs, after which every call is
a no-op, since nothing more reaches the disk after a SIGKILL (not even the clean-up in an
``except`` block). Every k from the first call to past the last is tried.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from distributed_worker import BATCH, TinyTask, optim
from test_train_tokenizer import TINY

from kineflow.cli import main
from kineflow.train.checkpoint import (
    FILES,
    CheckpointError,
    load_checkpoint,
    resume_checkpoint,
    save_checkpoint,
)
from kineflow.train.loop import run_training
from kineflow.train.run_folder import RunFolderInUseError, hold_run_folder
from kineflow.train.stop import CheckpointClock, TrainingInterrupted

REPO = Path(__file__).resolve().parents[2]
CONFIG = {"model": {"name": "tiny-mlp"}}
SIBLINGS = ("checkpoint.tmp", "checkpoint.old", "checkpoint.trash", "checkpoint.broken")


class Killed(BaseException):
    """The simulated SIGKILL (a BaseException: no ``except Exception`` catches it)."""


@contextlib.contextmanager
def killed_at(event: int | None) -> Iterator[dict]:
    """Kill the 'process' before its ``event``-th (from 0) mkdir / rename / replace / unlink /
    rmdir; None: never. Yields the record: ``n`` calls made, ``replaced`` target paths."""
    record = {"n": 0, "dead": False, "replaced": []}

    def wrap(name: str):
        real = getattr(os, name)

        def call(*args, **kwargs):
            if record["dead"]:
                return None
            if record["n"] == event:
                record["dead"] = True
                raise Killed
            record["n"] += 1
            result = real(*args, **kwargs)
            if name == "replace":
                record["replaced"].append(Path(args[1]))
            return result

        return call

    with pytest.MonkeyPatch.context() as mp:
        for name in ("mkdir", "rename", "replace", "unlink", "rmdir"):
            mp.setattr(os, name, wrap(name))
        yield record


def linear(fill: float) -> torch.nn.Linear:
    model = torch.nn.Linear(3, 2)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(fill)
    return model


def leftovers(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name in SIBLINGS)


def resumed_step(folder: Path) -> tuple[int, float]:
    model = linear(0.0)
    state = resume_checkpoint(folder, model, "m")
    return state["step"], float(model.weight[0, 0].detach())


def test_a_kill_at_any_point_of_a_save_or_recovery_resumes_the_newest_complete(tmp_path):
    def save(folder: Path, step: int) -> None:
        save_checkpoint(folder, linear(float(step)), {"model": "m"}, {"step": step})

    with killed_at(None) as record:
        save(tmp_path / "count" / "checkpoint", 1)
        first = record["n"]
        save(tmp_path / "count" / "checkpoint", 2)
    events = record["n"] - first
    assert events >= 8  # mkdir, 4 file commits, 2 renames, removal of the old one
    for k in range(events + 1):
        root = tmp_path / f"save{k}"
        save(root / "checkpoint", 1)
        with killed_at(k) as record, contextlib.suppress(Killed):
            save(root / "checkpoint", 2)
        # The new checkpoint is complete once its three files are on disk (in .tmp or moved).
        written = {p.name for p in record["replaced"] if p.parent.name == "checkpoint.tmp"}
        newest = 2 if set(FILES) <= written else 1
        # A kill during the recovery itself must not lose it either.
        probe = tmp_path / "probe"
        shutil.copytree(root, probe)
        with killed_at(None) as counted:
            resumed_step(probe / "checkpoint")
        shutil.rmtree(probe)
        for j in range(counted["n"] + 1):
            again = tmp_path / f"save{k}_recover{j}"
            shutil.copytree(root, again)
            with killed_at(j), contextlib.suppress(Killed):
                resumed_step(again / "checkpoint")
            assert resumed_step(again / "checkpoint") == (newest, float(newest)), (k, j)
            assert leftovers(again) == [], (k, j)
        assert resumed_step(root / "checkpoint") == (newest, float(newest)), k
        save(root / "checkpoint", 3)  # and the next save works from there
        assert resumed_step(root / "checkpoint") == (3, 3.0)


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def train(out: Path, steps: int, task: TinyTask | None = None, **kwargs) -> dict:
    kwargs = {"log_every": 1, "ckpt_every": 2, "progress": False, **kwargs}
    return run_training(task or TinyTask(), optim(steps=steps), out, CONFIG, **kwargs)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> list[dict]:
    """Metrics of an uninterrupted 6-step run (losses and learning rates per step)."""
    out = tmp_path_factory.mktemp("straight")
    train(out, 6)
    return [{k: v for k, v in row.items() if k != "seconds"} for row in metrics(out)]


def same_run(out: Path, reference: list[dict]) -> bool:
    rows = [{k: v for k, v in row.items() if k != "seconds"} for row in metrics(out)]
    return len(rows) == len(reference) and all(
        row == pytest.approx(ref, rel=1e-6) for row, ref in zip(rows, reference, strict=True)
    )


def kill_between_the_renames(step: int):
    """``os.rename`` that dies at the ``checkpoint.tmp -> checkpoint`` rename of ``step``'s
    save (after ``checkpoint -> checkpoint.old``): the data-loss case of the issue."""
    real = os.rename

    def rename(src, dst, *args, **kwargs):
        src = Path(src)
        if src.name == "checkpoint.tmp":
            marker = json.loads((src / "complete.json").read_text())
            if marker["step"] == step:
                raise Killed
        return real(src, dst, *args, **kwargs)

    return rename


def test_resume_after_a_kill_between_the_renames_matches_the_uninterrupted_run(
    tmp_path, monkeypatch, reference
):
    with monkeypatch.context() as mp:
        mp.setattr(os, "rename", kill_between_the_renames(4))
        with pytest.raises(Killed):
            train(tmp_path, 6)
    assert leftovers(tmp_path) == ["checkpoint.old", "checkpoint.tmp"]
    assert not (tmp_path / "checkpoint").exists()
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"step": 5, "lo')  # a row torn by the kill
    summary = train(tmp_path, 6)
    assert summary["resumed_from"] == 4
    assert same_run(tmp_path, reference)
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("damage", ["truncated", "overwritten"])
def test_a_damaged_newest_checkpoint_falls_back_to_an_older_complete_one(
    tmp_path, monkeypatch, capsys, reference, damage
):
    with monkeypatch.context() as mp:
        mp.setattr(os, "rename", kill_between_the_renames(4))
        with pytest.raises(Killed):
            train(tmp_path, 6)
    weights = tmp_path / "checkpoint.tmp" / "model.safetensors"
    data = weights.read_bytes()
    # Cut short (told by its size), or the same size with garbage (told when it is read).
    weights.write_bytes(data[:100] if damage == "truncated" else b"x" * len(data))
    summary = train(tmp_path, 6)
    assert summary["resumed_from"] == 2
    warning = capsys.readouterr().err.strip().splitlines()
    problem = "is 100 bytes" if damage == "truncated" else "is unreadable (truncated or damaged"
    assert len(warning) == 1 and warning[0].startswith(f"warning: {weights} {problem}")
    assert "resuming from the older complete checkpoint (step 2)" in warning[0]
    assert leftovers(tmp_path) == ["checkpoint.broken"]
    assert same_run(tmp_path, reference)


@pytest.mark.parametrize("damage", ["truncated trainer.pt", "truncated weights", "no marker"])
def test_a_damaged_only_checkpoint_is_one_error_line(tmp_path, capsys, damage):
    path = tmp_path / "c.yaml"
    run = tmp_path / "run"
    cfg = {"model": TINY["kl"], "out": str(run), "log_every": 1, "ckpt_every": 1,
           "eval_images": 4, "optim": {"steps": 2, "batch_size": 2, "warmup": 1}}  # fmt: skip
    path.write_text(yaml.safe_dump(cfg))
    args = ["train", "tokenizer", "--config", str(path), "--no-progress"]
    assert main(args) == 0
    ckpt = run / "checkpoint"
    name = "model.safetensors" if damage == "truncated weights" else "trainer.pt"
    if damage == "no marker":  # a checkpoint written before complete.json: read to tell
        (ckpt / "complete.json").unlink()
    (ckpt / name).write_bytes((ckpt / name).read_bytes()[:-50])
    capsys.readouterr()
    assert main([*args, "--steps", "3"]) == 2
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith(f"error: {ckpt / name} is ")
    assert out[0].endswith(f"delete {ckpt} to train from scratch")
    assert ckpt.is_dir()  # never deleted on our own


def test_load_checkpoint_names_a_truncated_file(tmp_path):
    folder = save_checkpoint(tmp_path / "c", linear(1.0), {"model": "m"}, {"step": 1})
    (folder / "complete.json").unlink()
    (folder / "trainer.pt").write_bytes((folder / "trainer.pt").read_bytes()[:-20])
    with pytest.raises(CheckpointError, match=r"trainer\.pt is unreadable \(truncated or damaged"):
        load_checkpoint(folder, linear(0.0))


# -- signals and time-based checkpoints -----------------------------------------------------------
class SignalledTask(TinyTask):
    """Sends itself ``signals`` while building the first batch of step ``at`` (1-based)."""

    def __init__(self, at: int, *signals: int) -> None:
        super().__init__()
        self.first, self.signals = (at - 1) * BATCH, signals

    def batch(self, indices):
        if indices[0] == self.first:
            for signum in self.signals:
                os.kill(os.getpid(), signum)
                time.sleep(0.01)  # its handler runs before the next one is sent
        return super().batch(indices)


def test_sigterm_finishes_the_step_saves_and_a_resumed_run_continues(tmp_path, reference):
    handler = signal.getsignal(signal.SIGTERM)
    with pytest.raises(TrainingInterrupted) as stop:
        train(tmp_path, 6, SignalledTask(3, signal.SIGTERM), ckpt_every=100)
    assert stop.value.exit_code == 143 and stop.value.step == 3
    assert signal.getsignal(signal.SIGTERM) is handler  # put back
    assert torch.load(tmp_path / "checkpoint" / "trainer.pt", weights_only=True)["step"] == 3
    assert [r["step"] for r in metrics(tmp_path)] == [1, 2, 3]
    assert train(tmp_path, 6)["resumed_from"] == 3
    assert same_run(tmp_path, reference)


def test_a_second_ctrl_c_stops_at_once_and_keeps_the_last_checkpoint(tmp_path):
    with pytest.raises(KeyboardInterrupt) as stop:
        train(tmp_path, 6, SignalledTask(3, signal.SIGINT, signal.SIGINT))
    assert not isinstance(stop.value, TrainingInterrupted)
    assert torch.load(tmp_path / "checkpoint" / "trainer.pt", weights_only=True)["step"] == 2


def test_ckpt_minutes_saves_between_ckpt_every_steps(tmp_path, monkeypatch):
    now = {"t": 0.0}
    monkeypatch.setattr("kineflow.train.stop.time", SimpleNamespace(monotonic=lambda: now["t"]))
    clock = CheckpointClock(2.0)
    now["t"] = 119.0
    assert not clock.due()
    now["t"] = 120.0
    assert clock.due()
    clock.reset()
    assert not clock.due() and not CheckpointClock(None).due()

    saved = []

    def on_step(done: int) -> None:  # runs after the step's checkpoint; each step "takes" 1 min
        marker = tmp_path / "checkpoint" / "complete.json"
        saved.append(json.loads(marker.read_text())["step"] if marker.is_file() else None)
        now["t"] += 60.0

    train(tmp_path, 5, ckpt_every=100, ckpt_minutes=1.5, on_step=on_step)
    # The clock is read at the end of each step: 0, 1, 2 (due: save, restart), 1 minute(s),
    # then step 5 is the last.
    assert saved == [None, None, 3, 3, 5]


def test_cli_ctrl_c_saves_a_checkpoint_and_the_run_continues(tmp_path, capsys):
    run = tmp_path / "run"
    cfg = {"model": TINY["kl"], "out": str(run), "log_every": 1, "ckpt_every": 100000,
           "eval_images": 4, "optim": {"steps": 100000, "batch_size": 2, "warmup": 1}}  # fmt: skip
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "kineflow", "train", "tokenizer", "--config", str(path),
           "--no-progress"]  # fmt: skip
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not (run / "metrics.jsonl").is_file() or not (run / "metrics.jsonl").read_text():
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, stdout + stderr
    assert "Traceback" not in stdout + stderr
    lines = stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("stopped by SIGINT at step "), stdout
    step = int(lines[0].split("at step ")[1].split(";")[0])
    assert f"checkpoint saved in {run / 'checkpoint'}" in lines[0]
    assert json.loads((run / "checkpoint" / "complete.json").read_text())["step"] == step
    assert metrics(run)[-1]["step"] == step
    assert main(["train", "tokenizer", "--config", str(path), "--no-progress",
                 "--steps", str(step + 2)]) == 0  # fmt: skip
    report = json.loads(capsys.readouterr().out)
    assert report["resumed_from"] == step
    assert [r["step"] for r in metrics(run)] == list(range(1, step + 3))


# -- one writer per run folder --------------------------------------------------------------------
def test_a_second_run_on_a_held_folder_is_refused_naming_the_holder(tmp_path):
    run = tmp_path / "run"
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"model": TINY["kl"], "out": str(run)}))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "kineflow", "train", "tokenizer", "--config", str(path)]
    with hold_run_folder(run):
        with hold_run_folder(run):  # re-entrant: the trainer holds it, then the loop again
            pass
        proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True,
                              timeout=120)  # fmt: skip
    assert proc.returncode == 2, proc.stdout + proc.stderr
    holder = f"pid {os.getpid()} on host {socket.gethostname()} (started "
    assert proc.stdout.startswith(f"error: {run} is in use by {holder}"), proc.stdout
    assert len(proc.stdout.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    assert not (run / "metrics.jsonl").exists()
    with hold_run_folder(run):  # released when the holder let go
        pass


def test_the_lock_dies_with_its_process(tmp_path):
    hold = (
        "import fcntl, os, sys, time\n"
        "fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX)\n"
        "print('held', flush=True)\n"
        "time.sleep(600)\n"
    )
    holder = subprocess.Popen([sys.executable, "-c", hold, str(tmp_path / ".lock")],
                              stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        busy = f"{tmp_path} is in use by another process"
        with pytest.raises(RunFolderInUseError, match=busy), hold_run_folder(tmp_path):
            pass
    finally:
        holder.kill()  # SIGKILL: no clean-up of its own
        holder.wait()
    with hold_run_folder(tmp_path):
        pass
