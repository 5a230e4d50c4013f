"""Packed FUDOKI batches: the same per-sample losses and gradients as the padded batch."""

from __future__ import annotations

import pytest
import torch

from tests.train.test_train_fudoki import assets, make_task  # noqa: F401 (fixture)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("kind", ["metric", "ar"])
def test_packing_changes_no_loss_and_no_gradient(assets, tmp_path, kind) -> None:  # noqa: F811
    task = make_task(assets, tmp_path, kind)
    indices = list(range(12))
    batch = task.batch(indices)
    task.data.pack = True
    pbatch = task.batch(indices)
    assert batch["pack"] is None
    plan = pbatch["pack"]
    B, N = batch["layout"].input_ids.shape
    R, L = plan.shape
    assert R * L < B * N  # a mixed batch packs into fewer slots
    assert batch["is_gen"].any() and (~batch["is_gen"]).any()
    results = []
    for b in (batch, pbatch):
        task.model.zero_grad()
        out = task.losses(b, task.model)
        out["loss"].backward()
        grads = {n: p.grad.clone() for n, p in task.model.named_parameters() if p.grad is not None}
        results.append((out, grads))
    (a, ga), (b, gb) = results
    for key in ("loss", "loss_gen", "loss_und"):
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6)
    assert ga.keys() == gb.keys()
    for name in ga:
        torch.testing.assert_close(gb[name], ga[name], rtol=1e-4, atol=1e-6, msg=name)
