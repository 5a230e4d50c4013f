"""UniFluid's data path: samples read from shards (KL-VAE latents) equal those made on the
fly, and training from shards gives the on-the-fly losses."""

from __future__ import annotations

import json

import pytest
import torch
from test_train_unifluid import assets, make_config  # noqa: F401 (the fixture)

from kineflow.tokenizers.text import TextTokenizer
from kineflow.train.common import encode_shards
from kineflow.train.unifluid import UnifluidTask, build_unifluid, train_unifluid

pytestmark = pytest.mark.usefixtures("one_thread")


def make_task(assets, out, **data) -> UnifluidTask:  # noqa: F811
    config = make_config(assets, out, **data)
    tok = TextTokenizer.load(assets["text"])
    return UnifluidTask(build_unifluid(config, tok), tok, config)


def test_shards_round_trip_and_train_the_same(assets, tmp_path) -> None:  # noqa: F811
    task = make_task(assets, tmp_path)
    encode_shards(task, tmp_path / "shards", 24, shard_size=7)
    read = make_task(assets, tmp_path, shards=str(tmp_path / "shards"))
    assert len(read.shards) == 24
    kinds: set[int] = set()
    for i in range(24):
        want = task.encode_records([task.record(i)])[0]
        got = read.shards.get(i)
        assert got.keys() == want.keys()
        kinds.add(int(got["kind"]))
        for key, value in want.items():
            # Latents encoded in a batch of 7 vs alone: equal up to float rounding.
            tol = 1e-4 if value.is_floating_point() else 0
            torch.testing.assert_close(got[key], value, rtol=tol, atol=tol, msg=f"{i} {key}")
    assert kinds == {0, 1, 2}  # gen, edit and und records
    fly = task.encoded(task.batch(list(range(12))))
    shards = read.batch(list(range(12)))
    assert "tokens_pictures" not in shards["gen"]  # no KL-VAE on this path
    for name in ("gen", "edit", "und"):
        for key, value in fly[name].items():
            torch.testing.assert_close(shards[name][key], value, rtol=1e-6, atol=1e-6)
    losses = {}
    for name, data in (("fly", {}), ("shards", {"shards": str(tmp_path / "shards")})):
        out = tmp_path / name
        train_unifluid(make_config(assets, out, steps=3, **data), progress=False)
        losses[name] = [json.loads(r)["loss"] for r in (out / "metrics.jsonl").open()]
    assert len(losses["fly"]) == 3
    assert losses["shards"] == pytest.approx(losses["fly"], rel=1e-5)


def test_shards_of_another_token_scale_are_refused(assets, tmp_path) -> None:  # noqa: F811
    encode_shards(make_task(assets, tmp_path), tmp_path / "s", 3)
    with pytest.raises(ValueError, match=r"shapes\.token_scale=.* but this run has"):
        make_task(assets, tmp_path, shards=str(tmp_path / "s"))  # same scale: fine
        config = make_config(assets, tmp_path, shards=str(tmp_path / "s"))
        config.token_scale = 2.5
        tok = TextTokenizer.load(assets["text"])
        UnifluidTask(build_unifluid(config, tok), tok, config)
