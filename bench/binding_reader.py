"""Can a small transformer bind a question's words to the right image tokens of a frozen tower?

``docs/understanding.md`` found every trained model answering ShapesWorld questions at
0.50–0.59 although linear probes read the scene from the features the language model gets.
This isolates the reading step from the flow, the generation half and the language-model
recipe: the understanding tower is frozen, its tokens (``--layer last``: the tower's output;
``embed``: the patch embeddings plus positions, before any block) go through a two-layer MLP,
the question's words get an embedding each, and a pre-norm transformer encoder (``--layers``
blocks of width ``--width``, 4 heads, learnt positions) reads ``[image tokens, words, CLS]``;
a linear head on the CLS token classifies the one-word answer. Trained with cross-entropy on
``--train`` ShapesWorld ``train``-split questions (AdamW, one-cycle learning rate), scored
on 1000 ``test``-split questions with 95 % bootstrap intervals, by question type, at six
points of training.

Usage: ``python bench/binding_reader.py --tower checkpoints/siglip-shapes --out FILE``.
Output: one JSON object on stdout (and ``--out``), progress on stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from kineflow.data.shapes import ShapesWorld
from kineflow.data.shapes.dataset import draw_item
from kineflow.data.shapes.render import render_image
from kineflow.data.shapes.scene import Scene
from kineflow.eval.stats import bootstrap_ci
from kineflow.inputs.images import preprocess_understanding
from kineflow.train.siglip import load_siglip_vision

MAX_WORDS = 24


def words_of(question: str) -> list[str]:
    return question.replace("?", " ?").split()


def question_ids(pairs: list[tuple[str, str]]) -> tuple[dict[str, int], dict[str, int]]:
    """Word ids (from 1; 0 pads) and answer ids of every ``(question, answer)`` in ``pairs``."""
    vocab = sorted({w for q, _ in pairs for w in words_of(q)})
    answers = sorted({a for _, a in pairs})
    return {w: i + 1 for i, w in enumerate(vocab)}, {a: i for i, a in enumerate(answers)}


def encode_questions(
    pairs: list[tuple[str, str]], word_id: dict[str, int], answer_id: dict[str, int]
) -> tuple[Tensor, Tensor]:
    """``(words Long[n, MAX_WORDS], answers Long[n])`` of ``(question, answer)`` pairs."""
    q = torch.zeros(len(pairs), MAX_WORDS, dtype=torch.long)
    for k, (question, _) in enumerate(pairs):
        ids = [word_id[w] for w in words_of(question)]
        q[k, : len(ids)] = torch.tensor(ids)
    return q, torch.tensor([answer_id[a] for _, a in pairs])


def optimiser(model: nn.Module, lr: float, steps: int) -> tuple[Any, Any]:
    """AdamW (weight decay 0.01) and its one-cycle schedule (5 % warm-up) over ``steps``."""
    opt = torch.optim.AdamW(model.parameters(), lr, weight_decay=0.01)
    return opt, torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps, pct_start=0.05)


def write_report(report: dict[str, Any], out: str | None) -> None:
    """Print ``report`` as JSON (and write it to ``out`` when given)."""
    text = json.dumps(report, indent=1)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text)
    print(text)


def tower_tokens(tower: nn.Module, items: list[Any], layer: str) -> Tensor:
    """Float[n, P, D]: the frozen tower's tokens for the items' 32-px renders."""
    size = tower.config.image_size
    out = []
    with torch.no_grad():
        for lo in range(0, len(items), 1000):
            pics = [render_image(Scene.from_key(it.scene_key)) for it in items[lo : lo + 1000]]
            px = preprocess_understanding(pics, size)
            if layer == "embed":
                out.append(tower.patch_embed(px) + tower.pos_embed)
            else:
                out.append(tower(px))
    return torch.cat(out)


class Reader(nn.Module):
    """``[MLP(image tokens), word embeddings, CLS] + positions`` -> encoder -> answer logits."""

    def __init__(self, feature: int, tokens: int, vocab: int, answers: int, width: int,
                 layers: int) -> None:  # fmt: skip
        super().__init__()
        self.proj = nn.Sequential(nn.Linear(feature, width), nn.GELU(), nn.Linear(width, width))
        self.words = nn.Embedding(vocab + 1, width)  # id 0 pads
        self.cls = nn.Parameter(torch.zeros(1, 1, width))
        self.pos = nn.Parameter(torch.randn(1, tokens + MAX_WORDS + 1, width) * 0.02)
        block = nn.TransformerEncoderLayer(width, 4, 4 * width, 0.0, batch_first=True,
                                           norm_first=True)  # fmt: skip
        self.encoder = nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.head = nn.Linear(width, answers)

    def forward(self, feats: Tensor, words: Tensor) -> Tensor:
        B, P, _ = feats.shape
        x = torch.cat([self.proj(feats), self.words(words), self.cls.expand(B, 1, -1)], 1)
        pad = torch.cat([torch.zeros(B, P, dtype=torch.bool), words == 0,
                         torch.zeros(B, 1, dtype=torch.bool)], 1)  # fmt: skip
        return self.head(self.encoder(x + self.pos, src_key_padding_mask=pad)[:, -1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--tower", default="checkpoints/siglip-shapes")
    p.add_argument("--layer", choices=("last", "embed"), default="last")
    p.add_argument("--train", type=int, default=20000, help="training questions")
    p.add_argument("--steps", type=int, default=1200)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    started = time.perf_counter()
    tower = load_siglip_vision(args.tower).eval()
    world = ShapesWorld()
    train_items = [draw_item(world, "vqa", "train", i) for i in range(args.train)]
    test_items = [draw_item(world, "vqa", "test", i) for i in range(1000)]
    train_x, test_x = (tower_tokens(tower, s, args.layer) for s in (train_items, test_items))
    train_pairs, test_pairs = (
        [(it.texts["question"], it.texts["answer"]) for it in items]
        for items in (train_items, test_items)
    )
    word_id, answer_id = question_ids(train_pairs + test_pairs)
    train_q, train_y = encode_questions(train_pairs, word_id, answer_id)
    test_q, test_y = encode_questions(test_pairs, word_id, answer_id)
    model = Reader(train_x.shape[-1], train_x.shape[1], len(word_id), len(answer_id), args.width,
                   args.layers)  # fmt: skip
    opt, sched = optimiser(model, args.lr, args.steps)
    g = torch.Generator().manual_seed(args.seed)

    def score() -> dict[str, Any]:
        model.eval()
        with torch.no_grad():
            hits = (model(test_x, test_q).argmax(-1) == test_y).numpy()
        model.train()
        low, high = bootstrap_ci(hits, seed=args.seed)[1:]
        kinds = np.array([it.kind for it in test_items])
        by_type = {k: float(hits[kinds == k].mean()) for k in sorted(set(kinds))}
        return {"accuracy": float(hits.mean()), "accuracy_ci": [low, high], "by_type": by_type}

    curve: dict[str, Any] = {}
    for step in range(1, args.steps + 1):
        batch = torch.randint(len(train_y), (args.batch_size,), generator=g)
        loss = nn.functional.cross_entropy(model(train_x[batch], train_q[batch]), train_y[batch])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % max(1, args.steps // 6) == 0 or step == args.steps:
            curve[str(step)] = {"loss": float(loss.detach()), **score()}
            print(f"[binding_reader] step {step} {curve[str(step)]}", file=sys.stderr, flush=True)
    report = {"tower": args.tower, "layer": args.layer, "tokens": int(train_x.shape[1]),
              "train_questions": args.train, "test_questions": 1000, "steps": args.steps,
              "batch_size": args.batch_size, "lr": args.lr, "layers": args.layers,
              "width": args.width, "seed": args.seed,
              "seconds": round(time.perf_counter() - started, 1), "curve": curve}  # fmt: skip
    write_report(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
