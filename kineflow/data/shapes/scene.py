"""ShapesWorld scenes: what is in a picture, how scenes are drawn, and which split owns them.

A scene is a set of 1-4 flat objects on a 3 x 3 grid, one object per cell. Each object has a
shape, a colour, a size and a cell ``(row, col)``; row 0 is the top, col 0 the left. Because
objects sit on grid cells, spatial relations are read off the indices with no threshold:

    a left of b  <=>  a.col < b.col          a above b  <=>  a.row < b.row

Splits. ``train`` / ``val`` / ``test`` are disjoint *as sets of scenes*: a scene belongs to the
split chosen by a stable hash of its canonical form, so no test scene is ever a training scene.
The ``heldout`` split owns every scene that contains a held-out composition (:class:`HeldOut`:
colour-shape pairs and shape-relation-shape combinations); those never occur in the other three
splits, in any image, caption, question or edit, so compositional generalisation is measured
rather than assumed.

Sampling is random access: scene ``i`` of a split is drawn from a generator seeded by
``(seed, split, i)``, so a dataset can be streamed from a seed, sharded across workers or
materialised, and always yields the same scenes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field, replace

import numpy as np

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 225),
    "yellow": (235, 205, 30),
    "purple": (145, 60, 190),
    "cyan": (40, 200, 210),
}
BACKGROUND: tuple[int, int, int] = (240, 240, 240)
SIZES: tuple[str, ...] = ("small", "large")
GRID = 3
CELLS: tuple[tuple[int, int], ...] = tuple((r, c) for r in range(GRID) for c in range(GRID))
#: Cell names, indexed ``[row][col]``: how captions, questions and edits say where things are.
POSITION_NAMES: tuple[tuple[str, ...], ...] = (
    ("top left", "top", "top right"),
    ("left", "center", "right"),
    ("bottom left", "bottom", "bottom right"),
)
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
#: The relation a relation turns into when its two objects swap places.
INVERSE_RELATION: dict[str, str] = {
    "left of": "right of",
    "right of": "left of",
    "above": "below",
    "below": "above",
}
SPLITS: tuple[str, ...] = ("train", "val", "test", "heldout")
_COLOUR_LIST = tuple(COLOURS)
_ATTR_COUNTS = np.array([len(SHAPES), len(COLOURS), len(SIZES)])
MAX_OBJECTS = 4


@dataclass(frozen=True, order=True)
class Obj:
    """One object. Ordered by ``(row, col)`` first, so sorting gives reading order."""

    row: int
    col: int
    shape: str
    colour: str
    size: str

    def __post_init__(self) -> None:
        if self.shape not in SHAPES:
            raise ValueError(f"unknown shape {self.shape!r}; ShapesWorld has {SHAPES}")
        if self.colour not in COLOURS:
            raise ValueError(f"unknown colour {self.colour!r}; ShapesWorld has {tuple(COLOURS)}")
        if self.size not in SIZES:
            raise ValueError(f"unknown size {self.size!r}; ShapesWorld has {SIZES}")
        if not (0 <= self.row < GRID and 0 <= self.col < GRID):
            raise ValueError(f"cell ({self.row}, {self.col}) is outside the {GRID}x{GRID} grid")

    @property
    def cell(self) -> tuple[int, int]:
        return (self.row, self.col)

    @property
    def position(self) -> str:
        return POSITION_NAMES[self.row][self.col]


def holds(relation: str, a: Obj, b: Obj) -> bool:
    """Whether ``a <relation> b``, e.g. ``holds("left of", a, b)`` iff ``a.col < b.col``."""
    if relation == "left of":
        return a.col < b.col
    if relation == "right of":
        return a.col > b.col
    if relation == "above":
        return a.row < b.row
    if relation == "below":
        return a.row > b.row
    raise ValueError(f"unknown relation {relation!r}; expected one of {RELATIONS}")


@dataclass(frozen=True)
class Scene:
    """A canonical scene: objects sorted in reading order, at most one per cell.

    The world samples at most :data:`MAX_OBJECTS` objects, but a scene read from a generated
    picture may have up to one per cell, so the type allows that.
    """

    objects: tuple[Obj, ...]

    def __post_init__(self) -> None:
        objects = tuple(sorted(self.objects))
        cells = [o.cell for o in objects]
        if len(set(cells)) != len(cells):
            raise ValueError(f"two objects share a cell in {cells}")
        object.__setattr__(self, "objects", objects)

    def __len__(self) -> int:
        return len(self.objects)

    def __iter__(self) -> Iterator[Obj]:
        return iter(self.objects)

    def at(self, row: int, col: int) -> Obj | None:
        return next((o for o in self.objects if o.cell == (row, col)), None)

    def free_cells(self) -> list[tuple[int, int]]:
        taken = {o.cell for o in self.objects}
        return [c for c in CELLS if c not in taken]

    def key(self) -> str:
        """A canonical string: equal scenes have equal keys (used for hashing into splits)."""
        return ";".join(f"{o.row}{o.col}{o.shape}-{o.colour}-{o.size}" for o in self.objects)

    @classmethod
    def from_key(cls, key: str) -> Scene:
        """The scene of a :meth:`key` string (inverse of :meth:`key`)."""
        objects = []
        for part in filter(None, key.split(";")):
            try:
                shape, colour, size = part[2:].split("-")
                objects.append(Obj(int(part[0]), int(part[1]), shape, colour, size))
            except ValueError as err:
                raise ValueError(f"not a ShapesWorld scene key: {key!r} ({err})") from None
        return cls(tuple(objects))

    def to_dict(self) -> dict:
        return {"objects": [asdict(o) for o in self.objects]}

    @classmethod
    def from_dict(cls, data: dict) -> Scene:
        try:
            return cls(tuple(Obj(**o) for o in data["objects"]))
        except (KeyError, TypeError) as err:
            raise ValueError(f"not a ShapesWorld scene: {data!r} ({err})") from None


@dataclass(frozen=True)
class HeldOut:
    """Compositions that only the ``heldout`` split contains.

    ``pairs``: (colour, shape) combinations. ``relations``: (shape_a, relation, shape_b): any
    scene with an ``a`` in that relation to a ``b`` (the same picture as ``b`` in the inverse
    relation to ``a``). The defaults keep every colour, shape and relation in training.
    """

    pairs: tuple[tuple[str, str], ...] = (
        ("red", "triangle"),
        ("blue", "circle"),
    )
    relations: tuple[tuple[str, str, str], ...] = (("triangle", "above", "circle"),)

    def __post_init__(self) -> None:
        for colour, shape in self.pairs:
            Obj(0, 0, shape, colour, SIZES[0])  # validates names
        for a, rel, b in self.relations:
            Obj(0, 0, a, "red", SIZES[0])
            Obj(0, 0, b, "red", SIZES[0])
            holds(rel, Obj(0, 0, a, "red", "small"), Obj(0, 0, b, "red", "small"))

    def pair_held(self, colour: str, shape: str) -> bool:
        return (colour, shape) in self.pairs

    def relation_held(self, shape_a: str, relation: str, shape_b: str) -> bool:
        """Whether ``shape_a relation shape_b`` (or its mirror statement) is held out."""
        if relation not in INVERSE_RELATION:
            raise ValueError(f"unknown relation {relation!r}; expected one of {RELATIONS}")
        mirror = (shape_b, INVERSE_RELATION[relation], shape_a)
        return (shape_a, relation, shape_b) in self.relations or mirror in self.relations

    def touches(self, scene: Scene) -> bool:
        """Whether ``scene`` shows any held-out composition."""
        if any(self.pair_held(o.colour, o.shape) for o in scene):
            return True
        return any(
            holds(rel, a, b)
            for a_shape, rel, b_shape in self.relations
            for a in scene
            if a.shape == a_shape
            for b in scene
            if b.shape == b_shape and b is not a
        )


@dataclass(frozen=True)
class WorldConfig:
    """What a ShapesWorld is: seed, picture size, objects per scene, split fractions."""

    seed: int = 0
    image_size: int = 32
    min_objects: int = 1
    max_objects: int = MAX_OBJECTS
    val_fraction: float = 0.05
    test_fraction: float = 0.05
    heldout: HeldOut = field(default_factory=HeldOut)

    def __post_init__(self) -> None:
        if self.image_size not in (32, 64):
            raise ValueError(f"image_size must be 32 or 64, got {self.image_size}")
        if not 1 <= self.min_objects <= self.max_objects <= MAX_OBJECTS:
            raise ValueError(
                f"need 1 <= min_objects <= max_objects <= {MAX_OBJECTS}, got "
                f"{self.min_objects}..{self.max_objects}"
            )
        if not (self.val_fraction > 0 and self.test_fraction > 0) or (
            self.val_fraction + self.test_fraction >= 1
        ):
            raise ValueError("val_fraction and test_fraction must be > 0 and sum to < 1")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> WorldConfig:
        data = dict(data)
        if "heldout" in data:
            h = data["heldout"]
            data["heldout"] = HeldOut(
                pairs=tuple(tuple(p) for p in h.get("pairs", ())),
                relations=tuple(tuple(r) for r in h.get("relations", ())),
            )
        return cls(**data)


def _split_index(split: str) -> int:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    return SPLITS.index(split)


class ShapesWorld:
    """Seeded scene sampler with disjoint splits; see the module docstring."""

    def __init__(self, config: WorldConfig | None = None) -> None:
        self.config = config or WorldConfig()

    # -- splits ------------------------------------------------------------------------------
    def split_of(self, scene: Scene) -> str:
        """The split owning ``scene``: ``heldout`` if it touches a held-out composition, else
        train / val / test by a stable hash of its key (the same on every machine)."""
        if self.config.heldout.touches(scene):
            return "heldout"
        digest = hashlib.blake2b(scene.key().encode(), digest_size=8).digest()
        u = int.from_bytes(digest, "big") / 2.0**64
        if u < self.config.test_fraction:
            return "test"
        if u < self.config.test_fraction + self.config.val_fraction:
            return "val"
        return "train"

    def allowed(self, scene: Scene, split: str) -> bool:
        return self.split_of(scene) == split

    def rng(self, split: str, index: int, stream: int = 0) -> np.random.Generator:
        """The generator of item ``index`` of ``split``; ``stream`` separates independent uses
        of one item (scene, text, edit) so that adding one never shifts another."""
        if index < 0:
            raise IndexError(f"index must be >= 0, got {index}")
        return np.random.default_rng((self.config.seed, _split_index(split), index, stream))

    # -- sampling ----------------------------------------------------------------------------
    def random_object(self, rng: np.random.Generator, cell: tuple[int, int], **fixed: str) -> Obj:
        """An object at ``cell`` with uniform shape / colour / size unless given in ``fixed``."""
        shape = fixed.get("shape") or SHAPES[rng.integers(len(SHAPES))]
        colour = fixed.get("colour") or tuple(COLOURS)[rng.integers(len(COLOURS))]
        size = fixed.get("size") or SIZES[rng.integers(len(SIZES))]
        return Obj(cell[0], cell[1], shape, colour, size)

    def random_scene(self, rng: np.random.Generator, n: int | None = None) -> Scene:
        """A scene of ``n`` objects (uniform in ``[min_objects, max_objects]`` when None) in
        uniform distinct cells, attributes uniform and independent (no split constraint)."""
        if n is None:
            n = int(rng.integers(self.config.min_objects, self.config.max_objects + 1))
        # One call to the generator per scene: splits are drawn by rejection, so this is hot.
        u = rng.random(len(CELLS) + 3 * n)
        cells = np.argsort(u[: len(CELLS)])[:n]
        attrs = (u[len(CELLS) :].reshape(n, 3) * _ATTR_COUNTS).astype(np.int64).tolist()
        return Scene(
            tuple(
                Obj(*CELLS[c], SHAPES[a], _COLOUR_LIST[k], SIZES[z])
                for c, (a, k, z) in zip(cells.tolist(), attrs, strict=True)
            )
        )

    def sample(self, rng: np.random.Generator, split: str, max_tries: int = 10_000) -> Scene:
        """A random scene of ``split``: the number of objects is drawn first and kept while
        rejecting scenes of other splits, so every split has a uniform object count (larger
        scenes touch held-out compositions more often and would otherwise be rarer)."""
        _split_index(split)
        n = int(rng.integers(self.config.min_objects, self.config.max_objects + 1))
        for _ in range(max_tries):
            scene = self.random_scene(rng, n)
            if self.split_of(scene) == split:
                return scene
        raise RuntimeError(f"no {split} scene in {max_tries} draws; are its fractions > 0?")

    def scene(self, split: str, index: int) -> Scene:
        """Scene ``index`` of ``split`` (deterministic given the config)."""
        return self.sample(self.rng(split, index), split)

    def scenes(self, split: str, n: int, start: int = 0) -> Iterable[Scene]:
        return (self.scene(split, i) for i in range(start, start + n))


def with_objects(scene: Scene, objects: Iterable[Obj]) -> Scene:
    """``scene`` with its objects replaced (keeps the canonical ordering)."""
    return replace(scene, objects=tuple(objects))
