"""Infilling through the pipeline interface on the shipped tiny checkpoints: only the masked
token cells change (checked on codes: decode -> re-encode is lossy), the mask rule, the order."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import kineflow
from kineflow.pipelines.infill import infill_order, load_mask, token_cells

CHECKPOINTS = Path(__file__).resolve().parents[2] / "checkpoints"
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def fudoki():
    return kineflow.load(CHECKPOINTS / "fudoki-shapes")


@pytest.fixture(scope="module")
def unifluid():
    return kineflow.load(CHECKPOINTS / "unifluid-shapes")


@pytest.fixture(scope="module")
def picture(fudoki):
    return fudoki.text_to_image("a red circle in the middle", seed=0, steps=4).images[0]


def _centre_mask() -> np.ndarray:
    mask = np.zeros((32, 32), bool)
    mask[11:21, 11:21] = True  # ShapesWorld's middle cell (32 / 3 px)
    return mask


def test_a_token_is_regenerated_when_any_of_its_pixels_is_masked() -> None:
    mask = np.zeros((32, 32), bool)
    mask[5, 9] = True  # one pixel: FUDOKI cell (1, 2) of 4x4 px, UniFluid cell (0, 1) of 8x8
    cells = token_cells(mask, (8, 8))
    assert cells.sum() == 1 and cells[1, 2]
    assert token_cells(mask, (4, 4)).nonzero().tolist() == [[0, 1]]
    # The middle cell 11..20 touches FUDOKI tokens 2..5 and UniFluid tokens 1..2 on each axis.
    assert token_cells(_centre_mask(), (8, 8)).nonzero()[:, 0].unique().tolist() == [2, 3, 4, 5]
    assert token_cells(_centre_mask(), (4, 4)).sum() == 4


def test_masks_read_from_pictures_and_arrays(tmp_path) -> None:
    from PIL import Image

    pixels = np.zeros((4, 4), np.uint8)
    pixels[0, 0], pixels[1, 1] = 255, 127  # white is masked; darker than mid grey is not
    Image.fromarray(pixels).save(tmp_path / "m.png")
    assert load_mask(tmp_path / "m.png").nonzero() == (np.array([0]), np.array([0]))
    assert load_mask(torch.tensor(pixels)).sum() == 2  # arrays: nonzero is masked
    with pytest.raises(ValueError, match="must be"):
        load_mask(np.zeros((2, 2, 2)))


def test_infill_order_puts_the_kept_cells_first_in_random_order() -> None:
    keep = torch.tensor([[True, False, True, False, True, False]] * 2)
    g = torch.Generator().manual_seed(0)
    order = infill_order(keep, "random", g)
    assert sorted(order[0].tolist()) == list(range(6))
    assert keep.gather(1, order).tolist() == [[True] * 3 + [False] * 3] * 2
    orders = {tuple(infill_order(keep, "random", g)[0].tolist()) for _ in range(20)}
    assert len(orders) > 1  # not a fixed order within the groups
    assert infill_order(keep, "raster")[0].tolist() == [0, 2, 4, 1, 3, 5]


def test_fudoki_changes_only_the_masked_codes(fudoki, picture) -> None:
    source = fudoki.encode_images(picture)[0]
    cells = token_cells(_centre_mask(), (8, 8))
    out = fudoki.infill(picture, _centre_mask(), "a green square in the middle", seed=1,
                        steps=4, return_trajectory=True)  # fmt: skip
    codes = out.codes[0]
    assert torch.equal(codes[~cells], source[~cells])
    assert (codes[cells] != source[cells]).any()
    assert len(out.trajectory[0]) == 5 and out.states.shape == (5, 1, 64)
    # Every state of the trajectory keeps the codes outside the region too.
    assert (out.states[:, 0, ~cells.flatten()] == source.flatten()[~cells.flatten()]).all()


def test_fudoki_with_nothing_masked_returns_the_source_codes(fudoki, picture) -> None:
    out = fudoki.infill(picture, np.zeros((32, 32), bool), "a blue square")
    assert torch.equal(out.codes[0], fudoki.encode_images(picture)[0])
    assert out.timings["nfe"] == 0


def test_infill_refuses_a_mask_of_another_size(fudoki, unifluid, picture) -> None:
    for pipe in (fudoki, unifluid):
        with pytest.raises(ValueError, match="mask 0 is 16x16 but its picture is 32x32"):
            pipe.infill(picture, np.ones((16, 16), bool), "a red circle")
    with pytest.raises(ValueError, match="2 mask"):
        fudoki.infill([picture] * 3, [_centre_mask()] * 2, "a red circle")


def test_unifluid_changes_only_the_masked_tokens(unifluid, picture) -> None:
    source = unifluid.encode(picture)[0].cpu()
    cells = token_cells(_centre_mask(), (4, 4)).flatten()
    out = unifluid.infill(picture, _centre_mask(), "a green square in the middle", seed=0,
                          return_trajectory=True, frames=4)  # fmt: skip
    tokens = out.codes[0]
    assert torch.equal(tokens[~cells], source[~cells])
    assert not torch.allclose(tokens[cells], source[cells])
    # The kept cells come first: the frame after 12 of 16 tokens shows no grey masked cell.
    first = np.asarray(out.trajectory[0][3])
    assert (first[8:24, 8:24] == [96, 96, 96]).all()  # the 4 masked cells, not yet drawn
    assert not (first[:8] == [96, 96, 96]).all(-1).any()
    everything = unifluid.infill(picture, np.zeros((32, 32), bool), "x", seed=0)
    assert torch.equal(everything.codes[0], source)


def test_infill_text_fills_the_blanks_between_the_kept_words(fudoki) -> None:
    out = fudoki.infill_text(["a red [blank] above a blue square", "[blank] circle"],
                             blank_tokens=[1], seed=0)  # fmt: skip
    assert [len(ids) for ids in out.ids] == [1, 1]
    tok = fudoki.tokenizer
    assert out.texts[0].startswith("a red") and out.texts[0].endswith(" above a blue square")
    assert out.texts[0] == tok.decode(tok.encode("a red") + out.ids[0]
                                      + tok.encode(" above a blue square"))  # fmt: skip
    assert out.texts[1].endswith(" circle")
    two = fudoki.infill_text("a [blank] above a [blank]", blank_tokens=[1, 2], steps=2)
    assert len(two.ids[0]) == 3
    with pytest.raises(ValueError, match="has no"):
        fudoki.infill_text("no blank here")
    with pytest.raises(ValueError, match="2 blanks but"):
        fudoki.infill_text("a [blank] [blank]", blank_tokens=[1])
