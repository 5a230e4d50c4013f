"""``kineflow reproduce``: the ShapesWorld reproduction, end to end, on a CPU.

Stages (a stage whose output is complete is skipped; an interrupted trainer resumes from its
checkpoint, so re-running the command continues where it stopped)::

    text tokenizer   byte-level BPE on the ShapesWorld corpus             out/text_tokenizer
    vq, siglip       VQ image tokenizer; tiny SigLIP encoder              out/vq, out/siglip
    ar               AR baseline, N steps; exports its weights at N/2     out/ar
    fudoki           FUDOKI (metric path) from scratch, N steps           out/fudoki
    masked           masked-path baseline, N steps                        out/masked
    fudoki_from_ar   FUDOKI for N/2 steps from the AR weights at N/2      out/fudoki_from_ar
    kl               KL-VAE image tokenizer (UniFluid's continuous tokens)  out/kl
    recipes          each shipped model's stages in order (``recipes``: the last stage's
                     config; :mod:`kineflow.apps.reproduce.recipes`)       out/<stage>
    unifluid…        UniFluid runs (``unifluid_runs``: the model and its λ / order
                     ablations), ``unifluid_steps`` steps each             out/<run name>
    evaluation       ShapesWorld generation (per category, held-out compositions), VQA and
                     captioning (and editing for UniFluid); sample grids, refinement GIFs
                     (token-by-token GIFs for UniFluid), self-correction statistics
    results          out/results.json, out/results.md, out/figures/; optionally copies into
                     ``ship`` each recipe's last stage under the recipe's name (UniFluid in
                     float16) or, without a recipe of that name, the FUDOKI checkpoint
                     (``fudoki_from_ar``) and the UniFluid one (``unifluid``); and,
                     standalone, the VQ tokenizer, SigLIP encoder and KL-VAE

With several ``seeds`` every run trains once per seed (``out/<run>_s<seed>``) and the results
add the papers' claims, each with its interval over the seeds and a verdict
(:mod:`kineflow.apps.reproduce.claims`); ``prebuilt`` skips encoder stages by reading trained
folders instead (``configs/claims.yaml``, ``make claims``).

Every discrete model trains on the same batches for the same number of optimizer steps of the
same network (equal training compute); ``fudoki_from_ar`` splits its N steps into N/2 AR + N/2
DFM. The UniFluid runs share that backbone size and batch size on continuous tokens.
Training and evaluation jobs run as subprocesses (``kineflow train ...``, ``python -m
kineflow.apps.reproduce eval RUN``), ``jobs`` at a time in dependency order, each with
``cpu_count // jobs`` threads (two one-thread jobs use a 2-core CPU better than one two-thread
job) and every core while a training job runs alone (its share follows the jobs that run:
:func:`~kineflow.apps.reproduce.jobs.run_jobs`), so a finished model is evaluated while the
others train; logs are in out/logs/.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kineflow.apps.reproduce.claims import claim_verdicts
from kineflow.apps.reproduce.config import (
    FLAGSHIP,
    RUNS,
    UNIFLUID_FLAGSHIP,
    EvalSettings,
    ReproduceConfig,
)
from kineflow.apps.reproduce.jobs import plan_jobs, run_jobs
from kineflow.apps.reproduce.recipes import recipe_chain, recipe_result
from kineflow.apps.reproduce.report import target_checks, write_results
from kineflow.apps.reproduce.ship import save_half, save_half_vae, ship
from kineflow.io import atomic_write_json

__all__ = ["RUNS", "EvalSettings", "ReproduceConfig", "reproduce", "ship", "write_results"]


def reproduce(config: ReproduceConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run every stage (see the module docstring); returns the results dict."""
    from kineflow.data.shapes.dataset import corpus
    from kineflow.eval.plot import plot_metrics, read_metrics
    from kineflow.tokenizers.text import train_text_tokenizer

    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    threads = max(1, (os.cpu_count() or 1) // config.jobs)
    jobs = plan_jobs(config, out, threads)  # reads the stage configs first: fail before training
    planned = {job.name for job in jobs}  # the encoder stages this run trains (not prebuilt)
    if (
        "text_tokenizer" not in config.prebuilt
        and not (out / "text_tokenizer" / "tokenizer.json").is_file()
    ):
        tokenizer = train_text_tokenizer(
            corpus(n=config.text_corpus_items), vocab_size=config.text_vocab_size
        )
        tokenizer.save(out / "text_tokenizer")
        log(f"text tokenizer: {tokenizer.vocab_size} tokens")
    # Job times persist across calls (an interrupted run resumed keeps the earlier ones).
    timings_file = out / "timings.json"
    timings = json.loads(timings_file.read_text()) if timings_file.is_file() else {}
    timings.setdefault("jobs", {})
    timings.setdefault("calls", [])
    ran: list[str] = []

    def done(name: str, seconds: float) -> None:
        timings["jobs"][name] = round(seconds, 1)
        ran.append(name)
        atomic_write_json(timings_file, timings)

    run_jobs(jobs, out, config.jobs, threads, log, done)
    timings["calls"].append({"wall_seconds": round(time.perf_counter() - t0, 1), "jobs_run": ran})
    atomic_write_json(timings_file, timings)
    train_seconds = {k: v for k, v in timings["jobs"].items() if not k.startswith("eval_")}
    evals = {n: json.loads((out / n / "eval.json").read_text()) for n in config.all_runs}
    discrete = [n for run in config.runs for n in config.seeded(run)]
    curves = {name: read_metrics(out / name / "metrics.jsonl") for name in discrete}
    if curves:
        plot_metrics(curves, ["loss", "loss_gen", "loss_und"], out / "figures" / "loss.png")
    if config.unifluid is not None:
        names = [n for run in config.unifluid_runs for n in config.seeded(run)]
        curves = {n: read_metrics(out / n / "metrics.jsonl") for n in names}
        plot_metrics(curves, ["loss", "loss_image", "loss_text"],
                     out / "figures" / "loss_unifluid.png")  # fmt: skip
    first = {run: config.seeded(run)[0] for run in (*RUNS, UNIFLUID_FLAGSHIP)}
    flagship = FLAGSHIP if first[FLAGSHIP] in evals else "fudoki"
    results = {
        "config": config.to_dict(),
        "train_seconds": train_seconds,
        "wall_seconds": sum(c["wall_seconds"] for c in timings["calls"]),
        "calls": timings["calls"],
        "flagship": flagship,
        "runs": evals,
        "targets": {}
        if len(config.seeds) > 1
        else {n: target_checks(evals, n) for n in ("fudoki", "fudoki_from_ar") if n in evals},
        "claims": claim_verdicts(evals, config) if len(config.seeds) > 1 else [],
        "recipes": {
            name: recipe_result(chain, out, timings["jobs"])
            for name, chain in ((n, recipe_chain(p)) for n, p in config.recipes.items())
        },
        "stages": {
            stage: json.loads((out / stage / "eval.json").read_text())
            for stage in ("vq", "siglip", "kl")
            if stage in planned
        },
    }
    if config.ship:
        # Prebuilt encoders are not copied: they are someone's trained folders already.
        results["shipped"] = {
            name: ship(src, Path(config.ship) / name) for stage, name, src in (
                ("vq", "vq-shapes", out / "vq" / "model"),
                ("siglip", "siglip-shapes", out / "siglip" / "vision"),
            ) if stage in planned
        }  # fmt: skip
        # A recipe makes the model it is named after; without one, the compared run does.
        if "fudoki-shapes" not in config.recipes and first[flagship] in evals:
            results["shipped"]["fudoki-shapes"] = ship(
                out / first[flagship] / "model", Path(config.ship) / "fudoki-shapes"
            )
        if "kl" in planned:
            # The configs in configs/ read the KL-VAE from here, so a fresh clone can train
            # UniFluid without running the tokenizer stage first.
            results["shipped"]["kl-shapes"] = ship(
                out / "kl" / "model", Path(config.ship) / "kl-shapes", save_half_vae
            )
        if first[UNIFLUID_FLAGSHIP] in evals and "unifluid-shapes" not in config.recipes:
            results["shipped"]["unifluid-shapes"] = ship(
                out / first[UNIFLUID_FLAGSHIP] / "model", Path(config.ship) / "unifluid-shapes",
                save_half,
            )  # fmt: skip
        for name, recipe in results["recipes"].items():
            # UniFluid is shipped in float16, as the comparison's shipped run.
            half = save_half if recipe["family"] == "unifluid" else None
            results["shipped"][name] = ship(out / recipe["final"] / "model",
                                            Path(config.ship) / name, half)  # fmt: skip
    write_results(results, out)
    log(f"results: {out / 'results.md'}")
    return results
