"""Shared fixtures: small random problems whose exact answers are known."""

from __future__ import annotations

import pytest
import torch

from kineflow.flow import EmbeddingMetric, MetricPath


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(1234)


def random_metric_path(V: int = 7, D: int = 3, exponent: float = 4.0, seed: int = 0) -> MetricPath:
    """A metric path over random float64 embeddings (float64 so finite differences are exact)."""
    E = torch.randn(V, D, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return MetricPath(EmbeddingMetric(E, exponent=exponent, dtype=torch.float64))


class LargestAllocation(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the largest tensor (in elements) any op produces while active."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = [a for a in torch.utils._pytree.tree_leaves((args, kwargs)) if _is_tensor(a)]
        shared = {a.untyped_storage().data_ptr() for a in inputs}
        for t in out if isinstance(out, (tuple, list)) else [out]:
            # Views and in-place results reuse an input's storage: they allocate nothing.
            if _is_tensor(t) and t.untyped_storage().data_ptr() not in shared:
                self.largest = max(self.largest, t.numel())
        return out


def _is_tensor(x: object) -> bool:
    return isinstance(x, torch.Tensor)


@pytest.fixture
def one_thread():
    """Run a test on one thread: small models gain nothing from more, and CI shares cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
