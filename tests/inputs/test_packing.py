"""Packing plans: every real token exactly once, in its own segment at its own position."""

from __future__ import annotations

import pytest
import torch

from kineflow.inputs.packing import plan_packing
from kineflow.models.masking import build_attention_mask


def left_padded(lengths: list[int], N: int) -> torch.Tensor:
    mask = torch.zeros(len(lengths), N, dtype=torch.bool)
    for b, n in enumerate(lengths):
        mask[b, N - n :] = True
    return mask


@pytest.mark.parametrize("length", [None, 12, 20])
def test_every_real_token_lands_once_in_its_segment(length) -> None:
    lengths = [3, 10, 4, 7, 1, 10, 2, 5]
    mask = left_padded(lengths, 10)
    mask[1, 4] = False  # a hole inside a row (padding between prompt and region)
    plan = plan_packing(mask, length)
    R, L = plan.shape
    assert plan.shape[1] == (length or 10)
    # Each real token once, each slot at most once.
    assert sorted(plan.source.tolist()) == mask.flatten().nonzero().flatten().tolist()
    assert len(set(plan.target.tolist())) == plan.target.numel()
    # The packed ids are the real ids of their segment, in order, at positions 0 .. n_b - 1.
    ids = torch.arange(80).view(8, 10)
    packed = plan.pack(ids, -1)
    for b in range(8):
        at = plan.segment_ids == b
        assert torch.equal(packed[at], ids[b][mask[b]])
        assert plan.position_ids[at].tolist() == list(range(int(mask[b].sum())))
        assert at.nonzero()[:, 0].unique().numel() == 1  # a sample is never split
    assert torch.equal(plan.attention_mask, plan.segment_ids >= 0)
    assert (packed[~plan.attention_mask] == -1).all()
    # First-fit decreasing fits these 48 tokens in fewer slots than the padded batch.
    assert R * L < 80 or length == 20
    # order: the samples as a row-major walk of the packed rows meets them.
    seen = [int(s) for s in plan.segment_ids.flatten() if s >= 0]
    assert plan.order.tolist() == list(dict.fromkeys(seen))


def test_order_among_reorders_per_sample_inputs() -> None:
    plan = plan_packing(left_padded([2, 6, 3, 6, 1], 6))
    selected = torch.tensor([True, False, True, True, False])
    stored = torch.tensor([0, 2, 3])  # the selected samples' own inputs, in sample order
    assert stored[plan.order_among(selected)].tolist() == [
        b for b in plan.order.tolist() if selected[b]
    ]


def test_too_long_sample_is_refused() -> None:
    with pytest.raises(ValueError, match="does not fit packed rows of 3"):
        plan_packing(left_padded([4, 2], 4), 3)


@pytest.mark.parametrize("mode", ["full", "causal"])
def test_segments_restrict_attention_to_their_own_sample(mode) -> None:
    segments = torch.tensor([[0, 0, 1, 1, 1, -1]])
    key_mask = segments >= 0
    allowed = build_attention_mask(key_mask, mode=mode, segment_ids=segments)[0, 0]
    for q in range(5):
        for k in range(6):
            want = segments[0, k] == segments[0, q] and (mode == "full" or k <= q)
            assert bool(allowed[q, k]) == bool(want), (q, k)
    with pytest.raises(ValueError, match="prefix"):
        build_attention_mask(key_mask, mode="prefix", prefix_lengths=torch.tensor([1]),
                             segment_ids=segments)  # fmt: skip
