"""The categorical sampler: exact frequencies, zero weights never drawn, rare states kept."""

from __future__ import annotations

import pytest
import torch

from kineflow.flow import categorical, total_variation


@pytest.mark.parametrize("V", [1, 2, 3, 10, 17, 300])
def test_frequencies_match_weights_and_zeros_are_never_drawn(V: int, gen) -> None:
    w = torch.rand(V, generator=gen) + 0.05
    w[1::3] = 0.0  # zero weights in the first, a middle and the last (partial) block
    n = 200_000
    draws = categorical(w.expand(n, V), gen)
    freq = torch.bincount(draws, minlength=V).double() / n
    assert (freq[w == 0] == 0).all()
    p = (w / w.sum()).double()
    noise = 0.5 * (2 / (torch.pi * n)) ** 0.5 * float(p.sqrt().sum())  # E[TV] of exact draws
    assert total_variation(freq, p) < 2 * noise + 1e-3


def test_rows_are_independent_and_shapes_kept(gen) -> None:
    w = torch.zeros(2, 3, 5)
    w[0, :, 1] = 1.0
    w[1, :, 4] = 1.0
    out = categorical(w, gen)
    assert out.shape == (2, 3) and out.dtype == torch.long
    assert (out[0] == 1).all() and (out[1] == 4).all()
    assert categorical(torch.ones(0, 7), gen).shape == (0,)


def test_rare_states_keep_their_mass_at_text_vocabulary_size(gen) -> None:
    """1e-4 of the mass spread over 102399 states of weight 1e-9: a flat float32 CDF over
    V = 102400 rounds such increments away; the two-level sampler must draw them."""
    V = 102400
    w = torch.full((V,), 1e-9)
    w[0] = 1.0
    rare = float(w[1:].sum() / w.sum())
    n = 20_000
    draws = torch.cat([categorical(w.expand(n, V), gen) for _ in range(25)])
    drawn = float((draws != 0).double().mean())
    sigma = (rare / draws.numel()) ** 0.5
    assert abs(drawn - rare) < 4 * sigma
