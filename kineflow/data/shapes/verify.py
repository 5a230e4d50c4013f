"""Verification questions: ``"does the picture show exactly: {prompt}?"`` → yes / no.

A training-only VQA type (``data.question_weights: {verify: w}``) that teaches a unified model
to check a picture against a GenEval-style prompt under the strict-scene rule
(:func:`~kineflow.data.shapes.prompts.strict_check`: the prompt's objects, nothing missing,
nothing extra). It is the question the self-judge of best-of-N asks
(:mod:`kineflow.pipelines.judge`): a model that answers it well can keep, of N pictures it drew,
one that shows the prompt.

One item (:func:`verify_question`): a category uniformly, a prompt of the split uniformly
within it (as the prompt half of the ``t2i`` items), then a scene:

- with probability 1/2 a scene of exactly the prompt's objects
  (:func:`~kineflow.data.shapes.prompts.scene_for_prompt`);
- otherwise a near miss, the ways generated pictures go wrong: that exact scene after one edit
  (an object added, removed, recoloured or moved:
  :func:`~kineflow.data.shapes.language.sample_edit`), or an exact scene of another prompt of
  the same category (another shape, count, colour or relation), each half the time, redrawn
  until it fails the prompt.

The answer is always ``strict_check`` of the final scene, never the branch's intention, so no
label can be wrong, and every scene stays in the split.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from kineflow.data.shapes.language import (
    POSITION_TYPES,
    QA,
    QUESTION_TYPES,
    VERIFY_QUESTION,
    VERIFY_TYPE,
    question_weight,
    sample_edit,
)
from kineflow.data.shapes.prompts import Prompt, scene_for_prompt, strict_check
from kineflow.data.shapes.scene import Scene, ShapesWorld

__all__ = ["verify_question", "verify_share"]

#: Draws of a near miss before the item keeps what it has (its answer is still the truth).
_TRIES = 20


def verify_share(weights: Mapping[str, float] | None) -> float:
    """The share of VQA rows that are verification questions under ``question_weights``::

        P(verify) = w_verify / (w_verify + Σ_{benchmark types} w_t + Σ_{position types} w_t)

    with unnamed benchmark types weighing 1 and unnamed position types 0, i.e. ``w_verify``
    counted against the other weights as if the scene supported every type. 0 without a
    ``verify`` weight."""
    if not weights or weights.get(VERIFY_TYPE, 0) <= 0:
        return 0.0
    w = question_weight(weights, VERIFY_TYPE)
    return w / (w + sum(question_weight(weights, t) for t in (*QUESTION_TYPES, *POSITION_TYPES)))


def verify_question(
    world: ShapesWorld,
    rng: np.random.Generator,
    split: str,
    prompts: Mapping[str, Sequence[Prompt]],
) -> tuple[Scene, QA]:
    """One verification item of ``split`` (module docstring): its scene and its question,
    answered ``"yes"`` exactly when the scene passes the prompt under the strict-scene rule.
    ``prompts``: the split's prompts by category
    (:func:`kineflow.data.shapes.dataset.split_prompts`)."""
    cats = list(prompts)
    category = cats[rng.integers(len(cats))]
    prompt = prompts[category][rng.integers(len(prompts[category]))]
    scene = scene_for_prompt(prompt, world, rng, split)
    if rng.random() < 0.5:
        others = [p for p in prompts[category] if p.id != prompt.id]
        for _ in range(_TRIES):
            if others and rng.random() < 0.5:
                other = others[rng.integers(len(others))]
                miss = scene_for_prompt(other, world, rng, split)
            else:
                edit = sample_edit(scene, rng, lambda s: world.split_of(s) == split)
                miss = None if edit is None else edit.target
            if miss is not None and strict_check(prompt, miss):
                scene = miss
                break
    answer = "no" if strict_check(prompt, scene) else "yes"
    return scene, QA(VERIFY_QUESTION.format(prompt=prompt.text), answer, VERIFY_TYPE)
