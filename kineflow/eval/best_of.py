"""Best-of-N with the model judging itself on the ShapesWorld generation benchmark.

Prompts: the GenEval-style ``test`` prompts (:func:`~kineflow.data.shapes.prompts.prompt_set`,
at most ``per_category`` per category, fixed by ``seed``). Each prompt gets ``max_n``
candidates from **one** sampling run (the prompt repeated ``max_n`` times, batched exactly as
``text_to_image(best_of=max_n)`` batches them), each candidate is scored once by the self-judge
(:func:`kineflow.pipelines.judge.self_scores`, the model's yes − no logit) and read by the
detector. For every N in ``ns`` the first N candidates of each prompt are the draw of
``best_of=N``:

* **self**: the candidate with the highest self-judge score among the N passes or not (what
  ``text_to_image(best_of=N, judge="self")`` keeps);
* **oracle**: any of the N passes (the detector picks a passing one: the ceiling);
* **mean**: the mean pass rate of the N (what a random pick would score on average).

N = 1 is the plain call. Accuracy is the pass rate over prompts (a picture passes when the
detector's scene satisfies every requirement of its prompt), with percentile-bootstrap 95 %
intervals over prompts (:func:`kineflow.eval.stats.bootstrap_ci`), and the paired difference
self − (N = 1) with its interval. ``judge_auc``: over pairs of candidates of one prompt, one
passing and one failing, how often the passing one scores higher (ties count half): 0.5 is a
judge that cannot tell them apart. Time per prompt for N: N × (sampling + judging) per
candidate, measured over the whole run.

The detector only grades: the judge's scores are computed before, and without, it.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from kineflow.data.shapes.prompts import check, prompt_set
from kineflow.eval.detector import detect
from kineflow.eval.stats import bootstrap_ci
from kineflow.pipelines.judge import self_scores

__all__ = ["judge_auc", "pick_rows", "run_best_of_benchmark"]


def pick_rows(scores: np.ndarray, passed: np.ndarray, n: int) -> dict[str, np.ndarray]:
    """Per prompt, from the first ``n`` candidates (``scores``, ``passed`` [P, max_n]):
    ``self`` (the highest-scoring one passed, first on ties), ``oracle`` (any passed) and
    ``mean`` (their pass rate)."""
    s, p = scores[:, :n], passed[:, :n].astype(bool)
    chosen = s.argmax(1)
    return {
        "self": p[np.arange(len(p)), chosen],
        "oracle": p.any(1),
        "mean": p.mean(1),
    }


def judge_auc(scores: np.ndarray, passed: np.ndarray) -> tuple[float, int]:
    """``(auc, pairs)``: over (passing, failing) candidate pairs of the same prompt, the
    share where the passing one scores higher (ties: half); nan without such pairs."""
    wins, pairs = 0.0, 0
    for s, p in zip(scores, passed.astype(bool), strict=True):
        good, bad = s[p], s[~p]
        if len(good) and len(bad):
            diff = good[:, None] - bad[None, :]
            wins += float((diff > 0).sum() + 0.5 * (diff == 0).sum())
            pairs += diff.size
    return (wins / pairs if pairs else float("nan")), pairs


def run_best_of_benchmark(
    pipe: Any,
    *,
    ns: tuple[int, ...] = (1, 2, 4, 8),
    per_category: int | None = 16,
    prompts_per_batch: int = 8,
    seed: int = 0,
) -> dict[str, Any]:
    """The benchmark of the module docstring for ``pipe`` (any pipeline whose
    ``text_to_image`` takes ``best_of``), default sampling settings. Returns per N the
    ``self`` / ``oracle`` / ``mean`` accuracy with ``low`` / ``high``, ``self_gain`` (paired
    self − N=1, with interval), ``seconds_per_prompt``; and ``judge_auc``, the per-candidate
    costs, per-prompt ``rows`` and ``api_agrees``: ``text_to_image(best_of=max_n)`` on the
    first batch kept the candidates the ``self`` column assumes."""
    max_n = max(ns)
    prompts = prompt_set("test", max_per_category=per_category, seed=seed)
    texts = [p.text for p in prompts]
    pictures, sample_s = [], 0.0
    for k, lo in enumerate(range(0, len(texts), prompts_per_batch)):
        many = [t for t in texts[lo : lo + prompts_per_batch] for _ in range(max_n)]
        start = time.perf_counter()
        pictures += pipe.text_to_image(many, seed=seed + k).images
        sample_s += time.perf_counter() - start
    start = time.perf_counter()
    many = [t for t in texts for _ in range(max_n)]
    scores = self_scores(pipe, pictures, many).view(len(texts), max_n).numpy()
    judge_s = time.perf_counter() - start
    scenes = detect(np.stack([np.asarray(p) for p in pictures]))
    passed = np.array([not check(prompts[i // max_n], s) for i, s in enumerate(scenes)])
    passed = passed.reshape(len(texts), max_n)
    per_candidate = {"sample_s": sample_s / len(pictures), "judge_s": judge_s / len(pictures)}
    base = pick_rows(scores, passed, 1)["self"].astype(float)
    by_n = {}
    for n in ns:
        picks = pick_rows(scores, passed, n)
        row: dict[str, Any] = {}
        for name, values in picks.items():
            acc, low, high = bootstrap_ci(values, seed=seed)
            row[name] = {"accuracy": acc, "low": low, "high": high}
        gain, low, high = bootstrap_ci(picks["self"].astype(float) - base, seed=seed)
        row["self_gain"] = {"mean": gain, "low": low, "high": high}
        cost = per_candidate["sample_s"] + (per_candidate["judge_s"] if n > 1 else 0.0)
        row["seconds_per_prompt"] = n * cost
        by_n[str(n)] = row
    auc, pairs = judge_auc(scores, passed)
    # The API keeps what the table's "self" column assumes (same seed, same batch).
    first = pipe.text_to_image(texts[:prompts_per_batch], seed=seed, best_of=max_n)
    api_agrees = first.chosen == scores[:prompts_per_batch].argmax(1).tolist()
    return {
        "model": pipe.display_name, "prompts": len(texts), "per_category": per_category,
        "max_n": max_n, "seed": seed, "threads": torch.get_num_threads(), "by_n": by_n,
        "judge_auc": auc, "judge_pairs": pairs, "per_candidate": per_candidate,
        "candidate_pass_rate": float(passed.mean()), "api_agrees": api_agrees,
        "rows": [
            {"prompt": t, "category": p.category, "scores": s.round(4).tolist(),
             "passed": ok.tolist()}
            for t, p, s, ok in zip(texts, prompts, scores, passed, strict=True)
        ],
    }  # fmt: skip
