"""Scoring ShapesWorld outputs on disk: the layouts ``kineflow eval shapes`` reads.

=========  ============================================================  =======================
task       model output (``--samples``)                                  benchmark items
=========  ============================================================  =======================
t2i        folder: ``<prompt id>.png`` or ``<prompt id>/<k>.png``, e.g.   ``prompts.jsonl`` or
           ``colors/a_red_circle/0.png`` (ids contain one ``/``)          the built-in prompt set
vqa        JSONL: ``{"id": ..., "answer": ...}``                         a materialised manifest
caption    JSONL: ``{"id": ..., "caption": ...}``                        (``meta`` holds scenes)
edit       folder: ``<item id>.png``                                     or redrawn from the ids
=========  ============================================================  =======================

Without a benchmark manifest, understanding and edit items are redrawn from their ids
(``<split>-<task>-<index>``) with the default world, which gives the very items that
``kineflow data shapes`` writes. :func:`write_reference` writes ground-truth outputs in these
layouts (pictures rendered from the scenes, gold answers and captions), which score 1.0: the
sanity check of the whole chain.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

from kineflow.data.manifest import read_manifest
from kineflow.data.shapes.dataset import draw_item
from kineflow.data.shapes.prompts import Prompt, prompt_set, scene_for_prompt
from kineflow.data.shapes.render import render
from kineflow.data.shapes.scene import SPLITS, Scene, ShapesWorld, WorldConfig
from kineflow.eval.detector import as_uint8_images, detect
from kineflow.eval.scores import (
    contact_sheet,
    score_captions,
    score_edits,
    score_t2i,
    score_vqa,
    write_report,
)
from kineflow.io import read_jsonl

_ITEM_ID = re.compile(r"^(train|val|test|heldout)-(t2i|caption|vqa|edit)-(\d+)$")
MAX_SHEET = 240  # pictures on a contact sheet (failures first)


# -- benchmark items ----------------------------------------------------------------------------
def load_prompts(path: str | Path | None = None, split: str = "test") -> list[Prompt]:
    """Prompts from a ``prompts.jsonl`` file, or the built-in set of ``split``."""
    if path is None:
        return prompt_set(split)
    prompts = []
    for line_no, line in enumerate(Path(path).read_text().splitlines(), 1):
        if line.strip():
            try:
                prompts.append(Prompt.from_dict(json.loads(line)))
            except ValueError as err:  # JSONDecodeError is a ValueError
                raise ValueError(f"{path}:{line_no}: {err}") from None
    if not prompts:
        raise ValueError(f"{path}: no prompts")
    return prompts


def load_items(task: str, ids: list[str], bench: str | Path | None = None) -> list[dict]:
    """Benchmark items (``id``, texts, ``scene``, ``kind``, ``target_scene``) for ``ids``:
    from a materialised manifest's ``meta``, or redrawn from the ids themselves."""
    if bench is not None:
        records = {r.id: r for r in read_manifest(bench, task=_manifest_task(task))}
        items = []
        for i in ids:
            if i not in records:
                raise ValueError(f"{bench}: no item with id {i!r}")
            r = records[i]
            if not r.meta or "scene" not in r.meta:
                raise ValueError(f"{bench}:{r.line}: meta.scene is missing; not a ShapesWorld item")
            items.append({"id": i, **r.texts(), **r.meta})
        return _with_type(items)
    world = ShapesWorld()
    items = []
    for i in ids:
        m = _ITEM_ID.match(i)
        if m is None or m.group(2) != task:
            raise ValueError(
                f"cannot redraw item {i!r}: ids look like 'test-{task}-000012'; pass --bench "
                "with the benchmark manifest for other ids"
            )
        item = draw_item(world, task, m.group(1), int(m.group(3)))
        items.append(
            {
                "id": i,
                **item.texts,
                "scene": item.scene_key,
                "kind": item.kind,
                "target_scene": item.target_key,
            }
        )
    return _with_type(items)


def _with_type(items: list[dict]) -> list[dict]:
    # A VQA item's kind is its question type, the grouping of the VQA report.
    return [{**it, "type": it.get("kind", "")} for it in items]


def _manifest_task(task: str) -> str:
    return "caption" if task == "t2i" else task


def read_jsonl_outputs(path: str | Path, field: str) -> dict[str, str]:
    """``{id: text}`` from a JSONL file of ``{"id": ..., field: ...}`` lines."""
    out: dict[str, str] = {}
    for line_no, obj in read_jsonl(path):
        if not isinstance(obj, dict) or set(obj) != {"id", field}:
            raise ValueError(f"{path}:{line_no}: expected keys 'id' and {field!r}, got {obj!r}")
        if not isinstance(obj[field], str):
            raise ValueError(f"{path}:{line_no}: {field!r} must be a string")
        if obj["id"] in out:
            raise ValueError(f"{path}:{line_no}: duplicate id {obj['id']!r}")
        out[obj["id"]] = obj[field]
    if not out:
        raise ValueError(f"{path}: no outputs")
    return out


def _read_picture(path: Path) -> np.ndarray:
    try:
        with warnings.catch_warnings():
            # PIL only warns from 89M pixels up to twice that, then decodes: refuse it too.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                picture = np.asarray(im.convert("RGB"))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ValueError(f"{path}: the picture is too large ({err})") from None
    except OSError as err:
        raise ValueError(f"{path}: cannot read the picture ({err})") from None
    try:
        return as_uint8_images(picture)[0]
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None


def t2i_pictures(samples: str | Path, prompts: list[Prompt]) -> dict[str, list[Path]]:
    """The picture files of each prompt (see the module docstring for the layout)."""
    root = Path(samples)
    if not root.is_dir():
        raise ValueError(f"{root}: not a folder of generated pictures")
    found: dict[str, list[Path]] = {}
    missing = []
    for p in prompts:
        files = sorted((root / p.id).glob("*.png"), key=lambda f: (len(f.stem), f.stem))
        if (root / f"{p.id}.png").is_file():
            files.insert(0, root / f"{p.id}.png")
        if not files:
            missing.append(p.id)
        found[p.id] = files
    if missing:
        raise ValueError(
            f"{root}: no pictures for {len(missing)} of {len(prompts)} prompts, e.g. "
            f"{missing[0]}.png or {missing[0]}/0.png"
        )
    return found


# -- evaluation of folders / files --------------------------------------------------------------
def evaluate(
    task: str,
    samples: str | Path,
    out: str | Path,
    prompts: str | Path | None = None,
    bench: str | Path | None = None,
    split: str = "test",
) -> tuple[dict, dict]:
    """Score ``samples`` for ``task``; writes the JSON report and contact sheet into ``out``.
    Returns ``(report, paths)``."""
    if task == "t2i":
        plist = load_prompts(prompts, split)
        files = t2i_pictures(samples, plist)
        flat = [_read_picture(f) for p in plist for f in files[p.id]]
        # One detector call for all pictures: its cost is mostly per call, not per picture.
        detected = iter(detect(np.stack(flat)))
        scenes = {p.id: [next(detected) for _ in files[p.id]] for p in plist}
        report = score_t2i(plist, scenes)
        labels = [it["prompt"] for it in report["items"]]
    elif task in ("vqa", "caption"):
        outputs = read_jsonl_outputs(samples, "answer" if task == "vqa" else "caption")
        items = load_items(task, list(outputs), bench)
        if task == "vqa":
            report = score_vqa(items, outputs)
            labels = [f"{it['answer']}|{outputs[it['id']]}" for it in items]
        else:
            report = score_captions(
                {it["id"]: Scene.from_key(it["scene"]) for it in items}, outputs
            )
            labels = [it["id"] for it in items]
        size = WorldConfig().image_size
        flat = [render(Scene.from_key(it["scene"]), size) for it in items]
    elif task == "edit":
        root = Path(samples)
        ids = sorted(f.stem for f in root.glob("*.png")) if root.is_dir() else []
        if not ids:
            raise ValueError(f"{root}: expected a folder of edited pictures <item id>.png")
        items = load_items("edit", ids, bench)
        flat = [_read_picture(root / f"{it['id']}.png") for it in items]
        detected = dict(zip(ids, detect(np.stack(flat)), strict=True))
        targets = {it["id"]: Scene.from_key(it["target_scene"]) for it in items}
        sources = {it["id"]: Scene.from_key(it["scene"]) for it in items}
        report = score_edits(targets, detected, {it["id"]: it["kind"] for it in items},
                             sources=sources)  # fmt: skip
        labels = [it["instruction"] for it in items]
    else:
        raise ValueError(f"unknown task {task!r}; expected t2i, vqa, caption or edit")
    verdicts = [it["passed"] for it in report["items"]]
    order = sorted(range(len(flat)), key=lambda i: verdicts[i])[:MAX_SHEET]  # failures first
    sheet = contact_sheet(
        [flat[i] for i in order], [verdicts[i] for i in order], [labels[i] for i in order]
    )
    return report, write_report(report, out, sheet)


# -- ground-truth outputs -----------------------------------------------------------------------
def write_reference(
    task: str,
    out: str | Path,
    split: str = "test",
    n: int = 200,
    samples_per_prompt: int = 4,
    seed: int = 0,
) -> Path:
    """Ground-truth outputs of ``task`` in the layout :func:`evaluate` reads: for t2i, renders
    of scenes satisfying each prompt of ``split``; for vqa / caption, a JSONL of the gold texts
    of the first ``n`` items; for edit, renders of the first ``n`` target scenes."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}")
    world = ShapesWorld(WorldConfig(seed=seed))
    size = world.config.image_size
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if task == "t2i":
        rng = np.random.default_rng(seed)
        for p in prompt_set(split):
            (out / p.id).mkdir(parents=True, exist_ok=True)
            for k in range(samples_per_prompt):
                scene = scene_for_prompt(p, world, rng, split)
                Image.fromarray(render(scene, size)).save(out / p.id / f"{k}.png")
        return out
    items = [draw_item(world, task, split, i) for i in range(n)]
    if task in ("vqa", "caption"):
        field = "answer" if task == "vqa" else "caption"
        path = out / f"{task}_reference.jsonl"
        path.write_text(
            "".join(json.dumps({"id": it.id, field: it.texts[field]}) + "\n" for it in items)
        )
        return path
    if task == "edit":
        for it in items:
            Image.fromarray(render(Scene.from_key(it.target_key), size)).save(out / f"{it.id}.png")
        return out
    raise ValueError(f"unknown task {task!r}; expected t2i, vqa, caption or edit")
