"""bench/guidance_sweep.py: a setting's scores are the benchmark's own for the same options, and
its command line writes the promised JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import bench_script

import kineflow
from kineflow.data.shapes.prompts import prompt_set
from kineflow.eval.benchmark import evaluate_model, summary

REPO = Path(__file__).resolve().parents[1]
MODEL = REPO / "checkpoints" / "fudoki-shapes"


def test_a_setting_scores_as_the_benchmark_does() -> None:
    """The oracle is :func:`evaluate_model` with the same prompts, pictures, seed and options."""
    pipe = kineflow.load(MODEL)
    options = {"cfg_scale": 3.0, "steps": 4}
    report = evaluate_model(pipe, images_per_prompt=2, max_prompts_per_category=2, vqa_items=0,
                            caption_items=0, progress=False, **options)  # fmt: skip
    want = summary(report)["t2i_test"]
    with bench_script("guidance_sweep") as bench:
        got = bench.sweep_setting(pipe, prompt_set("test", max_per_category=2, seed=0), 2,
                                  options)  # fmt: skip
    assert got["options"] == options
    assert got["overall"] == pytest.approx(want["overall"])
    assert got["strict"] == pytest.approx(want["strict"])
    assert got["by_category"] == pytest.approx(want["by_category"])
    assert got["overall_ci"] == pytest.approx(want["overall_ci"])


def test_command_line_writes_the_json(tmp_path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    out = tmp_path / "sweep.json"
    grid = '[{"cfg_scale": 1.0, "steps": 2}, {"cfg_scale": 3.0, "steps": 2}]'
    cmd = [sys.executable, str(REPO / "bench" / "guidance_sweep.py"), "--model", str(MODEL),
           "--grid", grid, "--prompts", "1", "--pictures", "1", "--threads", "1",
           "--items", "--out", str(out)]  # fmt: skip
    done = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    assert json.loads(out.read_text()) == report
    assert [s["options"]["cfg_scale"] for s in report["settings"]] == [1.0, 3.0]
    for s in report["settings"]:
        assert 0 <= s["strict"] <= s["overall"] <= 1  # strict passes are GenEval-style passes
        low, high = s["strict_ci"]
        assert low <= s["strict"] <= high
        # --items: one row per picture (one prompt per category here, so the overall score is
        # the mean of the rows' passes), each with the scene the detector read back.
        rows = s["items"]
        assert len(rows) == s["n"] == len({r["category"] for r in rows})
        assert s["overall"] == pytest.approx(sum(r["passed"] for r in rows) / len(rows))
        assert s["strict"] == pytest.approx(sum(r["strict"] for r in rows) / len(rows))
        assert all(r["passed"] == (not r["failures"]) for r in rows)
    bad = subprocess.run([*cmd[:2], "--grid", "{}"], env=env, cwd=REPO, capture_output=True,
                         text=True, timeout=600)  # fmt: skip
    assert bad.returncode == 2 and "--grid wants a JSON list" in bad.stderr
