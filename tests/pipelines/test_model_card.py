"""The ``README.md`` model card ``save_pretrained`` writes: present in the saved folder, its
front matter valid YAML with the Hub's fields, its numbers equal to the config's and the
weights', training and scores only when given, and the shipped checkpoints' cards current."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import kineflow
from kineflow.pipelines.model_card import SHAPESWORLD, parse_front_matter

SHIPPED = ["checkpoints/fudoki-shapes", "checkpoints/unifluid-shapes"]


def _config(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())


def _expected(config: dict) -> dict:
    """The card's numbers, read independently from config.json."""
    m = config["model"]
    lang = m["language"]
    common = {"text_vocab_size": lang["vocab_size"], "layers": lang["num_hidden_layers"],
              "hidden_size": lang["hidden_size"],
              "text_budget": config["pipeline"]["text_budget"]}  # fmt: skip
    if config["kineflow_type"] == "fudoki":
        gen = m["gen_vision"]
        # The VQ encoder halves the picture at every level but the first.
        side = gen["image_size"] // 2 ** (len(gen["autoencoder"]["channel_mult"]) - 1)
        return {**common, "image_size": gen["image_size"], "image_tokens": side**2,
                "codebook_size": gen["codebook_size"]}  # fmt: skip
    vae = m["vae"]
    side = vae["image_size"] // (2 ** (len(vae["channel_mult"]) - 1) * vae["patch_size"])
    return {**common, "image_size": vae["image_size"], "image_tokens": side**2,
            "token_channels": vae["z_channels"] * vae["patch_size"] ** 2}  # fmt: skip


@pytest.mark.parametrize("source", SHIPPED)
def test_saved_folder_has_a_card_whose_numbers_are_the_configs(source, tmp_path):
    pipe = kineflow.load(source)
    training = {"data": SHAPESWORLD, "config": {"out": Path("runs/x"), "steps": (1, 2)}}
    scores = {"settings": {"steps": 16, "cfg_scale": 3.0}, "results": {"vqa_accuracy": 0.5}}
    folder = pipe.save_pretrained(tmp_path / "m", training=training, scores=scores)
    text = (folder / "README.md").read_text()
    front = parse_front_matter(text)
    assert front["license"] == "apache-2.0" and front["library_name"] == "kineflow"
    assert front["pipeline_tag"] == "any-to-any" and "kineflow" in front["tags"]
    card = front["kineflow"]
    config = _config(folder)
    assert card["kineflow_type"] == config["kineflow_type"] == pipe.kineflow_type
    assert card["parameters"] == sum(p.numel() for p in pipe.model.parameters())
    assert {k: card[k] for k in _expected(config)} == _expected(config)
    assert card["tasks"] == sorted(pipe.capabilities)
    assert f"| parameters | {card['parameters']:,} |" in text
    assert SHAPESWORLD in text and "out: runs/x" in text and "vqa_accuracy: 0.5" in text
    assert "kineflow.load(" in text and "kineflow generate --model" in text
    # A folder holding its card is a kineflow folder: saving over it again is allowed.
    pipe.save_pretrained(folder)
    again = (folder / "README.md").read_text()
    assert "Not recorded in this folder" in again and "No scores are recorded" in again
    assert kineflow.load(folder).kineflow_type == pipe.kineflow_type


def test_a_training_run_record_goes_on_the_card(tmp_path):
    from dataclasses import dataclass

    from kineflow.train.common import card_record

    @dataclass
    class Run:
        out: Path = Path("outputs/run")
        steps: int = 7

    record = card_record(Run(), {"steps": 7, "last": {"loss": 1.25}})
    pipe = kineflow.load(SHIPPED[1])
    folder = pipe.save_pretrained(tmp_path / "u", dtype=torch.float16, training=record)
    text = (folder / "README.md").read_text()
    assert "out: outputs/run" in text and "loss: 1.25" in text and SHAPESWORLD in text


@pytest.mark.parametrize("source", SHIPPED)
def test_shipped_cards_match_their_checkpoints(source):
    folder = Path(source)
    front = parse_front_matter((folder / "README.md").read_text())
    config = _config(folder)
    card = front["kineflow"]
    assert card["kineflow_type"] == config["kineflow_type"]
    assert {k: card[k] for k in _expected(config)} == _expected(config)
    weights = load_file(str(folder / "model.safetensors"))
    assert card["parameters"] == sum(t.numel() for t in weights.values())
