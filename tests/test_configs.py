"""Every YAML in ``configs/`` runs as written on a fresh clone.

Each training config is run for two steps with the working directory set to a copy of what a
fresh clone holds (``configs/`` and the shipped ``checkpoints/``, nothing under ``outputs/``),
so a config that points at a part only ``make reproduce`` / ``make compare`` creates fails
here.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from kineflow.apps.reproduce import ReproduceConfig
from kineflow.cli import main

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"

#: config file -> the ``kineflow train`` command that runs it.
TRAINING = {
    "fudoki_shapes.yaml": "fudoki",
    "ar_shapes.yaml": "fudoki",
    "unifluid_shapes.yaml": "unifluid",
    "vq_shapes.yaml": "tokenizer",
    "kl_shapes.yaml": "tokenizer",
    "siglip_shapes.yaml": "siglip",
}
#: ``make reproduce``: the shipped models by their recipes.
REPRODUCTION = "reproduce.yaml"
#: ``make compare``: the compared runs at equal compute.
COMPARISON = "compare.yaml"
#: The claims study (``make claims``): the reproduction's machinery on the shipped encoders;
#: its discrete half at a longer budget (``make claims-fudoki``).
CLAIMS = "claims.yaml"
CLAIMS_FUDOKI = "claims_fudoki.yaml"
#: Configs whose data an app writes first (the manifest under outputs/): each is run by its
#: app's test instead (tests/apps/test_finetune_example.py).
APP_CONFIGS = {"finetune_fudoki_fashion.yaml", "vq_fashion.yaml"}
#: Configs that start from another config's model (``init_from``): config -> that config.
#: The shipped models' recipes: FUDOKI in eight stages, UniFluid in four.
SECOND_STAGE = {"fudoki_from_ar_shapes.yaml": "ar_shapes.yaml",
                "fudoki_understanding_shapes.yaml": "fudoki_from_ar_shapes.yaml",
                "fudoki_relations_shapes.yaml": "fudoki_understanding_shapes.yaml",
                "fudoki_relations2_shapes.yaml": "fudoki_relations_shapes.yaml",
                "fudoki_mix_shapes.yaml": "fudoki_relations2_shapes.yaml",
                "fudoki_generation_shapes.yaml": "fudoki_mix_shapes.yaml",
                "fudoki_generation2_shapes.yaml": "fudoki_generation_shapes.yaml",
                "unifluid_understanding_shapes.yaml": "unifluid_shapes.yaml",
                "unifluid_editing_shapes.yaml": "unifluid_understanding_shapes.yaml",
                "unifluid_editing2_shapes.yaml": "unifluid_editing_shapes.yaml"}  # fmt: skip
#: The last stage of each recipe: its test trains the whole chain.
LAST_STAGES = sorted(set(SECOND_STAGE) - set(SECOND_STAGE.values()))


def stages(name: str) -> list[str]:
    """The configs to run, in order, before and including ``name``."""
    chain = [name]
    while chain[-1] in SECOND_STAGE:
        chain.append(SECOND_STAGE[chain[-1]])
    return chain[::-1]


def test_every_config_is_covered() -> None:
    """A new config must be added to this file's table, so that it gets run too."""
    assert {p.name for p in CONFIGS.glob("*.yaml")} == (
        set(TRAINING)
        | {REPRODUCTION, COMPARISON, CLAIMS, CLAIMS_FUDOKI}
        | APP_CONFIGS
        | set(SECOND_STAGE)
    )


@pytest.fixture
def fresh_clone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A working directory with what a clone of the repository has: configs and checkpoints."""
    for name in ("configs", "checkpoints"):
        shutil.copytree(ROOT / name, tmp_path / name)
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize("name", sorted(TRAINING))
def test_config_trains_on_a_fresh_clone(
    name: str, fresh_clone: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    command = TRAINING[name]
    out = fresh_clone / "run"
    argv = ["train", command, "--config", f"configs/{name}", "--steps", "2", "--out", str(out)]
    if command == "tokenizer":  # eval.json's reconstructions of a 2-step codec say nothing
        argv += ["--eval-images", "16"]
    status = main([*argv, "--no-progress"])
    printed = capsys.readouterr().out
    assert status == 0, printed
    # The summary is the JSON the command prints last; the run left a checkpoint at step 2.
    summary = json.loads(printed[printed.index("{") :])
    assert summary, printed
    trainer_state = out / "checkpoint" / "trainer.pt"
    assert trainer_state.is_file(), sorted(p.name for p in out.iterdir())
    assert not (fresh_clone / "outputs").exists()


def _read(name: str) -> dict:
    return yaml.safe_load((CONFIGS / name).read_text())


def test_each_stage_starts_from_the_model_of_the_stage_before() -> None:
    """A later stage's ``init_from`` is the ``model`` folder its earlier stage writes, under
    ``outputs/``; the comments at the top of a stage list every command of its recipe."""
    for name, before in SECOND_STAGE.items():
        init_from = Path(_read(name)["init_from"])
        assert init_from.name == "model" and init_from.parts[0] == "outputs", name
        assert init_from.parent == Path(_read(before)["out"]), name
        command = TRAINING[stages(name)[0]]
        for config in stages(name):
            assert f"kineflow train {command} --config configs/{config}" in (
                (CONFIGS / name).read_text()), (name, config)  # fmt: skip


@pytest.mark.parametrize("name", LAST_STAGES)
def test_a_recipe_trains_stage_after_stage(
    name: str, fresh_clone: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A shipped recipe run stage after stage (2 steps each) on a fresh clone: each stage
    writes the model the next starts from."""
    chain = stages(name)
    command = TRAINING[chain[0]]
    outs = [_read(c)["out"] for c in chain[:-1]] + ["run"]
    for config, out in zip(chain, outs, strict=True):
        argv = ["train", command, "--config", f"configs/{config}", "--steps", "2",
                "--out", str(fresh_clone / out), "--no-progress"]  # fmt: skip
        status = main(argv)
        printed = capsys.readouterr().out
        assert status == 0, printed
    assert (fresh_clone / "run" / "checkpoint" / "trainer.pt").is_file()
    # Without the stage before's model the last stage says which folder is missing.
    shutil.rmtree(fresh_clone / outs[-2])
    status = main(["train", command, "--config", f"configs/{name}", "--steps", "2",
                   "--out", str(fresh_clone / "again"), "--no-progress"])  # fmt: skip
    said = capsys.readouterr()
    assert status == 2
    init_from = _read(name)["init_from"]
    assert f"error: init_from {init_from}: no model.safetensors there" in said.out + said.err


def test_comparison_config_names_existing_stage_configs() -> None:
    """``make compare`` reads configs/compare.yaml; the stage configs it names are the ones
    run above (the reproduction machinery itself runs end to end in test_reproduce)."""
    config = ReproduceConfig.from_yaml(CONFIGS / COMPARISON)
    named = {config.vq, config.siglip, config.model, config.kl, config.unifluid}
    for path in named:
        assert (ROOT / path).is_file(), path
        assert Path(path).name in TRAINING
    assert _read(COMPARISON)["out"].startswith("outputs/") and not config.recipes


def test_reproduction_trains_every_shipped_recipe(fresh_clone: Path) -> None:
    """``make reproduce`` plans each shipped model's whole recipe — the chain this file's table
    states, read back by the planner from the configs' ``init_from`` links — on its own
    encoders, each stage starting from the folder its stage before writes, and ships the last
    stage under the model's name."""
    from kineflow.apps.reproduce.jobs import plan_jobs
    from kineflow.apps.reproduce.recipes import recipe_chain

    config = ReproduceConfig.from_yaml(CONFIGS / REPRODUCTION)
    assert set(config.recipes) == {"fudoki-shapes", "unifluid-shapes"}
    assert {Path(p).name for p in config.recipes.values()} <= set(LAST_STAGES)
    out = fresh_clone / "outputs" / "reproduce"
    jobs = {j.name: j for j in plan_jobs(config, out, 1)}
    assert {"vq", "siglip", "kl"} <= set(jobs) and not config.runs
    for last in config.recipes.values():
        chain = recipe_chain(last)
        assert [s.path.name for s in chain] == stages(Path(last).name)
        for k, stage in enumerate(chain):
            job = jobs[stage.name]
            assert job.kind == TRAINING[stages(Path(last).name)[0]]
            assert job.config["out"] == str(out / stage.name)
            tokenizer = job.config.get("vq") or job.config["vae"]
            assert tokenizer in (str(out / "vq" / "model"), str(out / "kl" / "model"))
            assert job.config["text_tokenizer"] == str(out / "text_tokenizer")
            if k:
                assert job.config["init_from"] == str(out / chain[k - 1].name / "model")
                assert job.needs == (chain[k - 1].name,)
            else:
                assert "init_from" not in job.config
        assert f"eval_{chain[-1].name}" in jobs


@pytest.mark.parametrize("name", [CLAIMS, CLAIMS_FUDOKI])
def test_claims_config_plans_on_a_fresh_clone(fresh_clone: Path, name: str) -> None:
    """``make claims`` / ``make claims-fudoki`` train nothing before their models: every
    encoder is a shipped folder (checked by the planner), every compared run is there on three
    seeds, and each claim of ``claims.py`` whose runs the config trains has both of its runs at
    the same step count. The full study covers every claim; the discrete one every claim
    between discrete runs."""
    from kineflow.apps.reproduce.claims import CLAIMS as CLAIM_LIST
    from kineflow.apps.reproduce.config import RUNS
    from kineflow.apps.reproduce.jobs import plan_jobs

    config = ReproduceConfig.from_yaml(CONFIGS / name)
    assert Path(config.model).name in TRAINING
    jobs = {j.name: j for j in plan_jobs(config, fresh_clone / "outputs" / "claims", 1)}
    assert not {"vq", "siglip", "kl"} & set(jobs) and len(config.seeds) >= 3
    if config.unifluid is None:
        trained, wanted = set(config.runs), [c for c in CLAIM_LIST if {c.a, c.b} <= set(RUNS)]
        assert not any(job.startswith("unifluid") for job in jobs)
    else:
        assert Path(config.unifluid).name in TRAINING
        trained, wanted = {*config.runs, *config.unifluid_runs}, list(CLAIM_LIST)
    assert wanted
    for claim in wanted:
        assert {claim.a, claim.b} <= trained, claim.what
        steps = {jobs[config.seeded(r)[0]].config["optim"]["steps"] for r in (claim.a, claim.b)}
        assert len(steps) == 1 or "fudoki_from_ar" in (claim.a, claim.b), claim.what
