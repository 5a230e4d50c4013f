"""lmms-eval's side of the plug-in that needs no lmms-eval: its requests read, and the
entry point that registers the model class.

lmms-eval finds external models through the ``lmms_eval.models`` entry-point group: each entry
is a ``ModelManifest`` (or a callable returning one) naming the class by import path.
kineflow's ``pyproject.toml`` declares ``kineflow = "kineflow.eval.plugins.lmms_requests:
manifest"``, so ``lmms-eval --model kineflow`` finds
:class:`kineflow.eval.plugins.lmms_model.KineflowLmms` once kineflow is installed.

A "simple" lmms-eval model receives ``generate_until`` requests whose ``args`` are
``(context, gen_kwargs, doc_to_visual, doc_id, task, split)``; the pictures are
``doc_to_visual(task_dict[task][split][doc_id])``, a list (empty for text-only items).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from kineflow.eval.plugins.answerer import Answerer, cut_at

__all__ = ["MODEL_CLASS", "MODEL_ID", "answer_requests", "manifest"]

#: The name lmms-eval knows the model by (``--model kineflow``).
MODEL_ID = "kineflow"
MODEL_CLASS = "kineflow.eval.plugins.lmms_model.KineflowLmms"


def manifest() -> Any:
    """The ``ModelManifest`` lmms-eval's entry-point loader reads (a simple model)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_ID, simple_class_path=MODEL_CLASS)


def answer_requests(
    answerer: Answerer, requests: Sequence[Any], task_dict: Mapping[str, Any]
) -> list[str]:
    """The answers to lmms-eval ``generate_until`` requests, in order: each request's first
    picture (None when it has none) and its context, answered by ``answerer`` and cut at the
    first of ``gen_kwargs["until"]`` (a string or a list). Other ``gen_kwargs``
    (``max_new_tokens``, ``temperature``) are not used: the answer length and decoding are the
    answerer's settings (FUDOKI answers greedily in ``answer_tokens`` slots).

    Raises:
        ValueError: a request whose ``args`` are not the six fields above.
    """
    items, stops = [], []
    for n, request in enumerate(requests):
        args = request.args
        if len(args) != 6:
            raise ValueError(
                f"request {n}: generate_until args must be (context, gen_kwargs, "
                f"doc_to_visual, doc_id, task, split), got {len(args)} fields"
            )
        context, gen_kwargs, doc_to_visual, doc_id, task, split = args
        visuals = doc_to_visual(task_dict[task][split][doc_id]) if doc_to_visual else []
        visuals = [v for v in (visuals or []) if v is not None]
        until = (gen_kwargs or {}).get("until") or []
        stops.append([until] if isinstance(until, str) else list(until))
        items.append((visuals[0] if visuals else None, context))
    return [cut_at(text, stop) for text, stop in zip(answerer.answer(items), stops, strict=True)]
