"""GenEval-style text-to-image prompts with machine-readable specs, and how they are judged.

A :class:`Prompt` holds a text and a spec: a list of :class:`Requirement` (shape, optional
colour, count, exact or at-least) and an optional relation between its first two requirements.
GenEval's six categories map onto ShapesWorld as

==================  ===============================  =========================================
category            example                          passes when
==================  ===============================  =========================================
single_object       "a circle"                       >= 1 circle
two_object          "a circle and a square"          >= 1 circle and >= 1 square
counting            "three triangles"                exactly 3 triangles
colors              "a red circle"                   >= 1 red circle
position            "a circle left of a square"      some circle is left of some square
color_attr          "a red circle and a blue square" >= 1 red circle and >= 1 blue square
==================  ===============================  =========================================

An image passes only when *every* requirement holds (GenEval's definition); other objects in
the picture are allowed except where a count is exact. Category accuracy is the pass rate of
its images and overall accuracy the mean over categories, as GenEval reports it.

The prompt set is every prompt of each category; :func:`prompt_set` splits it into ``test``
(prompts using no held-out composition) and ``heldout`` (prompts that need one).
:func:`scene_for_prompt` draws a scene satisfying a prompt (ground-truth renders, training
pairs) and :func:`prompt_from_scene` a prompt that a given scene satisfies.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import lru_cache
from itertools import permutations, product

import numpy as np

from kineflow.data.shapes.language import NUMBER_WORDS, plural
from kineflow.data.shapes.scene import (
    CELLS,
    COLOURS,
    MAX_OBJECTS,
    RELATIONS,
    SHAPES,
    HeldOut,
    Obj,
    Scene,
    ShapesWorld,
    holds,
)

CATEGORIES: tuple[str, ...] = (
    "single_object",
    "two_object",
    "counting",
    "colors",
    "position",
    "color_attr",
)
COUNTS: tuple[int, ...] = (2, 3, 4)  # GenEval counts 2-4 objects


@dataclass(frozen=True)
class Requirement:
    """``count`` objects of ``shape`` (of ``colour`` if given); ``exact``: no more either."""

    shape: str
    colour: str | None = None
    count: int = 1
    exact: bool = False

    def matches(self, o: Obj) -> bool:
        return o.shape == self.shape and (self.colour is None or o.colour == self.colour)

    def phrase(self) -> str:
        noun = self.shape if self.colour is None else f"{self.colour} {self.shape}"
        if self.count == 1:
            return f"a {noun}"
        return f"{NUMBER_WORDS[self.count]} {plural(noun)}"


@dataclass(frozen=True)
class Prompt:
    """A prompt: ``text``, its ``category`` and spec; ``relation`` relates requirement 0 to
    requirement 1 (``"a circle left of a square"``: circle ``left of`` square)."""

    id: str
    category: str
    text: str
    requirements: tuple[Requirement, ...]
    relation: str | None = None

    def to_dict(self) -> dict:
        return {
            "id": self.id,
            "category": self.category,
            "text": self.text,
            "requirements": [asdict(r) for r in self.requirements],
            "relation": self.relation,
        }

    @classmethod
    def from_dict(cls, data: dict) -> Prompt:
        try:
            reqs = tuple(Requirement(**r) for r in data["requirements"])
            prompt = cls(data["id"], data["category"], data["text"], reqs, data.get("relation"))
        except (KeyError, TypeError) as err:
            raise ValueError(f"not a ShapesWorld prompt: {data!r} ({err})") from None
        if prompt.category not in CATEGORIES:
            raise ValueError(f"prompt {prompt.id!r}: unknown category {prompt.category!r}")
        return prompt

    def uses_heldout(self, heldout: HeldOut) -> bool:
        if any(r.colour and heldout.pair_held(r.colour, r.shape) for r in self.requirements):
            return True
        if self.relation is not None:
            a, b = self.requirements[0].shape, self.requirements[1].shape
            return heldout.relation_held(a, self.relation, b)
        return False


def check(prompt: Prompt, scene: Scene) -> list[str]:
    """The requirements of ``prompt`` that ``scene`` violates, as readable strings; empty
    when the scene passes."""
    failures = []
    for r in prompt.requirements:
        n = sum(r.matches(o) for o in scene)
        if (n != r.count) if r.exact else (n < r.count):
            want = f"exactly {r.count}" if r.exact else f">= {r.count}"
            failures.append(f"{r.phrase()}: want {want}, found {n}")
    if prompt.relation is not None and not failures:
        a, b = prompt.requirements[0], prompt.requirements[1]
        if not any(
            holds(prompt.relation, x, y)
            for x in scene
            if a.matches(x)
            for y in scene
            if b.matches(y) and y is not x
        ):
            failures.append(f"no {a.shape} {prompt.relation} a {b.shape}")
    return failures


def passes(prompt: Prompt, scene: Scene) -> bool:
    return not check(prompt, scene)


def strict_check(prompt: Prompt, scene: Scene) -> list[str]:
    """The reasons ``scene`` fails ``prompt`` under the strict-scene rule; empty when it passes.

    Strict rule: the GenEval-style check passes (:func:`check`: counts, colours, the relation)
    *and* the detected objects are exactly the prompt's objects: there is an assignment of
    every object to a requirement it matches (shape, and colour where the prompt states one)
    that gives each requirement exactly ``count`` objects, so ``len(scene) = Σ count`` and
    nothing is extra. What a prompt leaves unstated stays free:
    size always, colour where none is named, cells where there is no relation (a prompt names
    no absolute position)."""
    failures = check(prompt, scene)
    want = sum(r.count for r in prompt.requirements)
    if len(scene) != want:
        extra = len(scene) - want
        what = f"{extra} extra object(s)" if extra > 0 else f"{-extra} object(s) missing"
        return [*failures, f"strict: {len(scene)} objects, the prompt names {want} ({what})"]
    # At most MAX_OBJECTS objects: try every assignment of objects to matching requirements.
    options = [[k for k, r in enumerate(prompt.requirements) if r.matches(o)] for o in scene]
    counts = [r.count for r in prompt.requirements]
    if not any([c.count(k) for k in range(len(counts))] == counts for c in product(*options)):
        stray = [o.colour + " " + o.shape for o, opt in zip(scene, options, strict=True) if not opt]
        why = f"objects the prompt does not name: {stray}" if stray else "no one-to-one match"
        return [*failures, f"strict: {why}"]
    return failures


# -- the prompt set -----------------------------------------------------------------------------
def _make(category: str, reqs: tuple[Requirement, ...], relation: str | None = None) -> Prompt:
    if relation is not None:
        text = f"{reqs[0].phrase()} {relation} {reqs[1].phrase()}"
    else:
        text = " and ".join(r.phrase() for r in reqs)
    slug = text.replace(" ", "_")
    return Prompt(f"{category}/{slug}", category, text, reqs, relation)


def all_prompts() -> list[Prompt]:
    """Every prompt of every category (deterministic order)."""
    R = Requirement
    out = [_make("single_object", (R(s),)) for s in SHAPES]
    out += [_make("two_object", (R(a), R(b))) for a, b in permutations(SHAPES, 2)]
    out += [_make("counting", (R(s, count=n, exact=True),)) for n in COUNTS for s in SHAPES]
    out += [_make("colors", (R(s, c),)) for s in SHAPES for c in COLOURS]
    out += [
        _make("position", (R(a), R(b)), rel)
        for a, b in permutations(SHAPES, 2)
        for rel in RELATIONS
    ]
    out += [
        _make("color_attr", (R(s1, c1), R(s2, c2)))
        for s1, s2 in permutations(SHAPES, 2)
        for c1 in COLOURS
        for c2 in COLOURS
        if c1 != c2
    ]
    return out


def prompt_set(
    split: str = "test",
    heldout: HeldOut | None = None,
    max_per_category: int | None = None,
    seed: int = 0,
) -> list[Prompt]:
    """The benchmark prompts of ``split``: ``"test"`` (no held-out composition) or
    ``"heldout"`` (each needs one). ``max_per_category`` subsamples large categories with a
    fixed ``seed`` (color_attr alone has 180 prompts)."""
    if split not in ("test", "heldout"):
        raise ValueError(f"prompt sets are 'test' or 'heldout', got {split!r}")
    heldout = heldout or HeldOut()
    want = split == "heldout"
    prompts = [p for p in all_prompts() if p.uses_heldout(heldout) == want]
    if max_per_category is None:
        return prompts
    rng = np.random.default_rng(seed)
    out = []
    for category in CATEGORIES:
        group = [p for p in prompts if p.category == category]
        if len(group) > max_per_category:
            keep = np.sort(rng.choice(len(group), size=max_per_category, replace=False))
            group = [group[i] for i in keep]
        out += group
    return out


# -- scenes for prompts and prompts for scenes --------------------------------------------------
def scene_for_prompt(
    prompt: Prompt,
    world: ShapesWorld,
    rng: np.random.Generator,
    split: str | None = None,
    max_tries: int = 1000,
    extras: bool = False,
) -> Scene:
    """A random scene that passes ``prompt``: the required objects (free attributes uniform),
    cells uniform subject to the relation, and nothing else -- a prompt describes the whole
    picture, so its training pictures must not teach models to add objects. ``extras=True``
    adds 0 or more random objects that keep the prompt passing (the GenEval-style rule lets
    them through; the strict scene rule does not). With ``split``, the scene also belongs to
    that split (for ``heldout`` it must touch a held-out composition; for the others avoid
    them all); where the split holds no exact scene in ``max_tries`` draws (a one-object prompt
    has 18 scenes, and the 5 % splits may get none of them) extras are allowed."""
    n_required = sum(r.count for r in prompt.requirements)
    if n_required > MAX_OBJECTS:
        raise ValueError(f"prompt {prompt.id!r} needs {n_required} > {MAX_OBJECTS} objects")
    for padded in (True,) if extras else (False, True):
        for _ in range(max_tries):
            cells = [CELLS[i] for i in rng.permutation(len(CELLS))]
            objects = [
                world.random_object(rng, cells.pop(), shape=r.shape, colour=r.colour)
                for r in prompt.requirements
                for _ in range(r.count)
            ]
            n_extra = int(rng.integers(0, MAX_OBJECTS - n_required + 1)) if padded else 0
            objects += [world.random_object(rng, cells.pop()) for _ in range(n_extra)]
            scene = Scene(tuple(objects))
            if passes(prompt, scene) and (split is None or world.split_of(scene) == split):
                return scene
    raise RuntimeError(f"no scene for prompt {prompt.id!r} in split {split!r} in {max_tries} tries")


def prompt_from_scene(
    scene: Scene, rng: np.random.Generator, category: str | None = None
) -> Prompt | None:
    """A prompt of ``category`` (uniform among those the scene supports when None) that
    ``scene`` passes, or ``None`` if it supports none of the asked category. Used to pair
    training pictures with GenEval-style prompts."""
    candidates = [p for p in _prompts_by_category(category) if passes(p, scene)]
    if not candidates:
        return None
    if category is None:
        cats = sorted({p.category for p in candidates})
        chosen = cats[rng.integers(len(cats))]
        candidates = [p for p in candidates if p.category == chosen]
    return candidates[rng.integers(len(candidates))]


@lru_cache(maxsize=1)
def _all_prompts() -> tuple[Prompt, ...]:
    return tuple(all_prompts())


def _prompts_by_category(category: str | None) -> tuple[Prompt, ...]:
    if category is None:
        return _all_prompts()
    if category not in CATEGORIES:
        raise ValueError(f"unknown category {category!r}; expected one of {CATEGORIES}")
    return tuple(p for p in _all_prompts() if p.category == category)
