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

N = 1 is the plain call. Every column is given under both rules of :data:`RULES` (a picture
passes when the detector's scene satisfies every requirement of its prompt, GenEval-style, or
shows exactly the prompt's objects, strict). Accuracy is the pass rate over prompts, with
percentile-bootstrap 95 % intervals over prompts (:func:`kineflow.eval.stats.bootstrap_ci`),
and the paired difference self − (N = 1) with its interval; ``self_overall`` is GenEval's
overall score of the kept pictures (the mean of the category pass rates). ``judge_auc``, per
rule: over pairs of candidates of one prompt, one passing and one failing, how often the
passing one scores higher (ties count half): 0.5 is a judge that cannot tell them apart. Time
per prompt for N: N × (sampling + judging) per candidate, measured over the whole run.

The detector only grades: the judge's scores are computed before, and without, it.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from kineflow.data.shapes.prompts import check, prompt_set, strict_check
from kineflow.eval.detector import detect
from kineflow.eval.stats import bootstrap_ci, stratified_ci
from kineflow.pipelines.judge import self_scores

__all__ = ["RULES", "judge_auc", "pick_rows", "run_best_of_benchmark"]

#: How a picture passes its prompt: GenEval-style (extra objects allowed unless a count is
#: exact) or the strict-scene rule (exactly the prompt's objects).
RULES = {"geneval": check, "strict": strict_check}


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


def _rule_row(
    scores: np.ndarray, passed: np.ndarray, n: int, categories: list[str], seed: int
) -> dict[str, Any]:
    """One rule's columns for best-of-``n``: ``self`` / ``oracle`` / ``mean`` (pass rate over
    prompts, with interval), ``self_gain`` (paired self − N=1) and ``self_overall`` (GenEval's
    overall: the mean of the per-category pass rates of the kept pictures, each category's
    prompts redrawn within it)."""
    picks, base = pick_rows(scores, passed, n), pick_rows(scores, passed, 1)["self"]
    row: dict[str, Any] = {}
    for name, values in picks.items():
        acc, low, high = bootstrap_ci(values, seed=seed)
        row[name] = {"accuracy": acc, "low": low, "high": high}
    gain, low, high = bootstrap_ci(picks["self"].astype(float) - base, seed=seed)
    row["self_gain"] = {"mean": gain, "low": low, "high": high}
    groups = [picks["self"][[c == k for c in categories]] for k in dict.fromkeys(categories)]
    acc, low, high = stratified_ci(groups, seed=seed)
    row["self_overall"] = {"accuracy": acc, "low": low, "high": high}
    return row


def run_best_of_benchmark(
    pipe: Any,
    *,
    ns: tuple[int, ...] = (1, 2, 4, 8),
    per_category: int | None = 16,
    prompts_per_batch: int = 8,
    seed: int = 0,
    **options: Any,
) -> dict[str, Any]:
    """The benchmark of the module docstring for ``pipe`` (any pipeline whose
    ``text_to_image`` takes ``best_of``), ``options`` passed to every ``text_to_image`` call
    (e.g. ``steps``, ``cfg_scale``; none: the pipeline's defaults). Returns per N
    ``seconds_per_prompt`` and, per rule of :data:`RULES`, the ``self`` / ``oracle`` / ``mean``
    accuracy with ``low`` / ``high``, ``self_gain`` (paired self − N=1, with interval) and
    ``self_overall``; ``judge_auc`` per rule, the per-candidate costs, per-prompt ``rows`` and
    ``api_agrees``: ``text_to_image(best_of=max_n)`` on the first batch kept the candidates the
    ``self`` column assumes."""
    max_n = max(ns)
    prompts = prompt_set("test", max_per_category=per_category, seed=seed)
    texts = [p.text for p in prompts]
    pictures, sample_s = [], 0.0
    for k, lo in enumerate(range(0, len(texts), prompts_per_batch)):
        many = [t for t in texts[lo : lo + prompts_per_batch] for _ in range(max_n)]
        start = time.perf_counter()
        pictures += pipe.text_to_image(many, seed=seed + k, **options).images
        sample_s += time.perf_counter() - start
    start = time.perf_counter()
    many = [t for t in texts for _ in range(max_n)]
    scores = self_scores(pipe, pictures, many).view(len(texts), max_n).numpy()
    judge_s = time.perf_counter() - start
    scenes = detect(np.stack([np.asarray(p) for p in pictures]))
    passed = {
        rule: np.array([not fails(prompts[i // max_n], s) for i, s in enumerate(scenes)])
        .reshape(len(texts), max_n)
        for rule, fails in RULES.items()
    }  # fmt: skip
    per_candidate = {"sample_s": sample_s / len(pictures), "judge_s": judge_s / len(pictures)}
    categories = [p.category for p in prompts]
    by_n = {}
    for n in ns:
        cost = per_candidate["sample_s"] + (per_candidate["judge_s"] if n > 1 else 0.0)
        by_n[str(n)] = {"seconds_per_prompt": n * cost} | {
            rule: _rule_row(scores, ok, n, categories, seed) for rule, ok in passed.items()
        }
    auc = {}
    for rule, ok in passed.items():
        auc[rule] = dict(zip(("auc", "pairs"), judge_auc(scores, ok), strict=True))
    # The API keeps what the table's "self" column assumes (same seed, same batch).
    first = pipe.text_to_image(texts[:prompts_per_batch], seed=seed, best_of=max_n, **options)
    api_agrees = first.chosen == scores[:prompts_per_batch].argmax(1).tolist()
    return {
        "model": pipe.display_name, "prompts": len(texts), "per_category": per_category,
        "max_n": max_n, "seed": seed, "threads": torch.get_num_threads(), "options": options,
        "by_n": by_n,
        "judge_auc": auc, "per_candidate": per_candidate, "api_agrees": api_agrees,
        "candidate_pass_rate": {rule: float(ok.mean()) for rule, ok in passed.items()},
        "rows": [
            {"prompt": t, "category": p.category, "scores": s.round(4).tolist(),
             "passed": ok.tolist(), "strict": st.tolist()}
            for t, p, s, ok, st in zip(texts, prompts, scores, passed["geneval"],
                                       passed["strict"], strict=True)
        ],
    }  # fmt: skip
