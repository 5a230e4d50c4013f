"""The reproduction's job graph: what each training / evaluation subprocess runs (:class:`Job`),
the jobs of a run and their dependencies (:func:`plan_jobs`), and the scheduler that runs them
``jobs`` at a time with ``cpu_count // jobs`` threads each (:func:`run_jobs`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kineflow.apps.reproduce.config import RUNS, ReproduceConfig
from kineflow.io import atomic_write

__all__ = ["Job", "plan_jobs", "read_yaml", "run_jobs"]


@dataclass
class Job:
    """A subprocess: ``kineflow train {kind} --config out/configs/{name}.yaml`` or, with
    ``kind="eval"``, the evaluation of run ``name`` (``python -m kineflow.apps.reproduce eval``,
    :mod:`kineflow.apps.reproduce.__main__`)."""

    name: str
    kind: str
    config: dict[str, Any]
    done_file: Path
    needs: tuple[str, ...] = ()
    extra_args: tuple[str, ...] = ()
    exclusive: bool = False  # runs alone, with every thread (the tokenizer and SigLIP)

    def command(self, config_file: Path) -> list[str]:
        if self.kind == "eval":
            return [sys.executable, "-m", "kineflow.apps.reproduce", "eval", self.config["run"],
                    str(config_file)]  # fmt: skip
        return [sys.executable, "-m", "kineflow", "train", self.kind, "--config",
                str(config_file), "--no-progress", *self.extra_args]  # fmt: skip


def read_yaml(path: str) -> dict[str, Any]:
    import yaml

    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: no such config file")
    with open(path) as f:
        data = yaml.safe_load(f)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a run config must be a mapping")
    return data


def plan_jobs(config: ReproduceConfig, out: Path, threads: int) -> list[Job]:
    # The two encoders come first and alone, each with every thread: everything waits for them.
    every = os.cpu_count() or 1
    vq = read_yaml(config.vq) | {"out": str(out / "vq"), "threads": every}
    if config.vq_steps is not None:
        vq["optim"] = {**vq.get("optim", {}), "steps": config.vq_steps}
    siglip = read_yaml(config.siglip) | {"out": str(out / "siglip"), "threads": every}
    if config.siglip_steps is not None:
        siglip["optim"] = {**siglip.get("optim", {}), "steps": config.siglip_steps}
    jobs = [
        Job("vq", "tokenizer", vq, out / "vq" / "eval.json", exclusive=True),
        Job("siglip", "siglip", siglip, out / "siglip" / "eval.json",
             extra_args=("--tokenizer", str(out / "text_tokenizer")), exclusive=True),
    ]  # fmt: skip
    unifluid_runs = []
    if config.unifluid is not None:  # the KL-VAE is the third encoder stage, alone too
        kl, *unifluid_runs = _unifluid_jobs(config, out, threads, every)
        jobs.append(kl)
    base = _model_base(config.model, out, threads, vq=str(out / "vq" / "model"))
    N = config.steps
    for name in config.runs:
        run = json.loads(json.dumps(base))
        run["out"] = str(out / name)
        run["objective"] = {**run.get("objective", {}), "kind": RUNS[name][0]}
        run["optim"] = {**run.get("optim", {}), "steps": N}
        needs: tuple[str, ...] = ("vq", "siglip")
        if name == "ar" and "fudoki_from_ar" in config.runs:
            run["export_steps"] = [N // 2]
        if name == "fudoki_from_ar":
            run["init_from"] = str(out / "ar" / f"model_step{N // 2}")
            run["optim"]["steps"] = N - N // 2
            needs = ("ar",)
        jobs.append(Job(name, "fudoki", run, out / name / "summary.json", needs))
    jobs += unifluid_runs
    # Evaluations are jobs too: a finished model is scored while others still train.
    for name in config.all_runs:
        jobs.append(Job(f"eval_{name}", "eval", {"run": name, **config.to_dict()},
                         out / name / "eval.json", (name,)))  # fmt: skip
    return jobs


def _model_base(path: str, out: Path, threads: int, **image_tokenizer: str) -> dict[str, Any]:
    """A model's run config with the stages it shares filled in: the image tokenizer (``vq``
    or ``vae``), the SigLIP tower, the text tokenizer; ``threads`` per job."""
    return (
        read_yaml(path)
        | image_tokenizer
        | {
            "vision": str(out / "siglip" / "vision"),
            "text_tokenizer": str(out / "text_tokenizer"),
            "threads": threads,
        }
    )


def _unifluid_jobs(config: ReproduceConfig, out: Path, threads: int, every: int) -> list[Job]:
    """The KL-VAE (alone, every thread), then the UniFluid runs on it."""
    kl = read_yaml(config.kl) | {"out": str(out / "kl"), "threads": every}
    jobs = [Job("kl", "tokenizer", kl, out / "kl" / "eval.json", exclusive=True)]
    base = _model_base(config.unifluid, out, threads, vae=str(out / "kl" / "model"))
    for name in config.unifluid_runs:
        run = json.loads(json.dumps(base))
        run["out"] = str(out / name)
        knobs = {k: v for k, v in (config.unifluid_runs[name] or {}).items() if k != "steps"}
        run["model"] = {**run.get("model", {}), **knobs}
        run["optim"] = {**run.get("optim", {}), "steps": config.unifluid_run_steps(name)}
        jobs.append(Job(name, "unifluid", run, out / name / "summary.json", ("kl", "siglip")))
    return jobs


def run_jobs(
    jobs: list[Job], out: Path, parallel: int, threads: int, log: Callable,
    on_done: Callable[[str, float], None],
) -> None:  # fmt: skip
    """Run the jobs that are not done yet, ``parallel`` at a time, in dependency order;
    ``on_done(name, wall seconds)`` after each one that succeeds."""
    import yaml

    (out / "configs").mkdir(parents=True, exist_ok=True)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    finished = {j.name for j in jobs if j.done_file.is_file()}
    pending = [j for j in jobs if j.name not in finished]
    running: dict[str, tuple[subprocess.Popen, float, Any]] = {}
    exclusive = {j.name for j in jobs if j.exclusive}
    while pending or running:
        for job in list(pending):
            if len(running) >= parallel or exclusive & set(running):
                break
            if job.exclusive and running:
                continue
            if all(n in finished for n in job.needs):
                n = str(os.cpu_count() or 1) if job.exclusive else str(threads)
                env = {**os.environ, "OMP_NUM_THREADS": n, "MKL_NUM_THREADS": n}
                path = out / "configs" / f"{job.name}.yaml"
                atomic_write(path, lambda t, c=job.config: t.write_text(yaml.safe_dump(c)))
                cmd = job.command(path)
                handle = (out / "logs" / f"{job.name}.log").open("a")
                log(f"start {job.name}: {' '.join(cmd[1:])}")
                proc = subprocess.Popen(cmd, stdout=handle, stderr=subprocess.STDOUT, env=env)
                running[job.name] = (proc, time.perf_counter(), handle)
                pending.remove(job)
        if not running:
            blocked = [j.name for j in pending]
            raise RuntimeError(f"jobs {blocked} wait for jobs that did not finish")
        time.sleep(0.5)
        for name, (proc, start, handle) in list(running.items()):
            if proc.poll() is None:
                continue
            handle.close()
            del running[name]
            if proc.returncode != 0:
                for other, _, h in running.values():
                    other.terminate()
                    h.close()
                tail = (out / "logs" / f"{name}.log").read_text().splitlines()[-15:]
                raise RuntimeError(
                    f"training job {name!r} failed (exit {proc.returncode}); see "
                    f"{out / 'logs' / f'{name}.log'}:\n" + "\n".join(tail)
                )
            finished.add(name)
            took = time.perf_counter() - start
            on_done(name, took)
            log(f"done  {name} in {took / 60:.1f} min")
