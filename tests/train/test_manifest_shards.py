"""``kineflow data encode`` of a FUDOKI run config with ``data.manifest``: the shards hold
the manifest samples the run makes on the fly, train to the same losses, and are refused
once the manifest changes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from test_lora_train import assets, config, losses  # noqa: F401 (the fixture)

from kineflow.cli import main
from kineflow.tokenizers.text import TextTokenizer
from kineflow.train.fudoki import FudokiTask, build_model, train_fudoki

STEPS, BATCH = 3, 4

pytestmark = pytest.mark.usefixtures("one_thread")


def task_of(cfg) -> FudokiTask:
    tok = TextTokenizer.load(cfg.text_tokenizer)
    model = build_model(cfg, tok)
    text, image = model.language_model.model.embed_tokens.weight, model.gen_embed.weight
    return FudokiTask(model, tok, cfg, text.detach(), image.detach())


def test_encoded_manifest_trains_like_the_manifest(assets, tmp_path, capsys) -> None:  # noqa: F811
    # A copy of the manifest (and its pictures) that this test may edit.
    manifest = Path(assets["manifest"])
    for file in [manifest, *manifest.parent.glob("*.png")]:
        (tmp_path / file.name).write_bytes(file.read_bytes())
    assets = {**assets, "manifest": str(tmp_path / manifest.name)}
    raw = config(assets, tmp_path / "unused", steps=STEPS).to_dict()
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(raw))
    shards = tmp_path / "shards"
    argv = ["data", "encode", "--config", str(path), "--out", str(shards),
            "--samples", str(STEPS * BATCH), "--shard-size", "5"]  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().out
    index = json.loads((shards / "index.json").read_text())
    assert index["samples"] == STEPS * BATCH
    assert [s["samples"] for s in index["shards"]] == [5, 5, 2]
    # Record for record what the run makes on the fly (the manifest's samples, VQ-coded).
    fly = task_of(config(assets, tmp_path / "a", steps=STEPS))
    read_cfg = config(assets, tmp_path / "b", steps=STEPS)
    read_cfg.data.shards = str(shards)
    read = task_of(read_cfg)
    kinds = set()
    for i in range(STEPS * BATCH):
        want = fly.encode_records([fly.record(i)])[0]
        got = read.shards.get(i)
        assert got.keys() == want.keys(), i
        for key, value in want.items():
            assert torch.equal(got[key], value), (i, key)
        kinds.add(int(got["kind"]))
    assert kinds == {0, 1}  # generation and understanding samples from the manifest
    # N steps from the shards = N steps on the fly, same seeds.
    runs = {}
    for name, shard_folder in (("fly", None), ("shards", str(shards))):
        cfg = config(assets, tmp_path / name, steps=STEPS)
        cfg.data.shards = shard_folder
        train_fudoki(cfg, progress=False)
        runs[name] = losses(tmp_path / name)
    assert len(runs["fly"]) == STEPS
    assert runs["shards"] == pytest.approx(runs["fly"], rel=1e-6)
    # An edited manifest no longer matches the shards: refused, naming the manifest digest.
    copy = Path(assets["manifest"])
    copy.write_text(copy.read_text().replace("a red square", "a crimson square"))
    bad = config(assets, tmp_path / "c", steps=STEPS)
    bad.data.shards = str(shards)
    with pytest.raises(ValueError, match="manifest_sha256"):
        task_of(bad)
