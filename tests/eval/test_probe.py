"""The understanding diagnosis: probes recover a planted linear signal and nothing from noise,
labels of hand-built scenes, features taken from the pipeline's own answer path, and the
JSON of ``kineflow eval probe``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import kineflow
from kineflow.cli import main
from kineflow.data.shapes.render import render_image
from kineflow.data.shapes.scene import Obj, Scene
from kineflow.eval.probe import (
    FEATURES,
    TARGETS,
    ProbeConfig,
    capture_features,
    fit_probe,
    probe_model,
    scene_labels,
)

CHECKPOINTS = Path(__file__).resolve().parents[2] / "checkpoints"
CONFIG = ProbeConfig(train=400, test=200, weight_decays=(1e-3, 1e-1), iterations=40)


def _labels(n: int, cells: int, classes: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, (n, cells))
    y[rng.random((n, cells)) < 0.3] = -1  # unlabelled pairs (an empty cell) are ignored
    return y


def test_planted_linear_signal_is_recovered():
    n, classes, cells = 600, 4, 3
    y = _labels(n, cells, classes, seed=0)
    rng = np.random.default_rng(1)
    # Features: each cell's one-hot label through a random projection, plus noise.
    onehot = np.eye(classes)[y.clip(0)] * (y[..., None] >= 0)
    x = onehot.reshape(n, -1) @ rng.normal(size=(cells * classes, 24)) + 0.1 * rng.normal(
        size=(n, 24)
    )
    rows = np.arange(n)
    r = fit_probe(x, y, rows[:400], rows[400:], classes, CONFIG)
    assert r["accuracy"] > 0.98 and r["accuracy_ci"][0] > 0.95
    assert r["n"] == int((y[400:] >= 0).sum()) and r["weight_decay"] in CONFIG.weight_decays


def test_pure_noise_scores_chance():
    n, classes = 600, 3
    y = _labels(n, 2, classes, seed=2)
    x = np.random.default_rng(3).normal(size=(n, 24))
    rows = np.arange(n)
    r = fit_probe(x, y, rows[:400], rows[400:], classes, CONFIG)
    # Chance is 1/3 (labels uniform): no linear signal to find, so near it, not near 1.
    assert abs(r["accuracy"] - 1 / 3) < 0.1 and r["accuracy_ci"][0] < 1 / 3 + 0.05
    assert 0.2 < r["chance"] < 0.5
    assert fit_probe(x, y, rows[:400], rows[400:], classes, CONFIG) == r  # deterministic


def test_scene_labels_of_a_hand_built_scene():
    scene = Scene((Obj(0, 0, "circle", "red", "small"), Obj(2, 1, "triangle", "blue", "large")))
    lab = scene_labels([scene, Scene(())])
    assert lab["occupied"][0].tolist() == [1, 0, 0, 0, 0, 0, 0, 1, 0]
    assert lab["shape"][0].tolist() == [0, -1, -1, -1, -1, -1, -1, 2, -1]
    assert lab["colour"][0, 0] >= 0 and lab["colour"][0, 7] != lab["colour"][0, 0]
    assert lab["count"].tolist() == [[2], [0]] and (lab["colour"][1] == -1).all()


@pytest.mark.parametrize("name", ["fudoki-shapes", "unifluid-shapes"])
def test_features_come_from_the_answer_path(name):
    pipe = kineflow.load(CHECKPOINTS / name)
    scenes = [Scene((Obj(1, 1, "square", "green", "large"),)), Scene(())]
    feats = capture_features(pipe, [render_image(s) for s in scenes], batch_size=1)
    assert set(feats) == set(FEATURES) and all(len(v) == 2 for v in feats.values())
    assert "encode_images" not in vars(pipe.model)  # the interception is undone
    size = pipe.model.config.vision.image_size
    pixels = feats["pixels"].view(2, 3, size, size)
    with torch.no_grad():  # independent recomputation from the captured pixels
        torch.testing.assert_close(pipe.model.encode_images(pixels).flatten(1), feats["aligner"])
        tower = feats["tower"].view(2, pipe.model.config.vision.num_patches, -1)
        table = getattr(pipe.model, "understanding_pos_embed", None)  # FUDOKI's, when it has one
        read = pipe.model.aligner(tower) + (0 if table is None else table)
        torch.testing.assert_close(read.flatten(1), feats["aligner"])
    assert not torch.equal(feats["aligner"][0], feats["aligner"][1])


def test_probe_model_and_cli_json(tmp_path, capsys):
    pipe = kineflow.load(CHECKPOINTS / "fudoki-shapes")
    config = ProbeConfig(train=30, test=10, vqa_items=6, weight_decays=(1e-2,), iterations=3)
    r = probe_model(pipe, config, steps=2)
    assert set(r["probes"]) == set(FEATURES) and set(r["probes"]["tower"]) == set(TARGETS)
    assert r["widths"]["pixels"] == 3 * pipe.model.config.vision.image_size**2
    occ = r["probes"]["pixels"]["occupied"]
    assert occ["n"] == 10 * 9 and occ["accuracy_ci"][0] <= occ["accuracy"] <= occ["accuracy_ci"][1]
    v = r["vqa"]
    assert v["n"] == 6 and 0 <= v["shuffled_accuracy"] <= 1 and len(v["examples"]) == 6
    assert 0 <= v["exist"]["true_yes_share"] <= 1 or v["exist"]["n"] == 0
    args = [
        "eval",
        "probe",
        "--model",
        str(CHECKPOINTS / "fudoki-shapes"),
        "--out",
        str(tmp_path / "new"),
        "--train",
        "30",
        "--test",
        "5",
        "--vqa",
        "0",
        "--iterations",
        "2",
    ]
    assert main(args) == 0
    written = json.loads((tmp_path / "new" / "probe.json").read_text())
    assert written["vqa"] is None and written["config"]["train"] == 30
    assert "probe:" in capsys.readouterr().out
    assert main(["eval", "probe", "--model", str(tmp_path / "nope"), "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().out.startswith("error: ")
