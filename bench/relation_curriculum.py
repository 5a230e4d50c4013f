"""Are relation questions learnable, and what makes them so? A reader on *ideal* image tokens.

Every model in ``docs/understanding.md`` answers ShapesWorld relation questions ("is the red
circle left of the square?", "where is the circle relative to the blue square?") at chance,
while colour, shape, count and existence questions reach 0.97-1.00. This takes the tower out
of the question: each of the 9 grid cells becomes one token holding the one-hot truth about
it (occupied, colour, shape, size), so nothing about the picture is missing or blurred. The
reader is ``bench/binding_reader.py``'s (an MLP on the tokens, a pre-norm transformer encoder
over ``[cell tokens, question words, CLS]`` with learnt positions, a linear head on CLS).

Arms, the same seed, steps and batch, fresh training questions at every step (no question is
seen twice, so a rising test score is learning, not memory):

- ``relation``: relation questions only, drawn as the benchmark draws them (a uniform one of
  the scene's relation questions, from ShapesWorld ``train`` scenes);
- ``relation+position``: the same, except that ``--position-share`` of the questions ask
  instead which row or column one object is in
  (:func:`kineflow.data.shapes.language.position_questions`; ``data.position_questions`` of
  the trainers).

Scored on 1000 ``test``-split relation questions (and 1000 position questions) at ten points
of training, with 95 % bootstrap intervals; *chance* is the test share of the most common
answer.

Usage: ``python bench/relation_curriculum.py --out FILE``. Output: one JSON object on stdout
(and ``--out``), progress on stderr.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from binding_reader import Reader, encode_questions, optimiser, question_ids, write_report

from kineflow.data.shapes import ShapesWorld
from kineflow.data.shapes.language import ORDINAL_ANSWERS, QA, position_questions, questions
from kineflow.data.shapes.scene import COLOURS, GRID, SHAPES, SIZES, Scene
from kineflow.eval.stats import bootstrap_ci

ARMS = ("relation", "relation+position")
FEATURES = 1 + len(COLOURS) + len(SHAPES) + len(SIZES)


def cell_tokens(scene: Scene) -> np.ndarray:
    """Float[GRID², FEATURES]: per cell in reading order, occupied then one-hot colour, shape
    and size (all zero for an empty cell)."""
    x = np.zeros((GRID * GRID, FEATURES), np.float32)
    colours = list(COLOURS)
    for o in scene:
        k = o.row * GRID + o.col
        x[k, 0] = 1
        x[k, 1 + colours.index(o.colour)] = 1
        x[k, 1 + len(colours) + SHAPES.index(o.shape)] = 1
        x[k, 1 + len(colours) + len(SHAPES) + SIZES.index(o.size)] = 1
    return x


#: ``--position-answers words``: rows and columns named with the words relation answers use.
WORDS = {"row": ("top", "middle", "bottom"), "column": ("left", "center", "right")}


def worded(qa: QA) -> QA:
    """A position question answered with :data:`WORDS` instead of "one" / "two" / "three"."""
    axis = "row" if qa.question.startswith("what row") else "column"
    return QA(qa.question, WORDS[axis][ORDINAL_ANSWERS.index(qa.answer)], qa.type)


def draw(
    world: ShapesWorld, split: str, n: int, kind: str, share: float, seed: int,
    answers: str = "ordinal",
) -> tuple[Tensor, list[QA]]:  # fmt: skip
    """``n`` (tokens, question) pairs of ``split`` scenes: ``kind`` "relation" (with ``share``
    of them position questions instead) or "position"; position ``answers`` "ordinal" (as the
    trainers ask them) or "words" (:data:`WORDS`)."""
    rng = np.random.default_rng(seed)
    xs, qas = [], []
    while len(qas) < n:
        scene = world.sample(rng, split)
        rel, pos = questions(scene, rng)["relation"], position_questions(scene)
        if answers == "words":
            pos = [worded(qa) for qa in pos]
        use = pos if kind == "position" or (pos and rng.random() < share) else rel
        if not use:
            continue
        xs.append(cell_tokens(scene))
        qas.append(use[rng.integers(len(use))])
    return torch.from_numpy(np.stack(xs)), qas


def run_arm(arm: str, args: argparse.Namespace, world: ShapesWorld) -> dict[str, Any]:
    torch.manual_seed(args.seed)
    share = args.position_share if arm == "relation+position" else 0.0
    a = args.position_answers
    train_x, train_qa = draw(world, "train", args.steps * args.batch_size, "relation", share,
                             args.seed, a)  # fmt: skip
    test = {
        k: draw(world, "test", 1000, k, 0.0, args.seed + 1, a) for k in ("relation", "position")
    }

    def pairs(qas: list[QA]) -> list[tuple[str, str]]:
        return [(qa.question, qa.answer) for qa in qas]

    word_id, answer_id = question_ids(pairs(train_qa + [qa for _, q in test.values() for qa in q]))
    train_q, train_y = encode_questions(pairs(train_qa), word_id, answer_id)
    tests = {k: (x, *encode_questions(pairs(qas), word_id, answer_id))
             for k, (x, qas) in test.items()}  # fmt: skip
    model = Reader(FEATURES, GRID * GRID, len(word_id), len(answer_id), args.width, args.layers)
    opt, sched = optimiser(model, args.lr, args.steps)

    def score() -> dict[str, Any]:
        model.eval()
        out = {}
        with torch.no_grad():
            for k, (x, q, y) in tests.items():
                hits = (model(x, q).argmax(-1) == y).numpy()
                acc, low, high = bootstrap_ci(hits, seed=args.seed)
                out[k] = {"accuracy": acc, "accuracy_ci": [low, high]}
        model.train()
        return out

    curve: dict[str, Any] = {}
    started = time.perf_counter()
    for step in range(1, args.steps + 1):
        rows = slice((step - 1) * args.batch_size, step * args.batch_size)  # never reused
        loss = nn.functional.cross_entropy(model(train_x[rows], train_q[rows]), train_y[rows])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % max(1, args.steps // 10) == 0 or step == args.steps:
            curve[str(step)] = {"loss": float(loss.detach()), **score()}
            print(f"[relation_curriculum] {arm} step {step} {curve[str(step)]}", file=sys.stderr,
                  flush=True)  # fmt: skip
    kinds = Counter(qa.type for qa in train_qa)
    return {"position_share": share, "train_position_questions": kinds["position"],
            "train_relation_questions": kinds["relation"],
            "seconds": round(time.perf_counter() - started, 1), "curve": curve}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS))
    p.add_argument("--position-share", type=float, default=0.5)
    p.add_argument("--position-answers", choices=("ordinal", "words"), default="ordinal",
                   help="answer row / column questions with one / two / three (as the "
                   "trainers) or with top / middle / bottom, left / center / right")  # fmt: skip
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if not 0 < args.position_share < 1:
        p.error(f"--position-share must be in (0, 1), got {args.position_share}")
    torch.set_num_threads(args.threads)
    world = ShapesWorld()
    _, test_rel = draw(world, "test", 1000, "relation", 0.0, args.seed + 1)
    chance = Counter(qa.answer for qa in test_rel).most_common(1)[0][1] / len(test_rel)
    report = {"steps": args.steps, "batch_size": args.batch_size, "lr": args.lr,
              "position_share": args.position_share, "position_answers": args.position_answers,
              "layers": args.layers, "width": args.width, "seed": args.seed,
              "test_questions": 1000, "relation_chance": chance,
              "arms": {arm: run_arm(arm, args, world) for arm in args.arms}}  # fmt: skip
    write_report(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
