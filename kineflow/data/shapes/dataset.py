"""ShapesWorld as datasets: items of every task, streamed from a seed by index.

:func:`make_item` draws item ``index`` of a ``(task, split)`` deterministically, so a
:class:`ShapesWorldDataset` needs no storage, any worker can draw any item, and
:mod:`kineflow.data.shapes.materialise` writes exactly the same items to disk. Tasks:

- ``t2i``: a picture with a prompt. Half the items pair a GenEval-style prompt (category
  uniform, then a prompt of the split, then a random scene holding exactly the prompt's
  objects: no extras, which taught models to add objects), half a random scene of
  the split with its full caption in a random template, so text-to-image models learn both
  the benchmark's prompt language and full descriptions.
- ``caption``: a random scene and its canonical caption (the captioning target).
- ``vqa``: a random scene and one question (type uniform among those it supports); with a
  ``verify`` question weight (training only) some rows instead ask whether a picture drawn
  for a prompt, or a near miss of it, shows exactly that prompt
  (:mod:`kineflow.data.shapes.verify`).
- ``edit``: a random scene, an instruction and the edited scene; the target scene belongs to
  the same split, so no test picture leaks into training even as an edit target.

Items follow :mod:`kineflow.data.example` (``t2i`` items have task ``"caption"``: same fields)
plus ``meta``, a dict of strings (collatable): the scene key(s) and the question type, prompt
id or edit kind, which is all the evaluators need.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache

import torch

from kineflow.data.example import image_to_tensor
from kineflow.data.shapes.language import (
    CAPTION_TEMPLATES,
    EDIT_KINDS,
    caption,
    sample_edit,
    sample_question,
)
from kineflow.data.shapes.prompts import CATEGORIES, Prompt, all_prompts, scene_for_prompt
from kineflow.data.shapes.render import render
from kineflow.data.shapes.scene import HeldOut, Scene, ShapesWorld, WorldConfig
from kineflow.data.shapes.verify import verify_question, verify_share

SHAPES_TASKS: tuple[str, ...] = ("t2i", "caption", "vqa", "edit")
#: Independent random streams of one item index (see :meth:`ShapesWorld.rng`).
_STREAM = {"t2i": 1, "caption": 2, "vqa": 3, "edit": 4}


def _check_task(task: str) -> None:
    if task not in SHAPES_TASKS:
        raise ValueError(f"unknown ShapesWorld task {task!r}; expected one of {SHAPES_TASKS}")


def split_prompts(world: ShapesWorld, split: str) -> dict[str, list[Prompt]]:
    """Prompts usable in ``split``, by category: those needing a held-out composition for
    ``heldout``, the others for train / val / test (categories with none are left out)."""
    return _split_prompts(world.config.heldout, split == "heldout")


@cache
def _split_prompts(heldout: HeldOut, held: bool) -> dict[str, list[Prompt]]:
    by_cat: dict[str, list[Prompt]] = {}
    for p in all_prompts():
        if p.uses_heldout(heldout) == held:
            by_cat.setdefault(p.category, []).append(p)
    return {c: by_cat[c] for c in CATEGORIES if c in by_cat}


@dataclass(frozen=True)
class ShapesItem:
    """An item before rendering: texts and scenes (what :func:`make_item` turns into tensors)."""

    task: str
    id: str
    scene_key: str
    texts: dict[str, str]
    target_key: str | None = None
    kind: str = ""


def draw_item(
    world: ShapesWorld,
    task: str,
    split: str,
    index: int,
    question_weights: Mapping[str, float] | None = None,
) -> ShapesItem:
    """Item ``index`` of ``task`` in ``split``, as scenes and texts (deterministic).

    ``question_weights`` (``vqa`` only, for training): how often each question type is asked
    (:func:`~kineflow.data.shapes.language.sample_question`,
    :func:`~kineflow.data.shapes.verify.verify_share`); None is the benchmark's uniform draw."""
    _check_task(task)
    rng = world.rng(split, index, _STREAM[task])
    item_id = f"{split}-{task}-{index:06d}"
    if task == "t2i":
        if rng.random() < 0.5:
            by_cat = split_prompts(world, split)
            cats = list(by_cat)
            prompts = by_cat[cats[rng.integers(len(cats))]]
            prompt = prompts[rng.integers(len(prompts))]
            scene = scene_for_prompt(prompt, world, rng, split)
            return ShapesItem("t2i", item_id, scene.key(), {"caption": prompt.text}, kind=prompt.id)
        scene = world.sample(rng, split)
        text = caption(scene, int(rng.integers(len(CAPTION_TEMPLATES))))
        return ShapesItem("t2i", item_id, scene.key(), {"caption": text}, kind="caption")
    scene = world.sample(rng, split)
    if task == "caption":
        return ShapesItem("caption", item_id, scene.key(), {"caption": caption(scene)})
    if task == "vqa":
        heldout = None if split == "heldout" else world.config.heldout
        share = verify_share(question_weights)
        # The coin is drawn only when verification is asked for: other items stay as they were.
        if share > 0 and rng.random() < share:
            scene, qa = verify_question(world, rng, split, split_prompts(world, split))
        else:
            qa = sample_question(scene, rng, heldout, question_weights)
        texts = {"question": qa.question, "answer": qa.answer}
        return ShapesItem("vqa", item_id, scene.key(), texts, kind=qa.type)
    # The kind is drawn first and scenes are redrawn until one admits an edit of that kind
    # whose target stays in the split: kinds stay uniform even in the small val / test splits,
    # where most targets of a given scene fall outside the split.
    kind = EDIT_KINDS[rng.integers(len(EDIT_KINDS))]
    for _ in range(1000):
        edit = sample_edit(scene, rng, lambda t: world.split_of(t) == split, kind)
        if edit is not None:
            texts = {"instruction": edit.instruction}
            return ShapesItem("edit", item_id, scene.key(), texts, edit.target.key(), kind=kind)
        scene = world.sample(rng, split)
    raise RuntimeError(f"no {kind} edit within split {split!r} for item {index}")


def item_to_example(item: ShapesItem, image_size: int) -> dict:
    """The :mod:`kineflow.data.example` dict of an item, pictures rendered."""
    out: dict = {
        "task": "caption" if item.task == "t2i" else item.task,
        "id": item.id,
        "image": image_to_tensor(render(Scene.from_key(item.scene_key), image_size)),
        **item.texts,
    }
    meta = {"scene": item.scene_key, "kind": item.kind}
    if item.target_key is not None:
        out["target"] = image_to_tensor(render(Scene.from_key(item.target_key), image_size))
        meta["target_scene"] = item.target_key
    out["meta"] = meta
    return out


class ShapesWorldDataset(torch.utils.data.Dataset):
    """``length`` items of ``task`` in ``split``, drawn on demand (see the module docstring).

    >>> ds = ShapesWorldDataset("vqa", "train", length=1000)
    >>> sorted(ds[0])
    ['answer', 'id', 'image', 'meta', 'question', 'task']
    """

    def __init__(
        self,
        task: str,
        split: str = "train",
        length: int = 10_000,
        world: WorldConfig | ShapesWorld | None = None,
    ) -> None:
        _check_task(task)
        if length < 1:
            raise ValueError(f"length must be >= 1, got {length}")
        self.world = world if isinstance(world, ShapesWorld) else ShapesWorld(world)
        self.world.rng(split, 0)  # validates the split name now, not at the first item
        self.task, self.split, self.length = task, split, length

    def __len__(self) -> int:
        return self.length

    def item(self, index: int) -> ShapesItem:
        if not -self.length <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.length} items")
        return draw_item(self.world, self.task, self.split, index % self.length)

    def __getitem__(self, index: int) -> dict:
        return item_to_example(self.item(index), self.world.config.image_size)


def corpus(world: ShapesWorld | None = None, n: int = 2000, split: str = "train") -> list[str]:
    """Every kind of ShapesWorld text (``n`` items of each task of ``split``, all prompts of
    the split, all answer words) -- what the text tokenizer is trained on. Held-out prompts
    are left out of the non-heldout splits, like everything else held out."""
    world = world or ShapesWorld()
    texts: list[str] = []
    for task in SHAPES_TASKS:
        for i in range(n):
            texts += draw_item(world, task, split, i).texts.values()
    for prompts in split_prompts(world, split).values():
        texts += [p.text for p in prompts]
    return texts
