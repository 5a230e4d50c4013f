"""A trained model on the ShapesWorld benchmark, in memory: generation, VQA and captioning.

Generation: every GenEval-style prompt of ``test`` (no held-out composition) and ``heldout``
(each prompt needs one) is sampled ``images_per_prompt`` times, the pictures are read back by
the detector, and :func:`~kineflow.eval.scores.score_t2i` gives per-category and overall
accuracy. Understanding: ``vqa_items`` test questions (one-word answers, exact match) and
``caption_items`` test pictures (a caption counts when it parses back to the exact scene).
Editing (pipelines that support ``edit``, ``edit_items`` > 0): the edited test picture must
read back as the target scene.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from kineflow.data.shapes.dataset import draw_item
from kineflow.data.shapes.prompts import Prompt, prompt_set
from kineflow.data.shapes.render import render_image
from kineflow.data.shapes.scene import Scene, ShapesWorld
from kineflow.eval.detector import detect
from kineflow.eval.scores import (
    EDIT_JUDGEMENTS,
    score_captions,
    score_edits,
    score_t2i,
    score_vqa,
)

__all__ = ["answer_items", "evaluate_model", "summary", "text_to_image_report"]


def _batches(n: int, size: int) -> list[range]:
    return [range(i, min(i + size, n)) for i in range(0, n, size)]


def answer_items(
    pipe: Any,
    items: list[Any],
    question: str | None = None,
    *,
    steps: int | None = None,
    seed: int = 0,
    batch_size: int = 64,
    progress: bool = False,
    desc: str = "answer",
    **options: Any,
) -> dict[str, str]:
    """``pipe``'s answers ``{item id: text}`` about ShapesWorld ``items``: each item's scene
    rendered and asked its own ``texts["question"]`` (or ``question`` for every item, e.g. a
    caption instruction), in batches of ``batch_size``, batch ``k`` seeded ``seed + k``;
    ``options`` go to ``pipe.answer``."""
    answers: dict[str, str] = {}
    for k, rows in enumerate(tqdm(_batches(len(items), batch_size), disable=not progress,
                                  desc=desc)):  # fmt: skip
        batch = [items[i] for i in rows]
        images = [render_image(Scene.from_key(it.scene_key)) for it in batch]
        questions = [question or it.texts["question"] for it in batch]
        out = pipe.answer(images, questions, steps=steps, seed=seed + k, **options)
        answers.update({it.id: text for it, text in zip(batch, out.texts, strict=True)})
    return answers


def text_to_image_report(
    pipe: Any,
    prompts: list[Prompt],
    *,
    images_per_prompt: int = 1,
    batch_size: int = 64,
    seed: int = 0,
    progress: bool = False,
    desc: str = "generate",
    **options: Any,
) -> dict[str, Any]:
    """:func:`~kineflow.eval.scores.score_t2i` of ``pipe``'s pictures for ``prompts`` (each
    drawn ``images_per_prompt`` times, in batches of ``batch_size``, batch ``k`` seeded
    ``seed + k``, ``options`` passed to ``text_to_image``), read back by the detector; the
    pictures are kept under ``"pictures"``."""
    texts = [p.text for p in prompts for _ in range(images_per_prompt)]
    pictures: list[Image.Image] = []
    for k, rows in enumerate(tqdm(_batches(len(texts), batch_size), disable=not progress,
                                  desc=desc)):  # fmt: skip
        out = pipe.text_to_image([texts[i] for i in rows], seed=seed + k, **options)
        pictures += out.images
    scenes = iter(detect(np.stack([np.asarray(p) for p in pictures])))
    detected = {p.id: [next(scenes) for _ in range(images_per_prompt)] for p in prompts}
    report = score_t2i(prompts, detected)
    report["pictures"] = pictures
    return report


def evaluate_model(
    pipe: Any,
    *,
    images_per_prompt: int = 1,
    heldout_images_per_prompt: int | None = None,
    max_prompts_per_category: int | None = 24,
    vqa_items: int = 300,
    caption_items: int = 100,
    caption_instruction: str = "Describe the picture.",
    caption_tokens: int = 40,
    edit_items: int = 0,
    steps: int | None = None,
    cfg_scale: float | None = None,
    batch_size: int = 64,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Full reports (with per-item rows) for ``pipe``, a kineflow pipeline
    (:class:`~kineflow.pipelines.base.Pipeline`: ``text_to_image``, ``answer`` and, where it
    :meth:`~kineflow.pipelines.base.Pipeline.supports` it, ``edit``). A task asked for no items
    (``images_per_prompt`` or ``max_prompts_per_category`` 0, ``vqa_items`` 0, …) is left out
    of the report. ``heldout_images_per_prompt``: pictures per held-out prompt when it should
    differ from ``images_per_prompt`` (the held-out split has 28 prompts, two of its three
    categories two each, so a few pictures per prompt leave wide intervals)."""
    world = ShapesWorld()
    report: dict[str, Any] = {}
    per_prompt = {"test": images_per_prompt, "heldout": images_per_prompt
                  if heldout_images_per_prompt is None else heldout_images_per_prompt}  # fmt: skip
    for split, k in per_prompt.items():
        # Like the other tasks, generation is skipped when asked for no pictures.
        if k <= 0 or max_prompts_per_category == 0:
            continue
        prompts = prompt_set(split, max_per_category=max_prompts_per_category, seed=seed)
        report[f"t2i_{split}"] = text_to_image_report(
            pipe, prompts, images_per_prompt=k, batch_size=batch_size,
            seed=seed, progress=progress, desc=f"generate {split}", steps=steps,
            cfg_scale=cfg_scale,
        )  # fmt: skip

    tasks = (("vqa", vqa_items), ("caption", caption_items))
    for task, n in tasks:
        if n == 0:
            continue
        items = [draw_item(world, task, "test", i) for i in range(n)]
        options = {} if task == "vqa" else {"answer_tokens": caption_tokens}
        answers = answer_items(
            pipe, items, None if task == "vqa" else caption_instruction, steps=steps, seed=seed,
            batch_size=batch_size, progress=progress, desc=task, **options,
        )  # fmt: skip
        if task == "vqa":
            rows_ = [{"id": it.id, "type": it.kind, **it.texts} for it in items]
            report["vqa"] = score_vqa(rows_, answers)
        else:
            scenes_by_id = {it.id: Scene.from_key(it.scene_key) for it in items}
            report["caption"] = score_captions(scenes_by_id, answers)
    if edit_items and pipe.supports("edit"):
        items = [draw_item(world, "edit", "test", i) for i in range(edit_items)]
        edited: list[Image.Image] = []
        for k, rows in enumerate(tqdm(_batches(edit_items, batch_size), disable=not progress,
                                      desc="edit")):  # fmt: skip
            batch = [items[i] for i in rows]
            sources = [render_image(Scene.from_key(it.scene_key)) for it in batch]
            out = pipe.edit(sources, [it.texts["instruction"] for it in batch], seed=seed + k)
            edited += out.images
        scenes = detect(np.stack([np.asarray(p) for p in edited]))
        report["edit"] = score_edits(
            {it.id: Scene.from_key(it.target_key) for it in items},
            {it.id: sc for it, sc in zip(items, scenes, strict=True)},
            {it.id: it.kind for it in items},
            sources={it.id: Scene.from_key(it.scene_key) for it in items},
        )
        report["edit"]["pictures"] = edited
    return report


def summary(report: dict[str, Any]) -> dict[str, Any]:
    """The numbers of a report, without per-item rows or pictures (for tables and JSON); every
    score keeps its 95 % interval as ``<name>_ci`` (by group: ``by_<group>_ci``) where the
    report has one."""
    out: dict[str, Any] = {}
    for key, value in report.items():
        if key.startswith("t2i_"):
            cats = value["by_category"]
            out[key] = {
                "overall": value["accuracy"],
                "image_accuracy": value["image_accuracy"],
                "by_category": {c: v["accuracy"] for c, v in cats.items()},
                "n": value["n"],
            }
            if "strict_accuracy" in value:
                out[key] |= {
                    "overall_ci": value["accuracy_ci"],
                    "image_accuracy_ci": value["image_accuracy_ci"],
                    "by_category_ci": {c: v["accuracy_ci"] for c, v in cats.items()},
                    "strict": value["strict_accuracy"],
                    "strict_ci": value["strict_accuracy_ci"],
                    "strict_image_accuracy": value["strict_image_accuracy"],
                    "strict_image_accuracy_ci": value["strict_image_accuracy_ci"],
                    "strict_by_category": {c: v["strict_accuracy"] for c, v in cats.items()},
                    "strict_by_category_ci": {c: v["strict_accuracy_ci"] for c, v in cats.items()},
                }
            if "surplus_objects" in value:
                out[key] |= {
                    "surplus_objects": value["surplus_objects"],
                    "surplus_objects_ci": value["surplus_objects_ci"],
                    "surplus_by_category": {c: v["surplus_objects"] for c, v in cats.items()},
                }
        elif key in ("vqa", "edit"):
            group = "by_type" if key == "vqa" else "by_kind"
            out[key] = {
                "accuracy": value["accuracy"],
                group: {t: v["accuracy"] for t, v in value[group].items()},
                "n": value["n"],
            }
            if "accuracy_ci" in value:
                out[key]["accuracy_ci"] = value["accuracy_ci"]
                out[key][f"{group}_ci"] = {t: v["accuracy_ci"] for t, v in value[group].items()}
            for name in EDIT_JUDGEMENTS:  # edits judged against their source
                if name in value:
                    out[key] |= {k: value[k] for k in (name, f"{name}_ci", f"{name}_by_kind")}
        elif key == "caption":
            out[key] = {k: value[k] for k in ("accuracy", "parse_rate", "n")}
            out[key] |= {k: value[k] for k in ("accuracy_ci", "parse_rate_ci") if k in value}
    return out
