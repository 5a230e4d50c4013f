"""kineflow.flow.times.block_times against a loop over the grid."""

from __future__ import annotations

import pytest
import torch

from kineflow.flow.times import block_times


@pytest.mark.parametrize(("n", "block"), [(64, 3), (64, 4), (16, 3), (9, 1), (16, 8)])
def test_each_token_takes_its_blocks_time(n: int, block: int) -> None:
    side = int(n**0.5)
    k = -(-side // block)
    want_blocks = 0.2 + 0.6 * torch.rand(k, k, generator=torch.Generator().manual_seed(5))
    got = block_times(n, block, 0.2, 0.8, torch.Generator().manual_seed(5))
    assert got.shape == (n,)
    for i in range(side):
        for j in range(side):
            assert got[i * side + j] == want_blocks[i // block, j // block]
    assert float(got.min()) >= 0.2 and float(got.max()) < 0.8
    assert len(set(got.tolist())) == k * k  # one draw per block, each block its own


def test_refuses_a_grid_that_is_not_square_and_an_empty_block() -> None:
    with pytest.raises(ValueError, match="square"):
        block_times(10, 3, 0.0, 1.0)
    with pytest.raises(ValueError, match="block"):
        block_times(16, 0, 0.0, 1.0)
