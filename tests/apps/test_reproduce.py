"""`kineflow reproduce` end to end at toy size, plus its pieces: self-correction statistics
and the training-curve plot."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from kineflow.apps.reproduce import ReproduceConfig
from kineflow.cli import main
from kineflow.data.shapes.prompts import prompt_set, scene_for_prompt
from kineflow.data.shapes.render import render_image
from kineflow.data.shapes.scene import ShapesWorld
from kineflow.eval.plot import plot_metrics, read_metrics
from kineflow.eval.self_correction import picture_corrections, token_revisions

VISION = {"image_size": 32, "patch_size": 16, "hidden_size": 16, "intermediate_size": 32,
          "num_hidden_layers": 1, "num_attention_heads": 2}  # fmt: skip


def write_stage_configs(root: Path) -> dict[str, str]:
    def tokenizer(model: dict) -> dict:
        return {"model": {"image_size": 32, "channels": 8, "num_res_blocks": 1,
                          "norm_groups": 4, **model},
                "data": {"source": "shapes", "split": "train", "image_size": 32},
                "optim": {"steps": 2, "batch_size": 4, "lr": 1e-3, "warmup": 1},
                "out": "unused", "eval_images": 8}  # fmt: skip

    vq = tokenizer({"type": "vq", "channel_mult": [1, 2, 2, 2], "z_channels": 8,
                    "codebook_size": 32, "codebook_dim": 4})  # fmt: skip
    siglip = {
        "model": {**VISION, "embed_dim": 16, "text_width": 16, "text_layers": 1,
                  "text_heads": 2, "text_max_len": 48},
        "optim": {"steps": 2, "batch_size": 8, "lr": 1e-3, "warmup": 1},
        "out": "unused", "eval_pairs": 8,
    }  # fmt: skip
    model = {
        "model": {
            "language": {"hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 1,
                         "num_attention_heads": 4, "max_position_embeddings": 256},
            "vision": {**VISION, "select_layer": -1},
            "aligner_hidden": 32, "gen_aligner_hidden": 32, "gen_head_hidden": 24,
        },
        "vq": "set by reproduce", "text_tokenizer": "set by reproduce", "out": "unused",
        "data": {"vqa_answer_tokens": 2, "caption_tokens": 40, "text_budget": 64},
        "optim": {"batch_size": 4, "lr": 1e-3, "warmup": 1},
        "log_every": 1, "ckpt_every": 1,
    }  # fmt: skip
    kl = tokenizer({"type": "kl", "channel_mult": [1, 2, 2], "z_channels": 4, "patch_size": 2})
    unifluid = {
        "model": {
            "language": {"hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 1,
                         "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8,
                         "max_position_embeddings": 256, "hidden_act": "gelu_tanh",
                         "norm_offset": True, "embed_scale": True, "sandwich_norms": True},
            "vision": {**VISION, "select_layer": -1},
            "head": {"width": 16, "depth": 1, "steps": 20, "sample_steps": 2, "draws": 1},
        },
        "vae": "set by reproduce", "text_tokenizer": "set by reproduce", "out": "unused",
        "data": {"vqa_answer_tokens": 2, "caption_tokens": 40, "text_budget": 64},
        "optim": {"batch_size": 4, "lr": 1e-3, "warmup": 1},
        "log_every": 1, "ckpt_every": 1,
    }  # fmt: skip
    paths = {}
    stages = (("vq", vq), ("siglip", siglip), ("model", model), ("kl", kl),
              ("unifluid", unifluid))  # fmt: skip
    for name, data in stages:
        paths[name] = str(root / f"{name}.yaml")
        Path(paths[name]).write_text(yaml.safe_dump(data))
    return paths


#: The evaluation at toy size: every task, a handful of items each.
TINY_EVAL = {"steps": 2, "max_prompts_per_category": 1, "images_per_prompt": 1, "vqa_items": 4,
             "caption_items": 2, "edit_items": 3, "trajectories": 2,
             "grid_prompts_per_category": 1, "grid_samples": 1}  # fmt: skip


def run_reproduce(tmp_path: Path, config: dict) -> tuple[Path, Path, list[str]]:
    """``kineflow reproduce --ship`` on ``config`` (written to tmp_path): its out folder, its
    ship folder and the command's arguments (to run it again)."""
    (tmp_path / "reproduce.yaml").write_text(yaml.safe_dump(config))
    ship = tmp_path / "shipped"
    args = ["reproduce", "--config", str(tmp_path / "reproduce.yaml"), "--ship", str(ship)]
    assert main(args) == 0
    return Path(config["out"]), ship, args


@pytest.mark.slow  # every stage of the reproduction, end to end
def test_reproduce_end_to_end(tmp_path, capsys) -> None:
    stages = write_stage_configs(tmp_path)
    config = {
        **stages,
        "out": str(tmp_path / "run"),
        "text_corpus_items": 100,
        "steps": 2,
        "jobs": 2,
        "eval": TINY_EVAL,
        "unifluid_runs": {"unifluid": {"steps": 4}, "unifluid_raster": {
            "order": "raster", "text_loss_weight": 0.5}},
        "unifluid_steps": 3,
    }  # fmt: skip
    run, ship, args = run_reproduce(tmp_path, config)
    results = json.loads((run / "results.json").read_text())
    assert set(results["runs"]) == {"ar", "fudoki", "fudoki_from_ar", "masked", "unifluid",
                                    "unifluid_raster"}  # fmt: skip
    discrete = {n: r for n, r in results["runs"].items() if not n.startswith("unifluid")}
    # UniFluid: the shared evaluation plus editing, its knobs, GIFs and an editing sheet.
    for name in ("unifluid", "unifluid_raster"):
        r = results["runs"][name]
        assert r["family"] == "unifluid" and r["edit"]["n"] == 3 and r["vqa"]["n"] == 4
        assert (run / "figures" / f"{name}_refine_0.gif").is_file()
        assert (run / "figures" / f"{name}_edits.png").is_file()
    steps = {n: yaml.safe_load((run / "configs" / f"{n}.yaml").read_text())["optim"]["steps"]
             for n in ("unifluid", "unifluid_raster")}  # fmt: skip
    assert steps == {"unifluid": 4, "unifluid_raster": 3}  # its own steps, or unifluid_steps
    assert results["runs"]["unifluid_raster"]["order"] == "raster"
    assert results["runs"]["unifluid_raster"]["text_loss_weight"] == 0.5
    assert results["runs"]["unifluid"]["order"] == "random"
    assert "kl" in results["stages"] and (run / "figures" / "loss_unifluid.png").is_file()
    for name, r in discrete.items():
        assert r["t2i_test"]["n"] > 0 and r["vqa"]["n"] == 4 and r["caption"]["n"] == 2
        assert (run / "figures" / f"{name}_samples.png").is_file()
        assert (run / "figures" / f"{name}_refine_0.gif").is_file()
        revisions = r["self_correction"]["tokens"]["revised_fraction"]
        if name in ("ar", "masked"):
            assert revisions == 0  # a revealed / decoded token never moves again
    assert results["runs"]["ar"]["path"] == "ar" and results["runs"]["masked"]["path"] == "masked"
    # Equal compute: the AR -> DFM run starts from the AR weights at N/2 and trains N/2 steps.
    from_ar = yaml.safe_load((run / "configs" / "fudoki_from_ar.yaml").read_text())
    assert from_ar["init_from"].endswith("model_step1") and from_ar["optim"]["steps"] == 1
    assert (run / "ar" / "model_step1" / "config.json").is_file()
    timings = json.loads((run / "timings.json").read_text())
    assert set(timings["jobs"]) >= {"vq", "siglip", "ar", "eval_ar"} and timings["calls"]
    assert set(results["targets"]) == {"fudoki", "fudoki_from_ar"}
    md = (run / "results.md").read_text()
    assert "| `fudoki` |" in md and "Targets" in md and "Self-correction" in md
    assert "UniFluid ablations" in md and "| `unifluid_raster` | 0.5 | raster | 3 |" in md
    assert (run / "figures" / "loss.png").is_file()
    assert sum(v["bytes"] for v in results["shipped"].values()) > 0
    for name in ("fudoki-shapes", "vq-shapes", "siglip-shapes", "unifluid-shapes"):
        assert (ship / name / "model.safetensors").is_file()
    from safetensors import safe_open

    import kineflow

    assert kineflow.load(ship / "fudoki-shapes").config.path == "metric"
    # The shipped UniFluid is float16 on disk, float32 in memory, and samples as the original.
    with safe_open(ship / "unifluid-shapes" / "model.safetensors", "pt") as f:
        assert f.get_tensor("pos_in").dtype == torch.float16
    shipped, original = (
        kineflow.load(ship / "unifluid-shapes"),
        kineflow.load(run / "unifluid" / "model"),
    )
    assert shipped.model.pos_in.dtype == torch.float32
    a, b = (p.text_to_image(["a red circle"], seed=0).codes for p in (shipped, original))
    torch.testing.assert_close(a, b, atol=0.05, rtol=0.05)
    # A second call finds every stage done and only rewrites the results.
    capsys.readouterr()
    assert main(args) == 0
    assert "start" not in capsys.readouterr().out
    for name in ("vq", "siglip", "ar", "eval_ar", "eval_masked"):
        assert (run / "logs" / f"{name}.log").is_file()
    cats = results["runs"]["fudoki"]["t2i_test"]["by_category"]
    assert set(cats) == {"single_object", "two_object", "counting", "colors", "position",
                         "color_attr"}  # fmt: skip

    # The claims study: two seeds of each compared run on the encoders trained above.
    claims = {
        **config, "out": str(tmp_path / "claims"), "seeds": [0, 1], "steps": 2,
        "runs": ["ar", "fudoki", "fudoki_from_ar"],
        "prebuilt": {"text_tokenizer": str(run / "text_tokenizer"), "vq": str(run / "vq/model"),
                     "siglip": str(run / "siglip/vision"), "kl": str(run / "kl/model")},
        "unifluid_runs": {"unifluid": {}, "unifluid_gen_only": {
            "understanding_ratio": 0.0, "edit_ratio": 0.0}},
    }  # fmt: skip
    (tmp_path / "claims.yaml").write_text(yaml.safe_dump(claims))
    assert main(["reproduce", "--config", str(tmp_path / "claims.yaml")]) == 0
    study = tmp_path / "claims"
    results = json.loads((study / "results.json").read_text())
    assert set(results["runs"]) == {f"{r}_s{k}" for r in ("ar", "fudoki", "fudoki_from_ar",
                                    "unifluid", "unifluid_gen_only") for k in (0, 1)}  # fmt: skip
    assert not (study / "vq").exists() and not (study / "text_tokenizer").exists()
    seeded = yaml.safe_load((study / "configs" / "fudoki_s1.yaml").read_text())
    assert seeded["optim"]["seed"] == 1 and seeded["data"]["seed"] == 1
    assert seeded["vq"] == str(run / "vq/model")
    gen_only = yaml.safe_load((study / "configs" / "unifluid_gen_only_s0.yaml").read_text())
    assert gen_only["data"]["understanding_ratio"] == 0.0
    verdicts = {c["what"]: c for c in results["claims"]}
    assert set(verdicts) == {"FUDOKI generates as well as AR", "FUDOKI understands as well as AR",
                             "AR initialisation helps generation",
                             "AR initialisation helps understanding",
                             "unified beats generation-only (generation)"}  # fmt: skip
    helps = verdicts["AR initialisation helps generation"]
    assert helps["a_scores"] == [results["runs"][f"fudoki_from_ar_s{k}"]["t2i_test"]["overall"]
                                 for k in (0, 1)]  # fmt: skip
    low, high = helps["interval"]
    assert low <= helps["difference"] <= high
    md = (study / "results.md").read_text()
    assert "## Claims" in md and results["targets"] == {}
    assert "### `fudoki_s0`" in md and "### `fudoki_s1`" not in md  # one seed's figures
    assert (study / "figures" / "fudoki_s1_samples.png").is_file()


def test_reproduce_config_errors(tmp_path) -> None:
    with pytest.raises(ValueError, match="runs must be"):
        ReproduceConfig(runs=["gpt"])
    with pytest.raises(ValueError, match="add 'ar'"):
        ReproduceConfig(runs=["fudoki_from_ar"])
    with pytest.raises(ValueError, match="cannot be changed per run"):
        ReproduceConfig(unifluid="u.yaml", unifluid_runs={"unifluid": {"head": {}}})
    with pytest.raises(ValueError, match="not a free run name"):
        ReproduceConfig(unifluid="u.yaml", unifluid_runs={"masked": {}})
    with pytest.raises(ValueError, match=r"unifluid_runs.u.steps must be a positive"):
        ReproduceConfig(unifluid="u.yaml", unifluid_runs={"u": {"steps": 0}})
    with pytest.raises(ValueError, match="unifluid_steps"):
        ReproduceConfig(unifluid="u.yaml", unifluid_steps=0)
    with pytest.raises(ValueError, match=r"unknown config key\(s\) \['eval.stepz'\]"):
        ReproduceConfig.from_dict({"eval": {"stepz": 3}})
    assert main(["reproduce", "--config", str(tmp_path / "nope.yaml")]) == 2


# -- self-correction statistics -----------------------------------------------------------------
def test_token_revisions_on_a_handmade_trajectory() -> None:
    # Rows: time; columns: four tokens of one sample.
    states = torch.tensor([
        [5, 1, 4, 9],
        [5, 2, 4, 9],
        [7, 3, 4, 8],
        [7, 3, 4, 9],
    ])[:, None, :]  # fmt: skip
    stats = token_revisions(states)
    # token 0: set once (5 -> 7); token 1: set to 2, revised to 3; token 2: never set;
    # token 3: set to 8, revised back to 9 (its start value).
    assert stats["revised_fraction"] == 0.5
    assert stats["set_value_wrong_fraction"] == 0.5
    assert stats["never_set_fraction"] == 0.25
    assert stats["mean_changes_per_token"] == (1 + 2 + 0 + 2) / 4
    assert stats["settled_fraction"] == [0.5, 0.5, 0.75, 1.0]
    with pytest.raises(ValueError, match="states must be"):
        token_revisions(states[:1])


def test_picture_corrections_counts_a_fixed_mistake() -> None:
    prompts = prompt_set("test")[:2]
    rng = np.random.default_rng(0)
    good = [render_image(scene_for_prompt(p, ShapesWorld(), rng)) for p in prompts]
    blank = Image.new("RGB", (32, 32), (255, 255, 255))
    frames = [[blank, blank, blank, good[0]], [blank, good[1], blank, blank]]
    out = picture_corrections(prompts, frames)
    assert (out["corrected"], out["broken"], out["samples"]) == (1, 1, 2)
    ex = out["examples"][0]
    assert ex["sample"] == 0 and ex["failed_frame"] == 2 and ex["failures"]


# -- training curves -----------------------------------------------------------------------------
def test_plot_metrics(tmp_path) -> None:
    for name, scale in (("a", 1.0), ("b", 2.0)):
        (tmp_path / name).mkdir()
        rows = [{"step": s, "loss": scale * 5 / s, "lr": 1e-3} for s in range(1, 50)]
        (tmp_path / name / "metrics.jsonl").write_text("\n".join(map(json.dumps, rows)))
    runs = {n: read_metrics(tmp_path / n / "metrics.jsonl") for n in "ab"}
    path = plot_metrics(runs, ["loss", "lr"], tmp_path / "curves.png")
    image = np.asarray(Image.open(path).convert("RGB"))
    assert image.shape[1] == 2 * 420
    # Both runs' colours were drawn.
    for colour in ((31, 119, 180), (214, 39, 40)):
        assert (image == colour).all(-1).any()
    with pytest.raises(ValueError, match=r"run 'a' has no metric \['acc'\]"):
        plot_metrics(runs, ["acc"], tmp_path / "x.png")
    (tmp_path / "bad.jsonl").write_text('{"step": 1}\nnot json\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: bad JSON"):
        read_metrics(tmp_path / "bad.jsonl")
    out = tmp_path / "cli.png"
    assert main(["plot", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(out)]) == 0
    assert out.is_file()
    assert main(["plot", str(tmp_path / "missing")]) == 2


def test_eval_job_entry_point() -> None:
    # The command the eval jobs run; a wrong argument list exits before any work, so this
    # checks the wiring of the package's __main__ cheaply (the end-to-end test runs it in full).
    proc = subprocess.run(
        [sys.executable, "-m", "kineflow.apps.reproduce", "run", "x"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "usage: python -m kineflow.apps.reproduce eval RUN CONFIG_YAML" in proc.stdout


def _write_recipe(root: Path, stages: dict[str, str], kind: str, names: tuple[str, str]) -> str:
    """Two stage configs of one recipe in ``root``: the first writes ``outputs/<first>``, the
    second starts from its model (``init_from``); returns the last stage's config path."""
    base = yaml.safe_load(Path(stages[kind]).read_text())
    first, second = names
    for k, name in enumerate(names):
        data = {**base, "out": f"outputs/{name}", "optim": {**base["optim"], "steps": 2}}
        if k:
            data["init_from"] = f"outputs/{first}/model"
        (root / f"{name}.yaml").write_text(yaml.safe_dump(data))
    return str(root / f"{second}.yaml")


@pytest.mark.slow  # two recipes trained stage after stage, evaluated and shipped
def test_reproduce_trains_recipes_stage_after_stage_and_ships_their_last_stage(tmp_path) -> None:
    stages = write_stage_configs(tmp_path)
    recipes = tmp_path / "recipes"
    recipes.mkdir()
    config = {
        "vq": stages["vq"], "siglip": stages["siglip"], "kl": stages["kl"],
        "out": str(tmp_path / "run"), "text_corpus_items": 100, "runs": [], "jobs": 2,
        "recipes": {
            "fudoki-shapes": _write_recipe(recipes, stages, "model", ("f_one", "f_two")),
            "unifluid-shapes": _write_recipe(recipes, stages, "unifluid", ("u_one", "u_two")),
        },
        "eval": TINY_EVAL,
    }  # fmt: skip
    run, ship, args = run_reproduce(tmp_path, config)
    results = json.loads((run / "results.json").read_text())
    assert results["runs"] == {}
    assert {n: r["final"] for n, r in results["recipes"].items()} == {
        "fudoki-shapes": "f_two", "unifluid-shapes": "u_two"}  # fmt: skip
    assert [s["name"] for s in results["recipes"]["fudoki-shapes"]["stages"]] == ["f_one", "f_two"]
    assert results["recipes"]["unifluid-shapes"]["eval"]["edit"]["n"] == 3
    # Each later stage started from the model its stage before wrote, inside this run.
    for first, second in (("f_one", "f_two"), ("u_one", "u_two")):
        written = yaml.safe_load((run / "configs" / f"{second}.yaml").read_text())
        assert written["init_from"] == str(run / first / "model")
        assert (run / first / "model" / "model.safetensors").is_file()
    # The last stages are shipped under the recipes' names (UniFluid in float16), with the
    # encoders they were trained on.
    from safetensors import safe_open

    for name in ("fudoki-shapes", "unifluid-shapes", "vq-shapes", "siglip-shapes", "kl-shapes"):
        assert (ship / name / "model.safetensors").is_file(), name
    with safe_open(ship / "unifluid-shapes" / "model.safetensors", "pt") as f:
        names = f.keys()  # safe_open is not iterable
        dtypes = {f.get_slice(k).get_dtype() for k in names}
    assert dtypes == {"F16"}
    md = (run / "results.md").read_text()
    assert "The shipped models, by their recipes" in md and "| `fudoki-shapes` |" in md
    assert "`f_one` (" in md and "Targets" not in md
    # Re-running finds every stage done and trains nothing.
    assert main(args) == 0
    timings = json.loads((run / "timings.json").read_text())
    assert timings["calls"][-1]["jobs_run"] == []
