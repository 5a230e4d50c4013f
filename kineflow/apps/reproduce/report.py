"""The reproduction's results: ``results.json``, the ``results.md`` tables (scores, UniFluid
ablations, self-correction, figures) and the targets the flagship model is read against.

A score with a 95 % bootstrap interval (``<key>_ci`` beside it in the run's summary,
:func:`kineflow.eval.benchmark.summary`) is shown as ``0.580 [0.52, 0.64]``; a summary from
before the intervals shows the score alone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kineflow.apps.reproduce.claims import claims_table
from kineflow.apps.reproduce.config import ReproduceConfig
from kineflow.data.shapes.prompts import CATEGORIES
from kineflow.io import atomic_write, atomic_write_json

__all__ = ["score_table", "target_checks", "write_results"]


def _fmt(value: float | None, ci: list[float] | None = None) -> str:
    if value is None or value != value:  # missing, or NaN (an empty group)
        return "–"
    return f"{value:.3f}" if not ci else f"{value:.3f} [{ci[0]:.2f}, {ci[1]:.2f}]"


def _score(block: dict[str, Any] | None, key: str, group: str | None = None) -> str:
    """``block[key]`` (or ``block[group][key]``) with its interval where the summary has one."""
    if block is None:
        return "–"
    if group is None:
        return _fmt(block.get(key), block.get(f"{key}_ci"))
    return _fmt(block.get(group, {}).get(key), block.get(f"{group}_ci", {}).get(key))


def score_table(runs: dict[str, Any], train_seconds: dict[str, float] | None = None) -> list[str]:
    """Markdown rows of the scores table, one run per row: generation (GenEval-style overall,
    strict-scene overall, per category, held-out), VQA, captioning, editing and, with
    ``train_seconds``, training minutes. Every score with its interval where it has one."""
    head = ["model", "gen overall", "strict", *CATEGORIES, "held-out", "VQA",
            "caption exact", "caption parse", "edit"]  # fmt: skip
    head += ["train min"] if train_seconds is not None else []
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for name, r in runs.items():
        t2i = r["t2i_test"]
        row = [f"`{name}`", _score(t2i, "overall"), _score(t2i, "strict")]
        row += [_score(t2i, c, "by_category") for c in CATEGORIES]
        row += [_score(r["t2i_heldout"], "overall"), _score(r["vqa"], "accuracy"),
                _score(r["caption"], "accuracy"), _score(r["caption"], "parse_rate"),
                _score(r.get("edit"), "accuracy")]  # fmt: skip
        if train_seconds is not None:
            row.append(f"{train_seconds.get(name, 0) / 60:.1f}")
        lines.append("| " + " | ".join(row) + " |")
    return lines


def write_results(results: dict[str, Any], out: Path) -> Path:
    """``out/results.json`` (everything) and ``out/results.md`` (tables, targets, figures)."""
    atomic_write_json(out / "results.json", results)
    runs = results["runs"]
    steps = results["config"]["steps"]
    seeds = results["config"].get("seeds", [0])  # results from before seeds have one
    discrete = {n: r for n, r in runs.items() if r.get("family") != "unifluid"}
    unifluid = {n: r for n, r in runs.items() if r.get("family") == "unifluid"}
    lines = ["# ShapesWorld reproduction", *_recipe_lines(results.get("recipes", {}))]
    if discrete:
        lines += [
        "",
        f"Every discrete model: the same network ({_params(discrete)} parameters with the "
        f"frozen VQ and SigLIP), {steps} optimizer steps of the same batches (equal training "
        "compute; `fudoki_from_ar` = the AR run's weights at N/2, then N/2 DFM steps). "
        "Generation is scored by the ShapesWorld detector (GenEval-style rules); sampling: "
        f"{results['config']['eval']['steps']} Euler steps for the flow models, one step per "
        f"token for AR, CFG w = {results['config']['eval']['cfg_scale']}.",
        ]  # fmt: skip
    if unifluid:
        uf_steps = results["config"].get("unifluid_steps") or steps
        lines += ["", f"UniFluid runs: the same backbone size on continuous KL-VAE tokens with a "
                  f"per-token diffusion head ({_params(unifluid)} parameters with the frozen "
                  f"KL-VAE and SigLIP), {uf_steps} optimizer steps (unless the ablation table "
                  "says otherwise) of batch-mixed generation, "
                  "editing and understanding; one backbone step per token, random order unless "
                  "stated, CFG rising to the same w. Editing: the edited test picture must read "
                  "back as the target scene."]  # fmt: skip
    if runs:
        lines += ["", *score_table(runs, results["train_seconds"])]
    if unifluid:
        lines += ["", "## UniFluid ablations", "",
                  "L = L_image + λ·L_text; the paper: larger λ trades generation for "
                  "understanding, and random order beats raster order for generation.", "",
                  "| run | λ | order | steps | gen overall | held-out | VQA | caption exact "
                  "| edit |", "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        config = ReproduceConfig.from_dict(results["config"])
        for name, r in sorted(
            unifluid.items(),
            key=lambda kv: (kv[1]["order"], config.unifluid_run_steps(kv[0]),
                            kv[1]["text_loss_weight"]),
        ):  # fmt: skip
            cells = [f"`{name}`", f"{r['text_loss_weight']:g}", r["order"],
                     str(config.unifluid_run_steps(name)),
                     _score(r["t2i_test"], "overall"), _score(r["t2i_heldout"], "overall"),
                     _score(r["vqa"], "accuracy"), _score(r["caption"], "accuracy"),
                     _score(r.get("edit"), "accuracy")]  # fmt: skip
            lines.append("| " + " | ".join(cells) + " |")
    if results.get("claims"):
        lines += ["", "## Claims", "",
                  f"Each claim on {len(seeds)} training seeds ({', '.join(map(str, seeds))}): "
                  "`a − b` per seed (same initialisation seed and per-sample draws), the mean "
                  "difference and its 95 % Student t interval over the seeds "
                  "(`kineflow/apps/reproduce/claims.py` states the rule).", "",
                  *claims_table(results["claims"])]  # fmt: skip
    minutes = results["wall_seconds"] / 60
    lines += ["", f"Wall time of the whole reproduction: {minutes:.1f} min."]
    for name, targets in results["targets"].items():
        ships = name == results["flagship"] and "fudoki-shapes" not in results.get("recipes", {})
        shipped = " (the shipped model)" if ships else ""
        lines += ["", f"## Targets: `{name}`{shipped}", ""]
        for t in targets:
            verdict = "met" if t["met"] else f"missed by {t['gap']:.3f}"
            lines.append(f"- {t['what']}: **{_fmt(t['value'])}** (target {t['target']}): {verdict}")
    if discrete:
        lines += ["", "## Self-correction", "",
                  "A token is *set* when it first leaves its source value (mask or uniform "
                  "draw); *revised* when it changes again later. A picture is *corrected* when a "
                  "frame in the second half of its trajectory fails its prompt and the final "
                  "picture passes.",
                  "", "| model | tokens revised after being set | set to a non-final value | "
                  "changes per token | pictures corrected | pictures broken |",
                  "|---|---|---|---|---|---|"]  # fmt: skip
        for name, r in discrete.items():
            tok = r["self_correction"]["tokens"]
            pics = r["self_correction"].get("pictures")
            cells = [f"`{name}`", _fmt(tok["revised_fraction"]),
                     _fmt(tok["set_value_wrong_fraction"]), f"{tok['mean_changes_per_token']:.2f}",
                     f"{pics['corrected']}/{pics['samples']}" if pics else "–",
                     f"{pics['broken']}/{pics['samples']}" if pics else "–"]  # fmt: skip
            lines.append("| " + " | ".join(cells) + " |")
        example = next((
            (n, r["self_correction"]["pictures"]["examples"][0]) for n, r in discrete.items()
            if r["self_correction"].get("pictures", {}).get("examples")), None)  # fmt: skip
        if example:
            n, ex = example
            lines += ["", f"Example (`{n}`): \"{ex['prompt']}\": frame {ex['failed_frame']} of "
                      f"{ex['frames']} failed ({'; '.join(ex['failures'])}); the final picture "
                      f"passes. ![corrected](figures/{n}_corrected.gif) "
                      f"![strip](figures/{n}_corrected.png)"]  # fmt: skip
    lines += ["", "## Samples and refinement", ""]
    if len(seeds) > 1:  # one seed's figures (every seed's are in figures/)
        lines += [f"Seed {seeds[0]}'s runs.", ""]
    for name in [n for n in runs if len(seeds) == 1 or n.endswith(f"_s{seeds[0]}")]:
        lines += [f"### `{name}`", "", f"![samples](figures/{name}_samples.png)", "",
                  f"![refine](figures/{name}_refine_0.gif) ![refine](figures/{name}_refine_1.gif)"
                  f" ![strip](figures/{name}_refine_0.png)", ""]  # fmt: skip
        if name in unifluid:
            lines += ["Token by token above (cells not generated yet are the zero latent); "
                      "editing (instruction, the model's edit, the target):", "",
                      f"![edits](figures/{name}_edits.png)", ""]  # fmt: skip
    for name, recipe in results.get("recipes", {}).items():
        final = recipe["final"]
        lines += [f"### `{name}` (stage `{final}`)", "", f"![samples](figures/{final}_samples.png)",
                  "", f"![refine](figures/{final}_refine_0.gif)", ""]  # fmt: skip
    lines += ["## Training curves", ""]
    if discrete:
        lines += ["![loss](figures/loss.png)", ""]
    if unifluid:
        lines += ["![UniFluid loss](figures/loss_unifluid.png)", ""]
    path = out / "results.md"
    atomic_write(path, lambda t: t.write_text("\n".join(lines) + "\n"))
    return path


def _recipe_lines(recipes: dict[str, Any]) -> list[str]:
    """The shipped models' section: each recipe's last stage scored, and its stages."""
    if not recipes:
        return []
    lines = ["", "## The shipped models, by their recipes", "",
             "Each model trains stage after stage, every stage from the model of the one "
             "before (`kineflow/apps/reproduce/recipes.py`); its last stage is scored below "
             "and shipped under the model's name. Training minutes: the whole recipe.", "",
             *score_table({n: r["eval"] for n, r in recipes.items()},
                          {n: r["train_seconds"] for n, r in recipes.items()}), ""]  # fmt: skip
    for name, recipe in recipes.items():
        steps = [f"`{s['name']}` ({(s['train_seconds'] or 0) / 60:.1f} min)"
                 for s in recipe["stages"]]  # fmt: skip
        lines.append(f"- `{name}`: " + " → ".join(steps))
    return lines


def _params(runs: dict[str, Any]) -> str:
    counts = sorted({f"{r['parameters'] / 1e6:.2f} M" for r in runs.values()})
    return "/".join(counts)


def target_checks(runs: dict[str, Any], name: str) -> list[dict[str, Any]]:
    f = runs[name]
    gen, vqa = f["t2i_test"]["overall"], f["vqa"]["accuracy"]
    targets = [
        {"what": "generation overall", "value": gen, "target": ">= 0.70", "met": gen >= 0.70,
         "gap": 0.70 - gen},
        {"what": "VQA accuracy", "value": vqa, "target": ">= 0.85", "met": vqa >= 0.85,
         "gap": 0.85 - vqa},
    ]  # fmt: skip
    if "ar" in runs:
        a = runs["ar"]
        for what, mine, theirs in (
            ("generation: FUDOKI − AR", gen, a["t2i_test"]["overall"]),
            ("VQA: FUDOKI − AR", vqa, a["vqa"]["accuracy"]),
        ):
            d = mine - theirs
            targets.append({"what": what, "value": d, "target": ">= -0.05", "met": d >= -0.05,
                            "gap": -0.05 - d})  # fmt: skip
    return targets
