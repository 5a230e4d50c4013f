"""Discrete flow matching: metrics, probability paths, velocities and CTMC solvers.

- :mod:`~kineflow.flow.metric` — token distances ``d(x, y)`` (FUDOKI's embedding metric).
- :mod:`~kineflow.flow.metric_path` — ``p_t(x|x_1) = softmax(−β_t d(x, x_1))`` and its
  kinetic-optimal velocity.
- :mod:`~kineflow.flow.masked_path` — the absorbing-state (mask) baseline path.
- :mod:`~kineflow.flow.solver` — the Euler CTMC sampler, one code path for all modalities.
- :mod:`~kineflow.flow.guidance` — classifier-free guidance.
- :mod:`~kineflow.flow.oracle` — exact posteriors and exact solver laws for small problems.
- :mod:`~kineflow.flow.loss` — the training loss: cross-entropy against ``x_1`` on a region.
"""

from kineflow.flow.guidance import GuidedModel, blank_span, classifier_free_guidance
from kineflow.flow.loss import region_cross_entropy
from kineflow.flow.masked_path import MaskedPath
from kineflow.flow.metric import EmbeddingMetric, HammingMetric, Metric, make_metric
from kineflow.flow.metric_path import MetricPath
from kineflow.flow.oracle import ExactPosterior, euler_law, total_variation
from kineflow.flow.path import DiscretePath
from kineflow.flow.sampling import categorical, sample_logits
from kineflow.flow.schedulers import CosineScheduler, PolynomialScheduler
from kineflow.flow.solver import EulerSolver, SolverResult, power_grid, uniform_grid

__all__ = [
    "CosineScheduler",
    "DiscretePath",
    "EmbeddingMetric",
    "EulerSolver",
    "ExactPosterior",
    "GuidedModel",
    "HammingMetric",
    "MaskedPath",
    "Metric",
    "MetricPath",
    "PolynomialScheduler",
    "SolverResult",
    "blank_span",
    "categorical",
    "classifier_free_guidance",
    "euler_law",
    "make_metric",
    "power_grid",
    "region_cross_entropy",
    "sample_logits",
    "total_variation",
    "uniform_grid",
]
