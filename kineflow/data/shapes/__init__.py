"""ShapesWorld: a procedural image-text world and its GenEval-style benchmark (docs/design.md §3).

``scene`` (objects, splits, held-out compositions, the seeded sampler) -> ``render`` (pictures)
-> ``language`` (captions, questions, edits) and ``prompts`` (GenEval-style specs) ->
``dataset`` (streamed items of every task) -> ``materialise`` (a manifest on disk). The
detector and scorers that judge model outputs live in :mod:`kineflow.eval`.
"""

from kineflow.data.shapes.dataset import SHAPES_TASKS, ShapesWorldDataset, corpus, draw_item
from kineflow.data.shapes.language import caption, parse_caption, sample_edit, sample_question
from kineflow.data.shapes.materialise import materialise
from kineflow.data.shapes.prompts import CATEGORIES, Prompt, Requirement, check, prompt_set
from kineflow.data.shapes.render import render, render_image
from kineflow.data.shapes.scene import HeldOut, Obj, Scene, ShapesWorld, WorldConfig

__all__ = [
    "CATEGORIES",
    "SHAPES_TASKS",
    "HeldOut",
    "Obj",
    "Prompt",
    "Requirement",
    "Scene",
    "ShapesWorld",
    "ShapesWorldDataset",
    "WorldConfig",
    "caption",
    "check",
    "corpus",
    "draw_item",
    "materialise",
    "parse_caption",
    "prompt_set",
    "render",
    "render_image",
    "sample_edit",
    "sample_question",
]
