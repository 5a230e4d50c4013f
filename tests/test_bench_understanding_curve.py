"""bench/understanding_curve.py trains both runs, exports the asked steps and scores each."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import bench_script

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
    assert report["overrides"] == {
        "unified": {},
        "understanding_only": {"data.understanding_ratio": 1.0},
    }
    config = (tmp_path / "unified.yaml").read_text()
    assert "text_t_max: 0.45" in config  # the runs train answers at t <= 0.45 only


@pytest.mark.slow  # one 2-step UniFluid run at the shipped size and one small VQA evaluation
def test_curve_of_a_unifluid_config(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    variant = "und:data.understanding_ratio=1.0,data.edit_ratio=0.0,model.text_loss_weight=1.0"
    cmd = [sys.executable, str(REPO / "bench" / "understanding_curve.py"), "--out",
           str(tmp_path), "--config", str(REPO / "configs" / "unifluid_shapes.yaml"),
           "--steps", "2", "--checkpoints", "1", "--vqa", "4", "--variant", variant]  # fmt: skip
    done = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    assert report["config"].endswith("unifluid_shapes.yaml") and list(report["curves"]) == ["und"]
    assert set(report["curves"]["und"]) == {"1", "2"}
    assert report["curves"]["und"]["2"]["n"] == 4
    import kineflow

    pipe = kineflow.load(tmp_path / "und" / "model_step1")
    assert pipe.supports("edit")  # a UniFluid folder, trained by `kineflow train unifluid`


@pytest.fixture
def bench():
    with bench_script("understanding_curve") as module:
        yield module


def test_variant_parses_dotted_yaml_values_and_sets_them(bench):
    name, overrides = bench.parse_variant(
        "grid:data.understanding_ratio=1.0,train_vision=true,model.vision.patch_size=16,"
        "vision=checkpoints/siglip-shapes"
    )
    assert name == "grid"
    assert overrides == {
        "data.understanding_ratio": 1.0,
        "train_vision": True,
        "model.vision.patch_size": 16,
        "vision": "checkpoints/siglip-shapes",
    }
    raw = {"data": {"understanding_ratio": 0.5, "pack": True}, "model": {"vision": {}}}
    bench.apply_overrides(raw, overrides)
    assert raw["data"] == {"understanding_ratio": 1.0, "pack": True}
    assert raw["model"]["vision"] == {"patch_size": 16} and raw["train_vision"] is True
    assert bench.parse_variant("plain:") == ("plain", {})
    import argparse

    for bad in ("no-colon", ":x=1", "v:novalue"):
        with pytest.raises(argparse.ArgumentTypeError):
            bench.parse_variant(bad)


def test_the_config_names_its_trainer():
    import yaml

    from kineflow.apps.reproduce.recipes import trainer_of

    for name, family in (("fudoki_shapes", "fudoki"), ("ar_shapes", "fudoki"),
                         ("unifluid_shapes", "unifluid")):  # fmt: skip
        path = REPO / "configs" / f"{name}.yaml"
        assert trainer_of(path, yaml.safe_load(path.read_text())) == family
