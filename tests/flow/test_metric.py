"""Metrics: the formula, exact zeros, pluggability and the [..., V] memory bound."""

from __future__ import annotations

import pytest
import torch
from conftest import LargestAllocation

from kineflow.flow import EmbeddingMetric, HammingMetric, MetricPath, make_metric


@pytest.mark.parametrize("exponent", [1.0, 2.0, 4.0, 3.0])
def test_embedding_metric_matches_normalised_distance_power(exponent: float) -> None:
    g = torch.Generator().manual_seed(0)
    E = torch.randn(50, 6, generator=g, dtype=torch.float64) * torch.rand(50, 1, generator=g)
    metric = EmbeddingMetric(E, exponent=exponent, dtype=torch.float64)
    y = torch.randint(0, 50, (3, 4), generator=g)
    unit = E / E.norm(dim=-1, keepdim=True)
    expected = (unit[y].unsqueeze(-2) - unit).norm(dim=-1).pow(exponent)
    d = metric(y)
    assert d.shape == (3, 4, 50)
    torch.testing.assert_close(d, expected, atol=1e-10, rtol=1e-8)
    assert (d >= 0).all()
    assert (d.gather(-1, y.unsqueeze(-1)) == 0).all()  # exactly zero, not 1e-16


def test_fudoki_metric_is_squared_squared_distance_with_range_0_16() -> None:
    E = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0]])
    d = make_metric("fudoki", E)(torch.tensor([0]))
    torch.testing.assert_close(d, torch.tensor([[0.0, 16.0, 4.0]]))  # (2 − 2cos)²


def test_embedding_metric_is_invariant_to_row_scale() -> None:
    E = torch.randn(10, 4, generator=torch.Generator().manual_seed(1))
    y = torch.arange(10)
    torch.testing.assert_close(EmbeddingMetric(E)(y), EmbeddingMetric(E * 7.5)(y))


def test_embedding_metric_allocates_at_most_query_by_vocab() -> None:
    V, D = 5000, 16
    metric = EmbeddingMetric(torch.randn(V, D))
    y = torch.randint(0, V, (2, 3))
    with LargestAllocation() as probe:
        metric(y)
    assert probe.largest <= y.numel() * V  # never a [V, V] (or [..., V, D]) intermediate


def test_hamming_metric_and_names() -> None:
    d = HammingMetric(4)(torch.tensor([2, 0]))
    assert d.tolist() == [[1, 1, 0, 1], [0, 1, 1, 1]]
    assert isinstance(make_metric("hamming", vocab_size=4), HammingMetric)
    E = torch.randn(5, 3)
    assert make_metric("euclidean", E).exponent == 1.0
    assert make_metric("squared_euclidean", E).exponent == 2.0
    with pytest.raises(ValueError, match="unknown metric 'cosine'"):
        make_metric("cosine", E)
    with pytest.raises(ValueError, match="needs an embeddings table"):
        make_metric("fudoki")


def test_any_callable_is_a_metric() -> None:
    """A plain function giving d(·, y) plugs into the path; here |x − y| on a line."""
    V = 6

    def line(y: torch.Tensor) -> torch.Tensor:
        return (torch.arange(V) - y.unsqueeze(-1)).abs().float()

    path = MetricPath(line, vocab_size=V)
    p = path.probs(torch.tensor([0]), 0.5)[0]
    assert (p[:-1] > p[1:]).all()  # probability decreases with distance from x1 = 0
    path_by_name = MetricPath("hamming", vocab_size=V)
    assert path_by_name.vocab_size == V
    with pytest.raises(ValueError, match="vocab_size is required"):
        MetricPath(line)


def test_metric_moves_with_the_path() -> None:
    path = MetricPath.from_embeddings(torch.randn(8, 3))
    path = path.to(torch.float64)
    assert path.metric.unit.dtype == torch.float64
