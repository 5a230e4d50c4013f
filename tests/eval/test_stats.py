"""Percentile-bootstrap intervals: oracles (degenerate intervals, the binomial width),
containment, shrinking with n, determinism, and the weighted / stratified statistics."""

from __future__ import annotations

import numpy as np
import pytest

from kineflow.eval.stats import bootstrap_ci, ci_pair, stratified_ci


def test_all_pass_and_all_fail_are_degenerate():
    assert bootstrap_ci([True] * 7) == (1.0, 1.0, 1.0)
    assert bootstrap_ci([False] * 7) == (0.0, 0.0, 0.0)
    assert stratified_ci([[1.0] * 3, [0.0] * 5]) == (0.5, 0.5, 0.5)


def test_interval_contains_the_mean_and_matches_the_binomial_width():
    x = [True] * 30 + [False] * 70
    mean, low, high = bootstrap_ci(x)
    assert mean == 0.3 and low < mean < high
    # Oracle: the normal approximation 0.3 ± 1.96 sqrt(0.3·0.7/100) = [0.210, 0.390].
    assert low == pytest.approx(0.21, abs=0.015) and high == pytest.approx(0.39, abs=0.015)


def test_interval_shrinks_with_more_items_and_is_deterministic():
    small = bootstrap_ci([1, 0] * 20, seed=3)
    large = bootstrap_ci([1, 0] * 500, seed=3)
    assert (large[2] - large[1]) < 0.4 * (small[2] - small[1])
    assert bootstrap_ci([1, 0, 0] * 10, seed=5) == bootstrap_ci([1, 0, 0] * 10, seed=5)


def test_weighted_is_the_ratio_and_unit_weights_change_nothing():
    x, w = np.array([1.0, 0.5, 0.0]), np.array([1.0, 2.0, 1.0])
    assert bootstrap_ci(x, weights=w)[0] == pytest.approx(2.0 / 4.0)
    assert bootstrap_ci(x, weights=np.ones(3)) == bootstrap_ci(x)
    with pytest.raises(ValueError, match="weights"):
        bootstrap_ci(x, weights=[1.0, -1.0, 1.0])


def test_stratified_is_the_mean_of_group_means():
    a, b = [1, 1, 1, 0], [0, 0, 0, 0, 0, 0, 1, 1]
    mean, low, high = stratified_ci([a, b], seed=1)
    assert mean == pytest.approx((0.75 + 0.25) / 2) and low < mean < high
    # A single group is the plain bootstrap of that group, draw for draw.
    assert stratified_ci([a], seed=2) == bootstrap_ci(a, seed=2)
    assert ci_pair((0.5, 0.4, 0.6)) == [0.4, 0.6]


def test_empty_and_bad_input():
    assert all(np.isnan(v) for v in bootstrap_ci([]))
    with pytest.raises(ValueError, match="level"):
        bootstrap_ci([1, 0], level=1.5)
