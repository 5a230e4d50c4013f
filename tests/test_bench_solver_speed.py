"""The solver speed benchmark compares like with like: its naive reference step has the same
rates and the same next-state law as kineflow's step, and its command line produces the
promised JSON. No timing is asserted."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import torch
from conftest import bench_script

from kineflow.flow import EulerSolver, MetricPath

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "solver_speed.py"


@pytest.fixture(scope="module")
def bench() -> Iterator[ModuleType]:
    with bench_script("solver_speed") as module:
        yield module


def _tiny_problem(V: int = 64, D: int = 8) -> tuple[torch.Tensor, MetricPath]:
    E = torch.randn(V, D, generator=torch.Generator().manual_seed(0))
    return E, MetricPath.from_embeddings(E)


@pytest.mark.parametrize("t", [0.1, 0.5, 0.9])
def test_reference_rates_equal_kineflow_velocity(bench: ModuleType, t: float) -> None:
    V, B, N = 64, 2, 16
    E, path = _tiny_problem(V)
    g = torch.Generator().manual_seed(1)
    x_t = torch.randint(V, (B, N), generator=g)
    x1 = torch.randint(V, (B, N), generator=g)
    x1[:, :3] = x_t[:, :3]  # absorbed positions: no rate at all

    ref = bench.reference_rates(x_t, x1, E, t)
    ours = path.velocity(x_t, x1, t).scatter(-1, x_t.unsqueeze(-1), 0.0)

    assert ref.shape == (B, N, V)
    assert (ref >= 0).all()
    assert (ref.gather(-1, x_t.unsqueeze(-1)) == 0).all()
    assert ref[:, :3].abs().max() < 1e-6
    # Row-wise relative error: d(x_t, x1) − d(x, x1) cancels for near-ties, entries do not.
    scale = ours.abs().amax(-1, keepdim=True).clamp_min(1e-30)
    assert ((ref - ours).abs() / scale).max() < 1e-4


def _exact_next_law(
    path: MetricPath, logits: torch.Tensor, x_t: int, t: float, h: float
) -> torch.Tensor:
    """Float64[V]: law of the Euler step's next state from x_t, with x_1 ~ softmax(logits)."""
    V = logits.numel()
    targets = torch.arange(V)
    here = torch.full((V,), x_t)
    rates = path.velocity(here, targets, t).double()
    rates = rates.scatter(-1, here.unsqueeze(-1), 0.0)  # [x_1, next state]
    total = rates.sum(-1, keepdim=True)
    p_jump = -torch.expm1(-h * total)
    move = torch.where(total > 0, rates / total.clamp_min(1e-300), torch.zeros_like(rates))
    stay = torch.zeros(V, V, dtype=torch.float64)
    stay[:, x_t] = 1.0
    kernel = p_jump * move + (1 - p_jump) * stay
    return torch.softmax(logits.double(), -1) @ kernel


@pytest.mark.parametrize("h", [0.05, 1e3])
def test_reference_and_kineflow_steps_have_the_same_law(bench: ModuleType, h: float) -> None:
    """Many copies of a few (x_t, logits) positions: both steps' empirical next-state laws are
    within a TV of 0.03 of the exact law (h = 1e3: every position with a rate jumps)."""
    V, copies, t = 64, 50000, 0.5
    E, path = _tiny_problem(V)
    g = torch.Generator().manual_seed(2)
    starts = torch.tensor([3, 17, 40, 63])
    rows = 2.0 * torch.randn(starts.numel(), V, generator=g)
    logits = rows[:, None, :].expand(-1, copies, -1).contiguous()
    x_t = starts[:, None].expand(-1, copies).contiguous()

    ref_next = bench.reference_step(logits, x_t.clone(), E, t, h, generator=g)
    solver = EulerSolver(path, rate="euler")
    positions = torch.ones_like(x_t, dtype=torch.bool).nonzero(as_tuple=True)
    ours_next = bench.kineflow_step(
        solver, path, logits, x_t.clone(), positions, torch.tensor(t), torch.tensor(t + h), g
    )

    for k, start in enumerate(starts.tolist()):
        exact = _exact_next_law(path, rows[k], start, t, h)
        for name, sample in (("reference", ref_next[k]), ("kineflow", ours_next[k])):
            empirical = torch.bincount(sample, minlength=V).double() / copies
            tv = 0.5 * float((empirical - exact).abs().sum())
            assert tv < 0.03, f"{name} from x_t={start}: TV {tv:.4f} to the exact law"


@pytest.mark.slow  # the benchmark script end to end; the law tests above are the fast check
def test_command_line_prints_the_promised_json() -> None:
    cmd = [
        sys.executable,
        str(SCRIPT),
        "--quick",
        "--repeats",
        "1",
        "--sizes",
        "image=1,64,512,8",
        "--sizes",
        "text=1,32,1024,64",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout)

    assert report["device"] in ("cpu", "cuda")
    assert report["torch"] == torch.__version__
    assert report["threads"] >= 1
    assert set(report["cases"]) == {"image", "text"}
    for name, sizes in (("image", (1, 64, 512, 8)), ("text", (1, 32, 1024, 64))):
        case = report["cases"][name]
        assert (case["B"], case["N"], case["V"], case["D"]) == sizes
        assert case["t"] == 0.5
        for impl in ("reference", "kineflow_euler", "kineflow_integrated"):
            assert case[impl]["step_s"] > 0
            # A tiny step may fit in memory that is already resident: 0 is a valid peak.
            assert case[impl]["peak_step_mib"] >= 0
        assert case["speedup"] > 0
        assert case["memory_ratio"] is None or case["memory_ratio"] > 0
        assert 0 <= case["rates_max_rel_err"] < 1e-4
