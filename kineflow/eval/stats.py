"""Percentile-bootstrap confidence intervals for the benchmark scores.

Every score of the ShapesWorld scorers is a mean over independent units (prompts, questions,
pictures, scenes). The bootstrap redraws ``n`` units with replacement ``draws`` times from a
seeded generator and takes the ``(1 - level) / 2`` and ``(1 + level) / 2`` percentiles of the
redrawn statistic (the *percentile* interval, Efron & Tibshirani ch. 13):

- :func:`bootstrap_ci`: the mean of per-unit values ``x_i`` (pass / fail, or a prompt's
  pass fraction over its pictures), or with ``weights`` the ratio ``Σ w_i x_i / Σ w_i``
  (e.g. per-scene accuracy over a varying number of occupied cells);
- :func:`stratified_ci`: the mean of per-group means (GenEval's overall score: the mean of the
  per-category accuracies), each group redrawn within itself so every redraw keeps every group.

With a handful of values -- one score per training seed -- a bootstrap has too few distinct
redraws; :func:`t_interval` gives Student's ``mean ± t_{(1+level)/2, n−1} · sd / √n`` instead.

The same ``seed`` gives the same interval; all-pass or all-fail units give a degenerate
interval at the point estimate.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

__all__ = ["LEVEL", "bootstrap_ci", "ci_pair", "stratified_ci", "t_interval", "t_quantile"]

LEVEL = 0.95
DRAWS = 10_000


def _percentiles(stats: np.ndarray, level: float) -> tuple[float, float]:
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(stats, [tail, 100 - tail])
    return float(low), float(high)


def bootstrap_ci(
    passed: np.ndarray | Sequence[float] | Sequence[bool],
    level: float = LEVEL,
    draws: int = DRAWS,
    seed: int = 0,
    weights: np.ndarray | Sequence[float] | None = None,
) -> tuple[float, float, float]:
    """``(mean, low, high)``: the mean of ``passed`` (Float[n]; bools count 0 / 1) and its
    percentile-bootstrap interval over the ``n`` units. With ``weights`` (Float[n], ≥ 0) the
    statistic is ``Σ w x / Σ w`` on each redraw (a redraw with ``Σ w = 0`` counts as the full
    sample's value). No units: ``(nan, nan, nan)``."""
    x = np.asarray(passed, dtype=np.float64)
    if x.ndim != 1:
        raise ValueError(f"passed must be one value per unit, got shape {x.shape}")
    if len(x) == 0:
        return float("nan"), float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(x), (draws, len(x)))
    if weights is None:
        return (float(x.mean()), *_percentiles(x[idx].mean(1), level))
    w = np.asarray(weights, dtype=np.float64)
    if w.shape != x.shape or (w < 0).any() or w.sum() == 0:
        raise ValueError("weights must be ≥ 0, one per unit, not all 0")
    point = float((w * x).sum() / w.sum())
    num, den = (w * x)[idx].sum(1), w[idx].sum(1)
    stats = np.where(den > 0, num / np.where(den > 0, den, 1), point)
    return (point, *_percentiles(stats, level))


def stratified_ci(
    groups: Sequence[np.ndarray | Sequence[float]],
    level: float = LEVEL,
    draws: int = DRAWS,
    seed: int = 0,
    weights: Sequence[np.ndarray | Sequence[float]] | None = None,
) -> tuple[float, float, float]:
    """``(mean, low, high)`` of the mean of per-group means ``(1/G) Σ_g m_g``, every group
    redrawn with replacement within itself (its size kept); ``m_g`` is the group's mean, or
    with ``weights`` (one array per group) its ratio ``Σ w x / Σ w``. Empty groups are
    skipped."""
    ws = weights if weights is not None else [np.ones(len(g)) for g in groups]
    if len(ws) != len(groups):
        raise ValueError(f"{len(groups)} groups but {len(ws)} weight arrays")
    pairs = [
        (np.asarray(g, dtype=np.float64), np.asarray(w, dtype=np.float64))
        for g, w in zip(groups, ws, strict=True)
        if len(g)
    ]
    if not pairs:
        return float("nan"), float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    stats, point = np.zeros(draws), 0.0
    for x, w in pairs:
        if w.shape != x.shape or (w < 0).any() or w.sum() == 0:
            raise ValueError("weights must be ≥ 0, one per unit, not all 0 in a group")
        mean = (w * x).sum() / w.sum()
        idx = rng.integers(0, len(x), (draws, len(x)))
        num, den = (w * x)[idx].sum(1), w[idx].sum(1)
        stats += np.where(den > 0, num / np.where(den > 0, den, 1), mean)
        point += mean
    return (float(point / len(pairs)), *_percentiles(stats / len(pairs), level))


def ci_pair(result: tuple[float, float, float]) -> list[float]:
    """``[low, high]`` of a ``(mean, low, high)`` triple (the JSON form of an interval)."""
    return [result[1], result[2]]


def t_quantile(p: float, df: int) -> float:
    """The ``p``-quantile of Student's t with ``df`` degrees of freedom, ``p`` in [0.5, 1):
    bisection on the CDF ``F(x) = 1/2 + ∫_0^x f(u) du`` with the density
    ``f(u) = Γ((ν+1)/2) / (√(νπ) Γ(ν/2)) · (1 + u²/ν)^(−(ν+1)/2)`` integrated by Simpson's
    rule (substituting ``u = tan θ`` so the heavy tail of ν = 1 costs nothing)."""
    if not 0.5 <= p < 1 or df < 1:
        raise ValueError(f"need 0.5 <= p < 1 and df >= 1, got p={p}, df={df}")
    nu = float(df)
    log_c = math.lgamma((nu + 1) / 2) - math.lgamma(nu / 2) - 0.5 * math.log(nu * math.pi)

    def cdf(x: float) -> float:
        theta = np.linspace(0.0, math.atan(x), 2001)  # u = tan θ, du = dθ / cos² θ
        u = np.tan(theta)
        g = np.exp(log_c - (nu + 1) / 2 * np.log1p(u * u / nu)) / np.cos(theta) ** 2
        h = theta[1] - theta[0]
        return 0.5 + h / 3 * float(g[0] + g[-1] + 4 * g[1:-1:2].sum() + 2 * g[2:-1:2].sum())

    low, high = 0.0, 1.0
    while cdf(high) < p:
        high *= 2
    for _ in range(60):
        mid = (low + high) / 2
        low, high = (mid, high) if cdf(mid) < p else (low, mid)
    return (low + high) / 2


def t_interval(values: Sequence[float], level: float = LEVEL) -> tuple[float, float, float]:
    """``(mean, low, high)``: Student's interval ``mean ± t_{(1+level)/2, n−1} · sd / √n`` of
    ``n ≥ 2`` values (``sd`` with ``n − 1`` in the denominator); equal values give a
    zero-width interval."""
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1 or len(x) < 2:
        raise ValueError(f"t_interval needs two or more values, got {len(x)}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    mean = float(x.mean())
    half = t_quantile((1 + level) / 2, len(x) - 1) * float(x.std(ddof=1)) / math.sqrt(len(x))
    return mean, mean - half, mean + half
