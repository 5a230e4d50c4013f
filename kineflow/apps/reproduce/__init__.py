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
    unifluid…        UniFluid runs (``unifluid_runs``: the model and its λ / order
                     ablations), ``unifluid_steps`` steps each             out/<run name>
    evaluation       ShapesWorld generation (per category, held-out compositions), VQA and
                     captioning (and editing for UniFluid); sample grids, refinement GIFs
                     (token-by-token GIFs for UniFluid), self-correction statistics
    results          out/results.json, out/results.md, out/figures/; optionally copies into
                     ``ship`` the FUDOKI checkpoint (``fudoki_from_ar``, FUDOKI's recipe;
                     self-contained), the UniFluid one (``unifluid``, weights in float16)
                     and, standalone, the VQ tokenizer and SigLIP encoder

Every discrete model trains on the same batches for the same number of optimizer steps of the
same network (equal training compute); ``fudoki_from_ar`` splits its N steps into N/2 AR + N/2
DFM. The UniFluid runs share that backbone size and batch size on continuous tokens.
Training and evaluation jobs run as subprocesses (``kineflow train ...``, ``python -m
kineflow.apps.reproduce eval RUN``), ``jobs`` at a time in dependency order, each with
``cpu_count // jobs`` threads (two one-thread jobs use a 2-core CPU better than one two-thread
job), so a finished model is evaluated while the others train; logs are in out/logs/.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from kineflow.config import RunConfig
from kineflow.data.shapes.prompts import CATEGORIES
from kineflow.io import atomic_write, atomic_write_json

__all__ = ["RUNS", "EvalSettings", "ReproduceConfig", "reproduce", "write_results"]

#: The compared models: name -> (objective, label).
#: The FUDOKI model the targets are read on and that ``ship`` copies: FUDOKI's own recipe
#: (the paper starts from an AR model, Janus), at the same total compute as the others.
FLAGSHIP = "fudoki_from_ar"
RUNS: dict[str, tuple[str, str]] = {
    "ar": ("ar", "AR baseline (causal, KV-cache decoding)"),
    "fudoki": ("metric", "FUDOKI, metric path, from scratch"),
    "fudoki_from_ar": ("metric", "FUDOKI, metric path, N/2 AR + N/2 DFM"),
    "masked": ("masked", "masked-path baseline"),
}
#: The UniFluid run that ``ship`` copies (the others are its ablations).
UNIFLUID_FLAGSHIP = "unifluid"
#: What a UniFluid run may change from the base config: the paper's ablations, and its own
#: optimizer steps.
UNIFLUID_KNOBS = ("text_loss_weight", "order", "steps")


@dataclass
class EvalSettings:
    """How each model is evaluated (the same for all)."""

    steps: int = 16
    cfg_scale: float = 3.0
    max_prompts_per_category: int = 24
    images_per_prompt: int = 2
    vqa_items: int = 300
    caption_items: int = 100
    edit_items: int = 200
    trajectories: int = 48
    grid_prompts_per_category: int = 2
    grid_samples: int = 4
    seed: int = 0


@dataclass
class ReproduceConfig(RunConfig):
    """The reproduction run (``configs/reproduce.yaml``).

    ``vq``, ``siglip``, ``model``: the stage configs (their ``out`` is replaced by a folder of
    ``out``); ``vq_steps`` / ``siglip_steps`` override their step counts when set. ``steps``: N,
    the optimizer steps of every compared model. ``runs``: which of :data:`RUNS` to train.

    ``unifluid`` (None: no UniFluid stages) and ``kl``: the UniFluid and KL-VAE configs;
    ``unifluid_runs`` maps run names to what each changes (:data:`UNIFLUID_KNOBS`) in the
    UniFluid model config, or its own ``steps``; ``unifluid_steps`` (default N) the optimizer
    steps of the others.
    """

    SECTIONS: ClassVar[dict[str, type]] = {"eval": EvalSettings}
    REQUIRED: ClassVar[tuple[str, ...]] = ()

    out: str = "outputs/reproduce"
    vq: str = "configs/vq_shapes.yaml"
    siglip: str = "configs/siglip_shapes.yaml"
    model: str = "configs/fudoki_shapes.yaml"
    text_vocab_size: int = 512
    text_corpus_items: int = 2000
    vq_steps: int | None = None
    siglip_steps: int | None = None
    steps: int = 3000
    runs: list[str] = field(default_factory=lambda: list(RUNS))
    jobs: int = 2
    eval: EvalSettings = field(default_factory=EvalSettings)
    ship: str | None = None
    kl: str = "configs/kl_shapes.yaml"
    unifluid: str | None = None
    unifluid_runs: dict[str, dict[str, Any]] = field(
        default_factory=lambda: {UNIFLUID_FLAGSHIP: {}}
    )
    unifluid_steps: int | None = None

    def __post_init__(self) -> None:
        if self.unifluid is not None:
            self._check_unifluid_runs()
        unknown = [r for r in self.runs if r not in RUNS]
        if unknown or not self.runs:
            raise ValueError(f"runs must be a non-empty subset of {list(RUNS)}, got {self.runs}")
        if "fudoki_from_ar" in self.runs and "ar" not in self.runs:
            raise ValueError("fudoki_from_ar starts from the AR run: add 'ar' to runs")
        for name in ("steps", "jobs", "text_vocab_size", "text_corpus_items"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.steps < 2:
            raise ValueError(f"steps must be >= 2 (the AR -> DFM run splits it), got {self.steps}")

    def _check_unifluid_runs(self) -> None:
        runs = self.unifluid_runs
        if not isinstance(runs, dict) or not runs:
            raise ValueError(f"unifluid_runs must be a non-empty mapping, got {runs!r}")
        for name, knobs in runs.items():
            if not str(name).isidentifier() or name in RUNS or name in ("kl", "vq", "siglip"):
                raise ValueError(f"unifluid_runs: {name!r} is not a free run name")
            bad = [k for k in (knobs or {}) if k not in UNIFLUID_KNOBS]
            if bad:
                raise ValueError(
                    f"unifluid_runs.{name}: {bad} cannot be changed per run; allowed: "
                    f"{list(UNIFLUID_KNOBS)}"
                )
            own = (knobs or {}).get("steps")
            if own is not None and (isinstance(own, bool) or not isinstance(own, int) or own < 1):
                raise ValueError(f"unifluid_runs.{name}.steps must be a positive integer")
        steps = self.unifluid_steps
        if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int)
                                  or steps < 1):  # fmt: skip
            raise ValueError(f"unifluid_steps must be a positive integer, got {steps!r}")

    def unifluid_run_steps(self, name: str) -> int:
        """The optimizer steps of UniFluid run ``name``."""
        own = (self.unifluid_runs[name] or {}).get("steps")
        return own or self.unifluid_steps or self.steps

    @property
    def all_runs(self) -> list[str]:
        """The discrete runs, then the UniFluid ones."""
        return [*self.runs, *(self.unifluid_runs if self.unifluid else {})]


# -- training jobs ------------------------------------------------------------------------------
@dataclass
class _Job:
    """A subprocess: ``kineflow train {kind} --config out/configs/{name}.yaml`` or, with
    ``kind="eval"``, this module's evaluation of run ``name``."""

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


def _yaml_dict(path: str) -> dict[str, Any]:
    import yaml

    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: no such config file")
    with open(path) as f:
        data = yaml.safe_load(f)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a run config must be a mapping")
    return data


def _jobs(config: ReproduceConfig, out: Path, threads: int) -> list[_Job]:
    # The two encoders come first and alone, each with every thread: everything waits for them.
    every = os.cpu_count() or 1
    vq = _yaml_dict(config.vq) | {"out": str(out / "vq"), "threads": every}
    if config.vq_steps is not None:
        vq["optim"] = {**vq.get("optim", {}), "steps": config.vq_steps}
    siglip = _yaml_dict(config.siglip) | {"out": str(out / "siglip"), "threads": every}
    if config.siglip_steps is not None:
        siglip["optim"] = {**siglip.get("optim", {}), "steps": config.siglip_steps}
    jobs = [
        _Job("vq", "tokenizer", vq, out / "vq" / "eval.json", exclusive=True),
        _Job("siglip", "siglip", siglip, out / "siglip" / "eval.json",
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
        jobs.append(_Job(name, "fudoki", run, out / name / "summary.json", needs))
    jobs += unifluid_runs
    # Evaluations are jobs too: a finished model is scored while others still train.
    for name in config.all_runs:
        jobs.append(_Job(f"eval_{name}", "eval", {"run": name, **config.to_dict()},
                         out / name / "eval.json", (name,)))  # fmt: skip
    return jobs


def _model_base(path: str, out: Path, threads: int, **image_tokenizer: str) -> dict[str, Any]:
    """A model's run config with the stages it shares filled in: the image tokenizer (``vq``
    or ``vae``), the SigLIP tower, the text tokenizer; ``threads`` per job."""
    return (
        _yaml_dict(path)
        | image_tokenizer
        | {
            "vision": str(out / "siglip" / "vision"),
            "text_tokenizer": str(out / "text_tokenizer"),
            "threads": threads,
        }
    )


def _unifluid_jobs(config: ReproduceConfig, out: Path, threads: int, every: int) -> list[_Job]:
    """The KL-VAE (alone, every thread), then the UniFluid runs on it."""
    kl = _yaml_dict(config.kl) | {"out": str(out / "kl"), "threads": every}
    jobs = [_Job("kl", "tokenizer", kl, out / "kl" / "eval.json", exclusive=True)]
    base = _model_base(config.unifluid, out, threads, vae=str(out / "kl" / "model"))
    for name in config.unifluid_runs:
        run = json.loads(json.dumps(base))
        run["out"] = str(out / name)
        knobs = {k: v for k, v in (config.unifluid_runs[name] or {}).items() if k != "steps"}
        run["model"] = {**run.get("model", {}), **knobs}
        run["optim"] = {**run.get("optim", {}), "steps": config.unifluid_run_steps(name)}
        jobs.append(_Job(name, "unifluid", run, out / name / "summary.json", ("kl", "siglip")))
    return jobs


def _run_jobs(
    jobs: list[_Job], out: Path, parallel: int, threads: int, log: Callable,
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


# -- evaluation ---------------------------------------------------------------------------------
def _evaluate(name: str, out: Path, settings: EvalSettings, log: Callable) -> dict[str, Any]:
    """Scores, sample grid, refinement GIFs and self-correction statistics of one run."""
    import numpy as np

    import kineflow
    from kineflow.data.shapes.prompts import passes, prompt_set
    from kineflow.eval.benchmark import evaluate_model, summary
    from kineflow.eval.detector import detect
    from kineflow.eval.scores import contact_sheet
    from kineflow.eval.self_correction import picture_corrections, token_revisions
    from kineflow.inputs.images import save_gif, save_strip
    from kineflow.pipelines.unifluid import UnifluidPipeline

    s = settings
    pipe = kineflow.load(out / name / "model")
    figures = out / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    unifluid = isinstance(pipe, UnifluidPipeline)
    steps = None if unifluid else s.steps  # UniFluid: one backbone step per token
    start = time.perf_counter()
    report = evaluate_model(
        pipe,
        images_per_prompt=s.images_per_prompt,
        max_prompts_per_category=s.max_prompts_per_category,
        vqa_items=s.vqa_items,
        caption_items=s.caption_items,
        edit_items=s.edit_items if unifluid else 0,
        steps=steps,
        cfg_scale=s.cfg_scale,
        seed=s.seed,
        progress=False,
    )
    result = summary(report)
    result["eval_seconds"] = time.perf_counter() - start

    # Sample grid: the first prompts of every category (test), then held-out ones.
    test = prompt_set("test")
    chosen = [p for c in CATEGORIES for p in [q for q in test if q.category == c][
        : s.grid_prompts_per_category]]  # fmt: skip
    chosen += prompt_set("heldout")[: s.grid_prompts_per_category]
    texts = [p.text for p in chosen for _ in range(s.grid_samples)]
    images = pipe.text_to_image(texts, steps=steps, cfg_scale=s.cfg_scale, seed=s.seed).images
    pictures = [np.asarray(im) for im in images]
    verdicts = [passes(p, sc) for p, sc in zip(
        [p for p in chosen for _ in range(s.grid_samples)], detect(np.stack(pictures)),
        strict=True)]  # fmt: skip
    labels = [t if k % s.grid_samples == 0 else "" for k, t in enumerate(texts)]
    sheet = contact_sheet(pictures, verdicts, labels, columns=s.grid_samples * 2, scale=3)
    sheet.save(figures / f"{name}_samples.png")
    result["parameters"] = sum(p.numel() for p in pipe.model.parameters())
    if unifluid:
        result |= _unifluid_figures(pipe, name, figures, report, s)
        log(f"eval  {name}: {json.dumps(result)}")
        return result

    # Refinement GIFs and self-correction on test prompts (trajectories of every sample).
    rng = np.random.default_rng(s.seed)
    traj_prompts = [test[i] for i in rng.choice(len(test), size=s.trajectories, replace=False)]
    run = pipe.text_to_image([p.text for p in traj_prompts], steps=s.steps,
                             cfg_scale=s.cfg_scale, seed=s.seed + 1,
                             return_trajectory=True)  # fmt: skip
    for b in range(2):
        save_gif(run.trajectory[b], figures / f"{name}_refine_{b}.gif", scale=4)
        frames = run.trajectory[b]
        keep = sorted({round(k * (len(frames) - 1) / 8) for k in range(9)})
        save_strip([frames[k] for k in keep], figures / f"{name}_refine_{b}.png", scale=3)
    correction = {"tokens": token_revisions(run.states)}
    # Pictures only for the mask-free path: a half-drawn AR canvas or a half-masked picture
    # always fails its prompt, so "corrected" would count every sample.
    if pipe.config.path == "metric":
        pics = picture_corrections(traj_prompts, run.trajectory)
        correction["pictures"] = pics
        if pics["examples"]:
            ex = pics["examples"][0]
            frames = run.trajectory[ex["sample"]]
            save_gif(frames, figures / f"{name}_corrected.gif", scale=4)
            save_strip(frames, figures / f"{name}_corrected.png", scale=3)
    result["self_correction"] = correction
    result["path"] = pipe.config.path
    log(f"eval  {name}: {json.dumps({k: v for k, v in result.items() if k != 'self_correction'})}")
    return result


def _unifluid_figures(
    pipe: Any, name: str, figures: Path, report: dict[str, Any], s: EvalSettings
) -> dict[str, Any]:
    """Token-by-token GIFs of two test prompts and an editing sheet (source, edit, target;
    frames green when the edit reads back as the target); returns the run's ablation knobs."""
    import numpy as np

    from kineflow.data.shapes.dataset import draw_item
    from kineflow.data.shapes.prompts import prompt_set
    from kineflow.data.shapes.render import render
    from kineflow.data.shapes.scene import Scene, ShapesWorld
    from kineflow.eval.scores import contact_sheet
    from kineflow.inputs.images import save_gif, save_strip

    test = prompt_set("test")
    run = pipe.text_to_image([test[0].text, test[len(test) // 2].text], cfg_scale=s.cfg_scale,
                             seed=s.seed + 1, return_trajectory=True)  # fmt: skip
    for b, frames in enumerate(run.trajectory):
        save_gif(frames, figures / f"{name}_refine_{b}.gif", scale=4)
        keep = sorted({round(k * (len(frames) - 1) / 8) for k in range(9)})
        save_strip([frames[k] for k in keep], figures / f"{name}_refine_{b}.png", scale=3)
    if "edit" in report:  # the first test edits: source, the model's edit, the target
        world, edit = ShapesWorld(), report["edit"]
        pictures, verdicts, labels = [], [], []
        for k, row in enumerate(edit["items"][:8]):
            item = draw_item(world, "edit", "test", k)
            edited = np.asarray(edit["pictures"][k])
            size = edited.shape[0]
            pictures += [render(Scene.from_key(item.scene_key), size), edited,
                         render(Scene.from_key(item.target_key), size)]  # fmt: skip
            verdicts += [None, bool(row["passed"]), None]
            labels += [item.texts["instruction"], "edited", "target"]
        sheet = contact_sheet(pictures, verdicts, labels, columns=6, scale=4)
        sheet.save(figures / f"{name}_edits.png")
    config = pipe.model.config
    return {"family": "unifluid", "text_loss_weight": config.text_loss_weight,
            "order": config.order}  # fmt: skip


# -- results ------------------------------------------------------------------------------------
def _fmt(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


def write_results(results: dict[str, Any], out: Path) -> Path:
    """``out/results.json`` (everything) and ``out/results.md`` (tables, targets, figures)."""
    atomic_write_json(out / "results.json", results)
    runs = results["runs"]
    steps = results["config"]["steps"]
    discrete = {n: r for n, r in runs.items() if r.get("family") != "unifluid"}
    unifluid = {n: r for n, r in runs.items() if r.get("family") == "unifluid"}
    lines = [
        "# ShapesWorld reproduction",
        "",
        f"Every discrete model: the same network ({_params(discrete)} parameters with the "
        f"frozen VQ and SigLIP), {steps} optimizer steps of the same batches (equal training "
        "compute; `fudoki_from_ar` = the AR run's weights at N/2, then N/2 DFM steps). "
        "Generation is scored by the ShapesWorld detector (GenEval-style rules); sampling: "
        f"{results['config']['eval']['steps']} Euler steps for the flow models, one step per "
        f"token for AR, CFG w = {results['config']['eval']['cfg_scale']}.",
    ]
    if unifluid:
        uf_steps = results["config"].get("unifluid_steps") or steps
        lines += ["", f"UniFluid runs: the same backbone size on continuous KL-VAE tokens with a "
                  f"per-token diffusion head ({_params(unifluid)} parameters with the frozen "
                  f"KL-VAE and SigLIP), {uf_steps} optimizer steps (unless the ablation table "
                  "says otherwise) of batch-mixed generation, "
                  "editing and understanding; one backbone step per token, random order unless "
                  "stated, CFG rising to the same w. Editing: the edited test picture must read "
                  "back as the target scene."]  # fmt: skip
    lines += [
        "",
        "| model | gen overall | " + " | ".join(CATEGORIES) + " | held-out | VQA | caption "
        "exact | caption parse | edit | train min |",
        "|---" * (len(CATEGORIES) + 8) + "|",
    ]
    for name, r in runs.items():
        cats = r["t2i_test"]["by_category"]
        row = [f"`{name}`", _fmt(r["t2i_test"]["overall"])]
        row += [_fmt(cats.get(c)) for c in CATEGORIES]
        row += [_fmt(r["t2i_heldout"]["overall"]), _fmt(r["vqa"]["accuracy"]),
                _fmt(r["caption"]["accuracy"]), _fmt(r["caption"]["parse_rate"]),
                _fmt(r["edit"]["accuracy"]) if "edit" in r else "–",
                f"{results['train_seconds'].get(name, 0) / 60:.1f}"]  # fmt: skip
        lines.append("| " + " | ".join(row) + " |")
    if unifluid:
        lines += ["", "## UniFluid ablations", "",
                  "L = L_image + λ·L_text; the paper: larger λ trades generation for "
                  "understanding, and random order beats raster order for generation.", "",
                  "| run | λ | order | steps | gen overall | held-out | VQA | caption exact "
                  "| edit |", "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        config = ReproduceConfig.from_dict(results["config"])
        for name, r in sorted(
            unifluid.items(),
            key=lambda kv: (kv[1]["order"], config.unifluid_run_steps(kv[0]),
                            kv[1]["text_loss_weight"]),
        ):  # fmt: skip
            cells = [f"`{name}`", f"{r['text_loss_weight']:g}", r["order"],
                     str(config.unifluid_run_steps(name)),
                     _fmt(r["t2i_test"]["overall"]), _fmt(r["t2i_heldout"]["overall"]),
                     _fmt(r["vqa"]["accuracy"]), _fmt(r["caption"]["accuracy"]),
                     _fmt(r["edit"]["accuracy"]) if "edit" in r else "–"]  # fmt: skip
            lines.append("| " + " | ".join(cells) + " |")
    minutes = results["wall_seconds"] / 60
    lines += ["", f"Wall time of the whole reproduction: {minutes:.1f} min."]
    for name, targets in results["targets"].items():
        shipped = " (the shipped model)" if name == results["flagship"] else ""
        lines += ["", f"## Targets: `{name}`{shipped}", ""]
        for t in targets:
            verdict = "met" if t["met"] else f"missed by {t['gap']:.3f}"
            lines.append(f"- {t['what']}: **{_fmt(t['value'])}** (target {t['target']}): {verdict}")
    lines += ["", "## Self-correction", "",
              "A token is *set* when it first leaves its source value (mask or uniform draw); "
              "*revised* when it changes again later. A picture is *corrected* when a frame in "
              "the second half of its trajectory fails its prompt and the final picture passes.",
              "", "| model | tokens revised after being set | set to a non-final value | "
              "changes per token | pictures corrected | pictures broken |",
              "|---|---|---|---|---|---|"]  # fmt: skip
    for name, r in discrete.items():
        tok = r["self_correction"]["tokens"]
        pics = r["self_correction"].get("pictures")
        cells = [f"`{name}`", _fmt(tok["revised_fraction"]),
                 _fmt(tok["set_value_wrong_fraction"]), f"{tok['mean_changes_per_token']:.2f}",
                 f"{pics['corrected']}/{pics['samples']}" if pics else "–",
                 f"{pics['broken']}/{pics['samples']}" if pics else "–"]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    example = next((
        (n, r["self_correction"]["pictures"]["examples"][0]) for n, r in discrete.items()
        if r["self_correction"].get("pictures", {}).get("examples")), None)  # fmt: skip
    if example:
        n, ex = example
        lines += ["", f"Example (`{n}`): \"{ex['prompt']}\": frame {ex['failed_frame']} of "
                  f"{ex['frames']} failed ({'; '.join(ex['failures'])}); the final picture "
                  f"passes. ![corrected](figures/{n}_corrected.gif) "
                  f"![strip](figures/{n}_corrected.png)"]  # fmt: skip
    lines += ["", "## Samples and refinement", ""]
    for name in runs:
        lines += [f"### `{name}`", "", f"![samples](figures/{name}_samples.png)", "",
                  f"![refine](figures/{name}_refine_0.gif) ![refine](figures/{name}_refine_1.gif)"
                  f" ![strip](figures/{name}_refine_0.png)", ""]  # fmt: skip
        if name in unifluid:
            lines += ["Token by token above (cells not generated yet are the zero latent); "
                      "editing (instruction, the model's edit, the target):", "",
                      f"![edits](figures/{name}_edits.png)", ""]  # fmt: skip
    lines += ["## Training curves", "", "![loss](figures/loss.png)", ""]
    if unifluid:
        lines += ["![UniFluid loss](figures/loss_unifluid.png)", ""]
    path = out / "results.md"
    atomic_write(path, lambda t: t.write_text("\n".join(lines) + "\n"))
    return path


def _params(runs: dict[str, Any]) -> str:
    counts = sorted({f"{r['parameters'] / 1e6:.2f} M" for r in runs.values()})
    return "/".join(counts)


def _targets(runs: dict[str, Any], name: str) -> list[dict[str, Any]]:
    f = runs[name]
    gen, vqa = f["t2i_test"]["overall"], f["vqa"]["accuracy"]
    targets = [
        {"what": "generation overall", "value": gen, "target": ">= 0.70", "met": gen >= 0.70,
         "gap": 0.70 - gen},
        {"what": "VQA accuracy", "value": vqa, "target": ">= 0.85", "met": vqa >= 0.85,
         "gap": 0.85 - vqa},
    ]  # fmt: skip
    if "ar" in runs:
        a = runs["ar"]
        for what, mine, theirs in (
            ("generation: FUDOKI − AR", gen, a["t2i_test"]["overall"]),
            ("VQA: FUDOKI − AR", vqa, a["vqa"]["accuracy"]),
        ):
            d = mine - theirs
            targets.append({"what": what, "value": d, "target": ">= -0.05", "met": d >= -0.05,
                            "gap": -0.05 - d})  # fmt: skip
    return targets


# -- the whole run ------------------------------------------------------------------------------
def reproduce(config: ReproduceConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run every stage (see the module docstring); returns the results dict."""
    from kineflow.data.shapes.dataset import corpus
    from kineflow.eval.plot import plot_metrics, read_metrics
    from kineflow.tokenizers.text import train_text_tokenizer

    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    threads = max(1, (os.cpu_count() or 1) // config.jobs)
    jobs = _jobs(config, out, threads)  # reads the stage configs first: fail before training
    if not (out / "text_tokenizer" / "tokenizer.json").is_file():
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

    _run_jobs(jobs, out, config.jobs, threads, log, done)
    timings["calls"].append({"wall_seconds": round(time.perf_counter() - t0, 1), "jobs_run": ran})
    atomic_write_json(timings_file, timings)
    train_seconds = {k: v for k, v in timings["jobs"].items() if not k.startswith("eval_")}
    evals = {n: json.loads((out / n / "eval.json").read_text()) for n in config.all_runs}
    curves = {name: read_metrics(out / name / "metrics.jsonl") for name in config.runs}
    plot_metrics(curves, ["loss", "loss_gen", "loss_und"], out / "figures" / "loss.png")
    if config.unifluid is not None:
        curves = {n: read_metrics(out / n / "metrics.jsonl") for n in config.unifluid_runs}
        plot_metrics(curves, ["loss", "loss_image", "loss_text"],
                     out / "figures" / "loss_unifluid.png")  # fmt: skip
    flagship = FLAGSHIP if FLAGSHIP in evals else "fudoki"
    results = {
        "config": config.to_dict(),
        "train_seconds": train_seconds,
        "wall_seconds": sum(c["wall_seconds"] for c in timings["calls"]),
        "calls": timings["calls"],
        "flagship": flagship,
        "runs": evals,
        "targets": {n: _targets(evals, n) for n in ("fudoki", "fudoki_from_ar") if n in evals},
        "stages": {
            "vq": json.loads((out / "vq" / "eval.json").read_text()),
            "siglip": json.loads((out / "siglip" / "eval.json").read_text()),
        },
    }
    if config.unifluid is not None:
        results["stages"]["kl"] = json.loads((out / "kl" / "eval.json").read_text())
    if config.ship:
        results["shipped"] = {
            name: ship(src, Path(config.ship) / name) for name, src in (
                ("fudoki-shapes", out / flagship / "model"),
                ("vq-shapes", out / "vq" / "model"),
                ("siglip-shapes", out / "siglip" / "vision"),
            )
        }  # fmt: skip
        if config.unifluid is not None:
            # The configs in configs/ read the KL-VAE from here, so a fresh clone can train
            # UniFluid without running the tokenizer stage first.
            results["shipped"]["kl-shapes"] = ship(
                out / "kl" / "model", Path(config.ship) / "kl-shapes", _save_half_vae
            )
        if UNIFLUID_FLAGSHIP in evals:
            results["shipped"]["unifluid-shapes"] = ship(
                out / UNIFLUID_FLAGSHIP / "model", Path(config.ship) / "unifluid-shapes",
                _save_half,
            )  # fmt: skip
    write_results(results, out)
    log(f"results: {out / 'results.md'}")
    return results


def _main(argv: list[str]) -> int:
    """``python -m kineflow.apps.reproduce eval RUN CONFIG``: the evaluation job of one run."""
    if len(argv) != 3 or argv[0] != "eval":
        print("usage: python -m kineflow.apps.reproduce eval RUN CONFIG_YAML")
        return 2
    run, path = argv[1], argv[2]
    raw = _yaml_dict(path)
    raw.pop("run", None)
    config = ReproduceConfig.from_dict(raw)
    out = Path(config.out)
    result = _evaluate(run, out, config.eval, print)
    atomic_write_json(out / run / "eval.json", result)
    return 0


def ship(
    model: Path, dest: Path, write: Callable[[Path, Path], Any] = shutil.copytree
) -> dict[str, Any]:
    """Copy a trained model folder to ``dest`` (replacing it whole; ``write(model, folder)``
    makes the copy); returns its size."""
    tmp = dest.with_name(dest.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    write(model, tmp)
    if dest.exists():
        shutil.rmtree(dest)
    tmp.rename(dest)
    size = sum(f.stat().st_size for f in dest.rglob("*") if f.is_file())
    return {"path": str(dest), "bytes": size}


def _save_half(model: Path, folder: Path) -> None:
    """A UniFluid folder re-saved with float16 weights: half the bytes; the pipeline loads
    them into its float32 model."""
    import torch

    from kineflow.pipelines.unifluid import UnifluidPipeline

    UnifluidPipeline.from_pretrained(model).save_pretrained(folder, dtype=torch.float16)


def _save_half_vae(model: Path, folder: Path) -> None:
    """A KL-VAE folder re-saved with float16 weights (as the shipped UniFluid stores it)."""
    import torch

    from kineflow.tokenizers.kl_vae import AutoencoderKL

    AutoencoderKL.from_pretrained(model).to(torch.float16).save_pretrained(folder)


if __name__ == "__main__":
    raise SystemExit(_main(sys.argv[1:]))
