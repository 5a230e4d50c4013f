"""Rotary position embedding (``kineflow/models/rope.py``) against angles and cosines worked
out in Python floats, and the same tables on any thread count."""

from __future__ import annotations

import math

import pytest
import torch

from kineflow.models.rope import rope_cos_sin, rotate_half


def oracle(p: int, head_dim: int, theta: float) -> tuple[list[float], list[float]]:
    """cos / sin of ``float32(p · float32(theta^(−2k/head_dim)))``, duplicated to head_dim."""
    inv = torch.tensor([theta ** (-2 * k / head_dim) for k in range(head_dim // 2)])
    angles = (torch.tensor(float(p)) * inv.float()).tolist()  # float32 products, as RoPE's
    angles = angles + angles
    return [math.cos(a) for a in angles], [math.sin(a) for a in angles]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_tables_match_python_floats(dtype) -> None:
    positions = torch.tensor([[0, 1, 5, 85], [3, 3, 200, 1000]])
    cos, sin = rope_cos_sin(positions, 32, 10000.0, dtype)
    assert cos.shape == sin.shape == (2, 4, 32) and cos.dtype == dtype
    tol = {torch.float64: 1e-15, torch.float32: 6e-8, torch.bfloat16: 4e-3}[dtype]
    for b, row in enumerate(positions.tolist()):
        for n, p in enumerate(row):
            for got, want in zip((cos[b, n], sin[b, n]), oracle(p, 32, 10000.0), strict=True):
                want = torch.tensor(want, dtype=torch.float64)
                torch.testing.assert_close(got.double(), want, atol=tol, rtol=0)


def test_tables_do_not_depend_on_the_thread_count() -> None:
    """A batch large enough for torch to split across threads (torch's own CPU ``cos`` gave
    another answer on the second of two threads in some processes: 1.5e-4 in float32)."""
    positions = torch.arange(86).repeat(128, 1)
    before = torch.get_num_threads()
    try:
        tables = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            tables.append(rope_cos_sin(positions, 32, 10000.0, torch.float64))
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(a, b) for a, b in zip(*tables, strict=True))


def test_rotation_keeps_norms_and_rotate_half_is_a_quarter_turn() -> None:
    x = torch.randn(2, 3, 8, dtype=torch.float64)
    assert torch.equal(rotate_half(rotate_half(x)), -x)
    cos, sin = rope_cos_sin(torch.tensor([[0, 7, 40]]), 8, 10000.0, torch.float64)
    y = x * cos + rotate_half(x) * sin
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1))
    torch.testing.assert_close(y[:, 0], x[:, 0])  # position 0 is not rotated
