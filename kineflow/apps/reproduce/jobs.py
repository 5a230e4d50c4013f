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

from kineflow.apps.reproduce.config import (
    PREBUILT,
    RUNS,
    UNIFLUID_KNOBS,
    ReproduceConfig,
    read_yaml,
)
from kineflow.apps.reproduce.recipes import Stage, recipe_chain
from kineflow.io import atomic_write
from kineflow.train.threads import THREADS_FILE, write_threads

__all__ = ["Job", "plan_jobs", "run_jobs"]


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


def plan_jobs(config: ReproduceConfig, out: Path, threads: int) -> list[Job]:
    """Every job of the run (done ones included; :func:`run_jobs` skips them): the encoder
    stages not in ``prebuilt``, the stages of every recipe, one training job per run and seed,
    one evaluation per model (a recipe's last stage, every run)."""
    chains = {name: recipe_chain(last) for name, last in config.recipes.items()}
    for stage, folder in config.prebuilt.items():  # fail now, not in the first training job
        if not (Path(folder) / PREBUILT[stage]).is_file():
            raise FileNotFoundError(f"prebuilt.{stage}: {folder}: no {PREBUILT[stage]} there")
    # The encoders come first and alone, each with every thread: everything waits for them.
    every = os.cpu_count() or 1
    jobs = []
    for stage, kind in (("vq", "tokenizer"), ("siglip", "siglip")):
        if stage in config.prebuilt:
            continue
        stage_config = read_yaml(getattr(config, stage)) | {"out": str(out / stage),
                                                            "threads": every}  # fmt: skip
        own_steps = getattr(config, f"{stage}_steps")
        if own_steps is not None:
            stage_config["optim"] = {**stage_config.get("optim", {}), "steps": own_steps}
        tokenizer = config.stage_folder("text_tokenizer", out)
        extra = ("--tokenizer", tokenizer) if stage == "siglip" else ()
        jobs.append(Job(stage, kind, stage_config, out / stage / "eval.json", extra_args=extra,
                        exclusive=True))  # fmt: skip
    continuous = any(s.kind == "unifluid" for chain in chains.values() for s in chain)
    if (config.unifluid is not None or continuous) and "kl" not in config.prebuilt:
        # The KL-VAE is the third encoder stage, alone too.
        kl_config = read_yaml(config.kl) | {"out": str(out / "kl"), "threads": every}
        jobs.append(Job("kl", "tokenizer", kl_config, out / "kl" / "eval.json", exclusive=True))
    # The recipes first: their chains of stages are the longest path through the run.
    recipe_jobs = _recipe_jobs(config, chains, out, threads)
    clash = sorted({j.name for j in recipe_jobs} & set(config.all_runs))
    if clash:
        raise ValueError(f"recipes: stage {clash} has the name of a run; rename its 'out'")
    jobs += recipe_jobs
    N = config.steps
    base = _model_base(config, read_yaml(config.model), out, threads,
                       vq=config.stage_folder("vq", out)) if config.runs else {}  # fmt: skip
    for run_name in config.runs:
        for name, seed in zip(config.seeded(run_name), config.seeds, strict=True):
            run = _seeded(base, out / name, seed, len(config.seeds) > 1)
            run["objective"] = {**run.get("objective", {}), "kind": RUNS[run_name][0]}
            run["optim"]["steps"] = N
            needs = _stages(config, "vq", "siglip")
            if run_name == "ar" and "fudoki_from_ar" in config.runs:
                run["export_steps"] = [N // 2]
            if run_name == "fudoki_from_ar":
                ar = config.seeded("ar")[config.seeds.index(seed)]
                run["init_from"] = str(out / ar / f"model_step{N // 2}")
                run["optim"]["steps"] = N - N // 2
                needs = (ar,)
            jobs.append(Job(name, "fudoki", run, out / name / "summary.json", needs))
    if config.unifluid is not None:
        jobs += _unifluid_jobs(config, out, threads)
    # Evaluations are jobs too: a finished model is scored while others still train.
    finals = [chain[-1].name for chain in chains.values()]
    for name in dict.fromkeys(finals + config.all_runs):
        jobs.append(Job(f"eval_{name}", "eval", {"run": name, **config.to_dict()},
                         out / name / "eval.json", (name,)))  # fmt: skip
    return jobs


def _stages(config: ReproduceConfig, *stages: str) -> tuple[str, ...]:
    """The stage jobs a model waits for: those not ``prebuilt``."""
    return tuple(s for s in stages if s not in config.prebuilt)


def _seeded(base: dict[str, Any], out: Path, seed: int, several: bool) -> dict[str, Any]:
    """A copy of run config ``base`` writing to ``out``; with several seeds, ``seed`` drives
    both the initialisation (``optim.seed``) and every sample's draws (``data.seed``)."""
    run = json.loads(json.dumps(base))
    run["out"] = str(out)
    run["optim"] = dict(run.get("optim", {}))
    if several:
        run["optim"]["seed"] = seed
        run["data"] = {**run.get("data", {}), "seed": seed}
    return run


def _model_base(
    config: ReproduceConfig, model: dict[str, Any], out: Path, threads: int,
    **image_tokenizer: str,
) -> dict[str, Any]:  # fmt: skip
    """A model's run config with the stages it shares filled in: the image tokenizer (``vq``
    or ``vae``), the SigLIP tower, the text tokenizer; ``threads`` per job."""
    return (
        json.loads(json.dumps(model))
        | image_tokenizer
        | {
            "vision": config.stage_folder("siglip", out),
            "text_tokenizer": config.stage_folder("text_tokenizer", out),
            "threads": threads,
        }
    )


def _recipe_jobs(
    config: ReproduceConfig, chains: dict[str, list[Stage]], out: Path, threads: int
) -> list[Job]:
    """One training job per recipe stage (a stage two recipes share trains once): its config
    with this run's encoders and text tokenizer, ``out/<stage>`` as its folder and, after the
    first stage, ``init_from`` the folder of the stage before."""
    jobs: dict[str, Job] = {}
    sources: dict[str, Path] = {}
    for recipe, chain in chains.items():
        for stage in chain:
            if stage.name in sources and sources[stage.name] == stage.path:
                continue  # shared with a recipe planned already
            if stage.name in sources or stage.name in ("vq", "siglip", "kl", "text_tokenizer"):
                raise ValueError(f"recipes.{recipe}: stage {stage.name!r} ({stage.path}) has "
                                 "the name of another stage; rename its 'out'")  # fmt: skip
            sources[stage.name] = stage.path
            tokenizer = ({"vae": config.stage_folder("kl", out)} if stage.kind == "unifluid"
                         else {"vq": config.stage_folder("vq", out)})  # fmt: skip
            run = _model_base(config, stage.config, out, threads, **tokenizer)
            run["out"] = str(out / stage.name)
            if stage.before is None:
                needs = _stages(config, "kl" if stage.kind == "unifluid" else "vq", "siglip")
            else:
                run["init_from"] = str(out / stage.before / stage.start)
                needs = (stage.before,)
            jobs[stage.name] = Job(stage.name, stage.kind, run, out / stage.name /
                                   "summary.json", needs)  # fmt: skip
    return list(jobs.values())


def _unifluid_jobs(config: ReproduceConfig, out: Path, threads: int) -> list[Job]:
    """The UniFluid runs on the KL-VAE, once per seed; each run's knobs go to their config
    sections (:data:`UNIFLUID_KNOBS`)."""
    base = _model_base(config, read_yaml(config.unifluid), out, threads,
                       vae=config.stage_folder("kl", out))  # fmt: skip
    jobs = []
    for run_name, knobs in config.unifluid_runs.items():
        for name, seed in zip(config.seeded(run_name), config.seeds, strict=True):
            run = _seeded(base, out / name, seed, len(config.seeds) > 1)
            for knob, value in (knobs or {}).items():
                if knob != "steps":
                    section = UNIFLUID_KNOBS[knob]
                    run[section] = {**run.get(section, {}), knob: value}
            run["optim"]["steps"] = config.unifluid_run_steps(name)
            needs = _stages(config, "kl", "siglip")
            jobs.append(Job(name, "unifluid", run, out / name / "summary.json", needs))
    return jobs


def run_jobs(
    jobs: list[Job], out: Path, parallel: int, threads: int, log: Callable,
    on_done: Callable[[str, float], None],
) -> None:  # fmt: skip
    """Run the jobs that are not done yet, ``parallel`` at a time, in dependency order, with
    ``threads`` threads each (every core for an exclusive job, and for a job that nothing can
    run beside); ``on_done(name, wall seconds)`` after each one that succeeds.

    Shares follow the jobs that run: a training job reads its count from
    ``out/logs/<job>.threads`` after every step (:mod:`kineflow.train.threads`), which holds
    every core while it runs alone and ``threads`` while another job runs beside it, so a stage
    that started beside another job takes both cores once that job ends."""
    import yaml

    (out / "configs").mkdir(parents=True, exist_ok=True)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    finished = {j.name for j in jobs if j.done_file.is_file()}
    pending = [j for j in jobs if j.name not in finished]
    running: dict[str, tuple[subprocess.Popen, float, Any]] = {}
    exclusive = {j.name for j in jobs if j.exclusive}
    every = os.cpu_count() or 1
    shares: dict[str, int] = {}  # the thread count each running job was last given

    def share_cores() -> None:
        for name in running:
            n = every if len(running) == 1 else threads
            if shares.get(name) != n:
                write_threads(out / "logs" / f"{name}.threads", n)
                shares[name] = n

    while pending or running:
        for job in list(pending):
            if len(running) >= parallel or exclusive & set(running):
                break
            if job.exclusive and running:
                continue
            if all(n in finished for n in job.needs):
                # A job that nothing can run beside (no job running, every other pending job
                # waits for it) gets every core: the last stages of a long recipe chain.
                alone = job.exclusive or (not running and _waits_for(job, pending))
                n = str(every) if alone else str(threads)
                if "threads" in job.config:
                    job.config["threads"] = int(n)
                share = out / "logs" / f"{job.name}.threads"
                write_threads(share, int(n))
                shares[job.name] = int(n)
                env = {**os.environ, "OMP_NUM_THREADS": n, "MKL_NUM_THREADS": n,
                       THREADS_FILE: str(share)}  # fmt: skip
                path = out / "configs" / f"{job.name}.yaml"
                atomic_write(path, lambda t, c=job.config: t.write_text(yaml.safe_dump(c)))
                cmd = job.command(path)
                handle = (out / "logs" / f"{job.name}.log").open("a")
                log(f"start {job.name}: {' '.join(cmd[1:])}")
                proc = subprocess.Popen(cmd, stdout=handle, stderr=subprocess.STDOUT, env=env)
                running[job.name] = (proc, time.perf_counter(), handle)
                pending.remove(job)
        share_cores()
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
            shares.pop(name, None)
            share_cores()
            took = time.perf_counter() - start
            on_done(name, took)
            log(f"done  {name} in {took / 60:.1f} min")


def _waits_for(job: Job, pending: list[Job]) -> bool:
    """Whether every pending job other than ``job`` depends on it, directly or through others."""
    after = {job.name}
    grew = True
    while grew:
        grew = False
        for other in pending:
            if other.name not in after and after & set(other.needs):
                after.add(other.name)
                grew = True
    return all(other.name in after for other in pending)
