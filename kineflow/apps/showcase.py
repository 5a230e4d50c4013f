"""The main job: a trained checkpoint (FUDOKI or UniFluid) generating, understanding and
editing ShapesWorld pictures.

``kineflow showcase --model checkpoints/fudoki-shapes`` (and ``unifluid-shapes``; ``make
demo`` runs both) needs no training:

- **text-to-image**: one prompt per GenEval-style category plus a held-out composition, a few
  seeds each; every picture is read back by the ShapesWorld detector and marked pass / fail
  with the reasons (``samples.png``, ``sample_{i}.png``, ``t2i.json``); the refinement of the
  first seed of each prompt, one frame per solver step for FUDOKI, the canvas filling in token
  by token for UniFluid (``refine_{i}.gif`` / ``.png``);
- **VQA**: test-split questions about rendered test scenes, with the ground truth beside the
  model's answer, and questions about the model's own pictures (``answers.json``);
- **editing** (models that edit): test-split source pictures and instructions, the model's
  edit beside the target, graded by the detector (``edits.png``, ``edit_{i}.png``,
  ``edits.json``);
- ``summary.json``: accuracies and timings.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kineflow.data.shapes.language import NUMBER_WORDS
from kineflow.io import atomic_write_json

__all__ = ["SHOWCASE_PROMPTS", "format_showcase", "run_showcase"]

#: One prompt per GenEval-style category (test split), then a held-out composition (a blue
#: circle next to a red square never appears in training).
SHOWCASE_PROMPTS = (
    "a triangle",
    "a circle and a square",
    "three squares",
    "a green circle",
    "a circle left of a square",
    "a red circle and a blue square",
    "a blue circle and a red square",
)


def run_showcase(
    model: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    prompts: tuple[str, ...] | list[str] = SHOWCASE_PROMPTS,
    seeds: int = 4,
    vqa_items: int = 24,
    edit_items: int = 8,
    steps: int | None = None,
    cfg_scale: float | None = None,
    best_of: int = 1,
    seed: int = 0,
    device: str | None = None,
    dtype: torch.dtype | None = None,
) -> dict[str, Any]:
    """Run the showcase with the checkpoint at ``model``; writes into ``out`` and returns the
    summary (see the module docstring). ``best_of`` > 1: each shown picture is the one of
    ``best_of`` candidates the model itself rates likeliest to show its prompt
    (:mod:`kineflow.pipelines.judge`); the detector only grades what is kept. ``dtype``:
    the model's precision (default: the checkpoint's); float64 draws the same pictures across
    CPUs, where float32 redraws a few of FUDOKI's on another instruction set."""
    import kineflow
    from kineflow.data.shapes.dataset import draw_item
    from kineflow.data.shapes.prompts import all_prompts, check
    from kineflow.data.shapes.render import render_image
    from kineflow.data.shapes.scene import Scene, ShapesWorld
    from kineflow.eval.detector import detect
    from kineflow.eval.scores import contact_sheet
    from kineflow.inputs.images import save_gif, save_strip

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    pipe = kineflow.load(model, device=device, dtype=dtype)
    load_s = time.perf_counter() - start
    if steps is not None and not pipe.uses_option("text_to_image", "steps"):
        raise ValueError("steps (--steps) applies to FUDOKI models only: UniFluid takes one "
                         "backbone step per token")  # fmt: skip
    known = {p.text: p for p in all_prompts()}

    # Text-to-image: `seeds` pictures per prompt in one batch, the first with its trajectory.
    start = time.perf_counter()
    texts = [p for p in prompts for _ in range(seeds)]
    result = pipe.text_to_image(
        texts, steps=steps, cfg_scale=cfg_scale, seed=seed, return_trajectory=True,
        best_of=best_of,
    )  # fmt: skip
    t2i_s = time.perf_counter() - start
    scenes = detect(np.stack([np.asarray(im) for im in result.images]))
    records, verdicts = [], []
    for i, (text, image, scene) in enumerate(zip(texts, result.images, scenes, strict=True)):
        image.resize((image.width * 4, image.height * 4), 0).save(out / f"sample_{i}.png")
        prompt = known.get(text)
        failures = check(prompt, scene) if prompt is not None else None
        verdicts.append(failures == [])
        records.append({
            "prompt": text, "file": f"sample_{i}.png", "category": prompt and prompt.category,
            "detected": scene.to_dict(),
            "passes": failures == [] if failures is not None else None, "failures": failures,
        })  # fmt: skip
        if result.chosen is not None:  # which candidate the model kept, and its yes − no logit
            records[-1].update(chosen=result.chosen[i], judge_score=result.scores[i])
    for k in range(len(prompts)):
        frames = result.trajectory[k * seeds]
        save_gif(frames, out / f"refine_{k}.gif", scale=4)
        keep = sorted({round(j * (len(frames) - 1) / 8) for j in range(9)})
        save_strip([frames[j] for j in keep], out / f"refine_{k}.png", scale=4)
    labels = [t if i % seeds == 0 else "" for i, t in enumerate(texts)]
    sheet = contact_sheet([np.asarray(im) for im in result.images], verdicts, labels,
                          columns=2 * seeds, scale=4)  # fmt: skip
    sheet.save(out / "samples.png")
    atomic_write_json(out / "t2i.json", records)

    # VQA: test scenes with their ground truth, then questions about the model's own pictures.
    world = ShapesWorld()
    items = [draw_item(world, "vqa", "test", i) for i in range(vqa_items)]
    pictures = [render_image(Scene.from_key(it.scene_key)) for it in items]
    questions = [it.texts["question"] for it in items]
    # About each prompt's first picture, with the detector's count as the reference.
    own = [result.images[k * seeds] for k in range(len(prompts))]
    own_q = ["how many objects are there?"] * len(own)
    start = time.perf_counter()
    answers = pipe.answer(pictures + own, questions + own_q, steps=steps, seed=seed)
    vqa_s = time.perf_counter() - start
    qa = []
    for i, it in enumerate(items):
        picture_file = f"vqa_{i}.png"
        pictures[i].resize((128, 128), 0).save(out / picture_file)
        qa.append({"image": picture_file, "question": questions[i], "answer": answers.texts[i],
                   "truth": it.texts["answer"],
                   "correct": answers.texts[i].strip() == it.texts["answer"]})  # fmt: skip
    for k, text in enumerate(answers.texts[len(items) :]):
        count = len(scenes[k * seeds])
        qa.append({"image": f"sample_{k * seeds}.png", "question": own_q[k], "answer": text,
                   "detector_count": NUMBER_WORDS[count] if count < len(NUMBER_WORDS)
                   else str(count)})  # fmt: skip
    atomic_write_json(out / "answers.json", qa)
    edits, edit_s = [], 0.0
    if edit_items and pipe.supports("edit"):
        start = time.perf_counter()
        edits = _edits(pipe, out, edit_items, seed)
        edit_s = time.perf_counter() - start

    graded = [r["passes"] for r in records if r["passes"] is not None]
    summary = {
        "model": str(model),
        "device": str(pipe.device),
        "threads": torch.get_num_threads(),
        "t2i": {
            "pictures": len(texts),
            "passed": sum(graded),
            "graded": len(graded),
            "best_of": best_of,
            "cfg_scale": cfg_scale,
        },
        "vqa": {"questions": len(items), "correct": sum(r["correct"] for r in qa[: len(items)])},
        "edit": {"edits": len(edits), "correct": sum(r["passes"] for r in edits)},
        "seconds": {"load": load_s, "text_to_image": t2i_s, "vqa": vqa_s, "edit": edit_s},
        "files": sorted(p.name for p in out.iterdir()),
    }
    atomic_write_json(out / "summary.json", summary)
    return summary


def _edits(pipe: Any, out: Path, n: int, seed: int) -> list[dict[str, Any]]:
    """Edit ``n`` test-split pictures; write the pictures, a sheet and ``edits.json``."""
    from kineflow.data.shapes.dataset import draw_item
    from kineflow.data.shapes.render import render
    from kineflow.data.shapes.scene import Scene, ShapesWorld
    from kineflow.eval.detector import detect
    from kineflow.eval.scores import contact_sheet

    world = ShapesWorld()
    items = [draw_item(world, "edit", "test", i) for i in range(n)]
    size = pipe.model.config.vae.image_size
    sources = [render(Scene.from_key(it.scene_key), size) for it in items]
    result = pipe.edit(sources, [it.texts["instruction"] for it in items], seed=seed)
    scenes = detect(np.stack([np.asarray(im) for im in result.images]))
    records, pictures, verdicts, labels = [], [], [], []
    for i, (it, image, scene) in enumerate(zip(items, result.images, scenes, strict=True)):
        target = Scene.from_key(it.target_key)
        image.resize((image.width * 4, image.height * 4), 0).save(out / f"edit_{i}.png")
        records.append({"instruction": it.texts["instruction"], "kind": it.kind,
                        "source": it.scene_key, "target": it.target_key, "file": f"edit_{i}.png",
                        "detected": scene.key(), "passes": scene == target})  # fmt: skip
        pictures += [sources[i], np.asarray(image), render(target, size)]
        verdicts += [None, scene == target, None]
        labels += [it.texts["instruction"], "edited", "target"]
    contact_sheet(pictures, verdicts, labels, columns=6, scale=4).save(out / "edits.png")
    atomic_write_json(out / "edits.json", records)
    return records


def format_showcase(out: str | os.PathLike[str]) -> str:
    """A short human-readable report of a showcase folder."""
    out = Path(out)
    summary = json.loads((out / "summary.json").read_text())
    records = json.loads((out / "t2i.json").read_text())
    answers = json.loads((out / "answers.json").read_text())
    lines = ["text-to-image (detector verdict):"]
    for r in records:
        verdict = "pass" if r["passes"] else f"FAIL ({'; '.join(r['failures'] or ['?'])})"
        lines.append(f"  {r['file']:>14}  {r['prompt']!r}: {verdict}")
    lines.append("VQA (answer / truth):")
    for r in answers:
        truth = r.get("truth", r.get("detector_count"))
        lines.append(f"  {r['image']:>14}  {r['question']!r}: {r['answer']!r} / {truth!r}")
    edit_file = out / "edits.json"
    edits = json.loads(edit_file.read_text()) if edit_file.is_file() else []
    if edits:
        lines.append("editing (detector verdict):")
        for r in edits:
            verdict = "pass" if r["passes"] else f"FAIL (read {r['detected'] or 'nothing'})"
            lines.append(f"  {r['file']:>14}  {r['instruction']!r}: {verdict}")
    t, v, s = summary["t2i"], summary["vqa"], summary["seconds"]
    e = summary.get("edit", {"edits": 0})
    edited = f", {e['correct']}/{e['edits']} edits right" if e["edits"] else ""
    n = t.get("best_of", 1)
    kept = f" (each the best of {n} drawn, judged by the model itself)" if n > 1 else ""
    lines.append(
        f"{t['passed']}/{t['graded']} pictures pass their prompt{kept}, "
        f"{v['correct']}/{v['questions']} "
        f"answers correct{edited}; {s['text_to_image']:.1f} s text-to-image, {s['vqa']:.1f} s "
        f"VQA ({summary['device']}, {summary['threads']} threads). Files in {out}/"
    )
    return "\n".join(lines)
