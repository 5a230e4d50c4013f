"""One `error:` line instead of a traceback for training mistakes: run-config types and ranges
(checked against the dataclass annotations when the YAML is read), manifest errors, a
non-finite loss; and a resumed run that has nothing left to train."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from distributed_worker import TinyTask, optim
from test_train_tokenizer import TINY

from kineflow.cli import main
from kineflow.config import check_types
from kineflow.train.fudoki import FudokiTrainConfig
from kineflow.train.loop import Optim, run_training
from kineflow.train.tokenizer import build_tokenizer

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def run_cli(capsys, *args: str) -> tuple[int, list[str], str]:
    status = main(list(args))
    captured = capsys.readouterr()
    return status, captured.out.strip().splitlines(), captured.err


def shipped(name: str, tmp_path: Path, **changes) -> Path:
    """A shipped config with ``changes`` (dotted keys) applied, written to tmp_path."""
    config = yaml.safe_load((CONFIGS / name).read_text())
    for dotted, value in changes.items():
        *parents, key = dotted.split("__")
        section = config
        for p in parents:
            section = section.setdefault(p, {})
        section[key] = value
    path = tmp_path / name
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.parametrize(
    ("command", "name", "change", "message"),
    [
        ("fudoki", "fudoki_shapes.yaml", {"model__language__hidden_size": "32"},
         "model.language.hidden_size must be an integer, got '32'"),
        ("fudoki", "fudoki_shapes.yaml", {"ckpt_every": 0},
         "ckpt_every must be an integer >= 1, got 0"),
        ("fudoki", "fudoki_shapes.yaml", {"optim__lr": "1e-3"},
         "optim.lr must be a number, got '1e-3' (YAML reads 1e-3 as a string: write 1.0e-3)"),
        ("fudoki", "fudoki_shapes.yaml", {"ckpt_minutes": -1},
         "ckpt_minutes must be a number > 0 (or null: no time-based checkpoints), got -1"),
        ("fudoki", "fudoki_shapes.yaml", {"export_steps": ["10"]},
         "export_steps[0] must be an integer, got '10'"),
        ("fudoki", "fudoki_shapes.yaml", {"optim__betas": [0.9]},
         "optim.betas must be a list of 2 items, got [0.9]"),
        ("fudoki", "fudoki_shapes.yaml", {"data__question_weights": {"where": 1}},
         "data.question_weights: unknown question type 'where'; the types are ['count', "
         "'colour', 'shape', 'relation', 'exist', 'position', 'position_words', "
         "'verify']"),
        ("unifluid", "unifluid_shapes.yaml", {"data__question_weights": {"colour": -1}},
         "data.question_weights.colour must be a number >= 0, got -1"),
        ("unifluid", "unifluid_shapes.yaml", {"model__head__width": 12.5},
         "model.head.width must be an integer, got 12.5"),
        ("unifluid", "unifluid_shapes.yaml", {"model__vision__patch_size": None},
         "model.vision.patch_size must be an integer, got None"),
        ("siglip", "siglip_shapes.yaml", {"model__hidden_size": "96"},
         "model.hidden_size must be an integer, got '96'"),
        ("siglip", "siglip_shapes.yaml", {"log_every": True},
         "log_every must be an integer, got True"),
        ("tokenizer", "vq_shapes.yaml", {"model__channels": "32"},
         "model.channels must be an integer, got '32'"),
        ("tokenizer", "kl_shapes.yaml", {"threads": 0},
         "threads must be an integer >= 1 or null, got 0"),
        ("tokenizer", "kl_shapes.yaml", {"data__seed": -1},
         "data.seed must be an integer >= 0, got -1"),
        ("tokenizer", "kl_shapes.yaml", {"optim__weight_decay": -0.1},
         "optim.weight_decay must be >= 0, got -0.1"),
        ("tokenizer", "kl_shapes.yaml", {"optim__betas": [0.9, 1.5]},
         "optim.betas must be two numbers in [0, 1), got [0.9, 1.5]"),
    ],
)  # fmt: skip
def test_config_mistakes_are_one_line_naming_file_and_key(
    tmp_path, capsys, command, name, change, message
):
    path = shipped(name, tmp_path, **change)
    status, out, err = run_cli(capsys, "train", command, "--config", str(path))
    assert (status, out) == (2, [f"error: {path}: {message}"]), err


def test_check_types_accepts_what_the_dataclasses_accept():
    from kineflow.models.unifluid import UnifluidConfig

    # ints where floats are expected, lists for tuples, nulls for optionals, nested sections.
    check_types({"lr": 1, "betas": [0.9, 0.95], "steps": 3}, Optim)
    model = yaml.safe_load((CONFIGS / "unifluid_shapes.yaml").read_text())["model"]
    check_types(model, UnifluidConfig, "model.")
    with pytest.raises(ValueError, match=r"^optim\.betas\[1\] must be a number, got 'x'$"):
        check_types({"betas": [0.9, "x"]}, Optim, "optim.")
    config = FudokiTrainConfig.from_yaml(CONFIGS / "fudoki_shapes.yaml")
    assert config.ckpt_minutes is None


def test_run_training_checks_its_intervals(tmp_path):
    for bad, message in [
        ({"ckpt_every": 0}, "ckpt_every must be an integer >= 1, got 0"),
        ({"log_every": 2.5}, "log_every must be an integer >= 1, got 2.5"),
        ({"ckpt_minutes": 0}, "ckpt_minutes must be a number > 0"),
    ]:
        with pytest.raises(ValueError, match=message.replace("(", r"\(")):
            run_training(TinyTask(), optim(), tmp_path, {}, progress=False, **bad)
    assert not (tmp_path / "metrics.jsonl").exists()


def tokenizer_yaml(tmp_path: Path, steps: int = 2, **more) -> Path:
    config = {"model": TINY["kl"], "out": str(tmp_path / "run"), "log_every": 1,
              "ckpt_every": 1, "eval_images": 4,
              "optim": {"steps": steps, "batch_size": 2, "warmup": 1}, **more}  # fmt: skip
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_manifest_errors_of_train_tokenizer_are_one_line(tmp_path, capsys):
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"image": "a.png", "caption": "x"}\n{not json\n')
    missing_image = tmp_path / "missing.jsonl"
    missing_image.write_text('{"image": "nowhere.png", "caption": "x"}\n')
    for manifest, problem in [
        (bad_json, f"error: {bad_json}:2: "),
        (missing_image, f"error: {missing_image}:1: "),
        (tmp_path / "absent.jsonl", "error: "),
    ]:
        path = tokenizer_yaml(tmp_path, data={"source": "manifest", "path": str(manifest)})
        status, out, err = run_cli(capsys, "train", "tokenizer", "--config", str(path),
                                   "--no-progress")  # fmt: skip
        assert status == 2 and len(out) == 1 and out[0].startswith(problem), (out, err)
        assert "Traceback" not in err


def test_a_non_finite_loss_is_one_line_with_the_step_of_metrics(tmp_path, capsys, monkeypatch):
    model_cls = type(build_tokenizer(TINY["kl"]))
    real = model_cls.training_losses
    calls = {"n": 0}

    def poisoned(self, images):
        calls["n"] += 1
        losses = real(self, images)
        if calls["n"] == 3:
            losses["loss"] = losses["loss"] * float("nan")
        return losses

    monkeypatch.setattr(model_cls, "training_losses", poisoned)
    path = tokenizer_yaml(tmp_path, steps=4)
    status, out, _ = run_cli(capsys, "train", "tokenizer", "--config", str(path), "--no-progress")
    ckpt = tmp_path / "run" / "checkpoint"
    assert (status, out) == (
        2,
        [f"error: non-finite loss nan at step 3; the last good checkpoint (step 2) is kept in "
         f"{ckpt}"],
    )  # fmt: skip
    rows = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["step"] for r in rows] == [1, 2]  # metrics count the same way
    assert torch.load(ckpt / "trainer.pt", weights_only=True)["step"] == 2


def test_a_run_already_complete_says_so(tmp_path, capsys):
    path = tokenizer_yaml(tmp_path, steps=2)
    assert main(["train", "tokenizer", "--config", str(path), "--no-progress"]) == 0
    first = json.loads(capsys.readouterr().out)
    assert first["already_complete_at"] is None and first["resumed_from"] == 0
    status, out, err = run_cli(capsys, "train", "tokenizer", "--config", str(path),
                               "--no-progress")  # fmt: skip
    assert status == 0
    assert err.strip().splitlines()[-1] == (
        "already complete at step 2: nothing to train (raise --steps to train further)"
    )
    report = json.loads("\n".join(out))
    assert report["already_complete_at"] == 2 and report["resumed_from"] == 2
    assert report["psnr"] == pytest.approx(first["psnr"])  # the same model, evaluated again


def test_the_summary_of_a_complete_run_holds_its_last_losses(tmp_path):
    done = run_training(TinyTask(), optim(steps=3), tmp_path, {}, log_every=1, progress=False)
    again = run_training(TinyTask(), optim(steps=2), tmp_path, {}, log_every=1, progress=False)
    assert again["already_complete_at"] == 3 and again["steps_this_run"] == 0
    assert again["last"] == done["last"] and set(done["last"]) == {"loss", "mae"}
