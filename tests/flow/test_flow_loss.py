"""The region cross-entropy (kineflow.flow.loss) and the model's ``heads=`` forward it reads."""

from __future__ import annotations

import math

import pytest
import torch
from janus_fixture import random_model, tiny_config

from kineflow.flow import region_cross_entropy

B, N, V, K = 3, 9, 11, 7


def regions() -> tuple[torch.Tensor, torch.Tensor]:
    """Sample 0: image positions 2-5; sample 1: text positions 6-8; sample 2: both kinds;
    no position at column 0 (nothing to its left)."""
    image = torch.zeros(B, N, dtype=torch.bool)
    text = torch.zeros(B, N, dtype=torch.bool)
    image[0, 2:6] = True
    text[1, 6:9] = True
    image[2, 1:3] = True
    text[2, 5] = True
    return image, text


def test_matches_a_position_by_position_computation() -> None:
    g = torch.Generator().manual_seed(0)
    image, text = regions()
    targets = torch.randint(0, K, (B, N), generator=g)
    image_logits = torch.randn(int(image.sum()), K, generator=g)
    text_logits = torch.randn(int(text.sum()), V, generator=g)
    got = region_cross_entropy([image_logits, text_logits], [image, text], targets)
    # Independently: walk the positions in row-major order, each head consuming its rows in
    # turn, and average -log p(target) = logsumexp(z) - z[target] per sample.
    want = []
    used = {"image": 0, "text": 0}
    for b in range(B):
        terms = []
        for i in range(N):
            for name, mask, table in (("image", image, image_logits), ("text", text, text_logits)):
                if mask[b, i]:
                    z = table[used[name]].tolist()
                    used[name] += 1
                    lse = math.log(sum(math.exp(v) for v in z))
                    terms.append(lse - z[int(targets[b, i])])
        want.append(sum(terms) / len(terms))
    torch.testing.assert_close(got, torch.tensor(want), rtol=1e-6, atol=1e-6)


def test_empty_regions_and_bad_inputs() -> None:
    image, _ = regions()
    targets = torch.zeros(B, N, dtype=torch.long)
    none = torch.zeros(B, N, dtype=torch.bool)
    z = torch.zeros(int(image.sum()), K)
    got = region_cross_entropy([z, torch.zeros(0, V)], [image, none], targets)
    # Uniform logits: log K on every sample with a region, 0 on the one without.
    want = torch.tensor([math.log(K), 0.0, math.log(K)])
    torch.testing.assert_close(got, want)
    with pytest.raises(ValueError, match="overlapping"):
        region_cross_entropy([z, z], [image, image], targets)
    with pytest.raises(ValueError, match="2 logits for 1 regions"):
        region_cross_entropy([z, z], [image], targets)


def test_forward_heads_are_the_shifted_logits_at_the_region() -> None:
    model = random_model(tiny_config(V))
    K_model = model.config.gen_vision.codebook_size
    image, text = regions()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, V, (B, N), generator=g)
    with torch.no_grad():
        hidden = model(ids)
        text_logits, image_logits = model(ids, heads=(text, image))
    torch.testing.assert_close(text_logits, model.text_logits(hidden)[text])
    torch.testing.assert_close(image_logits, model.image_logits(hidden)[image])
    assert image_logits.shape == (int(image.sum()), K_model)
    at0 = torch.zeros(B, N, dtype=torch.bool)
    at0[0, 0] = True
    with pytest.raises(ValueError, match="position 0"):
        model(ids, heads=(at0, image))


def test_a_head_without_positions_does_not_run() -> None:
    """No gradient (None, not zeros) for an unused head: AdamW then leaves it alone, as it did
    when the trainer called only the heads it needed."""
    model = random_model(tiny_config(V))
    image, _ = regions()
    none = torch.zeros(B, N, dtype=torch.bool)
    ids = torch.randint(0, V, (B, N), generator=torch.Generator().manual_seed(2))
    text_logits, image_logits = model(ids, heads=(none, image))
    assert text_logits.shape == (0, V)
    region_cross_entropy([image_logits, text_logits], [image, none], ids % 8).mean().backward()
    assert model.language_model.lm_head.weight.grad is None
    assert all(p.grad is not None for p in model.gen_head.parameters())
