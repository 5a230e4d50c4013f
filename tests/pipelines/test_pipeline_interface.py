"""One pipeline interface: the registry ``kineflow.load`` dispatches by, the families'
capabilities and option refusals, and the one SamplingOptions the sampling calls share."""

from __future__ import annotations

import ast
import inspect
import json
import shutil
from pathlib import Path

import pytest

import kineflow
from kineflow.pipelines import (
    FudokiPipeline,
    Pipeline,
    SamplingOptions,
    UnifluidPipeline,
    pipeline_class,
)
from kineflow.pipelines import base as base_module
from kineflow.pipelines.base import pipeline_for_config, registered

CHECKPOINTS = Path(__file__).resolve().parents[2] / "checkpoints"


@pytest.mark.parametrize(
    ("name", "cls", "tasks"),
    [
        (
            "fudoki-shapes",
            FudokiPipeline,
            {"text_to_image", "answer", "generate_text", "infill", "infill_text"},
        ),
        (
            "unifluid-shapes",
            UnifluidPipeline,
            {"text_to_image", "answer", "caption", "edit", "infill"},
        ),
    ],
)
def test_shipped_checkpoints_load_through_the_registry(name, cls, tasks) -> None:
    folder = CHECKPOINTS / name
    kind = json.loads((folder / "config.json").read_text())["kineflow_type"]
    assert pipeline_class(kind) is cls and cls.kineflow_type == kind
    pipe = kineflow.load(folder)
    assert type(pipe) is cls and isinstance(pipe, Pipeline)
    assert pipe.capabilities == tasks
    assert all(pipe.supports(t) for t in tasks)
    assert not pipe.supports("fly")


def test_display_names_and_registration_order() -> None:
    assert [c.display_name for c in registered()] == ["FUDOKI", "UniFluid"]


def test_unknown_kineflow_type_is_a_clear_error(tmp_path) -> None:
    with pytest.raises(ValueError, match=r"no pipeline is registered for kineflow_type 'vae' "
                       r"\(known: 'fudoki', 'unifluid'\)"):  # fmt: skip
        pipeline_class("vae")
    folder = shutil.copytree(CHECKPOINTS / "unifluid-shapes", tmp_path / "m")
    config = json.loads((folder / "config.json").read_text())
    config["kineflow_type"] = "vae"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"describes 'vae'; kineflow.load reads kineflow FUDOKI "
                       r"and UniFluid folders \(kineflow_type 'fudoki' / 'unifluid'\) and Janus "
                       r"/ FUDOKI releases \(model_type 'multi_modality'\)"):  # fmt: skip
        kineflow.load(folder)


def test_foreign_formats_dispatch_by_model_type() -> None:
    assert pipeline_for_config({"model_type": "multi_modality"}, "c.json") is FudokiPipeline
    # A kineflow_type wins over a model_type.
    config = {"kineflow_type": "unifluid", "model_type": "multi_modality"}
    assert pipeline_for_config(config, "c.json") is UnifluidPipeline


def test_the_registry_has_no_isinstance_fallbacks() -> None:
    source = inspect.getsource(base_module)
    assert "isinstance(" not in source and "hasattr(" not in source

    # A subclass is not found through its parent: the registry is a plain lookup by type.
    class Sub(UnifluidPipeline):
        pass

    assert pipeline_class("unifluid") is UnifluidPipeline
    # Callers ask the interface, not the class.
    root = Path(__file__).resolve().parents[2] / "kineflow"
    for path in ("cli/sampling.py", "apps/showcase.py", "eval/benchmark.py"):
        text = (root / path).read_text()
        assert "isinstance(pipe" not in text and "hasattr(pipe" not in text, path


def test_a_second_class_for_a_type_is_refused() -> None:
    class Impostor(UnifluidPipeline):
        kineflow_type = "fudoki"

    with pytest.raises(ValueError, match="'fudoki' is already registered"):
        base_module.register(Impostor)
    assert pipeline_class("fudoki") is FudokiPipeline


@pytest.mark.parametrize(
    ("cls", "task", "given", "message"),
    [
        (UnifluidPipeline, "text_to_image", {"steps": 3},
         "steps is not supported by UniFluid models (they take one backbone step per token)"),
        (UnifluidPipeline, "answer", {"return_trajectory": True},
         "return_trajectory is not supported by UniFluid models (they decode left to right)"),
        (FudokiPipeline, "answer", {"beams": 2},
         "beams is not supported by FUDOKI models (they answer with the flow solver)"),
    ],
)  # fmt: skip
def test_an_option_a_family_ignores_is_refused(cls, task, given, message) -> None:
    with pytest.raises(ValueError) as info:
        cls.refuse_options(task, given)
    assert str(info.value) == message
    flag = "--" + next(iter(given)).replace("_", "-")
    with pytest.raises(ValueError, match=f"^{flag} is not supported"):
        cls.refuse_options(task, given, {name: flag for name in given})


def test_unset_and_used_options_pass() -> None:
    UnifluidPipeline.refuse_options("text_to_image", {"steps": None, "top_k": None})
    UnifluidPipeline.refuse_options("text_to_image", {"return_trajectory": True})
    FudokiPipeline.refuse_options("text_to_image", {"steps": 3, "top_k": 2, "beams": None})
    assert UnifluidPipeline.select_options("answer", {"beams": 2, "seed": 0}) == {"beams": 2}
    with pytest.raises(ValueError, match="FUDOKI models have no 'edit' task"):
        FudokiPipeline.refuse_options("edit", {})


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("steps", 0, "steps must be >= 1, got 0"),
        ("cfg_scale", float("nan"), "cfg_scale must be >= 0 and finite"),
        ("temperature", -1.0, "temperature must be >= 0"),
        ("top_k", 2.5, "top_k must be an integer"),
        ("seed", -1, "seed must be between"),
    ],
)
def test_sampling_options_name_the_bad_field(field, value, message) -> None:
    with pytest.raises(ValueError, match=message):
        SamplingOptions(**{field: value})


def test_sampling_options_are_normalised_once() -> None:
    options = SamplingOptions(steps=4, cfg_scale=2, temperature=0)
    assert options.cfg_scale == 2.0 and isinstance(options.cfg_scale, float)
    with pytest.raises(AttributeError):
        options.steps = 5  # type: ignore[misc]


def test_fudoki_solve_takes_options_not_positionals() -> None:
    params = inspect.signature(FudokiPipeline._solve).parameters
    positional = [p for p in params.values() if p.kind is p.POSITIONAL_OR_KEYWORD]
    assert [p.name for p in positional] == ["self", "layout", "head"]
    assert "options" in params and params["options"].kind is params["options"].KEYWORD_ONLY


def test_fudoki_from_pretrained_does_not_import_loading() -> None:
    from kineflow.pipelines import fudoki, fudoki_checkpoints

    for module in (fudoki, fudoki_checkpoints):  # lazy imports inside functions included
        tree = ast.parse(inspect.getsource(module))
        imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        assert "kineflow.pipelines.loading" not in imported, module.__name__
    with pytest.raises(ValueError, match="holds a UniFluid checkpoint, not a FUDOKI one"):
        FudokiPipeline.from_pretrained(CHECKPOINTS / "unifluid-shapes")
