"""bench/thread_determinism.py runs (one prompt per category) and prints one JSON object."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # two fresh processes sample 12 pictures each in float64 (~20 s)
def test_one_and_two_threads_draw_the_same_pictures() -> None:
    done = subprocess.run(
        [sys.executable, str(REPO / "bench" / "thread_determinism.py"), "--threads", "1", "2",
         "--runs", "1", "--prompts-per-category", "1"],
        env={**os.environ, "PYTHONPATH": str(REPO)}, cwd=REPO, capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    assert [r["threads"] for r in report["runs"]] == [1, 2]
    assert all(r["pictures"] == 12 and len(r["sha256"]) == 64 for r in report["runs"])
    assert report["all_identical"] and report["runs"][1]["same_as_first"]
