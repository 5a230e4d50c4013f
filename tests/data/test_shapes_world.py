"""ShapesWorld: scenes, splits, rendering, language, prompts, datasets and materialising.

Every text the world produces is checked against an oracle written here from the scene's
objects alone (positions by name, counts, colours, relations by row / column), so the tests do
not trust the code that generated the text to also judge it.
"""

from __future__ import annotations

import itertools
import json
import re
from collections import Counter

import numpy as np
import pytest
import torch
from torch.utils.data import default_collate

from kineflow.data.example import image_to_tensor
from kineflow.data.manifest import ManifestDataset, validate_manifest
from kineflow.data.shapes.dataset import SHAPES_TASKS, ShapesWorldDataset, draw_item
from kineflow.data.shapes.language import (
    CAPTION_TEMPLATES,
    COLUMN_WORDS,
    EDIT_KINDS,
    ORDINAL_ANSWERS,
    POSITION_TYPE,
    POSITION_WORDS_TYPE,
    QUESTION_TYPES,
    ROW_WORDS,
    caption,
    parse_caption,
    position_questions,
    possible_edits,
    questions,
    reference,
    sample_edit,
    sample_question,
)
from kineflow.data.shapes.materialise import materialise
from kineflow.data.shapes.prompts import (
    CATEGORIES,
    Prompt,
    Requirement,
    all_prompts,
    check,
    passes,
    prompt_from_scene,
    prompt_set,
    scene_for_prompt,
)
from kineflow.data.shapes.render import (
    cell_bounds,
    render,
    render_batch,
    render_image,
    stamp,
    stamp_side,
)
from kineflow.data.shapes.scene import (
    BACKGROUND,
    CELLS,
    COLOURS,
    RELATIONS,
    SHAPES,
    SIZES,
    SPLITS,
    HeldOut,
    Obj,
    Scene,
    ShapesWorld,
    WorldConfig,
    holds,
)
from kineflow.eval.scores import strict_check

# -- an independent oracle ------------------------------------------------------------------------
#: What the position words mean, written out here rather than read from the library.
POSITION = {
    "top left": (0, 0),
    "top": (0, 1),
    "top right": (0, 2),
    "left": (1, 0),
    "center": (1, 1),
    "right": (1, 2),
    "bottom left": (2, 0),
    "bottom": (2, 1),
    "bottom right": (2, 2),
}
NUMBER = ["zero", "one", "two", "three", "four"]
#: The default held-out compositions, as text that must never reach training.
HELDOUT_PAIRS = {("red", "triangle"), ("blue", "circle")}
HELDOUT_TEXT = re.compile(
    r"red triangle|blue circle"
    r"|triangles? (?:at the [a-z ]+ )?above (?:the|a) (?:[a-z]+ )*circle"
    r"|circles? (?:at the [a-z ]+ )?below (?:the|a) (?:[a-z]+ )*triangle"
)


INVERSE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}


def geometric(relation: str, a: Obj, b: Obj) -> bool:
    """``a relation b`` from grid indices (row 0 on top, col 0 on the left)."""
    return {
        "left of": a.col < b.col,
        "right of": a.col > b.col,
        "above": a.row < b.row,
        "below": a.row > b.row,
    }[relation]


def touches_default_heldout(scene: Scene) -> bool:
    if any((o.colour, o.shape) in HELDOUT_PAIRS for o in scene):
        return True
    triangles = [o for o in scene if o.shape == "triangle"]
    circles = [o for o in scene if o.shape == "circle"]
    return any(t.row < c.row for t in triangles for c in circles)


def resolve(ref: str, scene: Scene) -> list[Obj]:
    """The objects a reference such as ``"small red circle"`` or ``"circle at the top"`` fits."""
    if " at the " in ref:
        shape, position = ref.split(" at the ")
        if position not in POSITION:
            return []
        return [o for o in scene if o.shape == shape and (o.row, o.col) == POSITION[position]]
    words = ref.split()
    if not 1 <= len(words) <= 3:
        return []
    shape, colour, size = words[-1], None, None
    if len(words) >= 2:
        colour = words[-2]
        assert colour in COLOURS, ref
    if len(words) == 3:
        size = words[0]
        assert size in SIZES, ref
    return [
        o
        for o in scene
        if o.shape == shape
        and (colour is None or o.colour == colour)
        and (size is None or o.size == size)
    ]


def the(ref: str, scene: Scene) -> Obj:
    found = resolve(ref, scene)
    assert len(found) == 1, f"{ref!r} names {len(found)} objects in {scene.key()}"
    return found[0]


def relation_readings(body: str, scene: Scene) -> set[tuple[Obj, str, Obj]]:
    """Every way to read ``"<ref> <relation> the <ref>"`` with both references unique."""
    readings = set()
    for rel in RELATIONS:
        sep = f" {rel} the "
        for m in re.finditer(re.escape(sep), body):
            left, right = body[: m.start()], body[m.end() :]
            a, b = resolve(left, scene), resolve(right, scene)
            if len(a) == 1 and len(b) == 1:
                readings.add((a[0], rel, b[0]))
    return readings


def oracle_answer(question: str, scene: Scene) -> tuple[str, str]:
    """``(type, answer)`` of a question, computed from the objects of ``scene``."""
    objs = list(scene)
    if question == "how many objects are there?":
        return "count", NUMBER[len(objs)]
    if m := re.fullmatch(r"how many (\w+)s are there\?", question):
        assert m[1] in SHAPES
        return "count", NUMBER[sum(o.shape == m[1] for o in objs)]
    if m := re.fullmatch(r"how many (\w+) objects are there\?", question):
        assert m[1] in COLOURS
        return "count", NUMBER[sum(o.colour == m[1] for o in objs)]
    if m := re.fullmatch(r"what colour is the object at the ([a-z ]+)\?", question):
        return "colour", next(o.colour for o in objs if (o.row, o.col) == POSITION[m[1]])
    if m := re.fullmatch(r"what colour is the (\w+)\?", question):
        (o,) = [o for o in objs if o.shape == m[1]]
        return "colour", o.colour
    if m := re.fullmatch(r"what shape is at the ([a-z ]+)\?", question):
        return "shape", next(o.shape for o in objs if (o.row, o.col) == POSITION[m[1]])
    if m := re.fullmatch(r"what shape is the (\w+) object\?", question):
        (o,) = [o for o in objs if o.colour == m[1]]
        return "shape", o.shape
    if m := re.fullmatch(r"is there an? (\w+) (\w+)\?", question):
        return "exist", "yes" if any((o.colour, o.shape) == (m[1], m[2]) for o in objs) else "no"
    if m := re.fullmatch(r"where is the (.+) relative to the (.+)\?", question):
        a, b = the(m[1], scene), the(m[2], scene)
        if a.row == b.row:
            assert a.col != b.col
            return "relation", "left" if a.col < b.col else "right"
        assert a.col == b.col, "a 'where' question needs objects on one line"
        return "relation", "above" if a.row < b.row else "below"
    if m := re.fullmatch(r"is the (.+)\?", question):
        readings = relation_readings(m[1], scene)
        assert len(readings) == 1, f"{question!r} reads as {readings}"
        ((a, rel, b),) = readings
        if geometric(rel, a, b):
            return "relation", "yes"
        # "no" must mean the opposite holds, not "same row / column".
        assert geometric(INVERSE[rel], a, b), question
        return "relation", "no"
    raise AssertionError(f"the oracle does not know the question {question!r}")


def oracle_edit(instruction: str, source: Scene) -> tuple[str, Scene]:
    """``(kind, target)`` of an instruction applied to ``source``, done here by hand."""
    objs = list(source)
    if m := re.fullmatch(r"make the (.+) (\w+)\.", instruction):
        o = the(m[1], source)
        assert m[2] in COLOURS and m[2] != o.colour
        rest = [p for p in objs if p != o]
        return "recolour", Scene((*rest, Obj(o.row, o.col, o.shape, m[2], o.size)))
    if m := re.fullmatch(r"remove the (.+)\.", instruction):
        o = the(m[1], source)
        return "remove", Scene(tuple(p for p in objs if p != o))
    if m := re.fullmatch(r"move the (.+) to the ([a-z ]+)\.", instruction):
        o = the(m[1], source)
        row, col = POSITION[m[2]]
        assert source.at(row, col) is None, "moving onto an occupied cell"
        rest = [p for p in objs if p != o]
        return "move", Scene((*rest, Obj(row, col, o.shape, o.colour, o.size)))
    if m := re.fullmatch(r"add an? (\w+) (\w+) (\w+) at the ([a-z ]+)\.", instruction):
        row, col = POSITION[m[4]]
        assert source.at(row, col) is None, "adding onto an occupied cell"
        return "add", Scene((*objs, Obj(row, col, m[3], m[2], m[1])))
    raise AssertionError(f"the oracle does not know the instruction {instruction!r}")


# -- fixtures -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def world() -> ShapesWorld:
    return ShapesWorld()


@pytest.fixture(scope="module")
def split_scenes(world: ShapesWorld) -> dict[str, list[Scene]]:
    """1,500 scenes of each split (the same every run)."""
    return {split: list(world.scenes(split, 1500)) for split in SPLITS}


def varied_scenes(world: ShapesWorld, n: int, seed: int = 0) -> list[Scene]:
    """``n`` random scenes with 1-4 objects, every size equally often (no split constraint)."""
    rng = np.random.default_rng(seed)
    return [world.random_scene(rng, 1 + i % 4) for i in range(n)]


def obj(cell: str, shape: str, colour: str = "red", size: str = "large") -> Obj:
    return Obj(*POSITION[cell], shape, colour, size)


# -- scenes ---------------------------------------------------------------------------------------
def test_scene_sorts_objects_into_reading_order() -> None:
    objects = [
        obj("bottom right", "circle"),
        obj("top", "square", "blue"),
        obj("center", "triangle", "green", "small"),
        obj("top left", "circle", "cyan"),
    ]
    for perm in itertools.permutations(objects):
        scene = Scene(perm)
        assert [o.cell for o in scene] == [(0, 0), (0, 1), (1, 1), (2, 2)]
        assert scene == Scene(tuple(objects)) and scene.key() == Scene(tuple(objects)).key()
    assert len(Scene(tuple(objects))) == 4


def test_scene_allows_one_object_per_cell() -> None:
    with pytest.raises(ValueError, match=r"share a cell.*\(1, 1\)"):
        Scene((obj("center", "circle"), obj("center", "square", "blue")))
    full = Scene(tuple(Obj(r, c, "square", "red", "small") for r, c in CELLS))
    assert len(full) == 9 and full.free_cells() == []
    scene = Scene((obj("top left", "circle"), obj("bottom", "square")))
    assert scene.at(0, 0) == obj("top left", "circle") and scene.at(1, 1) is None
    assert scene.free_cells() == [c for c in CELLS if c not in {(0, 0), (2, 1)}]


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"shape": "hexagon"}, "'hexagon'"),
        ({"colour": "magenta"}, "'magenta'"),
        ({"size": "medium"}, "'medium'"),
        ({"row": 3}, r"\(3, 0\)"),
        ({"col": -1}, r"\(0, -1\)"),
    ],
)
def test_invalid_object_names_the_bad_value(kwargs: dict, named: str) -> None:
    fields = {"row": 0, "col": 0, "shape": "circle", "colour": "red", "size": "small", **kwargs}
    with pytest.raises(ValueError, match=named):
        Obj(**fields)


def test_scene_key_and_dict_round_trip(world: ShapesWorld) -> None:
    scenes = [Scene(()), *varied_scenes(world, 400)]
    for scene in scenes:
        assert Scene.from_key(scene.key()) == scene
        assert Scene.from_dict(scene.to_dict()) == scene
        assert Scene.from_dict(json.loads(json.dumps(scene.to_dict()))) == scene
    assert len({s.key() for s in scenes}) == len(set(scenes))  # equal keys <=> equal scenes


@pytest.mark.parametrize(
    "key", ["00circle-red", "xxcircle-red-small", "00hexagon-red-small", "40circle-red-small", "0"]
)
def test_bad_scene_key_raises(key: str) -> None:
    with pytest.raises(ValueError, match=re.escape(repr(key))):
        Scene.from_key(key)


def test_bad_scene_dict_raises() -> None:
    with pytest.raises(ValueError, match="not a ShapesWorld scene"):
        Scene.from_dict({"things": []})
    with pytest.raises(ValueError, match="not a ShapesWorld scene"):
        Scene.from_dict({"objects": [{"row": 0, "col": 0, "shape": "circle"}]})
    hexagon = {"row": 0, "col": 0, "shape": "hexagon", "colour": "red", "size": "small"}
    with pytest.raises(ValueError, match="'hexagon'"):
        Scene.from_dict({"objects": [hexagon]})


def test_relation_holds_matches_rows_and_columns_for_every_cell_pair() -> None:
    for (ra, ca), (rb, cb) in itertools.product(CELLS, CELLS):
        a, b = Obj(ra, ca, "circle", "red", "small"), Obj(rb, cb, "square", "blue", "large")
        assert holds("left of", a, b) == (ca < cb)
        assert holds("right of", a, b) == (ca > cb)
        assert holds("above", a, b) == (ra < rb)
        assert holds("below", a, b) == (ra > rb)
        for rel in RELATIONS:
            assert holds(rel, a, b) == holds(INVERSE[rel], b, a)
    with pytest.raises(ValueError, match="'beside'"):
        holds("beside", a, b)


def test_world_config_validates_and_round_trips() -> None:
    config = WorldConfig(seed=7, image_size=64, min_objects=2, max_objects=3)
    assert WorldConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    with pytest.raises(ValueError, match="48"):
        WorldConfig(image_size=48)
    with pytest.raises(ValueError, match=re.escape("3..2")):
        WorldConfig(min_objects=3, max_objects=2)
    with pytest.raises(ValueError, match=re.escape("0..4")):
        WorldConfig(min_objects=0)
    with pytest.raises(ValueError, match="fraction"):
        WorldConfig(val_fraction=0.5, test_fraction=0.5)
    with pytest.raises(ValueError, match="'hexagon'"):
        HeldOut(pairs=(("red", "hexagon"),))
    with pytest.raises(ValueError, match="'beside'"):
        HeldOut(relations=(("circle", "beside", "square"),))


# -- splits ---------------------------------------------------------------------------------------
def test_same_index_same_scene_across_instances() -> None:
    a, b = ShapesWorld(), ShapesWorld(WorldConfig())
    for split in SPLITS:
        assert [a.scene(split, i) for i in range(50)] == list(b.scenes(split, 50))
        assert list(a.scenes(split, 10, start=20)) == [b.scene(split, i) for i in range(20, 30)]
    other = ShapesWorld(WorldConfig(seed=1))
    assert [a.scene("train", i) for i in range(50)] != [other.scene("train", i) for i in range(50)]
    with pytest.raises(IndexError, match="-1"):
        a.scene("train", -1)
    with pytest.raises(ValueError, match="'dev'"):
        a.scene("dev", 0)


def test_splits_are_disjoint_sets_of_scenes(
    world: ShapesWorld, split_scenes: dict[str, list[Scene]]
) -> None:
    keys = {split: {s.key() for s in scenes} for split, scenes in split_scenes.items()}
    for s1, s2 in itertools.combinations(SPLITS, 2):
        assert not keys[s1] & keys[s2], (s1, s2)
    for split, scenes in split_scenes.items():
        assert all(world.split_of(s) == split for s in scenes)
        assert len(keys[split]) > 1000  # not a handful of scenes repeated


def test_heldout_compositions_belong_to_the_heldout_split_only(
    split_scenes: dict[str, list[Scene]],
) -> None:
    for split in ("train", "val", "test"):
        assert not any(touches_default_heldout(s) for s in split_scenes[split]), split
    assert all(touches_default_heldout(s) for s in split_scenes["heldout"])
    # Both kinds of held-out composition occur in the heldout split.
    held = split_scenes["heldout"]
    assert any(not any((o.colour, o.shape) in HELDOUT_PAIRS for o in s) for s in held)
    assert any(all(o.shape != "circle" for o in s) for s in held)


def test_split_fractions_follow_the_config(world: ShapesWorld) -> None:
    rng = np.random.default_rng(5)
    splits = Counter(world.split_of(world.random_scene(rng)) for _ in range(20_000))
    kept = splits["train"] + splits["val"] + splits["test"]
    assert splits["test"] / kept == pytest.approx(0.05, abs=0.01)
    assert splits["val"] / kept == pytest.approx(0.05, abs=0.01)


def test_object_count_is_uniform_in_every_split(split_scenes: dict[str, list[Scene]]) -> None:
    for split, scenes in split_scenes.items():
        counts = Counter(len(s) for s in scenes)
        assert set(counts) == {1, 2, 3, 4}, split
        expected = len(scenes) / 4
        chi2 = sum((counts[k] - expected) ** 2 / expected for k in (1, 2, 3, 4))
        assert chi2 < 16.27, (split, counts)  # 3 degrees of freedom, p = 0.001


def test_count_range_is_respected() -> None:
    world = ShapesWorld(WorldConfig(min_objects=2, max_objects=3))
    lengths = {len(world.scene(split, i)) for split in SPLITS for i in range(100)}
    assert lengths == {2, 3}


def test_training_uses_every_colour_shape_size_and_relation(
    split_scenes: dict[str, list[Scene]],
) -> None:
    train = split_scenes["train"]
    seen = [o for s in train for o in s]
    assert {o.colour for o in seen} == set(COLOURS)
    assert {o.shape for o in seen} == set(SHAPES)
    assert {o.size for o in seen} == set(SIZES)
    assert {o.cell for o in seen} == set(CELLS)
    pairs = {(o.colour, o.shape) for o in seen}
    assert pairs == {(c, s) for c in COLOURS for s in SHAPES} - HELDOUT_PAIRS
    relations = {
        (a.shape, rel, b.shape)
        for s in train
        for a, b in itertools.permutations(s, 2)
        for rel in RELATIONS
        if geometric(rel, a, b)
    }
    held = {("triangle", "above", "circle"), ("circle", "below", "triangle")}
    everything = {(a, rel, b) for a in SHAPES for b in SHAPES for rel in RELATIONS}
    assert relations == everything - held


# -- rendering ------------------------------------------------------------------------------------
def test_render_is_deterministic_and_uses_only_the_palette(world: ShapesWorld) -> None:
    scenes = varied_scenes(world, 300, seed=1)
    allowed = {BACKGROUND, *COLOURS.values()}
    for size in (32, 64):
        batch = render_batch(scenes, size)
        assert batch.shape == (300, size, size, 3) and batch.dtype == np.uint8
        assert batch.tobytes() == render_batch(scenes, size).tobytes()
        colours = {tuple(c) for c in np.unique(batch.reshape(-1, 3), axis=0)}
        assert colours <= allowed and colours == allowed
        assert np.array_equal(np.asarray(render_image(scenes[0], size)), batch[0])
    assert render_batch([], 32).shape == (0, 32, 32, 3)
    assert (render(Scene(())) == BACKGROUND).all()
    with pytest.raises(ValueError, match="48"):
        render(scenes[0], 48)


@pytest.mark.parametrize("size", [32, 64])
def test_each_object_is_painted_inside_its_cell(size: int) -> None:
    edges = cell_bounds(size)
    assert edges[0] == 0 and edges[-1] == size and list(edges) == sorted(edges)
    for (row, col), shape, colour_size in itertools.product(CELLS, SHAPES, SIZES):
        picture = render(Scene((Obj(row, col, shape, "green", colour_size),)), size)
        painted = (picture != BACKGROUND).any(-1)
        ys, xs = np.nonzero(painted)
        assert (picture[painted] == COLOURS["green"]).all()
        assert edges[row] <= ys.min() and ys.max() < edges[row + 1]
        assert edges[col] <= xs.min() and xs.max() < edges[col + 1]
        # The stamp (which fills its box) is pasted whole, centred in its cell to within a
        # pixel.
        mask = stamp(shape, colour_size, size)
        side = mask.shape[0]
        y0, x0 = ys.min(), xs.min()
        assert ys.max() - y0 + 1 == xs.max() - x0 + 1 == side
        assert np.array_equal(painted[y0 : y0 + side, x0 : x0 + side], mask)
        assert painted.sum() == mask.sum()
        for k, start in ((row, y0), (col, x0)):
            width = edges[k + 1] - edges[k]
            assert abs((start - edges[k]) - (width - side) / 2) <= 0.5


def test_scene_render_is_the_union_of_its_objects(world: ShapesWorld) -> None:
    for scene in varied_scenes(world, 100, seed=2):
        for size in (32, 64):
            picture = render(scene, size)
            expected = np.full_like(picture, BACKGROUND)
            for o in scene:
                alone = render(Scene((o,)), size)
                painted = (alone != BACKGROUND).any(-1)
                expected[painted] = alone[painted]
            assert np.array_equal(picture, expected)


@pytest.mark.parametrize("size", [32, 64])
def test_stamps_have_the_documented_geometry(size: int) -> None:
    expected_side = {32: {"small": 7, "large": 9}, 64: {"small": 11, "large": 17}}[size]
    masks = {}
    for shape, s in itertools.product(SHAPES, SIZES):
        m = stamp(shape, s, size)
        masks[shape, s] = m
        assert m.dtype == bool and m.shape == (expected_side[s],) * 2
        assert stamp_side(s, size) == m.shape[0] and m.shape[0] % 2 == 1
        assert not m.flags.writeable
        assert m[0].any() and m[-1].any() and m[:, 0].any() and m[:, -1].any()  # fills its box
    for s in SIZES:
        circle, square, triangle = (masks[k, s] for k in SHAPES)
        n = circle.shape[0]
        assert square.all()
        assert np.array_equal(circle, circle[:, ::-1]) and np.array_equal(circle, circle[::-1])
        assert np.array_equal(circle, circle.T)
        assert not circle[0, 0] and circle[n // 2].all() and circle[:, n // 2].all()
        assert np.array_equal(triangle, triangle[:, ::-1])
        assert triangle[-1].all()  # base on the bottom row
        assert np.flatnonzero(triangle[0]).tolist() == [n // 2]  # apex at the top centre
        widths = triangle.sum(1)
        assert (np.diff(widths) >= 0).all()  # pointing up: never narrower further down
    assert len({m.tobytes() for m in masks.values()}) == len(masks)
    with pytest.raises(ValueError, match="'hexagon'"):
        stamp("hexagon", "small", size)


# -- language: captions ---------------------------------------------------------------------------
def test_captions_parse_back_to_their_scene(world: ShapesWorld) -> None:
    scenes = varied_scenes(world, 400, seed=3)
    assert sum(len(s) == 4 for s in scenes) == 100
    for scene in scenes:
        for t in range(len(CAPTION_TEMPLATES)):
            text = caption(scene, t)
            assert parse_caption(text) == scene, text
            assert parse_caption("  " + text.upper() + "  ") == scene
        assert caption(scene) == caption(scene, 0)
    with pytest.raises(ValueError, match="empty"):
        caption(Scene(()))


def test_caption_text_describes_objects_in_reading_order() -> None:
    scene = Scene((obj("center", "square", "blue", "small"), obj("top left", "circle")))
    assert caption(scene) == (
        "a large red circle at the top left and a small blue square at the center."
    )
    assert caption(scene, 1).startswith("there is a large red circle")
    assert caption(scene, 2).startswith("an image with a large red circle")


@pytest.mark.parametrize(
    "text",
    [
        "",
        ".",
        "a red circle at the top left.",
        "a large red circle.",
        "a large red hexagon at the top.",
        "a large magenta circle at the top.",
        "a medium red circle at the top.",
        "a large red circle at the middle.",
        "two large red circles at the top.",
        "a large red circle at the top and a small blue square at the top.",
        "a large red circle at the top and.",
        "a large red circle at the top, and a small blue square at the left.",
        "there is there is a large red circle at the top.",
        "the picture shows a large red circle at the top.",
        "a large red circle at the top left left.",
    ],
)
def test_parse_caption_rejects_malformed_text(text: str) -> None:
    assert parse_caption(text) is None


# -- language: questions --------------------------------------------------------------------------
def test_every_question_has_the_oracle_answer(world: ShapesWorld) -> None:
    rng = np.random.default_rng(0)
    types_seen: Counter[str] = Counter()
    for scene in varied_scenes(world, 300, seed=4):
        by_type = questions(scene, rng)
        assert set(by_type) == set(QUESTION_TYPES)
        for qtype, qas in by_type.items():
            for qa in qas:
                assert qa.type == qtype
                assert oracle_answer(qa.question, scene) == (qtype, qa.answer), qa
                assert qa.answer == qa.answer.strip().lower() and " " not in qa.answer
                types_seen[qtype] += 1
        n = len(scene)
        assert len(by_type["count"]) == 1 + len(SHAPES) + len({o.colour for o in scene})
        unique_shapes = sum(Counter(o.shape for o in scene)[o.shape] == 1 for o in scene)
        unique_colours = sum(Counter(o.colour for o in scene)[o.colour] == 1 for o in scene)
        assert len(by_type["colour"]) == n + unique_shapes
        assert len(by_type["shape"]) == n + unique_colours
        # Yes/no relations: both relations of every axis on which a pair differs; a "where"
        # question for pairs on one row or column.
        pairs = list(itertools.permutations(scene, 2))
        yes_no = sum(2 * ((a.row != b.row) + (a.col != b.col)) for a, b in pairs)
        where = sum((a.row == b.row) != (a.col == b.col) for a, b in pairs)
        assert len(by_type["relation"]) == yes_no + where
        if n == 1:
            assert by_type["relation"] == []
    assert all(types_seen[t] > 100 for t in QUESTION_TYPES)


def test_exist_questions_are_balanced(world: ShapesWorld) -> None:
    rng = np.random.default_rng(1)
    for scene in varied_scenes(world, 300, seed=5):
        exist = questions(scene, rng)["exist"]
        answers = Counter(qa.answer for qa in exist)
        assert answers["yes"] == answers["no"] == len({(o.colour, o.shape) for o in scene})
        assert len({qa.question for qa in exist}) == len(exist)  # no question asked twice


def test_sample_question_is_one_of_the_scenes_questions(world: ShapesWorld) -> None:
    rng = np.random.default_rng(2)
    types = Counter()
    for scene in varied_scenes(world, 400, seed=6):
        qa = sample_question(scene, rng)
        assert oracle_answer(qa.question, scene) == (qa.type, qa.answer)
        types[qa.type] += 1
    assert set(types) == set(QUESTION_TYPES)


def test_references_name_exactly_one_object(world: ShapesWorld) -> None:
    forms = Counter()
    for scene in varied_scenes(world, 400, seed=7):
        for o in scene:
            ref = reference(o, scene)
            assert resolve(ref, scene) == [o], (ref, scene.key())
            forms["at" if " at the " in ref else len(ref.split())] += 1
    assert set(forms) == {1, 2, 3, "at"}  # every form of reference is exercised
    # The shortest unique phrase is chosen.
    scene = Scene(
        (
            obj("top left", "circle", "red", "small"),
            obj("top", "circle", "red", "large"),
            obj("left", "circle", "blue"),
            obj("right", "square"),
        )
    )
    assert reference(scene.at(1, 2), scene) == "square"
    assert reference(scene.at(1, 0), scene) == "blue circle"
    assert reference(scene.at(0, 0), scene) == "small red circle"
    twins = Scene((obj("top", "circle"), obj("bottom", "circle")))
    assert reference(twins.at(2, 1), twins) == "circle at the bottom"


def test_position_questions_name_the_row_and_column_counted_from_the_top_left(
    world: ShapesWorld,
) -> None:
    ordinal = {"one": 0, "two": 1, "three": 2}  # the oracle's own numbering
    for scene in varied_scenes(world, 300, seed=8):
        qs = position_questions(scene)
        named = [o for o in scene if " at the " not in reference(o, scene)]
        assert len(qs) == 2 * len(named)  # a row and a column question per object
        for qa in qs:
            m = re.fullmatch(r"what (row|column) is the (.+) in\?", qa.question)
            assert m is not None and qa.type == POSITION_TYPE, qa
            (o,) = resolve(m.group(2), scene)
            assert ordinal[qa.answer] == (o.row if m.group(1) == "row" else o.col), qa
        # In words: the same questions, each answer the word of the same row / column.
        words = position_questions(scene, words=True)
        assert [q.question for q in words] == [q.question for q in qs]
        for qa, qw in zip(qs, words, strict=True):
            assert qw.type == POSITION_WORDS_TYPE
            names = ROW_WORDS if qa.question.startswith("what row") else COLUMN_WORDS
            assert qw.answer == names[ordinal[qa.answer]], qw
    assert ROW_WORDS == ("top", "center", "bottom") and COLUMN_WORDS == ("left", "center", "right")
    assert {POSITION_TYPE, POSITION_WORDS_TYPE}.isdisjoint(QUESTION_TYPES)  # benchmark never asks


def test_question_weights_set_the_type_frequencies(world: ShapesWorld) -> None:
    weights = {"relation": 3, "position": 2, "position_words": 1}  # the others weigh 1
    rng = np.random.default_rng(9)
    scenes = [world.random_scene(rng, 4) for _ in range(250)]  # every type is supported
    types: Counter[str] = Counter()
    for scene in scenes:
        for _ in range(8):
            qa = sample_question(scene, rng, weights=weights)
            types[qa.type] += 1
            if qa.type == POSITION_TYPE:
                assert qa in position_questions(scene)
            elif qa.type == POSITION_WORDS_TYPE:
                assert qa in position_questions(scene, words=True)
            else:
                assert oracle_answer(qa.question, scene) == (qa.type, qa.answer)
    n = sum(types.values())
    expected = {t: weights.get(t, 1) / 10 for t in (*QUESTION_TYPES, *weights)}
    for t, share in expected.items():  # 2000 draws: 4 standard errors at most
        assert abs(types[t] / n - share) < 4 * (share * (1 - share) / n) ** 0.5, (t, types)
    # A scene that supports no type of positive weight falls back to the uniform draw.
    one = Scene((obj("top left", "circle"),))
    only_relations = {t: 0 for t in QUESTION_TYPES} | {"relation": 1}
    assert sample_question(one, rng, weights=only_relations).type in QUESTION_TYPES
    # Items: the weights apply to vqa only; None is the benchmark's draw.
    assert draw_item(world, "vqa", "train", 5, None) == draw_item(world, "vqa", "train", 5)
    assert draw_item(world, "caption", "train", 3, weights) == draw_item(
        world, "caption", "train", 3
    )
    kinds = Counter(draw_item(world, "vqa", "train", i, {"position": 50}).kind for i in range(60))
    assert kinds[POSITION_TYPE] > 45  # 50 / 55 of the scenes that have a position question
    assert kinds[POSITION_WORDS_TYPE] == 0  # training-only types weigh 0 unless named
    assert all(a.answer in ORDINAL_ANSWERS for s in world.scenes("train", 20)
               for a in position_questions(s))  # fmt: skip


# -- language: edits ------------------------------------------------------------------------------
def test_every_edit_does_what_its_instruction_says(world: ShapesWorld) -> None:
    kinds = Counter()
    for scene in varied_scenes(world, 120, seed=8):
        for kind in EDIT_KINDS:
            for edit in possible_edits(scene, kind=kind):
                assert edit.kind == kind and edit.source == scene
                assert oracle_edit(edit.instruction, scene) == (kind, edit.target), edit
                kinds[kind] += 1
    assert set(kinds) == set(EDIT_KINDS)


def test_edit_kinds_keep_scenes_valid(world: ShapesWorld) -> None:
    one = Scene((obj("center", "circle"),))
    four = Scene(tuple(obj(p, "square") for p in ("top", "left", "right", "bottom")))
    assert {e.kind for e in possible_edits(one)} == {"recolour", "move", "add"}
    assert {e.kind for e in possible_edits(four)} == {"recolour", "move", "remove"}
    # Every recolouring, move and addition is offered exactly once.
    assert len(possible_edits(one, kind="recolour")) == len(COLOURS) - 1
    assert len(possible_edits(one, kind="move")) == 8
    assert len(possible_edits(one, kind="add")) == 8 * len(SHAPES) * len(COLOURS) * len(SIZES)
    rng = np.random.default_rng(3)
    for scene in varied_scenes(world, 200, seed=9):
        edit = sample_edit(scene, rng)
        assert oracle_edit(edit.instruction, scene) == (edit.kind, edit.target)
        assert 1 <= len(edit.target) <= 4


def test_sample_edit_only_returns_allowed_targets(world: ShapesWorld) -> None:
    rng = np.random.default_rng(4)

    def no_red(target: Scene) -> bool:
        return all(o.colour != "red" for o in target)

    for scene in varied_scenes(world, 150, seed=10):
        edit = sample_edit(scene, rng, allowed=no_red)
        if edit is None:
            assert not possible_edits(scene, allowed=no_red)
        else:
            assert no_red(edit.target)
            assert oracle_edit(edit.instruction, scene) == (edit.kind, edit.target)
        for split in ("test", "heldout"):
            edit = sample_edit(scene, rng, allowed=lambda t, s=split: world.split_of(t) == s)
            if edit is not None:
                assert world.split_of(edit.target) == split
    assert sample_edit(Scene((obj("top", "circle"),)), rng, allowed=lambda t: False) is None


# -- prompts --------------------------------------------------------------------------------------
def test_prompt_counts_per_category() -> None:
    prompts = all_prompts()
    counts = Counter(p.category for p in prompts)
    assert counts == {
        "single_object": 3,
        "two_object": 6,
        "counting": 9,
        "colors": 18,
        "position": 24,
        "color_attr": 180,
    }
    assert list(counts) == list(CATEGORIES)  # grouped in category order
    assert len({p.id for p in prompts}) == len(prompts)
    assert len({p.text for p in prompts}) == len(prompts)
    texts = {p.text: p for p in prompts}
    for text in ("a circle", "three triangles", "a red circle", "a circle left of a square"):
        assert text in texts
    assert texts["a red circle and a blue square"].category == "color_attr"
    assert all(p.category == "counting" for p in prompts if p.text.split()[0] in NUMBER)


def test_prompt_sets_partition_all_prompts() -> None:
    test, held = prompt_set("test"), prompt_set("heldout")
    ids = [p.id for p in all_prompts()]
    assert sorted(p.id for p in test + held) == sorted(ids)
    assert not {p.id for p in test} & {p.id for p in held}
    for p in test:
        assert not HELDOUT_TEXT.search(p.text), p.text
    for p in held:
        assert HELDOUT_TEXT.search(p.text), p.text
    # color_attr: ordered shape pairs x distinct colours with a red triangle or a blue circle on
    # either side: (triangle, circle) and (circle, triangle) 5 + 4 each, the other four 5.
    assert Counter(p.category for p in held) == {"colors": 2, "position": 2, "color_attr": 38}
    # Subsampling keeps at most max_per_category, deterministically.
    small = prompt_set("test", max_per_category=5, seed=3)
    assert small == prompt_set("test", max_per_category=5, seed=3)
    assert all(n <= 5 for n in Counter(p.category for p in small).values())
    assert {p.id for p in small} <= {p.id for p in test}
    with pytest.raises(ValueError, match="'train'"):
        prompt_set("train")


def _prompt(text: str) -> Prompt:
    return next(p for p in all_prompts() if p.text == text)


def test_check_counts_exactly_only_for_counting() -> None:
    two = _prompt("two circles")
    circles = [obj(p, "circle") for p in ("top", "left", "right")]
    assert not passes(two, Scene(tuple(circles[:1])))
    assert passes(two, Scene(tuple(circles[:2])))
    assert passes(two, Scene((*circles[:2], obj("bottom", "square"))))
    failures = check(two, Scene(tuple(circles)))
    assert failures == ["two circles: want exactly 2, found 3"]
    one = _prompt("a circle")
    assert passes(one, Scene(tuple(circles))) and not passes(one, Scene((obj("top", "square"),)))
    both = _prompt("a circle and a square")
    assert not passes(both, Scene(tuple(circles)))
    assert passes(both, Scene((*circles, obj("bottom", "square"))))


def test_check_binds_colours_to_shapes() -> None:
    red_circle = _prompt("a red circle")
    assert passes(red_circle, Scene((obj("top", "circle", "red"),)))
    assert not passes(red_circle, Scene((obj("top", "circle", "blue"), obj("left", "square"))))
    attr = _prompt("a red circle and a blue square")
    assert passes(attr, Scene((obj("top", "circle", "red"), obj("left", "square", "blue"))))
    swapped = Scene((obj("top", "circle", "blue"), obj("left", "square", "red")))
    assert check(attr, swapped) == [
        "a red circle: want >= 1, found 0",
        "a blue square: want >= 1, found 0",
    ]


def test_check_relation_with_distractors() -> None:
    prompt = _prompt("a circle left of a square")
    square = obj("top", "square")
    wrong_side = obj("top right", "circle")
    same_column = obj("center", "circle")
    assert not passes(prompt, Scene((square, wrong_side, same_column)))
    assert check(prompt, Scene((square, wrong_side))) == ["no circle left of a square"]
    assert passes(prompt, Scene((square, wrong_side, same_column, obj("bottom left", "circle"))))
    assert not passes(prompt, Scene((obj("top left", "triangle"), square)))
    above = _prompt("a square above a triangle")
    assert passes(above, Scene((obj("top right", "square"), obj("bottom left", "triangle"))))
    assert not passes(above, Scene((obj("left", "square"), obj("right", "triangle"))))


def test_scene_for_prompt_passes_and_respects_the_split(world: ShapesWorld) -> None:
    rng = np.random.default_rng(5)
    for prompt in prompt_set("test"):
        for split in ("train", "test"):
            scene = scene_for_prompt(prompt, world, rng, split)
            assert passes(prompt, scene) and world.split_of(scene) == split, prompt.id
            assert not touches_default_heldout(scene)
            assert 1 <= len(scene) <= 4
    for prompt in prompt_set("heldout"):
        scene = scene_for_prompt(prompt, world, rng, "heldout")
        assert passes(prompt, scene) and touches_default_heldout(scene), prompt.id
    for prompt in prompt_set("test", max_per_category=2):
        assert all(passes(prompt, scene_for_prompt(prompt, world, rng)) for _ in range(20))


def test_scene_for_prompt_holds_exactly_the_prompts_objects_unless_extras(
    world: ShapesWorld,
) -> None:
    """The strict scene rule is the oracle: by default the scene is the prompt's and nothing
    more; with ``extras`` it still passes GenEval-style, and some scenes hold more objects."""
    rng = np.random.default_rng(7)
    more = 0
    for prompt in prompt_set("test"):
        n = sum(r.count for r in prompt.requirements)
        scene = scene_for_prompt(prompt, world, rng, "train")
        assert len(scene) == n and strict_check(prompt, scene) == [], prompt.id
        padded = scene_for_prompt(prompt, world, rng, "train", extras=True)
        assert passes(prompt, padded) and len(padded) >= n, prompt.id
        more += len(padded) > n
    assert more > len(prompt_set("test")) // 4


def test_scene_for_prompt_rejects_more_than_four_objects(world: ShapesWorld) -> None:
    prompt = Prompt(
        "counting/too_many",
        "counting",
        "three circles and two squares",
        (Requirement("circle", count=3, exact=True), Requirement("square", count=2)),
    )
    with pytest.raises(ValueError, match="5 > 4"):
        scene_for_prompt(prompt, world, np.random.default_rng(0))


def test_prompt_from_scene_returns_prompts_the_scene_passes(world: ShapesWorld) -> None:
    rng = np.random.default_rng(6)
    categories = Counter()
    for scene in varied_scenes(world, 150, seed=11):
        prompt = prompt_from_scene(scene, rng)
        assert prompt is not None and passes(prompt, scene)  # single_object always fits
        categories[prompt.category] += 1
        for category in CATEGORIES:
            prompt = prompt_from_scene(scene, rng, category)
            if prompt is None:
                assert not any(passes(p, scene) for p in all_prompts() if p.category == category)
            else:
                assert prompt.category == category and passes(prompt, scene)
    assert set(categories) == set(CATEGORIES)
    one_each = Scene((obj("top", "circle"), obj("left", "square"), obj("right", "triangle")))
    assert prompt_from_scene(one_each, rng, "counting") is None
    with pytest.raises(ValueError, match="'shapes'"):
        prompt_from_scene(one_each, rng, "shapes")


def test_prompt_dict_round_trip() -> None:
    for prompt in all_prompts():
        assert Prompt.from_dict(json.loads(json.dumps(prompt.to_dict()))) == prompt
    with pytest.raises(ValueError, match="not a ShapesWorld prompt"):
        Prompt.from_dict({"id": "x", "category": "colors"})
    data = all_prompts()[0].to_dict() | {"category": "mood"}
    with pytest.raises(ValueError, match="'mood'"):
        Prompt.from_dict(data)


# -- datasets -------------------------------------------------------------------------------------
EXPECTED_FIELDS = {
    "t2i": {"task", "id", "image", "caption", "meta"},
    "caption": {"task", "id", "image", "caption", "meta"},
    "vqa": {"task", "id", "image", "question", "answer", "meta"},
    "edit": {"task", "id", "image", "instruction", "target", "meta"},
}


def _picture(key: str, size: int = 32) -> torch.Tensor:
    return image_to_tensor(render(Scene.from_key(key), size))


@pytest.mark.parametrize("task", SHAPES_TASKS)
@pytest.mark.parametrize("split", ["train", "heldout"])
def test_dataset_items_have_the_documented_fields(
    world: ShapesWorld, task: str, split: str
) -> None:
    ds = ShapesWorldDataset(task, split, length=40, world=world)
    assert len(ds) == 40
    for i in range(len(ds)):
        item = ds[i]
        assert set(item) == EXPECTED_FIELDS[task]
        assert item["task"] == ("caption" if task == "t2i" else task)
        assert item["id"] == f"{split}-{task}-{i:06d}"
        scene = Scene.from_key(item["meta"]["scene"])
        assert world.split_of(scene) == split
        for name in ("image", "target") if task == "edit" else ("image",):
            image = item[name]
            assert image.dtype == torch.float32 and image.shape == (3, 32, 32)
            assert image.min() >= -1 and image.max() <= 1
        assert torch.equal(item["image"], _picture(item["meta"]["scene"]))
        meta = item["meta"]
        if task == "caption":
            assert item["caption"] == caption(scene) and meta["kind"] == ""
        elif task == "t2i":
            if meta["kind"] == "caption":
                assert parse_caption(item["caption"]) == scene
            else:
                prompt = next(p for p in all_prompts() if p.id == meta["kind"])
                assert item["caption"] == prompt.text and passes(prompt, scene)
        elif task == "vqa":
            assert oracle_answer(item["question"], scene) == (meta["kind"], item["answer"])
        else:
            target = Scene.from_key(meta["target_scene"])
            assert oracle_edit(item["instruction"], scene) == (meta["kind"], target)
            assert world.split_of(target) == split
            assert torch.equal(item["target"], _picture(meta["target_scene"]))
        assert all(isinstance(v, str) for v in meta.values())


def test_dataset_is_deterministic_and_indexes_like_a_sequence() -> None:
    for task in SHAPES_TASKS:
        a = ShapesWorldDataset(task, "val", length=25)
        b = ShapesWorldDataset(task, "val", length=25, world=WorldConfig())
        for i in (0, 7, 24):
            x, y = a[i], b[i]
            assert x.keys() == y.keys() and x["meta"] == y["meta"]
            assert torch.equal(x["image"], y["image"])
            assert all(x[k] == y[k] for k in x if isinstance(x[k], str))
        assert a[-1]["id"] == a[24]["id"] and a[-25]["id"] == a[0]["id"]
        for bad in (25, -26):
            with pytest.raises(IndexError, match=str(bad)):
                a[bad]
    seed0 = ShapesWorldDataset("caption", "val", length=25)
    seed9 = ShapesWorldDataset("caption", "val", length=25, world=WorldConfig(seed=9))
    assert [seed9[i]["caption"] for i in range(10)] != [seed0[i]["caption"] for i in range(10)]


def test_dataset_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="'draw'"):
        ShapesWorldDataset("draw")
    with pytest.raises(ValueError, match="'dev'"):
        ShapesWorldDataset("vqa", "dev")
    with pytest.raises(ValueError, match="0"):
        ShapesWorldDataset("vqa", length=0)


def test_dataset_64_pixels() -> None:
    ds = ShapesWorldDataset("edit", "test", length=5, world=WorldConfig(image_size=64))
    item = ds[3]
    assert item["image"].shape == item["target"].shape == (3, 64, 64)
    assert torch.equal(item["target"], _picture(item["meta"]["target_scene"], 64))


@pytest.mark.parametrize("task", SHAPES_TASKS)
def test_default_collate_batches_items(task: str) -> None:
    ds = ShapesWorldDataset(task, "train", length=8)
    batch = default_collate([ds[i] for i in range(8)])
    assert batch["image"].shape == (8, 3, 32, 32)
    assert batch["id"] == [ds[i]["id"] for i in range(8)]
    assert len(batch["meta"]["scene"]) == 8
    if task == "edit":
        assert batch["target"].shape == (8, 3, 32, 32)
        assert len(batch["meta"]["target_scene"]) == 8


def _training_texts(task: str, n: int) -> list[str]:
    ds = ShapesWorldDataset(task, "train", length=n)
    return [text for i in range(n) for text in ds.item(i).texts.values()]


@pytest.mark.parametrize("task", ["t2i", "caption", "edit"])
def test_training_text_never_mentions_a_heldout_composition(task: str) -> None:
    texts = _training_texts(task, 3000)
    assert len(texts) == 3000 and not [t for t in texts if HELDOUT_TEXT.search(t)]


def test_training_edit_targets_stay_in_training(world: ShapesWorld) -> None:
    ds = ShapesWorldDataset("edit", "train", length=1000, world=world)
    kinds = Counter()
    for i in range(len(ds)):
        item = ds.item(i)
        source, target = Scene.from_key(item.scene_key), Scene.from_key(item.target_key)
        assert world.split_of(target) == "train" and not touches_default_heldout(target)
        assert oracle_edit(item.texts["instruction"], source) == (item.kind, target)
        kinds[item.kind] += 1
    assert set(kinds) == set(EDIT_KINDS)


def test_training_questions_never_mention_a_heldout_composition() -> None:
    texts = _training_texts("vqa", 3000)
    assert [t for t in texts if HELDOUT_TEXT.search(t)] == []


# -- materialise ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def materialised(tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("shapes")
    summary = materialise(out, n=200, split="test", workers=1, progress=False)
    return out, summary


def test_materialised_manifest_is_valid(materialised) -> None:
    out, summary = materialised
    assert summary["items"] == 800 and summary["pictures"] == 1000
    report = validate_manifest(out / "manifest.jsonl")
    assert report.ok, report.format()
    assert report.num_records == 800
    assert report.tasks == {"caption": 400, "vqa": 200, "edit": 200}
    assert report.image_sizes == {(32, 32)}
    assert WorldConfig.from_dict(json.loads((out / "world.json").read_text())) == WorldConfig()


def test_materialised_items_equal_streamed_items(materialised) -> None:
    out, _ = materialised
    loaded = ManifestDataset(out / "manifest.jsonl")
    assert len(loaded) == 800
    streamed = {
        item["id"]: item
        for task in SHAPES_TASKS
        for ds in [ShapesWorldDataset(task, "test", length=200)]
        for item in (ds[i] for i in range(len(ds)))
    }
    assert sorted(loaded[i]["id"] for i in range(len(loaded))) == sorted(streamed)
    for i in range(len(loaded)):
        item = loaded[i]
        expected = streamed[item["id"]]
        assert item.keys() == expected.keys(), item["id"]
        for key, value in expected.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(item[key], value), (item["id"], key)
            else:
                assert item[key] == value, (item["id"], key)


def test_materialised_prompts_parse_back(materialised) -> None:
    out, _ = materialised
    lines = (out / "prompts.jsonl").read_text().splitlines()
    assert [Prompt.from_dict(json.loads(line)) for line in lines] == prompt_set("test")


def test_materialise_train_writes_no_prompt_file(tmp_path) -> None:
    summary = materialise(tmp_path, n=3, split="train", tasks=("vqa",), workers=1, progress=False)
    assert summary["items"] == 3 and not (tmp_path / "prompts.jsonl").exists()
    assert sorted(p.name for p in (tmp_path / "images" / "vqa").iterdir()) == [
        f"train-vqa-{i:06d}.png" for i in range(3)
    ]


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"n": 0}, "n must be >= 1"),
        ({"split": "dev"}, "'dev'"),
        ({"tasks": ("draw",)}, "'draw'"),
        ({"tasks": ()}, "non-empty"),
    ],
)
def test_materialise_rejects_bad_arguments(tmp_path, kwargs: dict, named: str) -> None:
    args = {"n": 5, "split": "test", "workers": 1, "progress": False, **kwargs}
    with pytest.raises(ValueError, match=named):
        materialise(tmp_path / "out", **args)
    assert not (tmp_path / "out").exists()
