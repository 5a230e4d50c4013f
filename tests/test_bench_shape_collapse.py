"""bench/shape_collapse.py: the picture classes by hand, the rates against a count by hand, and
the command line's JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import bench_script

REPO = Path(__file__).resolve().parents[1]
MODEL = REPO / "checkpoints" / "fudoki-shapes"


@pytest.mark.parametrize(
    ("prompt", "detected", "want"),
    [
        ("a circle and a square", "00circle-red-small;21square-blue-large", "both"),
        # Colour and relation do not matter, extra objects neither: both shapes are there.
        (
            "a red circle and a blue square",
            "00circle-cyan-small;01square-red-small;02triangle-red-small",
            "both",
        ),
        ("a circle left of a triangle", "00triangle-red-small;22circle-red-small", "both"),
        # Two or more objects, all of one named shape.
        ("a circle and a square", "00square-red-small;21square-blue-large", "collapsed"),
        (
            "a circle above a square",
            "00circle-red-small;10circle-red-small;22circle-red-large",
            "collapsed",
        ),
        # One object; an unnamed shape; all of the unnamed shape; nothing.
        ("a circle and a square", "00square-red-small", "other"),
        ("a circle and a square", "00square-red-small;11triangle-red-small", "other"),
        ("a circle and a square", "00triangle-red-small;11triangle-red-small", "other"),
        ("a circle and a square", "", "other"),
    ],
)
def test_classify(prompt: str, detected: str, want: str) -> None:
    with bench_script("shape_collapse") as bench:
        assert bench.classify(prompt, detected) == want


def test_classify_refuses_a_prompt_without_two_shapes() -> None:
    with bench_script("shape_collapse") as bench, pytest.raises(ValueError, match="two"):
        bench.classify("two circles", "00circle-red-small;11circle-red-small")


def test_prompts_name_two_shapes_and_the_rates_count_pictures() -> None:
    with bench_script("shape_collapse") as bench:
        prompts = bench.two_shape_prompts(2)
        assert {p.category for p in prompts} == {"two_object", "position", "color_attr"}
        assert all(len({r.shape for r in p.requirements}) == 2 for p in prompts)
        # Prompt a: 2 pictures (both, collapsed); prompt b: 1 picture (both, passed).
        rows = [
            {"id": "a", "prompt": "a circle and a square", "passed": False,
             "detected": "00circle-red-small;11square-red-small"},
            {"id": "a", "prompt": "a circle and a square", "passed": False,
             "detected": "00square-red-small;11square-red-small"},
            {"id": "b", "prompt": "a circle and a triangle", "passed": True,
             "detected": "00circle-red-small;11triangle-red-small"},
        ]  # fmt: skip
        got = bench.collapse_report(rows)
    assert (got["prompts"], got["pictures"]) == (2, 3)
    # Per picture (the prompts' pictures weigh as many as they are): 2/3 both, 1/3 collapsed.
    assert got["both"] == pytest.approx(2 / 3) and got["collapsed"] == pytest.approx(1 / 3)
    assert got["other"] == 0 and got["passed"] == pytest.approx(1 / 3)
    for name in ("both", "collapsed", "passed"):
        low, high = got[f"{name}_ci"]
        assert low <= got[name] <= high


def test_command_line_writes_the_json(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    out = tmp_path / "collapse.json"
    cmd = [sys.executable, str(REPO / "bench" / "shape_collapse.py"), "--models",
           f"shipped={MODEL}", "--per-category", "1", "--pictures", "1", "--steps", "2",
           "--cfg-scales", "1", "3", "--out", str(out)]  # fmt: skip
    done = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    assert json.loads(out.read_text()) == report
    rows = report["rows"]
    assert [(r["model"], r["options"]["cfg_scale"]) for r in rows] == [
        ("shipped", 1),
        ("shipped", 3),
    ]
    row = rows[0]
    assert row["pictures"] == row["prompts"] == 3 and row["options"]["steps"] == 2
    assert row["both"] + row["collapsed"] + row["other"] == pytest.approx(1)
    bad = subprocess.run([*cmd[:2], "--models", "shipped"], env=env, cwd=REPO,
                         capture_output=True, text=True, timeout=600)  # fmt: skip
    assert bad.returncode == 2 and "NAME=PATH" in bad.stderr


def test_given_one_infills_around_each_named_object() -> None:
    """``--given-one``: one row per named object of each prompt, the given object drawn where
    the model may not write (its cell's codes are the source's, so it reads back unless a
    regenerated neighbour token spills onto it)."""
    import kineflow

    pipe = kineflow.load(MODEL)
    with bench_script("shape_collapse") as bench:
        prompts = bench.two_shape_prompts(1)
        rows = bench.given_one_items(pipe, prompts, steps=2, cfg_scale=3.0)
        got = bench.collapse_report(rows)
    assert [r["id"] for r in rows] == [p.id for p in prompts for _ in range(2)]
    assert got["pictures"] == 2 * got["prompts"] == 2 * len(prompts)
    assert sum(r["kept"] for r in rows) >= len(rows) // 2
    assert all(bench.classify(r["prompt"], r["detected"]) in bench.CLASSES for r in rows)
