"""ShapesWorld scorers: generation (GenEval-style), VQA, captioning and editing.

Every scorer takes the benchmark items and a model's outputs and returns a JSON-ready report:

- **t2i**: one or more pictures per prompt; a picture passes when the detector's scene
  satisfies every requirement of its prompt (:func:`kineflow.data.shapes.prompts.check`).
  ``accuracy`` is GenEval's overall score, the mean of the per-category accuracies;
  ``image_accuracy`` is the plain pass rate over all pictures. Beside it the *strict-scene*
  rule (:func:`~kineflow.data.shapes.prompts.strict_check`): the detected objects are exactly
  the prompt's objects, none extra (``strict_accuracy``, ``strict_image_accuracy``, per
  category too).
- **vqa**: exact match of the normalised one-word answer (lowercase, no final period), per
  question type and overall.
- **caption**: a caption is right when :func:`~kineflow.data.shapes.language.parse_caption`
  reads back exactly the picture's scene; ``parse_rate`` says how many followed the grammar.
- **edit**: an edited picture is right when the detector reads exactly the target scene. Given
  the source scenes, a failure is split in two: ``applied`` (the objects the edit adds are
  there and the ones it takes away are gone) and ``kept`` (every object the edit leaves alone
  is still there, unchanged); ``unchanged`` counts pictures that read back as the source.

Every accuracy comes with its percentile-bootstrap 95 % interval (``<name>_ci: [low, high]``,
:mod:`kineflow.eval.stats`, seeded): t2i redraws prompts (a prompt's pictures stay together)
within each category; VQA, caption and edit redraw items.

Each report lists every item with its verdict (and why it failed), so failures can be looked at;
:func:`contact_sheet` draws the pictures with green (pass) or red (fail) frames.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from kineflow.data.shapes.language import normalise_answer, parse_caption
from kineflow.data.shapes.prompts import CATEGORIES, Prompt, check, strict_check
from kineflow.data.shapes.scene import Scene
from kineflow.eval.stats import bootstrap_ci, ci_pair, stratified_ci

#: What :func:`score_edits` judges each edit on beside ``passed``, given its source scene.
EDIT_JUDGEMENTS = ("applied", "kept", "unchanged")


def _accuracy(passed: Sequence[bool]) -> float:
    return float(np.mean(passed)) if len(passed) else float("nan")


def _ci(passed: Sequence[bool], seed: int) -> list[float]:
    return ci_pair(bootstrap_ci(passed, seed=seed))


def _group(items: list[dict], key: str, order: Sequence[str] | None = None, seed: int = 0) -> dict:
    groups: dict[str, list[bool]] = defaultdict(list)
    for item in items:
        groups[item[key]].append(item["passed"])
    names = [k for k in order if k in groups] if order else sorted(groups)
    return {
        k: {
            "accuracy": _accuracy(groups[k]),
            "accuracy_ci": _ci(groups[k], seed),
            "n": len(groups[k]),
        }
        for k in names
    }


def score_t2i(
    prompts: Sequence[Prompt], scenes: Mapping[str, Sequence[Scene]], seed: int = 0
) -> dict:
    """GenEval-style and strict-scene report. ``scenes[prompt.id]``: the detected scene of
    each picture made for that prompt; every prompt needs at least one picture. Intervals
    redraw prompts (all pictures of a prompt together) within each category, ``seed`` fixed:
    a category's accuracy is ``Σ passed / Σ pictures`` over its redrawn prompts, the overall
    one the mean over categories.

    ``surplus_objects``: the mean over pictures of ``len(scene) − Σ count``, the objects drawn
    beyond (negative: short of) the ones the prompt names — the failure the GenEval-style rule
    lets pass and the strict one does not; per category too, with intervals over prompts."""
    missing = [p.id for p in prompts if not scenes.get(p.id)]
    if missing:
        raise ValueError(f"no pictures for {len(missing)} prompt(s), e.g. {missing[:3]}")
    items = []
    for p in prompts:
        for k, scene in enumerate(scenes[p.id]):
            failures = check(p, scene)
            strict = strict_check(p, scene)
            items.append(
                {
                    "id": p.id,
                    "sample": k,
                    "category": p.category,
                    "prompt": p.text,
                    "passed": not failures,
                    "strict": not strict,
                    "failures": failures,
                    "strict_failures": strict[len(failures) :],
                    "detected": scene.key(),
                    "surplus": len(scene) - sum(r.count for r in p.requirements),
                }
            )
    # Per prompt: its pass counts and picture count (the bootstrap unit).
    units: dict[str, dict[str, list]] = {c: defaultdict(list) for c in CATEGORIES}
    for p in prompts:
        rows = [i for i in items if i["id"] == p.id]
        units[p.category]["passed"].append(sum(i["passed"] for i in rows))
        units[p.category]["strict"].append(sum(i["strict"] for i in rows))
        units[p.category]["pictures"].append(len(rows))
        units[p.category]["surplus"].append(np.mean([i["surplus"] for i in rows]))
    cats = [c for c in CATEGORIES if units[c]["pictures"]]
    report: dict = {"task": "t2i"}
    by_category: dict[str, dict] = {c: {} for c in cats}
    weights = [np.asarray(units[c]["pictures"], float) for c in cats]  # pictures per prompt
    for rule, key in (("passed", "accuracy"), ("strict", "strict_accuracy")):
        ratios = [np.divide(units[c][rule], units[c]["pictures"]) for c in cats]
        mean, low, high = stratified_ci(ratios, seed=seed, weights=weights)
        report[key], report[f"{key}_ci"] = mean, [low, high]
        all_x, all_w = np.concatenate(ratios), np.concatenate(weights)
        img = bootstrap_ci(all_x, seed=seed, weights=all_w)
        report[f"{key.replace('accuracy', 'image_accuracy')}"] = img[0]
        report[f"{key.replace('accuracy', 'image_accuracy')}_ci"] = ci_pair(img)
        for c, x, w in zip(cats, ratios, weights, strict=True):
            one = bootstrap_ci(x, seed=seed, weights=w)
            by_category[c] |= {key: one[0], f"{key}_ci": ci_pair(one), "n": int(w.sum())}
    # Per-prompt mean surplus, weighted by pictures: the mean over pictures.
    surplus = [np.asarray(units[c]["surplus"], float) for c in cats]
    all_s = bootstrap_ci(np.concatenate(surplus), seed=seed, weights=np.concatenate(weights))
    report["surplus_objects"], report["surplus_objects_ci"] = all_s[0], ci_pair(all_s)
    for c, x, w in zip(cats, surplus, weights, strict=True):
        one = bootstrap_ci(x, seed=seed, weights=w)
        by_category[c] |= {"surplus_objects": one[0], "surplus_objects_ci": ci_pair(one)}
    return report | {
        "by_category": by_category,
        "prompts": len(prompts),
        "n": len(items),
        "items": items,
    }


def score_vqa(
    items: Sequence[Mapping[str, str]], predictions: Mapping[str, str], seed: int = 0
) -> dict:
    """VQA report. ``items``: dicts with ``id``, ``question``, ``answer`` and ``type``;
    ``predictions[id]``: the model's answer. Every item needs a prediction. Intervals redraw
    questions (``seed`` fixed)."""
    _check_ids(items, predictions)
    rows = []
    for it in items:
        pred = predictions[it["id"]]
        ok = normalise_answer(pred) == normalise_answer(it["answer"])
        rows.append(
            {
                "id": it["id"],
                "type": it.get("type", ""),
                "question": it["question"],
                "answer": it["answer"],
                "prediction": pred,
                "passed": ok,
            }
        )
    return {
        "task": "vqa",
        "accuracy": _accuracy([r["passed"] for r in rows]),
        "accuracy_ci": _ci([r["passed"] for r in rows], seed),
        "by_type": _group(rows, "type", seed=seed),
        "n": len(rows),
        "items": rows,
    }


def score_captions(
    scenes: Mapping[str, Scene], predictions: Mapping[str, str], seed: int = 0
) -> dict:
    """Captioning report. ``scenes[id]``: the picture's scene; ``predictions[id]``: caption.
    Intervals redraw pictures (``seed`` fixed)."""
    _check_ids([{"id": i} for i in scenes], predictions)
    rows = []
    for item_id, scene in scenes.items():
        parsed = parse_caption(predictions[item_id])
        rows.append(
            {
                "id": item_id,
                "caption": predictions[item_id],
                "scene": scene.key(),
                "parsed": None if parsed is None else parsed.key(),
                "passed": parsed == scene,
            }
        )
    return {
        "task": "caption",
        "accuracy": _accuracy([r["passed"] for r in rows]),
        "accuracy_ci": _ci([r["passed"] for r in rows], seed),
        "parse_rate": _accuracy([r["parsed"] is not None for r in rows]),
        "parse_rate_ci": _ci([r["parsed"] is not None for r in rows], seed),
        "n": len(rows),
        "items": rows,
    }


def score_edits(
    targets: Mapping[str, Scene],
    detected: Mapping[str, Scene],
    kinds: Mapping[str, str],
    seed: int = 0,
    sources: Mapping[str, Scene] | None = None,
) -> dict:
    """Editing report. ``targets[id]``: the scene the instruction asks for; ``detected[id]``:
    the scene read from the edited picture; ``kinds[id]``: the edit kind. Intervals redraw
    edits (``seed`` fixed).

    With ``sources[id]`` (the scene before the edit), with S, T, D the object sets of source,
    target and detected scene, each edit is also judged on

    - ``applied``: ``T − S ⊆ D`` and ``(S − T) ∩ D = ∅`` — what the instruction changes is done;
    - ``kept``: ``S ∩ T ⊆ D`` — every object it leaves alone is still drawn, unchanged;
    - ``unchanged``: ``D = S`` — the picture came back as it went in;

    so ``passed`` (``D = T``) is ``applied ∧ kept`` with nothing extra drawn. Each has its rate,
    interval and per-kind rates (``<name>``, ``<name>_ci``, ``<name>_by_kind``)."""
    _check_ids([{"id": i} for i in targets], detected)
    rows = [
        {
            "id": i,
            "kind": kinds.get(i, ""),
            "target": t.key(),
            "detected": detected[i].key(),
            "passed": detected[i] == t,
        }
        for i, t in targets.items()
    ]
    report = {
        "task": "edit",
        "accuracy": _accuracy([r["passed"] for r in rows]),
        "accuracy_ci": _ci([r["passed"] for r in rows], seed),
        "by_kind": _group(rows, "kind", seed=seed),
        "n": len(rows),
        "items": rows,
    }
    if sources is not None:
        _check_ids([{"id": i} for i in targets], sources)
        for row in rows:
            S, T = set(sources[row["id"]]), set(targets[row["id"]])
            D = set(detected[row["id"]])
            row["source"] = sources[row["id"]].key()
            row["applied"] = (T - S) <= D and not (S - T) & D
            row["kept"] = (S & T) <= D
            row["unchanged"] = D == S
        for name in EDIT_JUDGEMENTS:
            flags = [r[name] for r in rows]
            report[name], report[f"{name}_ci"] = _accuracy(flags), _ci(flags, seed)
            by_kind = _group([{"kind": r["kind"], "passed": r[name]} for r in rows], "kind",
                             seed=seed)  # fmt: skip
            report[f"{name}_by_kind"] = {k: v["accuracy"] for k, v in by_kind.items()}
    return report


def _check_ids(items: Sequence[Mapping[str, str]], predictions: Mapping[str, object]) -> None:
    missing = [it["id"] for it in items if it["id"] not in predictions]
    if missing:
        raise ValueError(f"no output for {len(missing)} item(s), e.g. {missing[:3]}")


def fmt_ci(value: float, ci: Sequence[float] | None = None) -> str:
    """``0.580 [0.52, 0.64]``: a score and its interval (the score alone without one)."""
    if value is None or value != value:
        return "–"
    return f"{value:.3f}" if not ci else f"{value:.3f} [{ci[0]:.2f}, {ci[1]:.2f}]"


def format_report(report: dict) -> str:
    """A few human-readable lines: overall accuracy and each group, with 95 % intervals."""
    lines = [f"{report['task']}: accuracy {report['accuracy']:.3f} over {report['n']} items"]
    if report.get("accuracy_ci"):
        low, high = report["accuracy_ci"]
        lines[0] += f" (95 % interval [{low:.2f}, {high:.2f}])"
    if "strict_accuracy" in report:
        strict = fmt_ci(report["strict_accuracy"], report.get("strict_accuracy_ci"))
        lines.append(f"  strict-scene   {strict}")
    for key in ("by_category", "by_type", "by_kind"):
        for name, g in report.get(key, {}).items():
            row = f"  {name:<14} {fmt_ci(g['accuracy'], g.get('accuracy_ci'))}"
            if "strict_accuracy" in g:
                row += f"  strict {fmt_ci(g['strict_accuracy'], g.get('strict_accuracy_ci'))}"
            lines.append(row + f"  (n={g['n']})")
    if "parse_rate" in report:
        lines.append(
            f"  parse rate     {fmt_ci(report['parse_rate'], report.get('parse_rate_ci'))}"
        )
    return "\n".join(lines)


# -- contact sheet ------------------------------------------------------------------------------
PASS_COLOUR = (30, 160, 60)
FAIL_COLOUR = (210, 30, 30)
NEUTRAL_COLOUR = (170, 170, 170)


def contact_sheet(
    pictures: Sequence[np.ndarray],
    passed: Sequence[bool | None],
    labels: Sequence[str] | None = None,
    columns: int = 12,
    scale: int = 3,
) -> Image.Image:
    """A grid of pictures (uint8 ``[S, S, 3]``), each upscaled ``scale`` times (nearest) in a
    3-pixel frame, green when it passed, red when it failed and grey when it is not judged
    (None: e.g. the source and target beside an edit), with an optional label below."""
    if len(pictures) != len(passed):
        raise ValueError(f"{len(pictures)} pictures but {len(passed)} verdicts")
    if not len(pictures):
        raise ValueError("no pictures for the contact sheet")
    font = ImageFont.load_default()
    side = pictures[0].shape[0] * scale
    frame, label_h = 3, 12 if labels else 0
    cell_w, cell_h = side + 2 * frame + 4, side + 2 * frame + label_h + 4
    rows = -(-len(pictures) // columns)
    sheet = Image.new("RGB", (columns * cell_w, rows * cell_h), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for i, (pic, ok) in enumerate(zip(pictures, passed, strict=True)):
        x, y = (i % columns) * cell_w + 2, (i // columns) * cell_h + 2
        draw.rectangle(
            (x, y, x + side + 2 * frame - 1, y + side + 2 * frame - 1),
            fill=NEUTRAL_COLOUR if ok is None else PASS_COLOUR if ok else FAIL_COLOUR,
        )
        tile = Image.fromarray(pic).resize((side, side), Image.Resampling.NEAREST)
        sheet.paste(tile, (x + frame, y + frame))
        if labels:
            text = labels[i]
            max_chars = max(1, (side + 2 * frame) // 6)
            text = text if len(text) <= max_chars else text[: max_chars - 1] + "…"
            draw.text((x, y + side + 2 * frame), text, fill=(0, 0, 0), font=font)
    return sheet


def write_report(report: dict, out: str | Path, sheet: Image.Image | None = None) -> dict:
    """Write ``report_<task>.json`` (and ``contact_sheet_<task>.png``) into ``out``; returns
    the paths written."""
    import json

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"report": out / f"report_{report['task']}.json"}
    tmp = paths["report"].with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=1) + "\n")
    tmp.replace(paths["report"])
    if sheet is not None:
        paths["contact_sheet"] = out / f"contact_sheet_{report['task']}.png"
        sheet.save(paths["contact_sheet"])
    return {k: str(v) for k, v in paths.items()}
