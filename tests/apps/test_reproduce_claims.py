"""The claims study's pieces: Student's t against a printed table, the claims' intervals and
verdicts against hand-computed ones, and the job plan of several seeds on prebuilt encoders."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from kineflow.apps.reproduce.claims import CLAIMS, MARGIN, claim_verdicts, claims_table
from kineflow.apps.reproduce.config import PREBUILT, ReproduceConfig
from kineflow.apps.reproduce.jobs import plan_jobs
from kineflow.eval.stats import t_interval, t_quantile

#: t_{0.975, df} from a printed table (e.g. Fisher & Yates), three decimals.
T_TABLE = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 10: 2.228, 30: 2.042, 120: 1.980}


def test_t_quantile_matches_the_printed_table() -> None:
    for df, want in T_TABLE.items():
        assert t_quantile(0.975, df) == pytest.approx(want, abs=6e-4), df
    assert t_quantile(0.95, 2) == pytest.approx(2.920, abs=6e-4)
    assert t_quantile(0.5, 7) == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(ValueError, match=r"0\.5 <= p < 1"):
        t_quantile(0.2, 3)


def test_t_interval_by_hand() -> None:
    mean, low, high = t_interval([0.1, 0.2, 0.3])
    half = 4.303 * 0.1 / math.sqrt(3)  # sd = 0.1
    assert mean == pytest.approx(0.2)
    assert (low, high) == pytest.approx((0.2 - half, 0.2 + half), abs=1e-4)
    assert t_interval([0.5, 0.5]) == pytest.approx((0.5, 0.5, 0.5))
    with pytest.raises(ValueError, match="two or more"):
        t_interval([0.3])


def _config(**kw) -> ReproduceConfig:
    base = {
        "seeds": [0, 1, 2],
        "runs": ["ar", "fudoki", "masked", "fudoki_from_ar"],
        "unifluid": "u.yaml",
        "unifluid_runs": {"unifluid": {}, "unifluid_raster": {"order": "raster"},
                          "unifluid_gen_only": {"understanding_ratio": 0.0, "edit_ratio": 0.0,
                                                "steps": 9}},
        "steps": 10,
    }  # fmt: skip
    return ReproduceConfig(**(base | kw))


def _evals(config: ReproduceConfig, scores: dict[str, list[tuple[float, float]]]) -> dict:
    """Evaluation summaries: ``scores[run][k]`` = (generation, VQA) of seed k."""
    out = {}
    for run, per_seed in scores.items():
        for name, (gen, vqa) in zip(config.seeded(run), per_seed, strict=True):
            out[name] = {"t2i_test": {"overall": gen, "strict": gen / 2}, "vqa": {"accuracy": vqa}}
    return out


def test_claim_verdicts_by_hand() -> None:
    config = _config()
    evals = _evals(config, {
        "ar": [(0.50, 0.60), (0.52, 0.62), (0.54, 0.58)],
        # generation: differences to AR of −0.10, −0.12, −0.14 -> below −MARGIN
        "fudoki_from_ar": [(0.40, 0.61), (0.40, 0.63), (0.40, 0.59)],
        # fudoki_from_ar − fudoki (generation): +0.10, −0.10, +0.05 -> holds 0
        "fudoki": [(0.30, 0.50), (0.50, 0.50), (0.35, 0.50)],
        "masked": [(0.10, 0.50), (0.45, 0.50), (0.30, 0.50)],
        "unifluid": [(0.30, 0.4), (0.31, 0.4), (0.32, 0.4)],
        "unifluid_raster": [(0.20, 0.4), (0.20, 0.4), (0.20, 0.4)],
        "unifluid_gen_only": [(0.9, 0.1), (0.9, 0.1), (0.9, 0.1)],
    })  # fmt: skip
    claims = {c["what"]: c for c in claim_verdicts(evals, config)}
    gen = claims["FUDOKI generates as well as AR"]
    assert gen["a_scores"] == [0.40, 0.40, 0.40] and gen["b_scores"] == [0.50, 0.52, 0.54]
    half = 4.303 * 0.02 / math.sqrt(3)  # differences −0.10, −0.12, −0.14: sd 0.02
    assert gen["difference"] == pytest.approx(-0.12)
    assert gen["interval"] == pytest.approx([-0.12 - half, -0.12 + half], abs=1e-4)
    assert -0.12 + half < -MARGIN and gen["verdict"] == "does not"
    # VQA differences +0.01 each: a zero-width interval above −MARGIN.
    assert claims["FUDOKI understands as well as AR"]["verdict"] == "reproduces in miniature"
    assert claims["AR initialisation helps generation"]["verdict"] == "cannot tell"
    assert claims["random order beats raster order (generation)"]["verdict"] == (
        "reproduces in miniature"
    )
    # Not trained: the λ and understanding-only claims; different steps: generation-only.
    assert not any("λ" in w or "only" in w for w in claims)
    rows = claims_table(list(claims.values()))
    assert len(rows) == 2 + len(claims)
    assert f"{-0.12:+.3f} [{-0.12 - half:+.3f}, {-0.12 + half:+.3f}]" in "\n".join(rows)
    assert {c.metric for c in CLAIMS} <= {"generation", "strict scene", "VQA"}


def test_plan_of_several_seeds_on_prebuilt_encoders(tmp_path: Path) -> None:
    import yaml

    for name, data in (
        ("model", {"model": {}, "optim": {"steps": 1}, "data": {}}),
        ("u", {"model": {"order": "random"}, "data": {"edit_ratio": 0.3}}),
    ):
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(data))  # fmt: skip
    prebuilt = {"text_tokenizer": "tok", "vq": "vq-folder", "siglip": "sig", "kl": "kl-folder"}
    for stage, folder in prebuilt.items():
        (tmp_path / folder).mkdir()
        (tmp_path / folder / PREBUILT[stage]).write_text("")
    prebuilt = {stage: str(tmp_path / folder) for stage, folder in prebuilt.items()}
    config = _config(model=str(tmp_path / "model.yaml"), unifluid=str(tmp_path / "u.yaml"),
                     prebuilt=prebuilt, seeds=[3, 5])  # fmt: skip
    jobs = {j.name: j for j in plan_jobs(config, tmp_path / "out", threads=1)}
    assert not {"vq", "siglip", "kl"} & set(jobs)  # prebuilt: nothing to train first
    assert {"ar_s3", "ar_s5", "fudoki_from_ar_s5", "unifluid_gen_only_s3", "eval_masked_s5"} <= set(
        jobs
    )
    ar = jobs["ar_s5"].config
    assert ar["optim"]["seed"] == 5 and ar["data"]["seed"] == 5 and ar["export_steps"] == [5]
    assert (ar["vq"], ar["vision"], ar["text_tokenizer"]) == (
        prebuilt["vq"],
        prebuilt["siglip"],
        prebuilt["text_tokenizer"],
    )
    assert jobs["ar_s5"].needs == ()
    from_ar = jobs["fudoki_from_ar_s5"]
    assert from_ar.needs == ("ar_s5",) and from_ar.config["init_from"].endswith("ar_s5/model_step5")
    gen_only = jobs["unifluid_gen_only_s3"].config
    assert gen_only["data"] == {"edit_ratio": 0.0, "understanding_ratio": 0.0, "seed": 3}
    assert gen_only["optim"]["steps"] == 9 and gen_only["vae"] == prebuilt["kl"]
    assert jobs["unifluid_raster_s5"].config["model"]["order"] == "raster"
    assert jobs["eval_ar_s3"].needs == ("ar_s3",)
    # One seed keeps the plain names and the configs' own seeds.
    single = _config(model=str(tmp_path / "model.yaml"), unifluid=None, seeds=[0])
    names = {j.name for j in plan_jobs(single, tmp_path / "out1", threads=1)}
    assert {"vq", "siglip", "ar", "eval_ar"} <= names and "ar_s0" not in names
    plain = next(j for j in plan_jobs(single, tmp_path / "out1", 1) if j.name == "ar")
    assert "seed" not in plain.config["optim"]
    # A prebuilt folder without its model fails before any training, naming the field.
    missing = _config(model=str(tmp_path / "model.yaml"), unifluid=None,
                      prebuilt={"vq": str(tmp_path / "tok")})  # fmt: skip
    with pytest.raises(FileNotFoundError, match=r"prebuilt\.vq: .*tok: no model\.safetensors"):
        plan_jobs(missing, tmp_path / "out2", threads=1)


def test_claims_config_errors() -> None:
    with pytest.raises(ValueError, match="seeds must be"):
        ReproduceConfig(seeds=[1, 1])
    with pytest.raises(ValueError, match="seeds must be"):
        ReproduceConfig(seeds=[])
    with pytest.raises(ValueError, match=r"prebuilt: \['vae'\] not among"):
        ReproduceConfig(prebuilt={"vae": "x"})
    with pytest.raises(ValueError, match="cannot be changed per run"):
        ReproduceConfig(unifluid="u.yaml", unifluid_runs={"u": {"caption_ratio": 0.5}})
    config = ReproduceConfig(seeds=[0, 4])
    assert config.seeded("ar") == ["ar_s0", "ar_s4"]
    assert config.base_run("fudoki_from_ar_s4") == "fudoki_from_ar"
