"""What the FUDOKI and UniFluid trainers share: ShapesWorld data settings and understanding
samples, the vocabulary check, pictures as model inputs, and the run around
:func:`~kineflow.train.loop.run_training`.

Both trainers mix generation samples with understanding samples (VQA or captioning) laid out
with the inference layout of :mod:`kineflow.inputs.layout`; an understanding sample's targets
are its answer slots, the answer's ids then EOS up to the slot count (docs/design.md §1.8,
§2.7).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from kineflow.data.shapes.dataset import draw_item
from kineflow.data.shapes.render import render
from kineflow.data.shapes.scene import Scene, ShapesWorld
from kineflow.inputs.layout import Layout, understanding_layout
from kineflow.tokenizers.text import TextTokenizer
from kineflow.train.loop import Task, run_training
from kineflow.train.run_config import TrainRunConfig
from kineflow.train.run_folder import hold_run_folder

__all__ = [
    "ShapesData",
    "UnderstandingSample",
    "held_run",
    "language_with_vocab",
    "picture_tensor",
    "train_task",
    "understanding_sample",
]


@dataclass
class ShapesData:
    """ShapesWorld samples: ``understanding_ratio`` of them VQA or captioning (``caption_ratio``
    of those captioning), the rest text-to-image."""

    split: str = "train"
    image_size: int = 32
    seed: int = 0
    understanding_ratio: float = 0.5
    caption_ratio: float = 0.3
    vqa_answer_tokens: int = 4
    caption_tokens: int = 32
    caption_instruction: str = "Describe the picture."
    text_budget: int = 64
    cfg_dropout: float = 0.1

    def __post_init__(self) -> None:
        for name in ("understanding_ratio", "caption_ratio", "cfg_dropout"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"data.{name} must be in [0, 1], got {getattr(self, name)!r}")
        for name in ("vqa_answer_tokens", "caption_tokens", "text_budget", "image_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"data.{name} must be a positive integer, got {value!r}")


class UnderstandingSample(NamedTuple):
    """One VQA / captioning sample: its one-row layout, the ids of its answer slots (answer,
    then EOS: ``A`` ids) and its picture (uint8 ``[S, S, 3]``)."""

    layout: Layout
    target: list[int]
    picture: np.ndarray


def understanding_sample(
    world: ShapesWorld,
    data: ShapesData,
    tokenizer: TextTokenizer,
    index: int,
    g: torch.Generator,
    num_patches: int,
) -> UnderstandingSample:
    """Sample ``index`` as captioning (probability ``caption_ratio``, one draw from ``g``) or
    VQA, laid out with ``num_patches`` image placeholders and ``caption_tokens`` /
    ``vqa_answer_tokens`` answer slots.

    Raises:
        ValueError: an answer that leaves no slot for EOS.
    """
    caption = float(torch.rand((), generator=g)) < data.caption_ratio
    task = "caption" if caption else "vqa"
    item = draw_item(world, task, data.split, index)
    question = data.caption_instruction if caption else item.texts["question"]
    answer = item.texts["caption" if caption else "answer"]
    slots = data.caption_tokens if caption else data.vqa_answer_tokens
    ids = tokenizer.encode(answer)
    if len(ids) >= slots:
        raise ValueError(
            f"a {task} answer of {len(ids)} tokens does not fit in {slots} slots (+ EOS): "
            f"raise data.{'caption_tokens' if caption else 'vqa_answer_tokens'}"
        )
    layout = understanding_layout(tokenizer, [question], num_patches, data.text_budget, slots)
    target = ids + [tokenizer.eos_id] * (slots - len(ids))
    picture = render(Scene.from_key(item.scene_key), data.image_size)
    return UnderstandingSample(layout, target, picture)


def picture_tensor(pictures: list[np.ndarray], device: torch.device) -> Tensor:
    """uint8 ``[S, S, 3]`` pictures -> float ``[G, 3, S, S]`` in ``[−1, 1]`` (``x / 127.5 − 1``)
    on ``device``, the input range of the VQ and KL-VAE encoders."""
    x = torch.from_numpy(np.stack(pictures)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    return x.to(device)


def language_with_vocab(
    model: dict[str, Any], tokenizer: TextTokenizer, source: str
) -> dict[str, Any]:
    """``model["language"]`` with ``vocab_size`` defaulting to the tokenizer's (loaded from
    ``source``); a different explicit size is an error naming both."""
    language = dict(model.get("language", {}))
    V = language.setdefault("vocab_size", tokenizer.vocab_size)
    if tokenizer.vocab_size != V:
        raise ValueError(
            f"model.language.vocab_size={V} but the text tokenizer {source} has "
            f"{tokenizer.vocab_size} tokens: the model and tokenizer vocabularies must match"
        )
    return language


@contextmanager
def held_run(config: TrainRunConfig) -> Iterator[Path]:
    """``config.out`` as a Path, held for the block
    (:func:`~kineflow.train.run_folder.hold_run_folder`), with torch's CPU threads set to
    ``config.threads`` when given."""
    if config.threads:
        torch.set_num_threads(config.threads)
    out = Path(config.out)
    with hold_run_folder(out):
        yield out


def train_task(
    task: Task,
    config: TrainRunConfig,
    out: Path,
    progress: bool,
    desc: str,
    on_step: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """:func:`~kineflow.train.loop.run_training` with the run settings of ``config``
    (``optim``, ``log_every``, ``ckpt_every``, ``ckpt_minutes``, ``parallel``); its summary.
    Configs without ``parallel`` (tokenizer and SigLIP runs) train in one process."""
    return run_training(
        task,
        config.optim,
        out,
        config.to_dict(),
        log_every=config.log_every,
        ckpt_every=config.ckpt_every,
        ckpt_minutes=config.ckpt_minutes,
        parallel=getattr(config, "parallel", "none"),
        progress=progress,
        desc=desc,
        on_step=on_step,
    )
