"""bench/relation_curriculum.py: ideal cell tokens, both arms, curves with intervals."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from kineflow.data.shapes import ShapesWorld
from kineflow.data.shapes.scene import COLOURS, SHAPES, SIZES, Obj, Scene

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
from relation_curriculum import cell_tokens, draw, worded  # noqa: E402


def test_cell_tokens_are_the_one_hot_truth_of_each_cell() -> None:
    scene = Scene((Obj(0, 2, "square", "blue", "small"), Obj(2, 1, "circle", "red", "large")))
    x = cell_tokens(scene)
    assert x.shape == (9, 1 + len(COLOURS) + len(SHAPES) + len(SIZES))
    assert x[[0, 1, 3, 4, 5, 6, 8]].sum() == 0  # empty cells
    names = ["occupied", *COLOURS, *SHAPES, *SIZES]
    assert [names[i] for i in np.flatnonzero(x[2])] == ["occupied", "blue", "square", "small"]
    assert [names[i] for i in np.flatnonzero(x[7])] == ["occupied", "red", "circle", "large"]


def test_draw_mixes_in_position_questions_at_the_share() -> None:
    _, qas = draw(ShapesWorld(), "train", 400, "relation", 0.5, seed=0)
    kinds = [qa.type for qa in qas]
    assert set(kinds) == {"relation", "position"}
    assert 0.4 < kinds.count("position") / len(kinds) < 0.6
    _, only = draw(ShapesWorld(), "test", 50, "position", 0.0, seed=1)
    assert {qa.type for qa in only} == {"position"}


def test_worded_answers_name_rows_and_columns_like_relation_answers() -> None:
    from kineflow.data.shapes.language import QA

    assert worded(QA("what row is the circle in?", "one", "position")).answer == "top"
    assert worded(QA("what column is the red square in?", "three", "position")).answer == "right"
    _, qas = draw(ShapesWorld(), "test", 40, "position", 0.0, seed=2, answers="words")
    assert {qa.answer for qa in qas} <= {"top", "middle", "bottom", "left", "center", "right"}


@pytest.mark.slow  # two tiny readers (~10 s)
def test_report_has_both_arms_with_curves_and_intervals(tmp_path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    out = tmp_path / "curriculum.json"
    cmd = [sys.executable, str(REPO / "bench" / "relation_curriculum.py"), "--steps", "30",
           "--batch-size", "8", "--layers", "1", "--width", "16", "--out", str(out)]  # fmt: skip
    done = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    assert json.loads(out.read_text()) == report
    assert 0.3 < report["relation_chance"] < 0.6  # "yes" is the most common answer
    arms = report["arms"]
    assert list(arms) == ["relation", "relation+position"]
    assert arms["relation"]["train_position_questions"] == 0
    assert arms["relation+position"]["train_position_questions"] > 60  # of 240
    for arm in arms.values():
        assert arm["train_position_questions"] + arm["train_relation_questions"] == 30 * 8
        assert list(arm["curve"]) == [str(s) for s in range(3, 31, 3)]
        for point in arm["curve"].values():
            for kind in ("relation", "position"):
                low, high = point[kind]["accuracy_ci"]
                assert 0 <= low <= point[kind]["accuracy"] <= high <= 1


def test_bad_share_is_one_line() -> None:
    cmd = [sys.executable, str(REPO / "bench" / "relation_curriculum.py"), "--position-share", "1"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "--position-share must be in (0, 1)" in done.stderr
