"""The ShapesWorld detector, the judge of every benchmark: exact on clean renders, degrading
gracefully under noise and blur, and strict about what it is given.

Every rule of the detector has a test here that fails without it (checked by removing each
rule in turn): the colour vote (noise at sigma = 32), far pixels as background (the dark
frame), the off-segment cut-off and the contrast condition (uniform noise), the gain
condition (the dithered triangle), the blurred templates (blur radius 1.0, noise at 64), and
the choices *not* to zero other-colour pixels nor clip coverage at 1 (noise at 48 and 64).

The measured accuracies are printed (``pytest -s``) and recorded as test properties
(``--junitxml``), so a change in the detector shows up as a number, not only a pass / fail.
"""

from __future__ import annotations

from itertools import pairwise

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from kineflow.data.example import image_to_tensor
from kineflow.data.shapes.render import render, render_batch
from kineflow.data.shapes.scene import BACKGROUND, COLOURS, SPLITS, Obj, Scene, ShapesWorld
from kineflow.eval.detector import DetectorConfig, ShapesDetector, as_uint8_images, detect

SIGMAS = (8, 16, 32, 48, 64)


def accuracy(found: list[Scene], truth: list[Scene]) -> float:
    """Scene-level exact accuracy: every object's cell, shape, colour and size right."""
    assert len(found) == len(truth)
    return sum(a == b for a, b in zip(found, truth, strict=True)) / len(truth)


def report(record_property, name: str, value: float) -> None:
    print(f"{name}: {value:.4f}")
    record_property(name, value)


@pytest.fixture(scope="module")
def scenes() -> list[Scene]:
    """2,000 scenes, 500 from each split (held-out compositions included)."""
    world = ShapesWorld()
    return [s for split in SPLITS for s in world.scenes(split, 500)]


@pytest.fixture(scope="module")
def pictures(scenes: list[Scene]) -> np.ndarray:
    return render_batch(scenes, 32)


@pytest.fixture(scope="module")
def noisy_accuracy(scenes: list[Scene], pictures: np.ndarray) -> dict[int, float]:
    """Accuracy under Gaussian pixel noise; one noise field, scaled by each sigma."""
    z = np.random.default_rng(0).standard_normal(pictures.shape)
    out = {}
    for sigma in SIGMAS:
        noisy = np.clip(pictures + sigma * z, 0, 255).round().astype(np.uint8)
        out[sigma] = accuracy(detect(noisy), scenes)
    return out


# -- clean renders --------------------------------------------------------------------------------
def test_clean_renders_are_read_back_exactly(scenes, pictures, record_property) -> None:
    assert len(scenes) == 2000 and {len(s) for s in scenes} == {1, 2, 3, 4}
    acc = accuracy(detect(pictures), scenes)
    report(record_property, "clean_accuracy_32px", acc)
    assert acc >= 0.995, f"clean 32 px accuracy {acc:.4f}"


def test_clean_renders_are_read_back_exactly_at_64_pixels(scenes, record_property) -> None:
    sample = scenes[::10]  # 200 scenes, 50 per split
    acc = accuracy(detect(render_batch(sample, 64)), sample)
    report(record_property, "clean_accuracy_64px", acc)
    assert acc >= 0.995, f"clean 64 px accuracy {acc:.4f}"


def test_full_grid_of_every_kind_is_read_back() -> None:
    """Nine objects (more than the world samples) in every shape, size and colour."""
    shapes, sizes, colours = ("circle", "square", "triangle"), ("small", "large"), list(COLOURS)
    truth = []
    for shift in range(len(colours)):
        objects = [
            Obj(k // 3, k % 3, shapes[k % 3], colours[(k + shift) % 6], sizes[(k // 3) % 2])
            for k in range(9)
        ]
        truth.append(Scene(tuple(objects)))
    for size in (32, 64):
        assert detect(render_batch(truth, size)) == truth


def test_every_input_form_gives_the_same_scenes(scenes, pictures) -> None:
    sample, batch = scenes[:40], pictures[:40]
    expected = detect(batch)
    assert expected == sample
    as_pil = [Image.fromarray(p) for p in batch]
    as_tensor = torch.stack([image_to_tensor(p) for p in batch])
    assert detect(as_pil) == expected
    assert detect(as_tensor) == expected
    assert ShapesDetector().detect(batch) == expected
    for i in (0, 17):
        assert detect(batch[i]) == [expected[i]]
        assert detect(image_to_tensor(batch[i])) == [expected[i]]
        assert detect(image_to_tensor(as_pil[i])) == [expected[i]]
    # The float tensor comes back as the same bytes.
    assert np.array_equal(as_uint8_images(as_tensor), batch)
    assert detect(np.empty((0, 32, 32, 3), np.uint8)) == []


# -- graceful degradation -------------------------------------------------------------------------
def test_gaussian_noise_degrades_gracefully(noisy_accuracy, record_property) -> None:
    for sigma, acc in noisy_accuracy.items():
        report(record_property, f"noise_sigma_{sigma}_accuracy", acc)
    assert noisy_accuracy[16] >= 0.99
    assert noisy_accuracy[32] >= 0.99  # 1.0 measured; 0.41 if the colour vote took any colour
    # 0.999 measured. Zeroing pixels labelled with another colour (as the detector once did)
    # gives 0.81: noise relabels a blue pixel cyan or purple far more often than it moves the
    # pixel off blue's background-to-colour segment.
    assert noisy_accuracy[48] >= 0.98
    # 0.91 measured; 0.76 with coverage clipped at 1, 0.71 without blurred templates.
    assert noisy_accuracy[64] >= 0.85
    accs = [noisy_accuracy[s] for s in SIGMAS]
    assert all(later <= earlier + 0.002 for earlier, later in pairwise(accs))


@pytest.mark.parametrize(
    ("radius", "floor"),
    # Measured 1.0 / 1.0 / 0.93. Without blurred templates: 1.0 / 0.41 / 0.0; zeroing pixels
    # labelled with another colour: 1.0 / 0.95 / 0.69 (a blurred blue edge looks cyan).
    [(0.5, 0.99), (1.0, 0.99), (1.5, 0.88)],
)
def test_gaussian_blur_is_tolerated(scenes, pictures, record_property, radius, floor) -> None:
    blur = ImageFilter.GaussianBlur(radius=radius)
    blurred = [Image.fromarray(p).filter(blur) for p in pictures]
    acc = accuracy(detect(blurred), scenes)
    report(record_property, f"blur_radius_{radius}_accuracy", acc)
    assert acc >= floor


@pytest.mark.parametrize("size", [32, 64])
def test_empty_canvas_is_an_empty_scene(size: int) -> None:
    canvas = np.full((3, size, size, 3), BACKGROUND, np.uint8)
    canvas[1] = 0  # black and white canvases: no palette colour at all
    canvas[2] = 255
    assert detect(canvas) == [Scene(())] * 3
    assert detect(render(Scene(()), size)) == [Scene(())]


def test_noise_around_the_background_invents_no_objects() -> None:
    rng = np.random.default_rng(1)
    for sigma in (32, 64):
        noise = np.asarray(BACKGROUND) + rng.normal(0, sigma, (100, 32, 32, 3))
        found = detect(np.clip(noise, 0, 255).round().astype(np.uint8))
        assert max(len(s) for s in found) <= 1, sigma
        assert sum(len(s) for s in found) <= 10, sigma  # at most one phantom per ten pictures


def test_pure_noise_invents_no_objects() -> None:
    """Uniform RGB noise: 0 objects in 100 pictures measured. Without the contrast condition
    the detector finds ~600, without the off-segment cut-off ~900."""
    rng = np.random.default_rng(2)
    noise = rng.integers(0, 256, (100, 32, 32, 3), dtype=np.uint8)
    assert sum(len(s) for s in detect(noise)) <= 2


def test_a_dark_frame_does_not_outvote_the_object() -> None:
    """Pixels far from every colour are background: a dark frame around a cell (a decoder's
    smudge), with more pixels than the object, must not win the cell's colour vote."""
    pictures, truth = [], []
    for colour in COLOURS:
        for shape in ("triangle", "circle", "square"):
            scene = Scene((Obj(1, 1, shape, colour, "small"),))
            picture = render(scene, 32)  # cell (1, 1) is rows and columns 11..20
            picture[11, 11:21] = picture[19:21, 11:21] = 20
            picture[11:21, 11] = picture[11:21, 19:21] = 20
            pictures.append(picture)
            truth.append(scene)
    assert detect(np.stack(pictures)) == truth


def test_an_object_too_faint_for_the_gain_is_not_read() -> None:
    """A triangle with every third pixel missing passes the contrast condition but not the
    gain (it removes too little of its template's energy from the cell's error): no object.
    With the gain condition switched off the same pictures read as the triangle, so the gain
    is what rejects them."""
    pictures, truth = [], []
    for colour in COLOURS:
        for size in ("small", "large"):
            scene = Scene((Obj(1, 1, "triangle", colour, size),))
            picture = render(scene, 32)
            picture.reshape(-1, 3)[::3] = BACKGROUND
            pictures.append(picture)
            truth.append(scene)
    assert detect(np.stack(pictures)) == [Scene(())] * len(truth)
    no_gain = ShapesDetector(DetectorConfig(min_gain=-np.inf))
    assert no_gain.detect(np.stack(pictures)) == truth


def test_a_speck_on_a_dark_canvas_is_not_an_object() -> None:
    canvas = np.zeros((32, 32, 3), np.uint8)
    canvas[5, 5] = COLOURS["red"]
    assert detect(canvas) == [Scene(())]


@pytest.mark.parametrize("size", [32, 64])
@pytest.mark.parametrize("pixels", [1, 2])
def test_a_tiny_colour_speck_is_not_an_object(size: int, pixels: int) -> None:
    canvases = []
    for colour in COLOURS.values():
        canvas = np.full((size, size, 3), BACKGROUND, np.uint8)
        for k in range(9):  # one speck in the middle of every cell
            y, x = (2 * (k // 3) + 1) * size // 6, (2 * (k % 3) + 1) * size // 6
            canvas[y, x : x + pixels] = colour
        canvases.append(canvas)
    assert detect(np.stack(canvases)) == [Scene(())] * len(COLOURS)
    # Next to a real object the speck is not a second one either.
    scene = Scene((Obj(0, 0, "circle", "green", "large"),))
    picture = render(scene, size)
    picture[size // 2, size // 2 : size // 2 + pixels] = COLOURS["red"]
    assert detect(picture) == [scene]


# -- bad input ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("images", "named"),
    [
        (np.zeros((48, 48, 3), np.uint8), "48"),
        (np.zeros((2, 48, 48, 3), np.uint8), "48"),
        (np.zeros((32, 64, 3), np.uint8), "square"),
        (np.zeros((2, 64, 32, 3), np.uint8), "square"),
        (np.zeros((32, 32, 3), np.float32), "uint8"),
        (np.zeros((32, 32, 3), np.int64), "uint8"),
        (np.zeros((32, 32), np.uint8), "RGB"),
        (np.zeros((4, 32, 32), np.uint8), "RGB"),
        (np.zeros((32, 32, 1), np.uint8), "RGB"),
        (np.zeros((32, 32, 4), np.uint8), "RGB"),
        ([Image.new("L", (32, 32))], "RGB"),
        ([Image.new("RGBA", (32, 32))], "RGB"),
        ([np.zeros((32, 32, 3), np.uint8)], "PIL"),
        ([Image.new("RGB", (40, 40))], "40"),
        (torch.zeros(3, 48, 48), "48"),
        (torch.zeros(32, 32, 3), "3, H, W"),
        (torch.zeros(2, 3, 32, 64), "square"),
    ],
    ids=[
        "48px",
        "48px-batch",
        "non-square",
        "non-square-batch",
        "float32",
        "int64",
        "gray-2d",
        "gray-batch",
        "gray-1-channel",
        "rgba-array",
        "pil-gray",
        "pil-rgba",
        "list-of-arrays",
        "pil-40px",
        "tensor-48px",
        "tensor-channels-last",
        "tensor-non-square",
    ],
)
def test_bad_input_raises_naming_the_problem(images, named: str) -> None:
    with pytest.raises(ValueError, match=named):
        detect(images)


def test_uint8_tensor_is_rejected() -> None:
    picture = torch.from_numpy(render(Scene((Obj(1, 1, "circle", "red", "large"),))))
    with pytest.raises(ValueError, match="float"):
        detect(picture.permute(2, 0, 1).contiguous())
