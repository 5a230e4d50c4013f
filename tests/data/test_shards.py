"""Shard folders: records round-trip, refusals name the problem, ``kineflow data encode``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import kineflow.data.shards as shards
from kineflow.cli import main
from kineflow.data.shards import ShardReader, write_shards

REPO = Path(__file__).resolve().parents[2]


def records(n: int, start: int = 0) -> list[dict[str, torch.Tensor]]:
    out = []
    for i in range(start, start + n):
        r = {
            "ids": torch.arange(i % 5 + 1) * i,
            "picture": torch.full((2, 2, 3), i, dtype=torch.uint8),
        }
        if i % 2:  # a key only some samples have, of a float dtype
            r["tokens"] = torch.randn(3, 4, generator=torch.Generator().manual_seed(i))
        out.append(r)
    return out


def test_records_round_trip_by_global_index(tmp_path) -> None:
    everything = records(11)
    index = write_shards(tmp_path, [everything[:4], everything[4:8], everything[8:]], "toy",
                         {"data": {"seed": 1}})  # fmt: skip
    assert index["samples"] == 11 and [s["samples"] for s in index["shards"]] == [4, 4, 3]
    on_disk = json.loads((tmp_path / "index.json").read_text())
    assert on_disk == index and on_disk["format"] == "kineflow-shards"
    reader = ShardReader(tmp_path, "toy", {"data": {"seed": 1}})
    for i in (10, 0, 5, 3, 4, 7):  # random access, across shards
        got = reader.get(i)
        assert got.keys() == everything[i].keys(), i
        for key, value in everything[i].items():
            assert got[key].dtype == value.dtype and torch.equal(got[key], value), (i, key)
    import pickle

    clone = pickle.loads(pickle.dumps(reader))  # DataLoader workers get a copy
    assert torch.equal(clone.get(9)["tokens"], everything[9]["tokens"])


def test_refusals_name_what_is_wrong(tmp_path) -> None:
    write_shards(tmp_path, [records(3)], "toy", {"data": {"seed": 1, "split": "train"}})
    with pytest.raises(ValueError, match=r"data\.split='train' but this run has data\.split='val'"):
        ShardReader(tmp_path, "toy", {"data": {"seed": 1, "split": "val"}})
    with pytest.raises(ValueError, match="holds toy data, this run trains fudoki"):
        ShardReader(tmp_path, "fudoki", {"data": {"seed": 1, "split": "train"}})
    reader = ShardReader(tmp_path, "toy", {"data": {"seed": 1, "split": "train"}})
    with pytest.raises(ValueError, match="holds 3 samples, training asked for sample 3"):
        reader.get(3)
    (tmp_path / "shard-00000.safetensors").unlink()
    with pytest.raises(ValueError, match="missing shard file"):
        ShardReader(tmp_path, "toy", {"data": {"seed": 1, "split": "train"}})


def test_an_interrupted_encode_leaves_no_index(tmp_path, monkeypatch) -> None:
    write_shards(tmp_path, [records(2)], "toy", {})
    real = shards.atomic_save_safetensors

    def dies_on_second(path, tensors):
        if path.name.endswith("00001.safetensors"):
            raise KeyboardInterrupt
        return real(path, tensors)

    monkeypatch.setattr(shards, "atomic_save_safetensors", dies_on_second)
    with pytest.raises(KeyboardInterrupt):
        write_shards(tmp_path, [records(2), records(2, 2)], "toy", {})
    # The folder was complete before; a new encode that stops half-way leaves it unreadable.
    assert not (tmp_path / "index.json").exists()
    with pytest.raises(ValueError, match="did not finish"):
        ShardReader(tmp_path, "toy", {})


def test_cli_data_encode_writes_a_shard_folder(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(REPO)  # the shipped config names the shipped checkpoints relatively
    out = tmp_path / "shards"
    code = main(["data", "encode", "--config", "configs/fudoki_shapes.yaml", "--out", str(out),
                 "--samples", "6", "--shard-size", "4"])  # fmt: skip
    assert code == 0, capsys.readouterr().out
    index = json.loads((out / "index.json").read_text())
    assert index["kind"] == "fudoki" and index["samples"] == 6
    assert sorted(p.name for p in out.iterdir()) == [
        "index.json", "shard-00000.safetensors", "shard-00001.safetensors"]  # fmt: skip
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["samples"] == 6
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {}\n")
    assert main(["data", "encode", "--config", str(bad), "--out", str(out), "--samples", "2"]) == 2
    assert "not a FUDOKI (vq:) or UniFluid (vae:) training config" in capsys.readouterr().out
    missing = main(["data", "encode", "--config", str(tmp_path / "no.yaml"), "--out", str(out),
                    "--samples", "2"])  # fmt: skip
    assert missing == 2 and "no such config file" in capsys.readouterr().out
