"""kineflow.interop.checkpoint_files: weight files of checkpoint folders and embedding tables."""

from __future__ import annotations

import json
import pickle
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from kineflow.interop.checkpoint_files import (
    WEIGHT_FILES,
    load_embedding_table,
    read_weights,
    weight_files,
)


class Payload:
    """Unpickling this would call ``print("pwned")``: harmless, but visible if it ever ran."""

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (print, ("pwned",))


def _tensors() -> dict[str, Tensor]:
    return {
        "embed.weight": torch.randn(4, 3),
        "layer.0.weight": torch.randn(3, 3).to(torch.bfloat16),
        "layer.0.bias": torch.arange(3, dtype=torch.int64),
        "norm.weight": torch.ones(3, dtype=torch.float16),
    }


def _assert_same(got: dict[str, Tensor], want: dict[str, Tensor]) -> None:
    assert sorted(got) == sorted(want)
    for key, tensor in want.items():
        assert got[key].dtype == tensor.dtype, key
        assert got[key].device.type == "cpu"
        assert torch.equal(got[key], tensor), key


def _save(path: Path, tensors: dict[str, Tensor]) -> None:
    if path.name.endswith(".safetensors"):
        save_file(tensors, str(path))
    else:
        torch.save(tensors, path)


def _write_index(folder: Path, suffix: str, weight_map: dict[str, str]) -> Path:
    index = folder / f"{'model' if suffix == 'safetensors' else 'pytorch_model'}.{suffix}"
    index = index.with_name(index.name + ".index.json")
    index.write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    return index


def _sharded(folder: Path, suffix: str, shards: dict[str, dict[str, Tensor]]) -> Path:
    """Save ``shards`` (file name -> tensors) and an index listing exactly what they hold."""
    weight_map = {}
    for name, tensors in shards.items():
        _save(folder / name, tensors)
        weight_map.update(dict.fromkeys(tensors, name))
    return _write_index(folder, suffix, weight_map)


def _two_shards(suffix: str) -> dict[str, dict[str, Tensor]]:
    tensors = _tensors()
    keys = sorted(tensors)
    return {
        f"model-00002-of-00002.{suffix}": {k: tensors[k] for k in keys[:2]},
        f"model-00001-of-00002.{suffix}": {k: tensors[k] for k in keys[2:]},
    }


# -- round trips ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["model.safetensors", "pytorch_model.bin"])
def test_single_file_round_trips_with_dtypes(tmp_path: Path, name: str) -> None:
    tensors = _tensors()
    _save(tmp_path / name, tensors)
    assert weight_files(str(tmp_path)) == [tmp_path / name]
    _assert_same(read_weights(tmp_path), tensors)


@pytest.mark.parametrize("suffix", ["safetensors", "bin"])
def test_sharded_folder_round_trips(tmp_path: Path, suffix: str) -> None:
    shards = _two_shards(suffix)
    _sharded(tmp_path, suffix, shards)
    assert weight_files(tmp_path) == [tmp_path / name for name in sorted(shards)]
    want = {k: v for tensors in shards.values() for k, v in tensors.items()}
    _assert_same(read_weights(tmp_path), want)


def test_legacy_bin_without_zip_format_is_read(tmp_path: Path) -> None:
    tensors = _tensors()
    torch.save(tensors, tmp_path / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    _assert_same(read_weights(tmp_path), tensors)


def test_saved_parameters_come_back_as_plain_tensors(tmp_path: Path) -> None:
    torch.save(nn.Linear(2, 3).state_dict(keep_vars=True), tmp_path / "pytorch_model.bin")
    weights = read_weights(tmp_path)
    assert all(type(t) is Tensor and not t.requires_grad for t in weights.values())


@pytest.mark.parametrize("present", [(0, 1, 2, 3), (1, 2, 3), (2, 3), (1, 2), (0, 2)])
def test_preference_order(tmp_path: Path, present: tuple[int, ...]) -> None:
    assert WEIGHT_FILES == (
        "model.safetensors",
        "model.safetensors.index.json",
        "pytorch_model.bin",
        "pytorch_model.bin.index.json",
    )
    for i in present:
        name = WEIGHT_FILES[i]
        if name.endswith(".index.json"):
            suffix = name.removesuffix(".index.json").rsplit(".", 1)[1]
            _sharded(tmp_path, suffix, {f"shard.{suffix}": {"x": torch.full((1,), float(i))}})
        else:
            _save(tmp_path / name, {"x": torch.full((1,), float(i))})
    assert read_weights(tmp_path)["x"].item() == present[0]


# -- finding the files: errors --------------------------------------------------------------------
def test_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"no checkpoint folder at .*nope"):
        weight_files(tmp_path / "nope")


def test_folder_without_weights_names_what_was_looked_for_and_found(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.ckpt").write_bytes(b"")
    with pytest.raises(FileNotFoundError) as info:
        read_weights(tmp_path)
    message = str(info.value)
    assert str(tmp_path) in message
    assert all(name in message for name in WEIGHT_FILES)
    assert "it holds config.json, model.ckpt" in message


def test_folder_listing_is_capped(tmp_path: Path) -> None:
    for i in range(13):
        (tmp_path / f"f{i:02d}.txt").write_text("")
    with pytest.raises(FileNotFoundError, match=r"f09\.txt and 3 more$"):
        weight_files(tmp_path)


def test_empty_folder(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="it holds nothing"):
        weight_files(tmp_path)


def test_index_that_is_not_json(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"model\.safetensors\.index\.json is not valid JSON"):
        weight_files(tmp_path)


@pytest.mark.parametrize(
    ("content", "got"), [({}, "no such field"), ({"weight_map": ["a"]}, "list")]
)
def test_index_without_weight_map_object(tmp_path: Path, content: dict, got: str) -> None:
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps(content))
    with pytest.raises(
        ValueError, match=rf'index\.json must hold a "weight_map" object, got {got}'
    ):
        weight_files(tmp_path)


def test_index_with_empty_weight_map_or_bad_entry(tmp_path: Path) -> None:
    _write_index(tmp_path, "safetensors", {})
    with pytest.raises(ValueError, match=r'index\.json has an empty "weight_map"'):
        weight_files(tmp_path)
    _write_index(tmp_path, "safetensors", {"a.weight": 3})
    with pytest.raises(ValueError, match=r"index\.json: \"weight_map\" entry 'a\.weight' must"):
        weight_files(tmp_path)


def test_index_naming_a_missing_shard(tmp_path: Path) -> None:
    save_file({"a": torch.ones(1)}, str(tmp_path / "one.safetensors"))
    _write_index(tmp_path, "safetensors", {"a": "one.safetensors", "b": "two.safetensors"})
    with pytest.raises(
        ValueError,
        match=r"model\.safetensors\.index\.json names shard 'two\.safetensors', which is missing",
    ):
        read_weights(tmp_path)


@pytest.mark.parametrize("shard", ["../x.safetensors", "sub/../../x.safetensors", "/tmp/x"])
def test_index_naming_a_shard_outside_the_folder(tmp_path: Path, shard: str) -> None:
    folder = tmp_path / "ckpt"
    folder.mkdir()
    save_file({"a": torch.ones(1)}, str(tmp_path / "x.safetensors"))
    _write_index(folder, "safetensors", {"a": shard})
    with pytest.raises(ValueError, match=rf"names shard '{re.escape(shard)}', which lies outside"):
        weight_files(folder)


def test_shards_may_be_symlinks_out_of_the_folder(tmp_path: Path) -> None:
    # As in a Hugging Face cache, where snapshot files link into a blobs folder.
    blobs, folder = tmp_path / "blobs", tmp_path / "snapshot"
    blobs.mkdir()
    folder.mkdir()
    save_file({"a": torch.ones(2)}, str(blobs / "abc123"))
    (folder / "model-1.safetensors").symlink_to(blobs / "abc123")
    _write_index(folder, "safetensors", {"a": "model-1.safetensors"})
    assert torch.equal(read_weights(folder)["a"], torch.ones(2))


# -- index and shards disagree --------------------------------------------------------------------
def test_key_listed_but_not_in_its_shard(tmp_path: Path) -> None:
    save_file({"a": torch.ones(1)}, str(tmp_path / "s1.safetensors"))
    _write_index(tmp_path, "safetensors", {"a": "s1.safetensors", "b": "s1.safetensors"})
    with pytest.raises(ValueError) as info:
        read_weights(tmp_path)
    message = str(info.value)
    assert "model.safetensors.index.json does not match its shards" in message
    assert "s1.safetensors lacks 1 key: b that the index puts there" in message


def test_shard_holding_an_unlisted_key(tmp_path: Path) -> None:
    torch.save({"a": torch.ones(1), "stray": torch.ones(1)}, tmp_path / "s1.bin")
    _write_index(tmp_path, "bin", {"a": "s1.bin"})
    with pytest.raises(
        ValueError, match=r"(?s)index\.json does not match.*s1\.bin holds 1 key: stray"
    ):
        read_weights(tmp_path)


def test_key_held_by_two_shards(tmp_path: Path) -> None:
    save_file({"a": torch.ones(1), "b": torch.ones(1)}, str(tmp_path / "s1.safetensors"))
    save_file({"b": torch.zeros(1)}, str(tmp_path / "s2.safetensors"))
    _write_index(tmp_path, "safetensors", {"a": "s1.safetensors", "b": "s2.safetensors"})
    with pytest.raises(
        ValueError,
        match=r"s1\.safetensors holds 1 key: b \(listed in s2\.safetensors\) that the index puts "
        r"in another shard",
    ):
        read_weights(tmp_path)


def test_many_bad_keys_are_counted_not_all_named(tmp_path: Path) -> None:
    save_file({"a": torch.ones(1)}, str(tmp_path / "s1.safetensors"))
    weight_map = {"a": "s1.safetensors"} | {f"k{i}": "s1.safetensors" for i in range(8)}
    _write_index(tmp_path, "safetensors", weight_map)
    with pytest.raises(ValueError, match=r"lacks 8 keys: k0, k1, k2, k3, k4 and 3 more"):
        read_weights(tmp_path)


# -- damaged and unsafe files ---------------------------------------------------------------------
@pytest.mark.parametrize("name", ["model.safetensors", "pytorch_model.bin"])
def test_truncated_file(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    _save(path, _tensors())
    path.write_bytes(path.read_bytes()[:-40])
    with pytest.raises(ValueError, match=rf"{name} is not a readable .*\(corrupt or truncated\?\)"):
        read_weights(tmp_path)


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (b"", r"bin is not a readable PyTorch checkpoint"),
        (b"hello world", r"bin is not a readable PyTorch checkpoint"),
        (b"not a checkpoint at all", r"bin cannot be read safely: .*\(Unsupported operand 110\)"),
    ],
)
def test_garbage_bin(tmp_path: Path, content: bytes, match: str) -> None:
    # Garbage the safe unpickler trips over reads like a refusal without a named global.
    (tmp_path / "pytorch_model.bin").write_bytes(content)
    with pytest.raises(ValueError, match=match):
        read_weights(tmp_path)


def test_corrupt_shard_is_named(tmp_path: Path) -> None:
    _sharded(tmp_path, "safetensors", _two_shards("safetensors"))
    (tmp_path / "model-00002-of-00002.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(ValueError, match=r"model-00002-of-00002\.safetensors is not a readable"):
        read_weights(tmp_path)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol 4")
@pytest.mark.parametrize(
    ("how", "refused"),
    [
        ({}, r"refused: builtins\.print"),
        ({"_use_new_zipfile_serialization": False}, r"refused: print"),
        ({"pickle_protocol": 4}, r"refused it \(Unsupported operand 149\); it is corrupt, or"),
    ],
)
def test_pickled_objects_are_refused_and_never_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], how: dict, refused: str
) -> None:
    torch.save({"a": torch.ones(1), "b": Payload()}, tmp_path / "pytorch_model.bin", **how)
    with pytest.raises(ValueError) as info:
        read_weights(tmp_path)
    message = str(info.value)
    assert re.search(
        r"pytorch_model\.bin .*pickled Python objects that kineflow will not execute", message
    )
    assert re.search(refused, message)
    assert "pwned" not in capsys.readouterr().out


def test_raw_pickle_is_refused_and_never_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "pytorch_model.bin").write_bytes(pickle.dumps(Payload(), protocol=2))
    with pytest.raises(ValueError, match=r"holds pickled Python objects .*refused: print"):
        read_weights(tmp_path)
    assert "pwned" not in capsys.readouterr().out


def test_pickled_module_is_refused_as_weights(tmp_path: Path) -> None:
    # load_embedding_table allows nn.Embedding; read_weights does not.
    torch.save(nn.Embedding(3, 2), tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"refused: torch\.nn\.modules\.sparse\.Embedding"):
        read_weights(tmp_path)


@pytest.mark.parametrize(
    ("data", "match"),
    [
        ([torch.ones(1)], r"pytorch_model\.bin holds a list, expected a mapping of names"),
        (torch.ones(1), r"pytorch_model\.bin holds a Tensor, expected a mapping"),
        ({"a": torch.ones(1), "b": {"c": torch.ones(1)}}, r"bin: key 'b' holds a dict, expected"),
        ({"a": torch.ones(1), "n": 3}, r"bin: key 'n' holds a int, expected a tensor"),
        ({1: torch.ones(1)}, r"bin: key 1 is a int, expected str"),
    ],
)
def test_bin_that_is_not_a_flat_state_dict(tmp_path: Path, data: object, match: str) -> None:
    torch.save(data, tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match=match):
        read_weights(tmp_path)


# -- embedding tables -----------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_pickled_embedding_module(tmp_path: Path, dtype: torch.dtype) -> None:
    module = nn.Embedding(5, 3).to(dtype)
    assert module.weight.requires_grad
    torch.save(module, tmp_path / "text_embedding.pt")
    table = load_embedding_table(tmp_path / "text_embedding.pt")
    assert type(table) is Tensor
    assert table.dtype == dtype and not table.requires_grad and table.is_contiguous()
    assert torch.equal(table, module.weight.detach())


def test_embedding_allowance_does_not_outlive_the_call(tmp_path: Path) -> None:
    torch.save(nn.Embedding(5, 3), tmp_path / "e.pt")
    load_embedding_table(tmp_path / "e.pt")
    with pytest.raises(pickle.UnpicklingError):
        torch.load(tmp_path / "e.pt", weights_only=True)


@pytest.mark.parametrize(
    ("name", "data"),
    [
        ("t.pt", torch.randn(6, 2)),
        ("t.pth", {"weight": torch.randn(6, 2)}),
        ("t.bin", {"emb": torch.randn(6, 2)}),
        ("t.pt", {"weight": torch.randn(6, 2), "bias": torch.randn(2), "step": 3}),
    ],
)
def test_pickled_tensor_or_state_dict(tmp_path: Path, name: str, data: object) -> None:
    torch.save(data, tmp_path / name)
    want = data if isinstance(data, Tensor) else data.get("weight", data.get("emb"))
    assert torch.equal(load_embedding_table(str(tmp_path / name)), want)


def test_non_contiguous_table_comes_back_contiguous(tmp_path: Path) -> None:
    """A transposed (non-contiguous) table comes back contiguous *and* element for element
    the transposed values: row i is column i of the saved storage, not its i-th chunk."""
    stored = torch.arange(12.0).reshape(2, 6)
    torch.save(stored.t(), tmp_path / "t.pt")
    table = load_embedding_table(tmp_path / "t.pt")
    assert table.shape == (6, 2) and table.is_contiguous()
    assert torch.equal(table, stored.t())
    assert table[1].tolist() == [1.0, 7.0]  # not [2.0, 3.0], the storage read row by row


@pytest.mark.parametrize(
    "tensors",
    [
        {"only": torch.randn(6, 2).to(torch.bfloat16)},
        {"weight": torch.randn(6, 2).to(torch.bfloat16), "other": torch.randn(2)},
    ],
)
def test_safetensors_table(tmp_path: Path, tensors: dict[str, Tensor]) -> None:
    save_file(tensors, str(tmp_path / "e.safetensors"))
    table = load_embedding_table(tmp_path / "e.safetensors")
    assert torch.equal(table, tensors.get("weight", tensors.get("only")))
    assert table.dtype == torch.bfloat16


def test_pickled_linear_is_refused_as_embedding(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    torch.save(nn.Linear(3, 2), tmp_path / "e.pt")
    with pytest.raises(
        ValueError,
        match=r"e\.pt holds pickled Python objects that kineflow will not execute "
        r"\(refused: torch\.nn\.modules\.linear\.Linear\)$",
    ):
        load_embedding_table(tmp_path / "e.pt")
    torch.save(Payload(), tmp_path / "p.pt")
    with pytest.raises(ValueError, match=r"p\.pt holds pickled Python objects .*builtins\.print"):
        load_embedding_table(tmp_path / "p.pt")
    assert "pwned" not in capsys.readouterr().out


@pytest.mark.parametrize(
    ("name", "data", "match"),
    [
        ("e.pt", torch.randn(6), r"e\.pt: the embedding table has shape \(6,\); expected 2-D"),
        ("e.pt", torch.randn(2, 3, 4), r"e\.pt: the embedding table has shape \(2, 3, 4\)"),
        ("e.pt", torch.randn(0, 4), r"e\.pt: the embedding table is empty"),
        ("e.pt", torch.ones(3, 4, dtype=torch.int64), r"e\.pt: .* dtype torch\.int64"),
        ("e.pt", {"a": torch.ones(3, 4), "b": torch.ones(3, 4)}, r"e\.pt holds 2 keys: a, b, none"),
        ("e.pt", {"step": 3}, r"e\.pt holds no tensor"),
        ("e.pt", [torch.ones(3, 4)], r"e\.pt holds a list; expected an nn\.Embedding"),
        ("e.safetensors", {"a": torch.ones(3, 4), "b": torch.ones(3, 4)}, r"holds 2 keys: a, b"),
        ("e.npy", torch.ones(3, 4), r"e\.npy: unknown suffix '\.npy'"),
    ],
)
def test_refused_embedding_tables(tmp_path: Path, name: str, data: object, match: str) -> None:
    path = tmp_path / name
    if name.endswith(".safetensors"):
        save_file(data, str(path))
    else:
        torch.save(data, path)
    with pytest.raises(ValueError, match=match):
        load_embedding_table(path)


def test_missing_or_corrupt_embedding_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"no such file: .*gone\.pt"):
        load_embedding_table(tmp_path / "gone.pt")
    (tmp_path / "bad.safetensors").write_bytes(b"garbage!garbage!")
    with pytest.raises(ValueError, match=r"bad\.safetensors is not a readable safetensors file"):
        load_embedding_table(tmp_path / "bad.safetensors")
