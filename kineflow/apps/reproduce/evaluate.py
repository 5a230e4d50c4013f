"""Evaluating one trained run: the ShapesWorld scores, the sample grid, refinement GIFs and
self-correction statistics (token-by-token GIFs and an editing sheet for UniFluid).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kineflow.apps.reproduce.config import EvalSettings
from kineflow.data.shapes.prompts import CATEGORIES

__all__ = ["benchmark_report", "evaluate_run"]


def benchmark_report(
    pipe: Any, settings: EvalSettings, heldout_images_per_prompt: int | None = None
) -> dict[str, Any]:
    """:func:`~kineflow.eval.benchmark.evaluate_model` of ``pipe`` with ``settings`` (the
    reproduction's): solver steps only where the family has them (UniFluid takes one backbone
    step per token), edits only where it edits; ``heldout_images_per_prompt`` overrides the
    settings' pictures per prompt on the held-out split. The full report, per-item rows and
    pictures included; :func:`~kineflow.eval.benchmark.summary` keeps the numbers."""
    from kineflow.eval.benchmark import evaluate_model

    s = settings
    return evaluate_model(
        pipe,
        images_per_prompt=s.images_per_prompt,
        heldout_images_per_prompt=heldout_images_per_prompt,
        max_prompts_per_category=s.max_prompts_per_category,
        vqa_items=s.vqa_items,
        caption_items=s.caption_items,
        edit_items=s.edit_items if pipe.supports("edit") else 0,
        steps=s.steps if pipe.uses_option("text_to_image", "steps") else None,
        cfg_scale=s.cfg_scale,
        seed=s.seed,
        progress=False,
    )


def evaluate_run(name: str, out: Path, settings: EvalSettings, log: Callable) -> dict[str, Any]:
    """Scores, sample grid, refinement GIFs and self-correction statistics of one run."""
    import numpy as np

    import kineflow
    from kineflow.data.shapes.prompts import passes, prompt_set
    from kineflow.eval.benchmark import summary
    from kineflow.eval.detector import detect
    from kineflow.eval.scores import contact_sheet

    s = settings
    pipe = kineflow.load(out / name / "model")
    figures = out / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    # UniFluid takes one backbone step per token: it has no steps option.
    steps = s.steps if pipe.uses_option("text_to_image", "steps") else None
    start = time.perf_counter()
    report = benchmark_report(pipe, s)
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
    result |= _FIGURES[pipe.kineflow_type](pipe, name, figures, report, s)
    log(f"eval  {name}: {json.dumps({k: v for k, v in result.items() if k != 'self_correction'})}")
    return result


def _flow_figures(
    pipe: Any, name: str, figures: Path, report: dict[str, Any], s: EvalSettings
) -> dict[str, Any]:
    """Refinement GIFs of solver trajectories and self-correction statistics (FUDOKI, masked
    and AR runs); returns them with the run's path."""
    import numpy as np

    from kineflow.data.shapes.prompts import prompt_set
    from kineflow.eval.self_correction import picture_corrections, token_revisions
    from kineflow.inputs.images import save_gif, save_strip

    test = prompt_set("test")
    result: dict[str, Any] = {}
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


#: The figures of a run, by the loaded pipeline's ``kineflow_type``.
_FIGURES = {"fudoki": _flow_figures, "unifluid": _unifluid_figures}
