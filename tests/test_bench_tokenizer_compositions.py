"""bench/tokenizer_compositions.py: the per-composition score against tokenizers built to pass
or fail known compositions."""

from __future__ import annotations

import torch
from conftest import bench_script


class _Codec(torch.nn.Module):
    """A stand-in tokenizer: ``reconstruct`` returns the picture, with every pixel of colour
    ``lose`` (in [-1, 1]) replaced by ``into`` when given: a codec that cannot draw one colour."""

    def __init__(self, lose: tuple[int, ...] | None = None, into: tuple[int, ...] = (0, 0, 0)):
        super().__init__()
        self.lose, self.into = lose, into
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # the device and dtype to run in

    def reconstruct(self, images: torch.Tensor) -> torch.Tensor:
        if self.lose is None:
            return images
        lose = torch.tensor(self.lose, dtype=images.dtype).view(1, 3, 1, 1) / 127.5 - 1
        into = torch.tensor(self.into, dtype=images.dtype).view(1, 3, 1, 1) / 127.5 - 1
        hit = ((images - lose).abs() < 1e-3).all(1, keepdim=True)
        return torch.where(hit, into, images)


def test_a_perfect_codec_keeps_every_scene_and_a_colour_blind_one_loses_that_colour():
    from kineflow.data.shapes.scene import CELLS, COLOURS, SIZES

    with bench_script("tokenizer_compositions") as bench:
        scenes = bench.pair_scenes("red", "triangle")
        assert len(scenes) == len(CELLS) * len(SIZES) == 18
        assert bench.preserved(_Codec(), scenes) == 1.0
        # Red drawn as yellow: no red scene survives, and other colours are untouched.
        blind = _Codec(lose=COLOURS["red"], into=COLOURS["yellow"])
        assert bench.preserved(blind, scenes) == 0.0
        assert bench.preserved(blind, bench.pair_scenes("blue", "circle")) == 1.0
