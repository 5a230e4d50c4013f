"""The best-of-N benchmark's bookkeeping (:mod:`kineflow.eval.best_of`): which candidate each
judge keeps among the first N, and the judge's pairwise AUC."""

from __future__ import annotations

import numpy as np
import pytest

from kineflow.eval.best_of import RULES, _rule_row, judge_auc, pick_rows

# Two prompts, four candidates each.
SCORES = np.array([[0.1, 0.9, 0.5, 0.2], [2.0, 1.0, 3.0, 3.0]])
PASSED = np.array([[False, False, True, False], [True, False, False, True]])


def test_pick_rows_uses_only_the_first_n_candidates() -> None:
    one = pick_rows(SCORES, PASSED, 1)
    assert one["self"].tolist() == [False, True] and one["oracle"].tolist() == [False, True]
    two = pick_rows(SCORES, PASSED, 2)
    assert two["self"].tolist() == [False, True]  # candidate 1 (fails), candidate 0 (passes)
    assert two["oracle"].tolist() == [False, True]
    four = pick_rows(SCORES, PASSED, 4)
    # Prompt 0 keeps candidate 1 (0.9, fails); prompt 1 ties 2 and 3 at 3.0: the first, failing.
    assert four["self"].tolist() == [False, False]
    assert four["oracle"].tolist() == [True, True]
    assert four["mean"].tolist() == pytest.approx([0.25, 0.5])


def test_judge_auc_counts_passing_over_failing_pairs_of_one_prompt() -> None:
    auc, pairs = judge_auc(SCORES, PASSED)
    # Prompt 0: 0.5 beats 0.1 and 0.2, loses to 0.9 -> 2 of 3. Prompt 1: passing {2.0, 3.0}
    # vs failing {1.0, 3.0}: 2.0 > 1.0, 2.0 < 3.0, 3.0 > 1.0, 3.0 = 3.0 -> 2.5 of 4.
    assert pairs == 7 and auc == pytest.approx((2 + 2.5) / 7)
    assert np.isnan(judge_auc(SCORES, np.ones_like(PASSED))[0])


def test_each_rule_row_reports_the_category_mean_of_the_kept_pictures() -> None:
    scores = np.array([[0.0, 1.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    passed = np.array([[False, True], [True, False], [False, False], [True, True]])
    row = _rule_row(scores, passed, 2, ["a", "a", "a", "b"], seed=0)
    # Kept: candidate 1, 0, 1, 1 -> passes T, T, F, T; category a 2/3, b 1/1.
    assert row["self"]["accuracy"] == pytest.approx(3 / 4)
    assert row["self_overall"]["accuracy"] == pytest.approx((2 / 3 + 1) / 2)
    assert row["oracle"]["accuracy"] == pytest.approx(3 / 4)
    assert row["self_gain"]["mean"] == pytest.approx(1 / 4)  # N = 1 keeps F, T, F, T
    assert set(RULES) == {"geneval", "strict"}
