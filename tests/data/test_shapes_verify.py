"""Verification questions ("does the picture show exactly: {prompt}?"), checked against an
oracle that reads the prompt's *text* and applies the strict-scene rule by brute force."""

from __future__ import annotations

import itertools
import re
from collections import Counter

import numpy as np
import pytest

from kineflow.data.shapes.dataset import draw_item, split_prompts
from kineflow.data.shapes.language import (
    QUESTION_TYPES,
    VERIFY_QUESTION,
    VERIFY_TYPE,
    check_question_weights,
)
from kineflow.data.shapes.scene import COLOURS, SHAPES, Obj, Scene, ShapesWorld
from kineflow.data.shapes.verify import verify_question, verify_share
from kineflow.pipelines.judge import QUESTION

NUMBERS = {"a": 1, "two": 2, "three": 3, "four": 4}
_PHRASE = re.compile(rf"(a|two|three|four) (?:({'|'.join(COLOURS)}) )?({'|'.join(SHAPES)})s?")
_RELATIONS = {  # the oracle's own reading of the four relation words
    "left of": lambda a, b: a.col < b.col,
    "right of": lambda a, b: a.col > b.col,
    "above": lambda a, b: a.row < b.row,
    "below": lambda a, b: a.row > b.row,
}


def oracle(question: str, scene: Scene) -> str:
    """yes iff the scene's objects fill the prompt's phrases one to one (shape, and colour where
    named; nothing left over) and, for a relation prompt, the two objects stand in it."""
    m = re.fullmatch(r"does the picture show exactly: (.+)\?", question)
    assert m is not None, question
    text, relation = m.group(1), None
    for word in _RELATIONS:
        if f" {word} " in text:
            relation, parts = word, text.split(f" {word} ")
            break
    else:
        parts = text.split(" and ")
    slots = []  # one (phrase index, shape, colour) per object the prompt asks for
    for k, part in enumerate(parts):
        p = _PHRASE.fullmatch(part)
        assert p is not None, part
        slots += [(k, p.group(3), p.group(2))] * NUMBERS[p.group(1)]
    objects = list(scene)
    if len(objects) != len(slots):
        return "no"
    for perm in itertools.permutations(objects):
        if all(
            o.shape == s and c in (None, o.colour) for o, (_, s, c) in zip(perm, slots, strict=True)
        ):
            if relation is None:
                return "yes"
            first = [o for o, (k, _, _) in zip(perm, slots, strict=True) if k == 0]
            second = [o for o, (k, _, _) in zip(perm, slots, strict=True) if k == 1]
            if any(_RELATIONS[relation](a, b) for a in first for b in second):
                return "yes"
    return "no"


@pytest.fixture(scope="module")
def world() -> ShapesWorld:
    return ShapesWorld()


def test_the_oracle_reads_prompts_as_meant() -> None:
    red, blue = Obj(0, 0, "circle", "red", "small"), Obj(0, 2, "square", "blue", "large")
    ask = VERIFY_QUESTION.format
    assert oracle(ask(prompt="a red circle left of a square"), Scene((red, blue))) == "yes"
    assert oracle(ask(prompt="a red circle right of a square"), Scene((red, blue))) == "no"
    assert oracle(ask(prompt="a circle"), Scene((red, blue))) == "no"  # the square is extra
    assert oracle(ask(prompt="a circle and a blue square"), Scene((red, blue))) == "yes"
    assert oracle(ask(prompt="two circles"), Scene((red,))) == "no"


@pytest.mark.parametrize("split", ["train", "test", "heldout"])
def test_every_answer_is_the_strict_rule_and_every_scene_stays_in_its_split(
    world: ShapesWorld, split: str
) -> None:
    rng = np.random.default_rng(3)
    prompts = split_prompts(world, split)
    answers, categories, sizes = Counter(), Counter(), Counter()
    for _ in range(300):
        scene, qa = verify_question(world, rng, split, prompts)
        assert qa.type == VERIFY_TYPE and world.split_of(scene) == split
        assert qa.answer == oracle(qa.question, scene), (qa, scene.key())
        answers[qa.answer] += 1
        text = qa.question.removeprefix("does the picture show exactly: ").removesuffix("?")
        category = next(c for c, ps in prompts.items() if any(p.text == text for p in ps))
        categories[category] += 1
        wanted = sum(NUMBERS[p.group(1)] for p in _PHRASE.finditer(text))
        sizes[(qa.answer, np.sign(len(scene) - wanted))] += 1
    assert 0.38 < answers["yes"] / 300 < 0.62, answers  # about half, by construction
    assert set(categories) == set(prompts)
    # The near misses include pictures with an object too many, one too few, and the right
    # number of the wrong objects (colour, shape or place).
    if split == "train":
        assert sizes[("no", 1)] and sizes[("no", -1)] and sizes[("no", 0)], sizes


def test_the_share_of_verification_rows() -> None:
    weights = {"relation": 6, "position_words": 3, VERIFY_TYPE: 7}
    assert verify_share(weights) == pytest.approx(7 / (7 + 4 + 6 + 3))
    assert verify_share({VERIFY_TYPE: 1}) == pytest.approx(1 / 6)  # five types weigh 1 each
    assert (
        verify_share(None) == verify_share({"relation": 3}) == verify_share({VERIFY_TYPE: 0}) == 0
    )
    check_question_weights({VERIFY_TYPE: 2.5}, "data.question_weights")
    assert VERIFY_TYPE not in QUESTION_TYPES  # the benchmark never asks it


def test_items_ask_verification_at_its_share_and_leave_the_others_alone(world: ShapesWorld) -> None:
    weights = {"relation": 3, VERIFY_TYPE: 2}
    n, share = 600, verify_share(weights)
    items = [draw_item(world, "vqa", "train", i, weights) for i in range(n)]
    kinds = Counter(item.kind for item in items)
    assert abs(kinds[VERIFY_TYPE] / n - share) < 4 * (share * (1 - share) / n) ** 0.5, kinds
    for i, item in enumerate(items):
        if item.kind == VERIFY_TYPE:  # the item's scene is the one the question is about
            scene = Scene.from_key(item.scene_key)
            assert item.texts["answer"] == oracle(item.texts["question"], scene)
        assert item == draw_item(world, "vqa", "train", i, weights)  # deterministic
    # Without a verify weight no coin is drawn: the items are those of the weights alone.
    for i in range(40):
        assert draw_item(world, "vqa", "train", i, {"relation": 3, VERIFY_TYPE: 0}) == draw_item(
            world, "vqa", "train", i, {"relation": 3}
        )


def test_the_self_judge_asks_the_question_training_teaches(world: ShapesWorld) -> None:
    rng = np.random.default_rng(0)
    prompts = split_prompts(world, "train")
    _, qa = verify_question(world, rng, "train", prompts)
    text = qa.question.removeprefix("does the picture show exactly: ").removesuffix("?")
    assert QUESTION.format(prompt=text) == qa.question
