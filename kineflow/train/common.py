"""What the FUDOKI and UniFluid trainers share: ShapesWorld data settings and understanding
samples, the vocabulary check, pictures as model inputs, and the run around
:func:`~kineflow.train.loop.run_training`.

Both trainers mix generation samples with understanding samples (VQA or captioning) laid out
with the inference layout of :mod:`kineflow.inputs.layout`; an understanding sample's targets
are its answer slots, the answer's ids then EOS up to the slot count (docs/design.md §1.8,
§2.7).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar, NamedTuple, Protocol

import numpy as np
import torch
from torch import Tensor

from kineflow.data.shapes.dataset import draw_item
from kineflow.data.shapes.language import check_question_weights
from kineflow.data.shapes.render import render
from kineflow.data.shapes.scene import Scene, ShapesWorld
from kineflow.data.shards import ShardReader, file_digest, write_shards
from kineflow.inputs.layout import Layout, understanding_layout
from kineflow.models.lora import merged_view
from kineflow.pipelines.model_card import SHAPESWORLD
from kineflow.tokenizers.text import TextTokenizer
from kineflow.train.loop import Task, run_training
from kineflow.train.run_config import TrainRunConfig
from kineflow.train.run_folder import hold_run_folder, process_rank
from kineflow.train.threads import follow_threads

__all__ = [
    "EncodableTask",
    "ShapesData",
    "UnderstandingSample",
    "data_meta",
    "encode_shards",
    "frozen_copy",
    "held_run",
    "language_with_vocab",
    "layout_record",
    "open_shards",
    "picture_tensor",
    "record_layout",
    "step_exports",
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
    #: How often VQA rows ask each question type, e.g. ``{relation: 3, position: 2}``
    #: (unnamed types weigh 1; ``position``, which row / column an object is in, 0): training
    #: only, the benchmark asks every type equally (docs/understanding.md, relations). None:
    #: the benchmark's draw.
    question_weights: dict[str, float] | None = None
    text_budget: int = 64
    cfg_dropout: float = 0.1
    #: A folder of ``kineflow data encode`` shards to read samples from (None: ShapesWorld
    #: rendered and encoded on the fly, unbounded).
    shards: str | None = None
    #: Your own data: a JSONL manifest used instead of ShapesWorld, and the share of each task
    #: (:mod:`kineflow.train.own_data`; None: the ratios above).
    manifest: str | None = None
    mix: dict[str, float] | None = None
    #: Fields that shape how a step reads the samples, not the samples (not in shard indexes).
    STEP_ONLY: ClassVar[tuple[str, ...]] = ("shards",)

    def __post_init__(self) -> None:
        for name in ("understanding_ratio", "caption_ratio", "cfg_dropout"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"data.{name} must be in [0, 1], got {getattr(self, name)!r}")
        for name in ("vqa_answer_tokens", "caption_tokens", "text_budget", "image_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"data.{name} must be a positive integer, got {value!r}")
        if self.question_weights is not None:
            check_question_weights(self.question_weights, "data.question_weights")


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
    item = draw_item(world, task, data.split, index, data.question_weights)
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
    Configs without ``parallel`` (tokenizer and SigLIP runs) train in one process. The run
    follows ``$KINEFLOW_THREADS_FILE`` when a scheduler sets it (:mod:`kineflow.train.threads`)."""
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
        on_step=follow_threads(on_step),
    )


def step_exports(
    config: TrainRunConfig, model: torch.nn.Module, out: Path, save: Callable[[Path], None]
) -> Callable[[int], None] | None:
    """The loop's ``on_step`` hook that writes ``out/model_step{s}`` (``save(folder)``: the
    model's pipeline folder) after each step ``s`` of ``config.export_steps`` — the live
    weights, not an EMA, with LoRA adapters folded in; rank 0 only. None when the run exports
    nothing.

    Raises:
        ValueError: ``export_steps`` with FSDP (no process holds the whole weights).
    """
    steps = set(getattr(config, "export_steps", ()))
    if not steps:
        return None
    if getattr(config, "parallel", "none") == "fsdp":
        raise ValueError("export_steps needs whole weights on every process: not with FSDP")

    def export(done: int) -> None:
        if done in steps and process_rank() == 0:
            training = model.training
            with merged_view(model):  # a LoRA run's adapters folded in: base key names
                save(out / f"model_step{done}")
            model.train(training)

    return export


# -- pre-tokenised shards ------------------------------------------------------------------------
def card_record(config: Any, summary: Mapping[str, Any]) -> dict[str, Any]:
    """What a trained model's card records (:mod:`kineflow.pipelines.model_card`): the data
    (ShapesWorld), the run's whole config (a dataclass) and its summary (steps, last losses)."""
    return {"data": SHAPESWORLD, "config": asdict(config), "summary": dict(summary)}


def layout_record(layout: Layout) -> dict[str, Tensor]:
    """A one-row layout as record tensors (masks it lacks become all-False rows)."""
    no = torch.zeros_like(layout.input_ids[0], dtype=torch.bool)
    return {
        "input_ids": layout.input_ids[0], "attention_mask": layout.attention_mask[0],
        "region": layout.region[0], "prompt_span": layout.prompt_span[0],
        "image_mask": no if layout.image_mask is None else layout.image_mask[0],
        "understanding_mask": (no if layout.understanding_mask is None
                               else layout.understanding_mask[0]),
        "window": torch.tensor(layout.window), "prompt_length": torch.tensor(layout.prompt_lengths),
    }  # fmt: skip


def record_layout(record: dict[str, Tensor]) -> Layout:
    """The one-row layout of :func:`layout_record` (all-False masks stay rows:
    :func:`~kineflow.inputs.layout.stack_layouts` drops a mask no row has)."""
    row = {k: record[k][None] for k in ("input_ids", "attention_mask", "region", "prompt_span",
                                         "image_mask", "understanding_mask")}  # fmt: skip
    window = tuple(int(w) for w in record["window"])
    return Layout(**row, window=window, prompt_lengths=record["prompt_length"].tolist())


def data_meta(data: ShapesData, text_tokenizer: str, encoder: str, **shapes: Any) -> dict:
    """What a run's samples depend on, recorded in a shard index and checked when training
    reads it: the ``data`` section (but ``shards``), the text tokenizer's and the frozen image
    encoder's file digests, and the model sizes that shape a sample (``shapes``).
    ``data.STEP_ONLY`` fields (where the shards are, packing) are left out."""
    tok = Path(text_tokenizer)
    tok_files = [tok / "tokenizer.json"] if tok.is_dir() else [tok]
    meta = {
        "data": {k: v for k, v in asdict(data).items() if k not in data.STEP_ONLY},
        "text_tokenizer_sha256": file_digest(tok_files),
        "encoder_sha256": file_digest([Path(encoder) / "model.safetensors"]),
        "shapes": shapes,
    }
    if data.manifest:  # its records (not its pictures' bytes): an edited manifest is refused
        meta["manifest_sha256"] = file_digest([Path(data.manifest)])
    return meta


class EncodableTask(Protocol):
    """A trainer's task that can write its samples as shards (``kineflow data encode``)."""

    KIND: str

    def record(self, index: int) -> dict[str, Tensor]:
        """Sample ``index`` as a record, its pictures still pixels (no frozen encoder)."""
        ...

    def encode_records(self, records: list[dict[str, Tensor]]) -> list[dict[str, Tensor]]:
        """The records with their pictures run through the frozen encoder (codes / latents)."""
        ...

    def shard_meta(self) -> dict[str, Any]: ...


def open_shards(task: EncodableTask, folder: str) -> ShardReader:
    """The shard folder ``data.shards`` of a run, checked against ``task``'s data."""
    return ShardReader(folder, task.KIND, task.shard_meta())


def encode_shards(
    task: EncodableTask, out: str | Path, samples: int, shard_size: int = 1024
) -> dict[str, Any]:
    """Write samples ``0 .. samples − 1`` of ``task`` as shards of ``shard_size`` samples in
    ``out`` (:mod:`kineflow.data.shards`); returns the index."""
    if samples < 1 or shard_size < 1:
        raise ValueError(f"need samples >= 1 and shard_size >= 1, got {samples}, {shard_size}")
    starts = range(0, samples, shard_size)
    chunks = (
        task.encode_records([task.record(i) for i in range(s, min(s + shard_size, samples))])
        for s in starts
    )
    return write_shards(out, chunks, task.KIND, task.shard_meta())


def frozen_copy(module: torch.nn.Module) -> torch.nn.Module:
    """A frozen, evaluation-mode copy of a (frozen) image encoder for the task's own use: the
    model's own copy may be sharded by FSDP outside its forward."""
    encoder = copy.deepcopy(module).eval()
    return encoder.requires_grad_(False)
