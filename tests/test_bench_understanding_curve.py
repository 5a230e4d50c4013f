"""bench/understanding_curve.py trains both runs, exports the asked steps and scores each."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # two 4-step training runs and four small VQA evaluations (~10 s)
def test_curve_has_every_run_and_checkpoint(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(REPO / "bench" / "understanding_curve.py"), "--out",
           str(tmp_path), "--steps", "4", "--checkpoints", "2", "--vqa", "6",
           "--text-t-max", "0.45"]  # fmt: skip
    done = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    assert report["checkpoints"] == [2, 4]  # the last step is always measured
    assert json.loads((tmp_path / "curve.json").read_text()) == report
    for run in ("unified", "understanding_only"):
        for step in ("2", "4"):
            r = report["curves"][run][step]
            assert r["n"] == 6 and 0 <= r["accuracy"] <= 1
            low, high = r["accuracy_ci"]
            assert low <= r["accuracy"] <= high
            assert "examples" not in r and "rows" not in r
        assert (tmp_path / run / "model_step4" / "model.safetensors").is_file()
    assert report["ratios"] == {"unified": 0.5, "understanding_only": 1.0}
    config = (tmp_path / "unified.yaml").read_text()
    assert "text_t_max: 0.45" in config  # the runs train answers at t <= 0.45 only
