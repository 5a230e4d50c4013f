"""The ShapesWorld infill benchmark: its items, the interval, and the judging of a pipeline."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from kineflow.data.shapes.render import render_image
from kineflow.eval.infill import infill_items, run_infill_benchmark
from kineflow.eval.stats import bootstrap_ci


def test_items_replace_one_object_inside_its_cell() -> None:
    items = infill_items(30, seed=1)
    again = infill_items(30, seed=1)
    assert [(a.source, a.target) for a in items] == [(a.source, a.target) for a in again]
    for item in items:
        assert item.old.cell == item.new.cell and item.old in item.source
        assert (item.old.shape, item.old.colour) != (item.new.shape, item.new.colour)
        assert item.target.at(*item.new.cell) == item.new and len(item.target) == len(item.source)
        rows, cols = item.mask.nonzero()
        assert item.mask.sum() in (100, 110, 121)  # 10 or 11 px per side (32 / 3)
        bounds = [0, 11, 21, 32]
        r, c = item.old.cell
        assert (rows.min(), rows.max() + 1) == (bounds[r], bounds[r + 1])
        assert (cols.min(), cols.max() + 1) == (bounds[c], bounds[c + 1])


def test_bootstrap_interval_brackets_the_mean() -> None:
    mean, low, high = bootstrap_ci([True] * 30 + [False] * 70)
    assert mean == pytest.approx(0.3) and 0.2 < low < 0.3 < high < 0.4
    assert bootstrap_ci([True] * 5) == (1.0, 1.0, 1.0)


class _Oracle:
    """A stand-in pipeline that paints the target scene (right) or returns the source."""

    display_name = "oracle"

    def __init__(self, right: bool) -> None:
        self.right, self.items = right, {}

    def infill(self, pictures, masks, prompts, seed):
        scenes = [self.items[p] for p in prompts]
        return SimpleNamespace(images=[render_image(s) for s in scenes])


@pytest.mark.parametrize("right", [True, False])
def test_the_detector_judges_the_whole_scene(right: bool) -> None:
    pipe = _Oracle(right)
    from kineflow.data.shapes.language import caption

    for item in infill_items(6):
        pipe.items[caption(item.target)] = item.target if right else item.source
    report = run_infill_benchmark(pipe, 6, batch_size=4)
    assert report["accuracy"] == (1.0 if right else 0.0)
    assert report["kept"] == 1.0 and report["detector_on_source"] == 1.0
    assert report["new_object"] == (1.0 if right else 0.0)
    assert np.all([r["correct"] == right for r in report["rows"]])
