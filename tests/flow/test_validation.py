"""Bad input fails early with a message naming the argument and what is wrong with it."""

from __future__ import annotations

import pytest
import torch
from conftest import random_metric_path

from kineflow.flow import EmbeddingMetric, EulerSolver, MaskedPath, MetricPath

PATH = random_metric_path(V=5)
X1 = torch.tensor([[0, 1], [2, 3]])


@pytest.mark.parametrize(
    "call,error,message",
    [
        (lambda: PATH.probs(X1.float(), 0.5), TypeError, "x1 must be an integer tensor"),
        (lambda: PATH.probs(X1 + 4, 0.5), ValueError, r"x1 holds ids outside .* max 7"),
        (lambda: PATH.probs(X1 - 1, 0.5), ValueError, r"outside the vocabulary \[0, 5\): min -1"),
        (lambda: PATH.probs(X1, 1.5), ValueError, r"t must lie in \[0, 1\]"),
        (lambda: PATH.probs(X1, -0.1), ValueError, r"t must lie in \[0, 1\]"),
        (lambda: PATH.probs(X1, torch.tensor(float("nan"))), ValueError, "including NaN"),
        (lambda: PATH.probs(X1, torch.tensor([1, 0])), TypeError, "t must be a floating-point"),
        (lambda: PATH.probs(X1, torch.tensor([0.1, 0.2, 0.3])), ValueError, "leading dims"),
        (lambda: PATH.probs(X1, "0.5"), TypeError, "t must be a float"),
        (lambda: PATH.velocity(X1[:, :1], X1, 0.5), ValueError, "x_t and x1 must have the same"),
        (lambda: PATH.velocity(X1 + 9, X1, 0.5), ValueError, "x_t holds ids outside"),
        (lambda: MaskedPath(4, 3).probs(torch.tensor([3]), 0.5), ValueError, "cannot be a target"),
        (lambda: MaskedPath(4, 4), ValueError, "mask_id=4 is outside"),
        (lambda: EmbeddingMetric(torch.randn(5)), ValueError, r"\[V, D\] tensor"),
        (lambda: EmbeddingMetric(torch.zeros(3, 2)), ValueError, "all-zero rows"),
        (lambda: EmbeddingMetric(torch.randn(3, 2), exponent=0), ValueError, "exponent"),
        (
            lambda: EmbeddingMetric(torch.tensor([[1.0, float("nan")], [1.0, 0.0]])),
            ValueError,
            "NaN or inf",
        ),
        (lambda: MetricPath(PATH.metric, a=-1.0), ValueError, "must be positive"),
        (lambda: MetricPath(PATH.metric, vocab_size=6), ValueError, "disagrees"),
        (lambda: MetricPath(42), TypeError, "metric must be callable"),
    ],
)
def test_paths_reject_bad_input(call, error, message) -> None:
    with pytest.raises(error, match=message):
        call()


def logits_model(V: int = 5):
    return lambda x, t: torch.zeros(*x.shape, V)


SOLVER = EulerSolver(PATH)


@pytest.mark.parametrize(
    "kwargs,error,message",
    [
        ({"x_init": X1.float()}, TypeError, "x_init must be an integer tensor"),
        ({"x_init": X1[0]}, ValueError, r"x_init must have shape \[B, N\]"),
        ({"x_init": X1 + 5}, ValueError, "x_init holds ids outside"),
        ({"region": torch.ones(2, 3, dtype=torch.bool)}, ValueError, "region has shape"),
        ({"region": torch.ones(2, 2)}, TypeError, "region must be a bool tensor"),
        ({"steps": 0}, ValueError, "steps must be a positive integer"),
        ({"steps": 2.5}, ValueError, "steps must be a positive integer"),
        ({"steps": None}, ValueError, "either steps or time_grid"),
        ({"model_fn": logits_model(7)}, ValueError, r"output has shape \(2, 2, 7\)"),
        ({"model_fn": lambda x, t: x}, TypeError, "floating-point tensor of logits"),
        (
            {"model_fn": lambda x, t: torch.full((2, 2, 5), float("nan"))},
            ValueError,
            "NaN/inf logits",
        ),
        ({"time_grid": torch.tensor([0.0, 0.6, 0.5, 1.0])}, ValueError, "increase strictly"),
        ({"time_grid": torch.tensor([0.0, 1.2])}, ValueError, "within"),
        ({"time_grid": torch.tensor([0.0, 0.5, 1.0]), "steps": 3}, ValueError, "disagrees"),
        ({"temperature": -1.0}, ValueError, "temperature must be >= 0"),
        ({"top_k": 0}, ValueError, "top_k must be a positive"),
        ({"temperature": {"image": 1.0}}, ValueError, "unknown modalities"),
    ],
)
def test_solver_rejects_bad_input(kwargs, error, message) -> None:
    args = {"model_fn": logits_model(), "x_init": X1, "steps": 4} | kwargs
    if "time_grid" in kwargs and "steps" not in kwargs:
        args["steps"] = None
    with pytest.raises(error, match=message):
        SOLVER.sample(**args)


def test_multimodal_solver_rejects_bad_regions_and_outputs() -> None:
    image = MaskedPath(4, mask_id=3)
    solver = EulerSolver({"text": PATH, "image": image})
    x = torch.zeros(2, 3, dtype=torch.long)
    text = torch.tensor([[True, False, False]] * 2)
    image_r = torch.tensor([[False, True, True]] * 2)

    def model(x, t):
        return {"text": torch.zeros(2, 3, 5), "image": torch.zeros(2, 3, 4)}

    with pytest.raises(ValueError, match=r"region must map every modality \['image', 'text'\]"):
        solver.sample(model, x, 2, {"text": text})
    with pytest.raises(ValueError, match="regions of different modalities overlap"):
        solver.sample(model, x, 2, {"text": text, "image": text})
    with pytest.raises(ValueError, match=r"x_init in region\['image'\] holds ids outside"):
        solver.sample(model, x + 4, 2, {"text": text, "image": image_r})
    with pytest.raises(ValueError, match=r"model_fn must return logits for modalities"):
        solver.sample(
            lambda x, t: {"text": torch.zeros(2, 3, 5)}, x, 2, {"text": text, "image": image_r}
        )
    with pytest.raises(ValueError, match=r"output\['image'\] has shape"):
        solver.sample(
            lambda x, t: {"text": torch.zeros(2, 3, 5), "image": torch.zeros(2, 3, 5)},
            x, 2, {"text": text, "image": image_r},
        )  # fmt: skip
    with pytest.raises(TypeError, match="non-empty mapping"):
        EulerSolver({})
    with pytest.raises(ValueError, match="rate must be"):
        EulerSolver(PATH, rate="midpoint")
