"""The flow-core demo, run through the CLI in-process: its files, its numbers, its errors."""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from kineflow.apps.demo import PATH_KINDS, run_demo, toy_problem
from kineflow.cli import main

STEPS, SAMPLES, SEED = 8, 8, 0
ARGS = ["--steps", str(STEPS), "--samples", str(SAMPLES), "--seed", str(SEED)]


def run_cli(out: Path) -> str:
    """Run ``kineflow demo`` into ``out``; return its stdout."""
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert main(["demo", "--out", str(out), *ARGS]) == 0
    return stdout.getvalue()


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, dict[str, Any]]:
    out = tmp_path_factory.mktemp("demo")
    stdout = run_cli(out)
    return out, stdout, json.loads((out / "summary.json").read_text())


def test_writes_files(demo: tuple[Path, str, dict[str, Any]]) -> None:
    out, _, summary = demo
    with Image.open(out / "refinement.gif") as gif:
        # One frame per grid time: x_0 and the state after each step.
        assert gif.n_frames == STEPS + 1 == summary["files"]["gif_frames"]
        assert gif.is_animated and 300 < gif.width < 1200
    with Image.open(out / "refinement_strip.png") as strip:
        strip.load()
        assert strip.width > strip.height > 3 * 16  # one row of tiles per path
    assert (out / "refinement.gif").stat().st_size < 2_000_000


def test_prints_tables(demo: tuple[Path, str, dict[str, Any]]) -> None:
    _, stdout, summary = demo
    for s in summary["paths"].values():
        assert s["label"] in stdout
    assert "exact TV" in stdout and "refinement.gif" in stdout


def test_summary_per_path(demo: tuple[Path, str, dict[str, Any]]) -> None:
    _, _, summary = demo
    assert summary["config"] == {
        "steps": STEPS,
        "seed": SEED,
        "samples": SAMPLES,
        "images": 12,
        "image_size": 16,
        "palette_colours": 64,
        "device": "cpu",
    }
    paths = summary["paths"]
    assert list(paths) == list(PATH_KINDS)
    for s in paths.values():
        assert s["nfe"] == STEPS and s["wall_time_s"] >= 0
        settled = s["settled_fraction"]
        assert len(settled) == STEPS + 1 and settled[-1] == 1.0
        assert all(0 <= f <= 1 for f in [*settled, s["self_correction_fraction"]])
        assert set(s["memorised_fraction_vs_steps"]) == {"2", "8", "32"}
    metric, uniform, masked = (paths[k] for k in ("metric", "uniform", "masked"))
    # Mask-free paths keep every token mobile and recover whole dataset images...
    assert metric["memorised_fraction"] >= 0.75 and uniform["memorised_fraction"] >= 0.75
    # ...while the masked path's independent per-pixel reveals contradict each other for good.
    assert masked["memorised_fraction"] <= 0.25
    # The masked path starts all-mask and a revealed token never moves before the last step.
    assert masked["settled_fraction"][0] == 0.0 and masked["self_correction_fraction"] == 0.0
    # FUDOKI's colour metric moves pixels through similar colours; the uniform path jumps anywhere.
    assert metric["mean_jump_colour_distance"] < uniform["mean_jump_colour_distance"] - 0.3
    assert metric["mean_jumps_per_token"] > 1.5 > uniform["mean_jumps_per_token"]


def test_summary_toy_total_variation(demo: tuple[Path, str, dict[str, Any]]) -> None:
    _, _, summary = demo
    tv = summary["toy_tv"]
    assert set(tv["tv"]) == set(PATH_KINDS)
    # One step draws each pixel independently from its marginal: TV(q, product of marginals).
    support, weights, _ = toy_problem()
    joint = torch.zeros(4, 4).index_put_((support[:, 0], support[:, 1]), weights)
    product = joint.sum(1)[:, None] * joint.sum(0)[None, :]
    one_step = 0.5 * float((joint - product).abs().sum())
    steps = tv["step_counts"]
    for kind, by_rate in tv["tv"].items():
        assert set(by_rate) == {"integrated", "euler"}
        for values in by_rate.values():
            assert len(values) == len(steps) and all(0 <= v <= 1 for v in values)
            assert values[0] == pytest.approx(one_step, abs=1e-4)
        # With the integrated clock increment the solver converges to the target.
        tail = by_rate["integrated"][steps.index(8) :]
        assert all(a > b for a, b in itertools.pairwise(tail)), kind
        assert tail[-1] < 0.05, kind


def test_deterministic(demo: tuple[Path, str, dict[str, Any]], tmp_path: Path) -> None:
    out, _, summary = demo
    run_cli(tmp_path)
    again = json.loads((tmp_path / "summary.json").read_text())

    def strip_times(s: dict[str, Any]) -> dict[str, Any]:
        s = json.loads(json.dumps(s))
        s.pop("total_wall_time_s")
        for p in s["paths"].values():
            p.pop("wall_time_s")
        return s

    assert strip_times(again) == strip_times(summary)
    assert (tmp_path / "refinement.gif").read_bytes() == (out / "refinement.gif").read_bytes()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["demo", "--steps", "0"], "argument --steps: must be between 1 and 256, got 0"),
        (["demo", "--steps", "ten"], "argument --steps: expected an integer, got 'ten'"),
        (["demo", "--samples", "-3"], "argument --samples: must be between 1 and 256"),
        (["demo", "--images", "0"], "argument --images: must be between 1 and 64"),
        (["demo", "--seed", "-1"], "argument --seed: must be between 0 and"),
        (["demo", "--bogus"], "unrecognized arguments: --bogus"),
        (["fly"], "argument command: invalid choice: 'fly'"),
        (["train"], "the following arguments are required: subcommand"),
        (["data", "shapes"], "the following arguments are required: --out"),
        ([], "the following arguments are required: command"),
    ],
)
def test_bad_arguments(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_out_must_be_a_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "file.txt"
    blocker.write_text("not a folder")
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--out", str(blocker)])
    assert exit_info.value.code == 2
    assert "argument --out:" in capsys.readouterr().err


def test_run_demo_rejects_bad_values(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="steps must be a positive integer"):
        run_demo(tmp_path, steps=0)


def test_python_dash_m_entry_point() -> None:
    # An argument error exits before any work, so this checks the wiring of __main__ cheaply.
    proc = subprocess.run(
        [sys.executable, "-m", "kineflow", "demo", "--steps", "0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "usage: kineflow demo" in proc.stderr and "--steps" in proc.stderr


def test_plain_euler_converges_or_stalls_by_problem_as_the_readme_says(
    demo: tuple[Path, str, dict[str, Any]],
) -> None:
    """README ("What differs from the official FUDOKI solver"): plain Euler's error may stop
    falling (uniform path on the demo's toy), or converge (metric path on the same toy), while
    the integrated clock converges on both."""
    _, _, summary = demo
    tv = summary["toy_tv"]
    at = tv["step_counts"].index
    uniform, metric = tv["tv"]["uniform"], tv["tv"]["metric"]
    # Uniform path: Euler barely moves from 32 to 64 steps and stays far from the target.
    assert uniform["euler"][at(64)] > 0.1
    assert uniform["euler"][at(64)] > 0.9 * uniform["euler"][at(32)]
    assert uniform["integrated"][at(64)] < 0.25 * uniform["euler"][at(64)]
    # Metric path: Euler converges (about halves per doubling) and is ahead at 64 steps.
    assert metric["euler"][at(64)] < 0.25 * metric["euler"][at(16)]
    assert metric["euler"][at(64)] < metric["integrated"][at(64)]
