"""bench/shipped_scores.py: the results tables are rendered from the committed scores."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCORES = REPO / "docs" / "reproduction" / "shipped_scores.json"


def test_tables_carry_every_score_with_its_interval_and_are_in_results_md():
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, str(REPO / "bench" / "shipped_scores.py"), "--tables", str(SCORES)]
    done = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    text = done.stdout
    runs = json.loads(SCORES.read_text())["runs"]
    tables_ = text.strip().split("\n\n")
    for run in runs.values():
        name = f"`{Path(run['checkpoint']).name}`"
        # overall, strict by category, VQA by type: one row each
        rows = [line for table in tables_[:3] for line in table.splitlines()
                if line.startswith(f"| {name} |")]  # fmt: skip
        assert len(rows) == 3
        edit = run.get("edit", {})
        if "applied" in edit:  # editing by kind: all, then one row per kind
            edit_rows = [line for line in tables_[3].splitlines() if line.startswith(f"| {name} |")]
            assert len(edit_rows) == 1 + len(edit["by_kind"])
            low, high = edit["kept_ci"]
            assert f"| all | {edit['accuracy']:.3f}" in edit_rows[0]
            assert f"{edit['kept']:.3f} [{low:.2f}, {high:.2f}]" in edit_rows[0]
        t2i, vqa = run["t2i_test"], run["vqa"]
        low, high = t2i["overall_ci"]
        assert f"{t2i['overall']:.3f} [{low:.2f}, {high:.2f}]" in rows[0]
        low, high = vqa["accuracy_ci"]
        assert f"{vqa['accuracy']:.3f} [{low:.2f}, {high:.2f}]" in rows[0]
        for kind, value in vqa["by_type"].items():
            low, high = vqa["by_type_ci"][kind]
            assert f"{value:.3f} [{low:.2f}, {high:.2f}]" in rows[2]
    # docs/reproduction/results.md shows exactly these tables.
    results = (REPO / "docs" / "reproduction" / "results.md").read_text()
    assert any("applied" in run.get("edit", {}) for run in runs.values())
    for table in tables_:
        assert table in results
