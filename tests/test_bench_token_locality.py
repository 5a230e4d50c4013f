"""bench/token_locality.py: which tokens overlap a grid cell, and the report's shape."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import bench_script

REPO = Path(__file__).resolve().parents[1]


def test_one_patch_per_cell_when_the_grid_lines_up():
    with bench_script("token_locality") as bench:
        overlapping = bench.overlapping_tokens
    # 48 px in 16-px patches: cell k is token k (both in reading order).
    assert [overlapping(k, 48, 16) for k in range(9)] == [[k] for k in range(9)]
    # 32 px in 8-px patches: cells are 0-11, 11-21, 21-32 px, so every cell spans 2 x 2
    # patches and neighbouring cells share a row or column of them.
    assert overlapping(0, 32, 8) == [0, 1, 4, 5]
    assert overlapping(4, 32, 8) == [5, 6, 9, 10]
    assert overlapping(8, 32, 8) == [10, 11, 14, 15]


@pytest.mark.slow  # features of 60 scenes and 60 small probe fits (~20 s)
def test_report_has_every_depth_and_target(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(REPO / "bench" / "token_locality.py"), "--train", "40",
           "--test", "20"]  # fmt: skip
    done = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    assert report["tokens"] == 9 and report["cells"] == [0, 4, 8]
    assert list(report["accuracy"]) == ["embeddings", "block 1", "block 2", "block 3", "aligner"]
    for row in report["accuracy"].values():
        assert set(row) == {"colour_local", "colour_remote", "shape_local", "shape_remote",
                            "own_cell_occupied", "own_cell_empty"}  # fmt: skip
        assert all(0 <= v <= 1 for v in row.values())
