"""ShapesWorld scorers: generation (GenEval-style), VQA, captioning and editing.

Every scorer takes the benchmark items and a model's outputs and returns a JSON-ready report:

- **t2i**: one or more pictures per prompt; a picture passes when the detector's scene
  satisfies every requirement of its prompt (:func:`kineflow.data.shapes.prompts.check`).
  ``accuracy`` is GenEval's overall score, the mean of the per-category accuracies;
  ``image_accuracy`` is the plain pass rate over all pictures.
- **vqa**: exact match of the normalised one-word answer (lowercase, no final period), per
  question type and overall.
- **caption**: a caption is right when :func:`~kineflow.data.shapes.language.parse_caption`
  reads back exactly the picture's scene; ``parse_rate`` says how many followed the grammar.
- **edit**: an edited picture is right when the detector reads exactly the target scene.

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
from kineflow.data.shapes.prompts import CATEGORIES, Prompt, check
from kineflow.data.shapes.scene import Scene


def _accuracy(passed: Sequence[bool]) -> float:
    return float(np.mean(passed)) if len(passed) else float("nan")


def _group(items: list[dict], key: str, order: Sequence[str] | None = None) -> dict:
    groups: dict[str, list[bool]] = defaultdict(list)
    for item in items:
        groups[item[key]].append(item["passed"])
    names = [k for k in order if k in groups] if order else sorted(groups)
    return {k: {"accuracy": _accuracy(groups[k]), "n": len(groups[k])} for k in names}


def score_t2i(prompts: Sequence[Prompt], scenes: Mapping[str, Sequence[Scene]]) -> dict:
    """GenEval-style report. ``scenes[prompt.id]``: the detected scene of each picture made
    for that prompt; every prompt needs at least one picture."""
    missing = [p.id for p in prompts if not scenes.get(p.id)]
    if missing:
        raise ValueError(f"no pictures for {len(missing)} prompt(s), e.g. {missing[:3]}")
    items = []
    for p in prompts:
        for k, scene in enumerate(scenes[p.id]):
            failures = check(p, scene)
            items.append(
                {
                    "id": p.id,
                    "sample": k,
                    "category": p.category,
                    "prompt": p.text,
                    "passed": not failures,
                    "failures": failures,
                    "detected": scene.key(),
                }
            )
    by_category = _group(items, "category", CATEGORIES)
    return {
        "task": "t2i",
        "accuracy": float(np.mean([v["accuracy"] for v in by_category.values()])),
        "image_accuracy": _accuracy([i["passed"] for i in items]),
        "by_category": by_category,
        "prompts": len(prompts),
        "n": len(items),
        "items": items,
    }


def score_vqa(items: Sequence[Mapping[str, str]], predictions: Mapping[str, str]) -> dict:
    """VQA report. ``items``: dicts with ``id``, ``question``, ``answer`` and ``type``;
    ``predictions[id]``: the model's answer. Every item needs a prediction."""
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
        "by_type": _group(rows, "type"),
        "n": len(rows),
        "items": rows,
    }


def score_captions(scenes: Mapping[str, Scene], predictions: Mapping[str, str]) -> dict:
    """Captioning report. ``scenes[id]``: the picture's scene; ``predictions[id]``: caption."""
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
        "parse_rate": _accuracy([r["parsed"] is not None for r in rows]),
        "n": len(rows),
        "items": rows,
    }


def score_edits(
    targets: Mapping[str, Scene], detected: Mapping[str, Scene], kinds: Mapping[str, str]
) -> dict:
    """Editing report. ``targets[id]``: the scene the instruction asks for; ``detected[id]``:
    the scene read from the edited picture; ``kinds[id]``: the edit kind."""
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
    return {
        "task": "edit",
        "accuracy": _accuracy([r["passed"] for r in rows]),
        "by_kind": _group(rows, "kind"),
        "n": len(rows),
        "items": rows,
    }


def _check_ids(items: Sequence[Mapping[str, str]], predictions: Mapping[str, object]) -> None:
    missing = [it["id"] for it in items if it["id"] not in predictions]
    if missing:
        raise ValueError(f"no output for {len(missing)} item(s), e.g. {missing[:3]}")


def format_report(report: dict) -> str:
    """A few human-readable lines: overall accuracy and each group."""
    lines = [f"{report['task']}: accuracy {report['accuracy']:.3f} over {report['n']} items"]
    for key in ("by_category", "by_type", "by_kind"):
        for name, g in report.get(key, {}).items():
            lines.append(f"  {name:<14} {g['accuracy']:.3f}  (n={g['n']})")
    if "parse_rate" in report:
        lines.append(f"  parse rate     {report['parse_rate']:.3f}")
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
