"""bench/relation_questions.py: relation questions only, scored with an interval."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # the shipped FUDOKI answers 8 questions in float64 (~10 s)
def test_relation_questions_only(tmp_path) -> None:
    out = tmp_path / "r.json"
    done = subprocess.run(
        [sys.executable, str(REPO / "bench" / "relation_questions.py"), "--models",
         "shipped=checkpoints/fudoki-shapes", "--questions", "8", "--out", str(out)],
        env={**os.environ, "PYTHONPATH": str(REPO)}, cwd=REPO, capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    assert report == json.loads(out.read_text()) and report["questions"] == 8
    scored = report["models"]["shipped"]
    assert scored["accuracy"] in {k / 8 for k in range(9)}
    lo, hi = scored["accuracy_ci"]
    assert lo <= scored["accuracy"] <= hi
