"""The papers' claims, each read on several training seeds with an interval and a verdict.

A claim compares two runs of the reproduction on one score: ``a − b`` on the test split, where
``a`` and ``b`` trained with the same seed (the same initialisation seed and the same
per-sample draws), so each seed gives one paired difference ``d_k``. With ``n ≥ 2`` seeds the
interval is Student's ``t``:

    mean(d) ± t_{0.975, n−1} · sd(d) / √n

``d_k`` holds both sources of noise at once -- the training seed and the finite test sample
-- so the interval needs no model of either (a bootstrap over three seeds would have ten
distinct redraws). Verdicts, for a claim that ``a`` beats ``b``:

- *reproduces in miniature*: the interval lies above 0;
- *does not*: it lies below 0 (the opposite holds);
- *cannot tell*: it holds 0.

A claim that ``a`` is as good as ``b`` (FUDOKI against AR) is non-inferiority with margin
``m = 0.05``: reproduces when the interval lies above ``−m``, does not when it lies below
``−m``, cannot tell otherwise. Runs trained for different step counts are not compared.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kineflow.apps.reproduce.config import ReproduceConfig
from kineflow.eval.stats import t_interval

__all__ = ["CLAIMS", "MARGIN", "Claim", "claim_verdicts", "claims_table"]

#: The non-inferiority margin of the "as good as" claims.
MARGIN = 0.05
#: Where each compared score is in a run's evaluation summary.
METRICS: dict[str, tuple[str, str]] = {
    "generation": ("t2i_test", "overall"),
    "strict scene": ("t2i_test", "strict"),
    "VQA": ("vqa", "accuracy"),
}


@dataclass(frozen=True)
class Claim:
    """``a`` against ``b`` on ``metric``: ``kind`` ``"beats"`` (``a − b > 0``) or
    ``"not_worse"`` (``a − b > −MARGIN``); ``source`` says whose claim it is."""

    what: str
    a: str
    b: str
    metric: str
    kind: str
    source: str


CLAIMS: tuple[Claim, ...] = (
    Claim("FUDOKI generates as well as AR", "fudoki_from_ar", "ar", "generation", "not_worse",
          "FUDOKI"),
    Claim("FUDOKI understands as well as AR", "fudoki_from_ar", "ar", "VQA", "not_worse",
          "FUDOKI"),
    Claim("AR initialisation helps generation", "fudoki_from_ar", "fudoki", "generation",
          "beats", "FUDOKI"),
    Claim("AR initialisation helps understanding", "fudoki_from_ar", "fudoki", "VQA", "beats",
          "FUDOKI"),
    Claim("the metric path beats the masked path (generation)", "fudoki", "masked",
          "generation", "beats", "FUDOKI"),
    Claim("random order beats raster order (generation)", "unifluid", "unifluid_raster",
          "generation", "beats", "UniFluid"),
    Claim("a larger λ helps understanding", "unifluid_lambda5", "unifluid", "VQA", "beats",
          "UniFluid"),
    Claim("a larger λ costs generation", "unifluid", "unifluid_lambda5", "generation",
          "beats", "UniFluid"),
    Claim("unified beats generation-only (generation)", "unifluid", "unifluid_gen_only",
          "generation", "beats", "UniFluid"),
    Claim("unified beats understanding-only (understanding)", "unifluid", "unifluid_und_only",
          "VQA", "beats", "UniFluid"),
)  # fmt: skip


def _score(run: dict[str, Any], metric: str) -> float:
    block, key = METRICS[metric]
    return float(run[block][key])


def _verdict(kind: str, low: float, high: float) -> str:
    floor = -MARGIN if kind == "not_worse" else 0.0
    if low > floor:
        return "reproduces in miniature"
    if high < floor:
        return "does not"
    return "cannot tell"


def _steps(config: ReproduceConfig, run: str) -> int:
    return config.steps if run in config.runs else config.unifluid_run_steps(run)


def claim_verdicts(
    evals: dict[str, dict[str, Any]], config: ReproduceConfig
) -> list[dict[str, Any]]:
    """Every claim of :data:`CLAIMS` whose two runs the config trains (with the same step
    count), read on ``evals`` (folder name -> evaluation summary) over ``config.seeds``:
    per-seed scores and differences, the mean difference, its interval and the verdict."""
    trained = {*config.runs, *(config.unifluid_runs if config.unifluid else {})}
    out = []
    for claim in CLAIMS:
        if not {claim.a, claim.b} <= trained or _steps(config, claim.a) != _steps(config, claim.b):
            continue
        pairs = list(zip(config.seeded(claim.a), config.seeded(claim.b), strict=True))
        a = [_score(evals[x], claim.metric) for x, _ in pairs]
        b = [_score(evals[y], claim.metric) for _, y in pairs]
        mean, low, high = t_interval([x - y for x, y in zip(a, b, strict=True)])
        out.append({
            "what": claim.what, "source": claim.source, "a": claim.a, "b": claim.b,
            "metric": claim.metric, "kind": claim.kind, "seeds": list(config.seeds),
            "a_scores": a, "b_scores": b, "difference": mean, "interval": [low, high],
            "verdict": _verdict(claim.kind, low, high),
        })  # fmt: skip
    return out


def claims_table(claims: list[dict[str, Any]]) -> list[str]:
    """Markdown rows: the claim, the runs, per-seed means, ``a − b`` with its interval and the
    verdict."""
    lines = ["| claim (paper) | a − b | score | a (mean of seeds) | b | a − b [95 % t] | verdict |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for c in claims:
        n = len(c["seeds"])
        rule = f" (margin {MARGIN:g})" if c["kind"] == "not_worse" else ""
        lines.append(
            f"| {c['what']} ({c['source']}) | `{c['a']}` − `{c['b']}` | {c['metric']} | "
            f"{sum(c['a_scores']) / n:.3f} | {sum(c['b_scores']) / n:.3f} | "
            f"{c['difference']:+.3f} [{c['interval'][0]:+.3f}, {c['interval'][1]:+.3f}] | "
            f"{c['verdict']}{rule} |"
        )
    return lines
