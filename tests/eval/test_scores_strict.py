"""The strict-scene metric beside the GenEval-style one, on hand-built scenes, and the
intervals every scorer reports."""

from __future__ import annotations

import pytest

from kineflow.data.shapes.prompts import Prompt, Requirement
from kineflow.data.shapes.scene import Obj, Scene
from kineflow.eval.scores import (
    format_report,
    score_captions,
    score_edits,
    score_t2i,
    score_vqa,
    strict_check,
)

R = Requirement
TWO = Prompt("two_object/a", "two_object", "a circle and a square", (R("circle"), R("square")))
RED = Prompt("colors/r", "colors", "a red circle", (R("circle", "red"),))
LEFT = Prompt("position/l", "position", "a circle left of a square",
              (R("circle"), R("square")), "left of")  # fmt: skip
THREE = Prompt("counting/3", "counting", "three triangles", (R("triangle", count=3, exact=True),))


def _scene(*objs: tuple[int, int, str, str]) -> Scene:
    return Scene(tuple(Obj(r, c, s, col, "large") for r, c, s, col in objs))


def test_extra_object_passes_geneval_but_fails_strict():
    scene = _scene((0, 0, "circle", "red"), (0, 1, "square", "blue"), (2, 2, "triangle", "red"))
    report = score_t2i([TWO], {TWO.id: [scene]})
    assert report["accuracy"] == 1.0 and report["strict_accuracy"] == 0.0
    assert report["items"][0]["strict_failures"] == [
        "strict: 3 objects, the prompt names 2 (1 extra object(s))"
    ]


def test_exact_scene_passes_both():
    scene = _scene((1, 0, "circle", "green"), (1, 2, "square", "blue"))
    for prompt in (TWO, LEFT):
        report = score_t2i([prompt], {prompt.id: [scene]})
        assert report["accuracy"] == report["strict_accuracy"] == 1.0
        assert report["accuracy_ci"] == report["strict_accuracy_ci"] == [1.0, 1.0]


def test_strict_rule_cases():
    # Unstated attributes stay free; a wrong-colour twin or an unnamed shape does not.
    assert strict_check(RED, _scene((2, 1, "circle", "red"))) == []
    assert strict_check(RED, _scene((0, 0, "circle", "red"), (0, 1, "circle", "blue")))
    two_circles = _scene((0, 0, "circle", "red"), (0, 1, "circle", "blue"))
    assert strict_check(TWO, two_circles)  # right count, but no square
    assert strict_check(THREE, _scene(*[(0, c, "triangle", "red") for c in range(3)])) == []
    # The relation is still required: the circle right of the square fails both rules.
    wrong_side = _scene((1, 2, "circle", "green"), (1, 0, "square", "blue"))
    assert strict_check(LEFT, wrong_side) and score_t2i([LEFT], {LEFT.id: [wrong_side]})[
        "accuracy"] == 0.0  # fmt: skip


def test_strict_by_category_and_image_accuracy():
    exact = _scene((0, 0, "circle", "red"), (0, 1, "square", "blue"))
    extra = _scene((0, 0, "circle", "red"), (0, 1, "square", "blue"), (1, 1, "circle", "red"))
    red = _scene((1, 1, "circle", "red"))
    report = score_t2i([TWO, RED], {TWO.id: [exact, extra], RED.id: [red, extra]})
    cats = report["by_category"]
    assert cats["two_object"]["accuracy"] == 1.0 and cats["two_object"]["strict_accuracy"] == 0.5
    assert cats["colors"]["accuracy"] == 1.0 and cats["colors"]["strict_accuracy"] == 0.5
    assert report["strict_accuracy"] == 0.5 and report["strict_image_accuracy"] == 0.5
    assert cats["colors"]["n"] == 2 and report["n"] == 4
    for key in ("accuracy_ci", "strict_accuracy_ci", "image_accuracy_ci"):
        low, high = report[key]
        assert low <= report[key[:-3]] <= high
    assert "strict-scene   0.500" in format_report(report)


def test_intervals_on_every_scorer():
    items = [{"id": f"q{i}", "question": "q?", "answer": "yes", "type": "exist" if i % 2 else
              "count"} for i in range(40)]  # fmt: skip
    preds = {it["id"]: "yes" if i % 4 else "no" for i, it in enumerate(items)}
    vqa = score_vqa(items, preds, seed=1)
    low, high = vqa["accuracy_ci"]
    assert vqa["accuracy"] == 0.75 and low < 0.75 < high
    assert vqa["by_type"]["exist"]["accuracy_ci"] == [1.0, 1.0]  # odd ids: all "yes"
    assert vqa == score_vqa(items, preds, seed=1)
    scene = _scene((0, 0, "circle", "red"))
    cap = score_captions({"a": scene, "b": scene}, {"a": "a large red circle at the top left.",
                                                   "b": "nonsense"})  # fmt: skip
    assert cap["parse_rate"] == pytest.approx(0.5) and len(cap["parse_rate_ci"]) == 2
    edits = score_edits({"a": scene}, {"a": scene}, {"a": "recolour"})
    assert edits["accuracy_ci"] == [1.0, 1.0] and edits["by_kind"]["recolour"]["accuracy_ci"]


def test_summary_keeps_intervals_and_the_results_table_shows_them():
    from kineflow.apps.reproduce.report import score_table
    from kineflow.eval.benchmark import summary

    exact = _scene((0, 0, "circle", "red"), (0, 1, "square", "blue"))
    extra = _scene((0, 0, "circle", "red"), (0, 1, "square", "blue"), (1, 1, "circle", "red"))
    t2i = score_t2i([TWO, RED], {TWO.id: [exact, extra], RED.id: [extra, extra]})
    items = [{"id": f"q{i}", "question": "q?", "answer": "yes", "type": "exist"} for i in range(4)]
    vqa = score_vqa(items, {f"q{i}": "yes" if i else "no" for i in range(4)})
    cap = score_captions({"a": exact}, {"a": "nonsense"})
    numbers = summary({"t2i_test": t2i, "t2i_heldout": t2i, "vqa": vqa, "caption": cap})
    assert numbers["t2i_test"]["strict"] == 0.25 and numbers["t2i_test"]["overall"] == 1.0
    assert numbers["t2i_test"]["strict_by_category"]["colors"] == 0.0
    assert numbers["vqa"]["by_type_ci"]["exist"] == vqa["by_type"]["exist"]["accuracy_ci"]
    table = score_table({"m": numbers})
    low, high = vqa["accuracy_ci"]
    assert f"| 0.750 [{low:.2f}, {high:.2f}] |" in table[2]
    assert "| `m` | 1.000 [1.00, 1.00] | 0.250 [" in table[2] and table[0].count("|") == 15


def test_surplus_objects_counts_what_the_prompt_does_not_name():
    """``surplus_objects``: objects drawn minus objects named, the mean over pictures (each
    prompt's pictures weighted by their number), by category; negative when short."""
    from kineflow.eval.benchmark import summary

    exact = _scene((0, 0, "circle", "red"), (0, 1, "square", "blue"))
    four = _scene(*[(r, c, "triangle", "red") for r, c in ((0, 0), (0, 1), (1, 1), (2, 2))])
    two = _scene((0, 0, "triangle", "red"), (1, 1, "triangle", "blue"))
    crowded = _scene((0, 0, "circle", "red"), (0, 1, "square", "blue"), (1, 1, "circle", "red"),
                     (2, 2, "square", "green"))  # fmt: skip
    scenes = {TWO.id: [exact, crowded], THREE.id: [four, two, four]}
    report = score_t2i([TWO, THREE], scenes)
    # Oracle: count each picture's objects by hand against the prompt's named objects.
    surplus = [2 - 2, 4 - 2, 4 - 3, 2 - 3, 4 - 3]
    assert [i["surplus"] for i in report["items"]] == surplus
    assert report["surplus_objects"] == pytest.approx(sum(surplus) / 5)
    low, high = report["surplus_objects_ci"]
    assert low <= report["surplus_objects"] <= high
    assert report["by_category"]["two_object"]["surplus_objects"] == pytest.approx(1.0)
    assert report["by_category"]["counting"]["surplus_objects"] == pytest.approx(1 / 3)
    numbers = summary({"t2i_test": report})["t2i_test"]
    assert numbers["surplus_objects"] == report["surplus_objects"]
    assert numbers["surplus_by_category"] == {"two_object": 1.0, "counting": pytest.approx(1 / 3)}
