"""ShapesWorld text: captions (and their parser), questions with answers, edit instructions.

Everything is generated from the scene, so every text is true of its picture by construction.
Objects are named by the shortest unambiguous *reference* (:func:`reference`): "the circle"
when there is one circle, else "the red circle", "the small red circle", and as a last resort
"the circle at the top left".

Captions describe the full scene in reading order, e.g.
``"a large red circle at the top left and a small blue square at the center."``;
:func:`parse_caption` reads any caption template back into a :class:`Scene`, which is how
captioning is scored (a caption is right when it describes exactly the picture's scene).

Answers are single lowercase words: numbers as words ("two"), colours, shapes, "yes" / "no",
and "left" / "right" / "above" / "below".
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

from kineflow.data.shapes.scene import (
    COLOURS,
    MAX_OBJECTS,
    POSITION_NAMES,
    RELATIONS,
    SHAPES,
    SIZES,
    HeldOut,
    Obj,
    Scene,
    holds,
    with_objects,
)

NUMBER_WORDS: tuple[str, ...] = ("zero", "one", "two", "three", "four")
QUESTION_TYPES: tuple[str, ...] = ("count", "colour", "shape", "relation", "exist")
#: Training-only questions, never asked by the benchmark: which row / column an object is in
#: (:func:`position_questions`), the stepping stone to relation questions. ``position`` answers
#: with numbers, ``position_words`` with the words of relations and captions.
POSITION_TYPE = "position"
POSITION_WORDS_TYPE = "position_words"
#: "does the picture show exactly: {prompt}?" (:mod:`kineflow.data.shapes.verify`).
VERIFY_TYPE = "verify"
POSITION_TYPES: tuple[str, ...] = (POSITION_TYPE, POSITION_WORDS_TYPE)
TRAINING_TYPES: tuple[str, ...] = (*POSITION_TYPES, VERIFY_TYPE)
#: The verification question, yes when the picture shows exactly the prompt's objects (the
#: strict-scene rule); the question the self-judge of best-of-N asks (kineflow.pipelines.judge).
VERIFY_QUESTION = "does the picture show exactly: {prompt}?"
#: Rows counted from the top, columns from the left; one-token answers in the shipped tokenizer.
ORDINAL_ANSWERS: tuple[str, ...] = ("one", "two", "three")
#: Rows and columns in words, the captions' position words (up to 3 tokens + EOS in the shipped
#: tokenizer, hence ``vqa_answer_tokens: 4``).
ROW_WORDS: tuple[str, ...] = ("top", "center", "bottom")
COLUMN_WORDS: tuple[str, ...] = ("left", "center", "right")
EDIT_KINDS: tuple[str, ...] = ("recolour", "remove", "add", "move")
_POSITION_OF_NAME = {
    name: (r, c) for r, row in enumerate(POSITION_NAMES) for c, name in enumerate(row)
}


def plural(shape: str) -> str:
    return shape + "s"


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def describe(o: Obj) -> str:
    """The full noun phrase of an object: ``"a small red circle at the top left"``."""
    return f"a {o.size} {o.colour} {o.shape} at the {o.position}"


# -- references ---------------------------------------------------------------------------------
def _matches(o: Obj, words: dict[str, str]) -> bool:
    return all(getattr(o, k) == v for k, v in words.items())


def reference(o: Obj, scene: Scene) -> str:
    """Shortest phrase naming ``o`` uniquely in ``scene``, without the article: ``"circle"``,
    ``"red circle"``, ``"small red circle"`` or ``"circle at the top left"``."""
    for keys in (("shape",), ("colour", "shape"), ("size", "colour", "shape")):
        words = {k: getattr(o, k) for k in keys}
        if sum(_matches(p, words) for p in scene) == 1:
            return " ".join(words[k] for k in keys)
    return f"{o.shape} at the {o.position}"


# -- captions -----------------------------------------------------------------------------------
CAPTION_TEMPLATES: tuple[str, ...] = ("{list}.", "there is {list}.", "an image with {list}.")


def _join(items: list[str]) -> str:
    if len(items) == 1:
        return items[0]
    return ", ".join(items[:-1]) + " and " + items[-1]


def caption(scene: Scene, template: int = 0) -> str:
    """The full description of ``scene`` with caption template ``template``; template 0 is the
    canonical one that captioning models are scored with."""
    if not len(scene):
        raise ValueError("cannot caption an empty scene")
    return CAPTION_TEMPLATES[template].format(list=_join([describe(o) for o in scene]))


_ITEM = re.compile(
    rf"^an? ({'|'.join(SIZES)}) ({'|'.join(COLOURS)}) ({'|'.join(SHAPES)}) "
    rf"(?:at|in) the ({'|'.join(sorted(_POSITION_OF_NAME, key=len, reverse=True))})$"
)


def parse_caption(text: str) -> Scene | None:
    """The scene a caption describes, or ``None`` if it does not follow the caption grammar
    (or names one cell twice). Case, surrounding space and a final period are ignored."""
    body = text.strip().lower().rstrip(".").strip()
    for prefix in ("there is ", "an image with "):
        if body.startswith(prefix):
            body = body[len(prefix) :]
            break
    parts = [p.strip() for p in re.split(r",| and ", body)]
    objects = []
    for part in parts:
        m = _ITEM.match(part)
        if m is None:
            return None
        size, colour, shape, pos = m.groups()
        row, col = _POSITION_OF_NAME[pos]
        objects.append(Obj(row, col, shape, colour, size))
    try:
        return Scene(tuple(objects))
    except ValueError:
        return None


# -- questions ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class QA:
    """A question about a scene, its one-word answer and its type (:data:`QUESTION_TYPES`)."""

    question: str
    answer: str
    type: str


def _count_questions(scene: Scene) -> list[QA]:
    qs = [QA("how many objects are there?", NUMBER_WORDS[len(scene)], "count")]
    for shape in SHAPES:
        n = sum(o.shape == shape for o in scene)
        qs.append(QA(f"how many {plural(shape)} are there?", NUMBER_WORDS[n], "count"))
    for colour in COLOURS:
        n = sum(o.colour == colour for o in scene)
        if n:
            qs.append(QA(f"how many {colour} objects are there?", NUMBER_WORDS[n], "count"))
    return qs


def _colour_questions(scene: Scene) -> list[QA]:
    qs = [QA(f"what colour is the object at the {o.position}?", o.colour, "colour") for o in scene]
    for o in scene:
        if sum(p.shape == o.shape for p in scene) == 1:
            qs.append(QA(f"what colour is the {o.shape}?", o.colour, "colour"))
    return qs


def _shape_questions(scene: Scene) -> list[QA]:
    qs = [QA(f"what shape is at the {o.position}?", o.shape, "shape") for o in scene]
    for o in scene:
        if sum(p.colour == o.colour for p in scene) == 1:
            qs.append(QA(f"what shape is the {o.colour} object?", o.shape, "shape"))
    return qs


def _relation_questions(scene: Scene, heldout: HeldOut | None) -> list[QA]:
    qs = []
    for a in scene:
        for b in scene:
            if a is b:
                continue
            ra, rb = reference(a, scene), reference(b, scene)
            # Yes/no only on an axis where the two differ, so "no" means the opposite holds.
            for rel in RELATIONS:
                axis_differs = a.col != b.col if rel in ("left of", "right of") else a.row != b.row
                if heldout is not None and heldout.relation_held(a.shape, rel, b.shape):
                    continue  # even asking "is the triangle above the circle?" names it
                if axis_differs:
                    answer = "yes" if holds(rel, a, b) else "no"
                    qs.append(QA(f"is the {ra} {rel} the {rb}?", answer, "relation"))
            if (a.row == b.row) != (a.col == b.col):  # exactly one axis differs: one answer
                rel = next(r for r in RELATIONS if holds(r, a, b))
                word = rel.removesuffix(" of")
                qs.append(QA(f"where is the {ra} relative to the {rb}?", word, "relation"))
    return qs


def position_questions(scene: Scene, words: bool = False) -> list[QA]:
    """``"what row is the {ref} in?"`` -> ``"one"`` / ``"two"`` / ``"three"`` (rows from the
    top) and the same for its column (from the left), for every object whose reference does
    not already name its cell; with ``words``, the answers are :data:`ROW_WORDS` /
    :data:`COLUMN_WORDS` (type :data:`POSITION_WORDS_TYPE`).

    Why: a relation question ("is the red circle left of the square?") needs two skills at
    once, finding each referent's image token and comparing rows or columns, and its answer
    depends on both; trained alone it stays at chance for every model here. These questions
    train finding one referent's cell. On ideal tokens relations then follow only when these
    answers use relation words, not numbers (docs/understanding.md, "Relations")."""
    rows, cols, kind = (ROW_WORDS, COLUMN_WORDS, POSITION_WORDS_TYPE) if words else (
        ORDINAL_ANSWERS, ORDINAL_ANSWERS, POSITION_TYPE)  # fmt: skip
    qs = []
    for o in scene:
        ref = reference(o, scene)
        if " at the " in ref:
            continue  # the question would name the answer
        qs.append(QA(f"what row is the {ref} in?", rows[o.row], kind))
        qs.append(QA(f"what column is the {ref} in?", cols[o.col], kind))
    return qs


def _exist_questions(scene: Scene, rng: np.random.Generator, heldout: HeldOut | None) -> list[QA]:
    present = {(o.colour, o.shape) for o in scene}
    absent = [
        (c, s)
        for c in COLOURS
        for s in SHAPES
        if (c, s) not in present and (heldout is None or not heldout.pair_held(c, s))
    ]
    qs = [QA(f"is there a {c} {s}?", "yes", "exist") for c, s in sorted(present)]
    # As many "no" as "yes" questions, so that answering "yes" always scores 50%.
    for i in rng.choice(len(absent), size=len(qs), replace=False):
        c, s = absent[i]
        qs.append(QA(f"is there a {c} {s}?", "no", "exist"))
    return qs


def questions(
    scene: Scene, rng: np.random.Generator, heldout: HeldOut | None = None
) -> dict[str, list[QA]]:
    """Every question of each type that ``scene`` supports (a type may have none, e.g.
    relations in a one-object scene). With ``heldout``, questions naming a held-out composition
    ("is there a red triangle?" -> no) are left out, as they must be outside its split."""
    return {
        "count": _count_questions(scene),
        "colour": _colour_questions(scene),
        "shape": _shape_questions(scene),
        "relation": _relation_questions(scene, heldout),
        "exist": _exist_questions(scene, rng, heldout),
    }


def sample_question(
    scene: Scene,
    rng: np.random.Generator,
    heldout: HeldOut | None = None,
    weights: Mapping[str, float] | None = None,
) -> QA:
    """One question: a type among those the scene supports, then a uniform question of it
    (``heldout`` as in :func:`questions`).

    The type is uniform (the benchmark's draw) unless ``weights`` are given (training only):
    then ``P(type) ∝ weights[type]`` over the supported types, where a type not named weighs 1
    and the position types (:func:`position_questions`) weigh 0 unless named; a scene that
    supports no type of positive weight falls back to the uniform draw. ``weights["verify"]``
    is not drawn here: the dataset decides first whether a row is a verification question
    (:func:`kineflow.data.shapes.verify.verify_share`)."""
    by_type = {t: qs for t, qs in questions(scene, rng, heldout).items() if qs}
    if weights is not None:
        # Built only when asked for: this runs per training row. Verification questions need a
        # scene drawn for a prompt, so the dataset draws them (kineflow.data.shapes.verify).
        for kind in POSITION_TYPES:
            if weights.get(kind, 0) > 0:
                by_type[kind] = position_questions(scene, words=kind == POSITION_WORDS_TYPE)
        w = {t: question_weight(weights, t) for t in by_type}
        types = sorted(t for t in by_type if by_type[t] and w[t] > 0)
        if types:
            p = np.array([w[t] for t in types])
            qs = by_type[types[rng.choice(len(types), p=p / p.sum())]]
            return qs[rng.integers(len(qs))]
        by_type = {t: qs for t, qs in by_type.items() if qs and t not in TRAINING_TYPES}
    types = sorted(by_type)
    qs = by_type[types[rng.integers(len(types))]]
    return qs[rng.integers(len(qs))]


def question_weight(weights: Mapping[str, float], kind: str) -> float:
    """The weight of question type ``kind`` under ``question_weights``: as given, else 1 for a
    benchmark type (:data:`QUESTION_TYPES`) and 0 for a training-only one."""
    return float(weights.get(kind, 0.0 if kind in TRAINING_TYPES else 1.0))


def check_question_weights(weights: object, where: str) -> None:
    """Raise ValueError (naming ``where`` and the key) unless ``weights`` maps question types
    (:data:`QUESTION_TYPES` or :data:`TRAINING_TYPES`) to numbers >= 0."""
    if not isinstance(weights, Mapping):
        raise ValueError(f"{where} must be a mapping of question types to weights, got {weights!r}")
    for name, value in weights.items():
        if name not in (*QUESTION_TYPES, *TRAINING_TYPES):
            raise ValueError(f"{where}: unknown question type {name!r}; the types are "
                             f"{[*QUESTION_TYPES, *TRAINING_TYPES]}")  # fmt: skip
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1e300:
            raise ValueError(f"{where}.{name} must be a number >= 0, got {value!r}")


def normalise_answer(text: str) -> str:
    """Answers are compared lowercase, without surrounding space or a final period."""
    return text.strip().lower().rstrip(".").strip()


# -- edits --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Edit:
    """An instruction turning ``source`` into ``target``; ``kind`` in :data:`EDIT_KINDS`."""

    instruction: str
    source: Scene
    target: Scene
    kind: str


def _edit(scene: Scene, kind: str, o: Obj | None, new: Obj | None) -> Edit:
    """The edit of ``kind`` on object ``o`` (``None`` for add) producing ``new`` (``None`` for
    remove); the instruction names ``o`` by its reference in the *source* scene."""
    rest = [p for p in scene if p is not o]
    if kind == "recolour":
        text = f"make the {reference(o, scene)} {new.colour}."
    elif kind == "remove":
        text = f"remove the {reference(o, scene)}."
    elif kind == "move":
        text = f"move the {reference(o, scene)} to the {new.position}."
    else:
        text = f"add {describe(new)}."
    target = with_objects(scene, rest if new is None else [*rest, new])
    return Edit(text, scene, target, kind)


def _edit_kinds(scene: Scene) -> list[str]:
    """Kinds that keep the target a valid scene: removing needs two objects, adding a free
    slot (at most :data:`MAX_OBJECTS`); recolouring and moving are always possible."""
    kinds = ["recolour", "move"]
    if len(scene) > 1:
        kinds.append("remove")
    if len(scene) < MAX_OBJECTS:
        kinds.append("add")
    return sorted(kinds)


def _candidates(scene: Scene, kind: str) -> list[tuple[Obj | None, Obj | None]]:
    """Every ``(o, new)`` of one edit kind."""
    free = scene.free_cells()
    if kind == "recolour":
        return [
            (o, Obj(o.row, o.col, o.shape, c, o.size))
            for o in scene
            for c in COLOURS
            if c != o.colour
        ]
    if kind == "remove":
        return [(o, None) for o in scene]
    if kind == "move":
        return [(o, Obj(r, c, o.shape, o.colour, o.size)) for o in scene for r, c in free]
    return [
        (None, Obj(r, c, s, k, z)) for r, c in free for s in SHAPES for k in COLOURS for z in SIZES
    ]


def possible_edits(
    scene: Scene, allowed: Callable[[Scene], bool] | None = None, kind: str | None = None
) -> list[Edit]:
    """Every edit of ``scene`` (of one ``kind`` if given) whose target passes ``allowed``
    (e.g. "belongs to the same split")."""
    kinds = _edit_kinds(scene) if kind is None else [kind]
    edits = [_edit(scene, k, o, new) for k in kinds for o, new in _candidates(scene, k)]
    return [e for e in edits if allowed is None or allowed(e.target)]


def sample_edit(
    scene: Scene,
    rng: np.random.Generator,
    allowed: Callable[[Scene], bool] | None = None,
    kind: str | None = None,
) -> Edit | None:
    """A uniform edit of ``kind`` (uniform among the kinds the scene allows when None) whose
    target passes ``allowed``; ``None`` if there is none."""
    if kind is not None and kind not in EDIT_KINDS:
        raise ValueError(f"unknown edit kind {kind!r}; expected one of {EDIT_KINDS}")
    kinds = [k for k in _edit_kinds(scene) if kind is None or k == kind]
    while kinds:
        kind = kinds[rng.integers(len(kinds))]
        candidates = _candidates(scene, kind)
        # Rejection sampling keeps the choice uniform over the allowed edits of this kind
        # without building all of them (adds alone number up to 288).
        for _ in range(32):
            o, new = candidates[rng.integers(len(candidates))]
            edit = _edit(scene, kind, o, new)
            if allowed is None or allowed(edit.target):
                return edit
        edits = possible_edits(scene, allowed, kind)
        if edits:
            return edits[rng.integers(len(edits))]
        kinds.remove(kind)
    return None


def relation_word(relation: str) -> str:
    """``"left of"`` -> ``"left"`` (how answers name relations)."""
    if relation not in RELATIONS:
        raise ValueError(f"unknown relation {relation!r}")
    return relation.removesuffix(" of")
