"""bench/binding_reader.py trains a reader on frozen tower tokens and scores it by type."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # two tiny readers (~10 s each)
@pytest.mark.parametrize("layer", ["last", "embed"])
def test_reader_reports_a_curve_with_intervals_by_type(tmp_path, layer):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    out = tmp_path / "reader.json"
    cmd = [sys.executable, str(REPO / "bench" / "binding_reader.py"), "--layer", layer,
           "--train", "300", "--steps", "12", "--batch-size", "16", "--layers", "1",
           "--width", "32", "--out", str(out)]  # fmt: skip
    done = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    assert json.loads(out.read_text()) == report
    # The shipped tower: 48 px, 16-px patches, one token per grid cell.
    assert report["tokens"] == 9 and report["layer"] == layer
    assert list(report["curve"]) == ["2", "4", "6", "8", "10", "12"]
    for point in report["curve"].values():
        low, high = point["accuracy_ci"]
        assert 0 <= low <= point["accuracy"] <= high <= 1
        assert set(point["by_type"]) == {"colour", "count", "exist", "relation", "shape"}
