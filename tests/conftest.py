"""Shared fixtures: small random problems whose exact answers are known; loading bench scripts."""

from __future__ import annotations

import contextlib
import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import torch

from kineflow.flow import EmbeddingMetric, ExactPosterior, MaskedPath, MetricPath

BENCH = Path(__file__).resolve().parents[1] / "bench"


@contextlib.contextmanager
def bench_script(name: str) -> Iterator[ModuleType]:
    """``bench/<name>.py`` imported as a module for the ``with`` block. It sits in
    ``sys.modules`` meanwhile, because dataclasses resolve their module there while the class
    body runs."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(1234)


def random_metric_path(V: int = 7, D: int = 3, exponent: float = 4.0, seed: int = 0) -> MetricPath:
    """A metric path over random float64 embeddings (float64 so finite differences are exact)."""
    E = torch.randn(V, D, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return MetricPath(EmbeddingMetric(E, exponent=exponent, dtype=torch.float64))


def text_and_image_problem(B: int) -> tuple[ExactPosterior, object, dict, int]:
    """Text (metric path, V=5) at positions 0 and 2, image (masked path, 3 codes + mask) at
    position 1, and a prompt token at position 3 that is in neither vocabulary: the exact
    posterior ``oracle`` over a coupled joint, a ``model`` that pads its logits for the prompt
    position, the ``region`` masks and the prompt id."""
    text, image = random_metric_path(V=5, D=3, seed=4), MaskedPath(4, mask_id=3)
    support = torch.cartesian_prod(torch.arange(5), torch.arange(3), torch.arange(5))
    w = torch.rand(len(support), generator=torch.Generator().manual_seed(7)) ** 4
    w[support[:, 0] == support[:, 2]] *= 5  # couple the two text tokens
    w[(support[:, 1] == 0) & (support[:, 0] < 2)] *= 5  # and image with text
    oracle = ExactPosterior(support, w, {"text": text, "image": image}, ["text", "image", "text"])

    def model(x, t):
        out = oracle(x[:, :3], t)
        return {k: torch.cat([v, torch.zeros(B, 1, v.shape[-1])], 1) for k, v in out.items()}

    region = {
        "text": torch.tensor([True, False, True, False]).expand(B, 4),
        "image": torch.tensor([False, True, False, False]).expand(B, 4),
    }
    return oracle, model, region, 12345


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
