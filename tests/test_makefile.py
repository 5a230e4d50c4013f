"""The Makefile's targets set themselves up, and the main job installs only what it needs.

``make -n`` prints the commands a target would run (into a virtualenv that does not exist
yet) without running them.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")


def planned(target: str, tmp_path: Path) -> str:
    result = subprocess.run(
        ["make", "-n", target, f"VENV={tmp_path / 'venv'}"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    )  # fmt: skip
    return result.stdout


@pytest.mark.parametrize("target", ["demo", "demo-flow", "reproduce", "bench"])
def test_main_jobs_install_kineflow_without_the_test_references(
    target: str, tmp_path: Path
) -> None:
    commands = planned(target, tmp_path)
    assert "torch==2.13.0" in commands
    assert "-e ." in commands
    assert "[dev]" not in commands


@pytest.mark.parametrize("target", ["test", "lint"])
def test_test_targets_add_the_dev_extras(target: str, tmp_path: Path) -> None:
    commands = planned(target, tmp_path)
    assert "-e '.[dev]'" in commands
    # Every install is constrained to the pinned CPU torch, the extras included.
    for line in commands.splitlines():
        if "pip install" in line and "--upgrade pip" not in line:
            assert "-c " in line, line
