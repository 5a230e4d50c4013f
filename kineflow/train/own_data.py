"""Training FUDOKI and UniFluid on your own data: a JSONL manifest mixed by task ratios.

``data.manifest`` names a manifest (:mod:`kineflow.data.manifest`: caption, VQA and edit
records) and ``data.mix`` the share of each training task:

=========  ===================  ==========================================================
task       records used         sample
=========  ===================  ==========================================================
t2i        caption              generate the picture from its caption (CFG dropout applies)
caption    caption              answer ``data.caption_instruction`` with the caption
vqa        vqa                  answer the question
edit       edit (UniFluid)      generate the target picture from the source + instruction
=========  ===================  ==========================================================

Without ``mix`` the shares follow the ShapesWorld settings: ``understanding_ratio`` of the
samples are understanding (``caption_ratio`` of those captioning), ``edit_ratio`` (UniFluid)
editing, the rest text-to-image. The task of sample ``i`` and the record it reads are functions
of ``(data.seed, i)`` alone (:class:`~kineflow.data.mix.TaskMix`), so exact resume and DDP hold
as with ShapesWorld. Pictures are centre-cropped and resized to ``data.image_size``
(:class:`~kineflow.data.manifest.ManifestDataset`). Problems name the manifest line
(``FILE:LINE: ...``): a bad record when the run starts, an answer that does not fit its slots
before the first step, an unreadable picture when its sample is drawn.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from kineflow.data.example import tensor_to_array
from kineflow.data.manifest import ManifestDataset, ManifestError, ManifestRecord
from kineflow.data.mix import TaskMix, check_mix
from kineflow.inputs.layout import Layout, text_to_image_layout, understanding_layout
from kineflow.models.unifluid import generation_order
from kineflow.tokenizers.text import TextTokenizer
from kineflow.train.common import layout_record
from kineflow.train.loop import sample_generator

__all__ = [
    "FUDOKI_TASKS",
    "UNIFLUID_TASKS",
    "OwnData",
    "default_mix",
    "fudoki_record",
    "unifluid_record",
]

FUDOKI_TASKS = ("t2i", "caption", "vqa")
UNIFLUID_TASKS = ("t2i", "caption", "vqa", "edit")
_SOURCE = {"t2i": "caption", "caption": "caption", "vqa": "vqa", "edit": "edit"}


def default_mix(data: Any, tasks: tuple[str, ...]) -> dict[str, float]:
    """The shares ``data``'s ShapesWorld ratios give (module docstring)."""
    und, cap = data.understanding_ratio, data.caption_ratio
    edit = getattr(data, "edit_ratio", 0.0) if "edit" in tasks else 0.0
    mix = {"t2i": 1 - und - edit, "caption": und * cap, "vqa": und * (1 - cap)}
    if "edit" in tasks:
        mix["edit"] = edit
    return mix


class OwnData:
    """The samples of ``data.manifest`` mixed by ``data.mix`` (module docstring).

    Args:
        data: the run's ``data`` section (``manifest``, ``mix``, ``seed``, ``image_size``,
            ``caption_instruction``, ``caption_tokens``, ``vqa_answer_tokens``, ...).
        tasks: the trainer's tasks (:data:`FUDOKI_TASKS` or :data:`UNIFLUID_TASKS`).
        tokenizer: the run's text tokenizer (answers are checked against their slots).

    Raises:
        ManifestError: a bad record, a task with a share but no records, an answer that does
            not fit (``FILE:LINE: ...``).
        ValueError: a bad ``mix``.
    """

    def __init__(self, data: Any, tasks: tuple[str, ...], tokenizer: TextTokenizer) -> None:
        mix = dict(data.mix) if data.mix is not None else default_mix(data, tasks)
        check_mix(mix, tasks)
        self.data = data
        self.dataset = ManifestDataset(data.manifest, image_size=data.image_size)
        self.path = self.dataset.path
        # In name order: the task of a sample must not depend on how the mapping was written
        # (a config dumped with sorted keys, e.g. by yaml.safe_dump, is the same run).
        self.mix = TaskMix.from_mapping(dict(sorted(mix.items())), data.seed)
        self.pools: dict[str, list[int]] = {}
        for task, _ in self.mix.ratios:
            pool = [i for i, r in enumerate(self.dataset.records) if r.task == _SOURCE[task]]
            if not pool:
                raise ManifestError(
                    self.path,
                    1,
                    f"data.mix gives task {task!r} a share but the manifest has "
                    f"no {_SOURCE[task]} records",
                )
            self.pools[task] = pool
        for task in ("caption", "vqa"):
            for i in self.pools.get(task, []):
                self.answer_ids(task, self.dataset.records[i], tokenizer)

    def answer_ids(self, task: str, record: ManifestRecord, tokenizer: TextTokenizer) -> list[int]:
        """The answer slots' target ids of an understanding sample: the answer's ids, then EOS
        up to ``caption_tokens`` / ``vqa_answer_tokens`` slots."""
        d = self.data
        answer = record.caption if task == "caption" else record.answer
        slots = d.caption_tokens if task == "caption" else d.vqa_answer_tokens
        ids = tokenizer.encode(answer)
        if len(ids) >= slots:
            knob = "caption_tokens" if task == "caption" else "vqa_answer_tokens"
            raise ManifestError(
                self.path,
                record.line,
                f"the {task} answer {answer!r} is {len(ids)} tokens: it "
                f"does not fit in {slots} slots (+ EOS); raise data.{knob}",
            )
        return ids + [tokenizer.eos_id] * (slots - len(ids))

    def draw(self, index: int) -> tuple[str, int]:
        """Sample ``index``'s task and the position of its record in the manifest."""
        task = self.mix.task(index)
        pool = self.pools[task]
        return task, pool[self.mix.record(index, len(pool))]

    def picture(self, at: int, target: bool = False) -> np.ndarray:
        """Record ``at``'s picture (or an edit's target) as uint8 ``[S, S, 3]``."""
        return tensor_to_array(self.dataset[at]["target" if target else "image"])

    def layout(
        self,
        task: str,
        record: ManifestRecord,
        tokenizer: TextTokenizer,
        num_patches: int,
        num_image_tokens: int,
        cfg_draw: float,
    ) -> tuple[Layout, list[int] | None]:
        """FUDOKI's one-row layout of the sample and its answer targets (None for t2i). A
        prompt longer than the budget is a :class:`ManifestError` naming the line."""
        d = self.data
        try:
            if task == "t2i":
                lay = text_to_image_layout(
                    tokenizer, [record.caption], num_image_tokens, d.text_budget
                )
                if cfg_draw < d.cfg_dropout:
                    lay.input_ids = lay.input_ids.masked_fill(lay.prompt_span, tokenizer.pad_id)
                return lay, None
            question = d.caption_instruction if task == "caption" else record.question
            slots = d.caption_tokens if task == "caption" else d.vqa_answer_tokens
            lay = understanding_layout(tokenizer, [question], num_patches, d.text_budget, slots)
        except ValueError as e:
            raise ManifestError(self.path, record.line, str(e)) from None
        return lay, self.answer_ids(task, record, tokenizer)


def fudoki_record(
    own: OwnData, task_obj: Any, index: int
) -> tuple[dict[str, torch.Tensor], torch.Generator]:
    """:meth:`FudokiTask._draw` for a manifest sample: the same record keys (``kind`` 0 / 1,
    the layout row, ``target`` for understanding, the uint8 ``picture``, ``draws``), one
    uniform drawn from the sample's generator (the CFG dropout draw, drawn for every task so
    shards replay it alike)."""
    g = sample_generator(own.data.seed, index)
    cfg_draw = float(torch.rand((), generator=g))
    task, at = own.draw(index)
    record = own.dataset.records[at]
    if task != "t2i" and task_obj.num_patches == 0:
        raise ValueError(f"data.mix asks for {task} samples but the model has no vision tower")
    lay, target = own.layout(
        task, record, task_obj.tokenizer, task_obj.num_patches, task_obj.num_image_tokens, cfg_draw
    )
    extra = {"kind": torch.tensor([int(target is not None)])}
    if target is not None:
        extra["target"] = torch.tensor(target)
    picture = torch.from_numpy(own.picture(at))
    return {**layout_record(lay), **extra, "picture": picture, "draws": torch.tensor([1])}, g


def unifluid_record(own: OwnData, task_obj: Any, index: int) -> dict[str, torch.Tensor]:
    """:meth:`UnifluidTask.record` for a manifest sample: ``kind`` 0 (t2i: prompt ``ids``,
    generation ``order``, ``picture``), 1 (edit: also ``source_picture``) or 2 (understanding:
    the layout row, ``target``, ``picture``). The sample's generator draws the order and the
    CFG dropout, after one draw kept where ShapesWorld samples draw their kind."""
    g = sample_generator(own.data.seed, index)
    torch.rand((), generator=g)
    task, at = own.draw(index)
    record = own.dataset.records[at]
    tok = task_obj.tokenizer
    if task in ("caption", "vqa"):
        if task_obj.num_patches == 0:
            raise ValueError(f"data.mix asks for {task} samples but the model has no vision tower")
        lay, target = own.layout(task, record, tok, task_obj.num_patches, 0, 1.0)
        return {
            **layout_record(lay),
            "kind": torch.tensor([2]),
            "target": torch.tensor(target),
            "picture": torch.from_numpy(own.picture(at)),
        }
    config = task_obj.model.config
    order = generation_order(1, config.num_image_tokens, config.order, g)[0]
    if task == "t2i":
        ids = task_obj._prompt(record.caption, False, g)
        return {
            "kind": torch.tensor([0]),
            "ids": torch.tensor(ids),
            "order": order,
            "picture": torch.from_numpy(own.picture(at)),
        }
    ids = task_obj._prompt(record.instruction, True, g)
    return {
        "kind": torch.tensor([1]),
        "ids": torch.tensor(ids),
        "order": order,
        "picture": torch.from_numpy(own.picture(at, target=True)),
        "source_picture": torch.from_numpy(own.picture(at)),
    }
