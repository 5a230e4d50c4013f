"""The lmms-eval model against the real package (skipped where lmms-eval is not installed;
``tests/eval/test_plugins.py`` covers the same code without it): the entry point's manifest
accepted by lmms-eval's own registry, the class built from a ``--model_args`` string, and
real ``Instance`` requests answered as the pipeline answers them."""

from __future__ import annotations

import numpy as np
import pytest

import kineflow
from kineflow.data.shapes.render import render_image
from kineflow.data.shapes.scene import ShapesWorld

pytest.importorskip("lmms_eval")
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from lmms_eval.models import MODEL_REGISTRY_V2, get_model

from kineflow.eval.plugins.lmms_requests import MODEL_ID, manifest

FUDOKI = "checkpoints/fudoki-shapes"


def test_registered_built_from_model_args_and_answering_instances():
    MODEL_REGISTRY_V2.register_manifest(manifest(), overwrite=True)
    cls = get_model(MODEL_ID)
    assert issubclass(cls, lmms) and cls.is_simple
    model = cls.create_from_arg_string(
        f"pretrained={FUDOKI},steps=3,answer_tokens=None,seed=2", {"batch_size": 1, "device": None}
    )
    picture = render_image(ShapesWorld().sample(np.random.default_rng(1), "test"))
    model.task_dict = {"shapes": {"test": [{"image": picture}]}}
    question = "How many shapes are there?"
    requests = [
        Instance("generate_until", (question, {"until": ["\n"]}, lambda d: [d["image"]], 0,
                                    "shapes", "test"), idx=0,
                 metadata={"task": "shapes", "doc_id": 0, "repeats": 1}),
    ]  # fmt: skip
    expected = kineflow.load(FUDOKI).answer(picture, question, steps=3, seed=2).texts[0]
    assert model.generate_until(requests) == [expected.split("\n")[0]]
    with pytest.raises(NotImplementedError, match="loglikelihood"):
        model.loglikelihood(requests)
