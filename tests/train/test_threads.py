"""Elastic CPU threads (``kineflow/train/threads.py``): a trainer follows the count its
scheduler writes, and keeps its threads while the file is missing or unreadable."""

from __future__ import annotations

import pytest
import torch

from kineflow.train.threads import THREADS_FILE, follow_threads, read_threads, write_threads


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_a_step_takes_the_count_the_file_names(tmp_path, restore_threads) -> None:
    path = tmp_path / "job.threads"
    seen: list[int] = []
    step = follow_threads(seen.append, path)
    torch.set_num_threads(1)
    step(1)  # no file yet: nothing changes
    assert torch.get_num_threads() == 1
    write_threads(path, 2)
    assert path.read_text() == "2" and read_threads(path) == 2
    step(2)
    assert torch.get_num_threads() == 2
    for bad in ("", "two", "0", "-3"):  # half-written or wrong: keep the threads
        path.write_text(bad)
        assert read_threads(path) is None
        step(3)
        assert torch.get_num_threads() == 2
    write_threads(path, 1)
    step(4)
    assert torch.get_num_threads() == 1 and seen == [1, 2, 3, 3, 3, 3, 4]


def test_without_a_file_to_follow_the_callback_is_unchanged(monkeypatch) -> None:
    monkeypatch.delenv(THREADS_FILE, raising=False)
    assert follow_threads(None) is None
    callback = print
    assert follow_threads(callback) is callback


def test_every_trainer_follows_the_file_its_scheduler_names(tmp_path, monkeypatch,
                                                            restore_threads) -> None:  # fmt: skip
    """``train_task`` (the FUDOKI, UniFluid, tokenizer and SigLIP trainers' entry to the loop)
    hands the loop a step callback that follows ``$KINEFLOW_THREADS_FILE``."""
    from types import SimpleNamespace

    from kineflow.train import common

    path = tmp_path / "job.threads"
    write_threads(path, 1)
    monkeypatch.setenv(THREADS_FILE, str(path))
    calls: list[int] = []

    def fake_run_training(task, optim, out, config, *, on_step, **kw):
        torch.set_num_threads(2)
        on_step(1)
        return {"threads": torch.get_num_threads()}

    monkeypatch.setattr(common, "run_training", fake_run_training)
    config = SimpleNamespace(optim=None, log_every=1, ckpt_every=1, ckpt_minutes=None,
                             to_dict=dict)  # fmt: skip
    summary = common.train_task(None, config, tmp_path, False, "x", calls.append)
    assert summary == {"threads": 1} and calls == [1]
