"""kineflow.train.start_weights: the record of a run's starting weights, alone (the trainers'
tests check the same refusal end to end for init_from and lora.base)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

import kineflow.train.start_weights as start_weights
from kineflow.train.start_weights import START_FILE, check_start, weights_digest


@pytest.fixture
def resumed(monkeypatch: pytest.MonkeyPatch) -> dict[str, bool]:
    """Whether ``out`` "has a checkpoint", set by the test."""
    state = {"checkpoint": False}
    monkeypatch.setattr(start_weights, "has_checkpoint", lambda folder: state["checkpoint"])
    return state


def write_weights(folder: Path, payload: bytes) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.safetensors").write_bytes(payload)
    return folder


def test_digest_is_the_files_sha256(tmp_path: Path) -> None:
    payload = bytes(range(256)) * 5000  # over one 1 MiB read
    base = write_weights(tmp_path / "base", payload)
    assert weights_digest(base) == hashlib.sha256(payload).hexdigest()


def test_fresh_run_records_and_resume_checks(tmp_path: Path, resumed: dict[str, bool]) -> None:
    base, out = write_weights(tmp_path / "base", b"first"), tmp_path / "run"
    check_start(out, "init_from", tmp_path / "empty")  # no weights there: the caller says so
    assert not (out / START_FILE).exists()
    check_start(out, "init_from", base)
    record = json.loads((out / START_FILE).read_text())
    assert record == {"init_from": {"folder": str(base), "sha256": weights_digest(base)}}
    resumed["checkpoint"] = True
    check_start(out, "init_from", base)  # unchanged: resumes
    check_start(out, "lora.base", base)  # no record for that role: resumes unchecked
    write_weights(base, b"second")
    with pytest.raises(ValueError, match=r"run: this run started from init_from .*base .* now "
                                         r"holds other weights"):  # fmt: skip
        check_start(out, "init_from", base)
    (base / "model.safetensors").unlink()  # a folder that has gone is not needed to resume
    check_start(out, "init_from", base)
    check_start(out, "init_from", None)


def test_damaged_records(tmp_path: Path, resumed: dict[str, bool]) -> None:
    base, out = write_weights(tmp_path / "base", b"w"), tmp_path / "run"
    out.mkdir()
    (out / START_FILE).write_text("not json")
    check_start(out, "init_from", base)  # a fresh run replaces it
    assert json.loads((out / START_FILE).read_text())["init_from"]["sha256"]
    resumed["checkpoint"] = True
    (out / START_FILE).write_text("not json")
    with pytest.raises(ValueError, match=r"start\.json is not valid JSON"):
        check_start(out, "init_from", base)
    (out / START_FILE).write_text(json.dumps({"init_from": {"folder": str(base)}}))
    with pytest.raises(ValueError, match=r"start\.json: 'init_from' holds no 'sha256'"):
        check_start(out, "init_from", base)
