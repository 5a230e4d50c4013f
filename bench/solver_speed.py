"""Speed and peak memory of one Euler step of kineflow's solver against a naive reference.

What is measured
----------------
The *solver's own work* for one Euler step of FUDOKI's metric path, the model excluded: given
fixed logits Float[B, N, V] and a state x_t Long[B, N], one step samples x_1 from the logits,
computes the kinetic-optimal jump rates, the jump probabilities and the new states. The model
is excluded simply by feeding precomputed logits.

* ``kineflow_euler`` / ``kineflow_integrated``: exactly what :class:`EulerSolver` does per step
  for one modality, ``EulerSolver(path, rate)._advance(...)`` with the region = all positions
  and ``path = MetricPath.from_embeddings(E)`` (exponent 4, a = 0.9, c = 3). ``rate="euler"``
  (clock increment ``h·β̇_t``) computes the same step as the reference and is the one the
  ``speedup`` and ``memory_ratio`` compare against; ``rate="integrated"`` (kineflow's default,
  increment ``β_{t+h} − β_t``) is reported alongside. Both use the *compact* strategy, the
  CPU default.
* ``kineflow_static_euler`` / ``kineflow_static_integrated``: the same steps with the
  fixed-shape strategy and the exponential-race sampler (:mod:`kineflow.flow.static_step`),
  the CUDA default: no host reads, one chunk unless memory asks for more.
  ``speedup_static_euler`` / ``speedup_static_integrated`` compare them with the reference.
* ``reference``: :func:`reference_step`, a straightforward implementation that does the math
  the way the official FUDOKI solver does it: softmax over the full [B, N, V] and
  ``torch.multinomial`` over all B·N rows for x_1; the whole embedding table re-normalised by
  ``F.normalize`` on every distance call; the full [B·N, V] distance matrix
  ``(‖z‖² + ‖e‖² − 2 z·e)²`` built by einsum twice (once for ``p_t = softmax(−β_t d)``, once
  for the rate); ``d(x_t, x_1)`` per row; ``u = p_t · β̇_t · relu(d(x_t, x_1) − d(·, x_1))``;
  the diagonal zeroed through an int64 ``F.one_hot(x_t, V)`` and ``torch.where``;
  ``1 − exp(−h·Σu)`` jump probabilities; ``torch.multinomial`` over the jumping rows of u.

Both see the same logits and the same x_t; t = 0.5 (mid-trajectory), h = 1/50 is the headline
step, t = 0.1 and 0.9 are timed too (``--extra-times``).

Inputs
------
* ``image``: V = 16384, D = 8, N = 576, B = 8. Embeddings: a random VQ-codebook-like table,
  i.i.d. N(0, 1) entries [V, 8] (typical cosine between codes ~0 ± 0.35, as for a small D).
* ``text``: V = 102400, D = 2048, N = 128, B = 4. Embeddings: anisotropic like LM input
  embeddings, ``e_v = √0.2·m + √0.35·Σ_k s_k g_vk w_k + √0.45·n_v/√D`` with one shared mean
  direction m, a rank-64 component (orthonormal w_k, spectrum s_k ∝ k^(−1/2) normalised to
  Σ s_k² = 1, g ~ N(0, 1)) and isotropic noise n ~ N(0, I). The mean direction alone gives a
  cosine of ~0.2 between random tokens; the measured mean ± std is reported under ``inputs``.
* Logits (both cases): model-like, not white noise: N(0, 1) noise over the whole vocabulary
  plus a bonus on K = 8 plausible tokens per position, decreasing by 1 nat per rank, with a
  per-position confidence ``log V + 2.5 + 1.5·N(0, 1)`` for the top one, so the predictive
  distribution has moderate entropy (~2 nats; measured value reported). Predicted targets
  partly repeat like backgrounds: half of the image positions take their plausible set from
  one of 4 per-image "background" sets (+2 confidence), a quarter of the text positions from
  a global pool of 8 "frequent token" sets.
* x_t: a sample of the path at t, ``x_t ~ p_t(·|x̂_1)`` with x̂_1 one draw from the logits
  (a realistic mid-trajectory state: near its target at large t, spread out at small t).

Timing
------
Wall-clock time of one step, median over ``--repeats`` calls (default 3 for image, 2 for text)
after one warm-up call, ``torch.set_num_threads`` left at its default (reported). The input
state is cloned before the clock starts; on CUDA the device is synchronised around each call.
``minor_page_faults_per_step_by_t`` (median, from ``ru_minflt``) is reported because on CPU every
large temporary is a fresh ``mmap`` whose pages fault in on first touch, which is a large
part of both implementations' time. The 1-minute load average at start and end is reported
too: timings are only comparable when nothing else ran on the machine.

Peak memory
-----------
On CPU, torch's allocations are invisible to tracemalloc, so every (implementation, case) runs
in a fresh subprocess (this script re-invoked with the hidden ``--worker`` flag) that loads the
inputs, warms the libraries up on a tiny problem, and then measures the first full-size step:
``peak_step_mib = max(0, maxrss_after − rss_before)``, where ``rss_before`` is the resident
set size read from ``/proc/self/statm`` just before the step (inputs built) and
``maxrss_after`` the process's resident high-water mark after it. The high-water mark is
first reset to the current RSS through ``/proc/self/clear_refs`` (Linux ≥ 4.0) so that
transient memory used while loading the inputs cannot mask the step's peak, and it is read as
``VmHWM`` from ``/proc/self/status``, not as ``resource.getrusage().ru_maxrss``: on Linux,
``ru_maxrss`` of an exec'd child starts at the high-water mark of the process that spawned it
(the kernel carries the old address space's peak into ``signal->maxrss`` at exec, and
``clear_refs`` does not reset that), so every worker of this script would report at least the
parent's peak, several GiB after building the text inputs. ``ru_maxrss`` (KiB on Linux) is the
fallback where ``/proc/self/status`` is missing; where the reset is refused too, the number is
an upper bound unless the step set a new high-water mark (``peak_exact`` says which). Freed
heap memory is returned to the OS with ``malloc_trim`` first so the step cannot hide in
already-resident free memory. On CUDA the peak is ``torch.cuda.max_memory_allocated()`` (reset
before the step) minus the memory allocated before it.

Correctness cross-check
-----------------------
For 64 rows and the same sampled x_1, the reference's rate rows u (before sampling) are
compared with the off-diagonal entries of kineflow's ``path.velocity(x_t, x_1, t)``.
``rates_max_rel_err`` is the largest row-wise ``max|u_ref − u_kf| / max|u_kf|`` (elementwise
relative errors are meaningless where ``d(x_t, x_1) − d(x, x_1)`` cancels); it should be
~1e-5 or below (float32). ``jump_fraction_by_t`` per implementation shows the two steps also move
the same share of positions at full size.

Sampler
-------
``sampler`` compares, in the parent process, ``torch.multinomial`` (the reference's sampler)
with kineflow's inverse-CDF :func:`~kineflow.flow.sampling.categorical` for the x_1 draw of up
to 1024 rows of the case's logits: median of 3 calls each, after one warm-up call.

Usage: ``python bench/solver_speed.py [--quick] [--cases image,text] [--repeats N]``. One JSON
object goes to stdout, progress to stderr.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import Tensor

from kineflow.flow import EulerSolver, MetricPath
from kineflow.flow.sampling import categorical, sample_logits

# bench/ holds scripts, not a package: make the shared helpers importable however we are run.
sys.path.insert(0, str(Path(__file__).resolve().parent))
from memory import (
    high_water_bytes,
    release_free_memory,
    reset_high_water_mark,
    rss_bytes,
)
from reference_step import EXPONENT, A, C, reference_rates, reference_step
from solver_inputs import CASES, CaseSpec, build_inputs

IMPLEMENTATIONS = (
    "reference",
    "kineflow_euler",
    "kineflow_integrated",
    "kineflow_static_euler",
    "kineflow_static_integrated",
)
STEP_H = 1.0 / 50
HEADLINE_T = 0.5
CHECK_ROWS = 64
MIB = float(1 << 20)


def log(message: str) -> None:
    print(f"[solver_speed] {message}", file=sys.stderr, flush=True)


# -- kineflow's step ----------------------------------------------------------------------------
def kineflow_step(
    solver: EulerSolver,
    path: MetricPath,
    logits: Tensor,
    x_t: Tensor,
    positions: tuple[Tensor, Tensor],
    t: Tensor,
    t_next: Tensor,
    generator: torch.Generator | None = None,
) -> Tensor:
    """What ``solver`` does per step for one modality (temperature 1, no top-k) with the
    strategy it plans for the device; updates and returns ``x_t``."""
    strategy, sampler = solver.plan(x_t.device)
    args = (path, x_t, logits, positions, t, t_next, False, 1.0, None, generator)
    if strategy == "compact":
        solver._advance("tokens", *args)
    else:
        solver._advance_static(*args, sampler)
    return x_t


def rate_cross_check(
    path: MetricPath,
    embeddings: Tensor,
    logits: Tensor,
    x_t: Tensor,
    t: float,
    generator: torch.Generator,
    rows: int = CHECK_ROWS,
) -> dict:
    """Compare the reference's rate rows with kineflow's ``path.velocity`` off the diagonal."""
    flat_x = x_t.reshape(-1)
    idx = torch.linspace(0, flat_x.numel() - 1, min(rows, flat_x.numel())).long()
    xt = flat_x[idx]
    x1 = sample_logits(logits.reshape(-1, logits.shape[-1])[idx], generator=generator)
    ours = path.velocity(xt, x1, t).scatter_(-1, xt.unsqueeze(-1), 0.0)
    ref = reference_rates(xt, x1, embeddings, t)
    err = (ref - ours).abs().amax(-1)
    scale = ours.abs().amax(-1)
    moving = scale > 0
    rel = err[moving] / scale[moving]
    return {
        "rows": int(idx.numel()),
        "rows_with_rates": int(moving.sum()),
        "max_abs_err": float(err.max()),
        "max_rel_err": float(rel.max()) if rel.numel() else 0.0,
        "intensity_max_rel_err": float(
            ((ref.sum(-1) - ours.sum(-1)).abs()[moving] / ours.sum(-1)[moving]).max()
        )
        if rel.numel()
        else 0.0,
    }


def sampler_comparison(logits: Tensor, rows: int = 1024, repeats: int = 3) -> dict:
    """Median time of ``torch.multinomial`` and of kineflow's inverse-CDF ``categorical`` for
    one draw from each of ``rows`` rows of ``softmax(logits)`` (the x_1 draw of a step)."""
    V = logits.shape[-1]
    probs = torch.softmax(logits.reshape(-1, V)[:rows].float(), dim=-1)
    g = torch.Generator(device=probs.device).manual_seed(0)
    samplers = {
        "multinomial_s": lambda: torch.multinomial(probs, 1, generator=g),
        "categorical_s": lambda: categorical(probs, g),
    }
    out: dict = {"rows": probs.shape[0]}
    for key, sample in samplers.items():
        sample()
        durations = []
        for _ in range(repeats):
            start = time.perf_counter()
            sample()
            durations.append(time.perf_counter() - start)
        out[key] = round(statistics.median(durations), 5)
    out["ratio"] = _ratio(out["multinomial_s"], out["categorical_s"])
    return out


# -- measurement in a fresh process -------------------------------------------------------------
def measure_peak(step: Callable[[], object], device: torch.device) -> dict:
    """Peak memory of one call of ``step`` beyond what is allocated before it (see top)."""
    release_free_memory()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        step()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - before
        return {"peak_step_mib": round(peak / MIB, 1), "peak_method": "cuda_max_allocated"}
    reset = reset_high_water_mark()
    rss_before = rss_bytes()
    high_before, _ = high_water_bytes()
    step()
    high_after, counter = high_water_bytes()
    return {
        "peak_step_mib": round(max(0, high_after - rss_before) / MIB, 1),
        "rss_before_mib": round(rss_before / MIB, 1),
        "peak_method": f"{counter} - rss_before" + (" (hwm reset)" if reset else ""),
        # A reset cannot lower ru_maxrss below a peak inherited at exec (see top).
        "peak_exact": bool((reset and counter == "VmHWM") or high_after > high_before),
    }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _make_step(
    impl: str,
    E: Tensor,
    logits: Tensor,
    path: MetricPath | None,
    t: float,
    h: float,
) -> Callable[[Tensor, torch.Generator], Tensor]:
    if impl == "reference":
        return lambda x, g: reference_step(logits, x, E, t, h, g)
    assert path is not None
    rate = "euler" if impl.endswith("_euler") else "integrated"
    # kineflow_static_*: the fixed-shape step with the race sampler (what CUDA gets by default);
    # the others: the compact step (what the CPU gets by default).
    static = impl.startswith("kineflow_static")
    solver = EulerSolver(path, rate=rate, strategy="static" if static else "compact",
                         sampler="race" if static else "inverse_cdf")  # fmt: skip
    B, N = logits.shape[:2]
    positions = torch.ones(B, N, dtype=torch.bool, device=logits.device).nonzero(as_tuple=True)
    # float32 0-d times, as the solver's own time grid hands them to _advance.
    tt = torch.tensor(t, device=logits.device)
    tn = torch.tensor(t + h, device=logits.device)
    return lambda x, g: kineflow_step(solver, path, logits, x, positions, tt, tn, g)


def _warm_up_libraries(impl: str, device: torch.device) -> None:
    """One step on a tiny problem so one-time library set-up is not counted as step memory."""
    g = torch.Generator(device=device).manual_seed(0)
    E = torch.randn(64, 8, device=device)
    logits = torch.randn(2, 16, 64, device=device)
    path = MetricPath.from_embeddings(E).to(device) if impl != "reference" else None
    x = torch.randint(64, (2, 16), device=device)
    _make_step(impl, E, logits, path, HEADLINE_T, STEP_H)(x, g)
    _sync(device)


def run_worker(
    impl: str, inputs_file: str, times: Sequence[float], repeats: int, device_name: str
) -> dict:
    """Measure one implementation on one case's saved inputs (in a fresh process)."""
    device = torch.device(device_name)
    _warm_up_libraries(impl, device)
    data = torch.load(inputs_file, weights_only=True)
    E = data["embeddings"].to(device)
    logits = data["logits"].to(device)
    states = {float(t): x.to(device) for t, x in data["states"].items()}
    del data
    path = MetricPath.from_embeddings(E, EXPONENT, A, C).to(device) if impl != "reference" else None
    g = torch.Generator(device=device).manual_seed(1)
    result: dict = {}
    step_s: dict[str, float] = {}
    jumps: dict[str, float] = {}
    page_faults: dict[str, int] = {}
    with torch.no_grad():
        # The memory-measured call at the headline time is also the warm-up call.
        step = _make_step(impl, E, logits, path, HEADLINE_T, STEP_H)
        x = states[HEADLINE_T].clone()
        result.update(measure_peak(lambda: step(x, g), device))
        for t in times:
            step = _make_step(impl, E, logits, path, t, STEP_H)
            durations, moved, faults = [], [], []
            for _ in range(repeats):
                x = states[t].clone()
                _sync(device)
                faults_before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                start = time.perf_counter()
                x = step(x, g)
                _sync(device)
                durations.append(time.perf_counter() - start)
                faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults_before)
                moved.append(float((x != states[t]).float().mean()))
            step_s[str(t)] = statistics.median(durations)
            jumps[str(t)] = round(statistics.fmean(moved), 4)
            page_faults[str(t)] = int(statistics.median(faults))
            log(f"  {impl} t={t}: {step_s[str(t)]:.4f} s/step (jump fraction {jumps[str(t)]})")
    result["step_s"] = round(step_s[str(HEADLINE_T)], 5)
    result["step_s_by_t"] = {k: round(v, 5) for k, v in step_s.items()}
    result["jump_fraction_by_t"] = jumps
    result["minor_page_faults_per_step_by_t"] = page_faults
    result["repeats"] = repeats
    return result


def _spawn_worker(
    impl: str, inputs_file: Path, times: Sequence[float], repeats: int, device: str
) -> dict:
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--worker",
        impl,
        "--inputs-file",
        str(inputs_file),
        "--times",
        ",".join(str(t) for t in times),
        "--repeats",
        str(repeats),
        "--device",
        device,
    ]
    done = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=None, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"worker {impl} failed with exit status {done.returncode}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _ratio(num: float, den: float) -> float | None:
    return round(num / den, 3) if den > 0 else None


def run_case(
    spec: CaseSpec, times: Sequence[float], repeats: int, device: str, seed: int = 0
) -> dict:
    """Build a case's inputs, cross-check the rates, and measure every implementation."""
    t0 = time.perf_counter()
    inputs = build_inputs(spec, times, seed)
    log(f"{spec.name}: inputs built in {time.perf_counter() - t0:.1f} s: {inputs['stats']}")
    g = torch.Generator().manual_seed(seed + 1)
    checks = {
        str(t): rate_cross_check(
            inputs["path"], inputs["embeddings"], inputs["logits"], inputs["states"][t], t, g
        )
        for t in times
    }
    log(f"{spec.name}: rate cross-check {checks}")
    sampler = sampler_comparison(inputs["logits"])
    log(f"{spec.name}: x_1 sampler {sampler}")
    out: dict = {
        "B": spec.B,
        "N": spec.N,
        "V": spec.V,
        "D": spec.D,
        "t": HEADLINE_T,
        "h": STEP_H,
        "times": list(times),
        "inputs": inputs["stats"],
    }
    with tempfile.TemporaryDirectory(prefix="solver_speed_") as tmp:
        inputs_file = Path(tmp) / f"{spec.name}.pt"
        torch.save(
            {
                "embeddings": inputs["embeddings"],
                "logits": inputs["logits"],
                "states": {str(t): x for t, x in inputs["states"].items()},
            },
            inputs_file,
        )
        del inputs
        gc.collect()
        for impl in IMPLEMENTATIONS:
            log(f"{spec.name}: measuring {impl} in a fresh process")
            out[impl] = _spawn_worker(impl, inputs_file, times, repeats, device)
    ref, ours, integrated = out["reference"], out["kineflow_euler"], out["kineflow_integrated"]
    out["speedup"] = _ratio(ref["step_s"], ours["step_s"])
    out["speedup_by_t"] = {
        k: _ratio(v, ours["step_s_by_t"][k]) for k, v in ref["step_s_by_t"].items()
    }
    out["speedup_integrated"] = _ratio(ref["step_s"], integrated["step_s"])
    out["speedup_static_euler"] = _ratio(ref["step_s"], out["kineflow_static_euler"]["step_s"])
    out["speedup_static_integrated"] = _ratio(
        ref["step_s"], out["kineflow_static_integrated"]["step_s"]
    )
    out["memory_ratio"] = _ratio(ref["peak_step_mib"], ours["peak_step_mib"])
    out["rates_max_rel_err"] = max(c["max_rel_err"] for c in checks.values())
    out["rates_max_abs_err"] = max(c["max_abs_err"] for c in checks.values())
    out["rates_check"] = checks
    out["sampler"] = sampler
    return out


# -- command line ------------------------------------------------------------------------------
def _parse_sizes(values: Sequence[str]) -> dict[str, tuple[int, int, int, int]]:
    sizes = {}
    for value in values:
        name, _, rest = value.partition("=")
        parts = rest.split(",")
        if name not in CASES or len(parts) != 4:
            raise argparse.ArgumentTypeError(f"--sizes wants CASE=B,N,V,D, got {value!r}")
        sizes[name] = tuple(int(p) for p in parts)
    return sizes


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--cases", default="image,text", help="comma-separated: image,text")
    parser.add_argument("--quick", action="store_true", help="smoke test: B=1, one repeat, t=0.5")
    parser.add_argument(
        "--repeats", type=int, default=None, help="timed calls per t (default 3 image, 2 text)"
    )
    parser.add_argument(
        "--extra-times", default="0.1,0.9", help="times timed besides t=0.5 ('' for none)"
    )
    parser.add_argument(
        "--sizes", action="append", default=[], help="override a case's sizes: CASE=B,N,V,D"
    )
    parser.add_argument(
        "--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--worker", choices=IMPLEMENTATIONS, help=argparse.SUPPRESS)
    parser.add_argument("--inputs-file", help=argparse.SUPPRESS)
    parser.add_argument("--times", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark and print one JSON object to stdout."""
    args = _parse_args(argv)
    if args.worker:
        times = [float(t) for t in args.times.split(",")]
        result = run_worker(args.worker, args.inputs_file, times, args.repeats, args.device)
        print(json.dumps(result))
        return 0
    names = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = set(names) - set(CASES)
    if unknown or not names:
        raise SystemExit(f"--cases must name some of {sorted(CASES)}, got {args.cases!r}")
    sizes = _parse_sizes(args.sizes)
    extra = [] if args.quick else [float(t) for t in args.extra_times.split(",") if t.strip()]
    times = [HEADLINE_T, *[t for t in extra if t != HEADLINE_T]]
    report: dict = {
        "device": args.device,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "load_average_1min_at_start": round(os.getloadavg()[0], 2),
        "cases": {},
    }
    start = time.perf_counter()
    for name in names:
        spec = CASES[name]
        if args.quick:
            spec = CaseSpec(name, 1, spec.N, spec.V, spec.D, 1)
        if name in sizes:
            B, N, V, D = sizes[name]
            spec = CaseSpec(name, B, N, V, D, spec.default_repeats)
        repeats = args.repeats if args.repeats is not None else spec.default_repeats
        if repeats < 1:
            raise SystemExit("--repeats must be at least 1")
        report["cases"][name] = run_case(spec, times, repeats, args.device, args.seed)
    report["load_average_1min_at_end"] = round(os.getloadavg()[0], 2)
    report["total_s"] = round(time.perf_counter() - start, 1)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
