"""kineflow.io: atomic writes, JSON objects, state-dict checks and pretrained folders."""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from kineflow.io import (
    atomic_save_safetensors,
    atomic_write,
    atomic_write_json,
    atomic_write_text,
    check_state_dict,
    load_pretrained,
    load_pretrained_folder,
    read_json_object,
    save_pretrained_folder,
)


# -- atomic_write ---------------------------------------------------------------------------------
def test_atomic_write_creates_and_replaces(tmp_path: Path) -> None:
    path = tmp_path / "f.txt"
    assert atomic_write(str(path), lambda p: p.write_bytes(b"one")) == path
    atomic_write(path, lambda p: p.write_bytes(b"two"))
    assert path.read_bytes() == b"two"
    assert os.listdir(tmp_path) == ["f.txt"]


def test_atomic_write_hands_write_a_fresh_empty_file_next_to_the_target(tmp_path: Path) -> None:
    path = tmp_path / "f.txt"
    path.write_text("old")
    seen: list[Path] = []

    def write(temp: Path) -> None:
        seen.append(temp)
        assert temp.parent == tmp_path and temp != path and temp.name.startswith(".f.txt.")
        assert temp.read_bytes() == b""
        temp.write_text("new")

    atomic_write(path, write)
    atomic_write(path, write)
    assert seen[0] != seen[1]  # a unique name each time
    assert path.read_text() == "new"


def test_failure_mid_write_keeps_the_old_file_and_no_temp(tmp_path: Path) -> None:
    path = tmp_path / "f.txt"
    path.write_text("old contents")

    def half_write(temp: Path) -> None:
        with open(temp, "w") as f:
            f.write("half of the new")
            f.flush()
        raise RuntimeError("crash mid-write")

    with pytest.raises(RuntimeError, match="crash mid-write"):
        atomic_write(path, half_write)
    assert path.read_text() == "old contents"
    assert os.listdir(tmp_path) == ["f.txt"]


def test_failure_on_new_file_leaves_nothing(tmp_path: Path) -> None:
    with pytest.raises(KeyboardInterrupt):  # BaseException too
        atomic_write(tmp_path / "f.txt", lambda p: (_ for _ in ()).throw(KeyboardInterrupt))
    assert os.listdir(tmp_path) == []


def test_failed_rename_keeps_the_old_file_and_no_temp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "f.txt"
    path.write_text("old")

    def failing_replace(src: object, dst: object) -> None:
        raise OSError("disk on fire")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk on fire"):
        atomic_write_text(path, "new")
    monkeypatch.undo()
    assert path.read_text() == "old"
    assert os.listdir(tmp_path) == ["f.txt"]


def test_missing_folder_raises_and_creates_nothing(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        atomic_write_text(tmp_path / "no" / "f.txt", "x")
    assert os.listdir(tmp_path) == []


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX permissions")
@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_permissions_follow_the_umask(tmp_path: Path, umask: int) -> None:
    old = os.umask(umask)
    try:
        atomic_write_text(tmp_path / "new.txt", "x")
        existing = tmp_path / "existing.txt"
        existing.write_text("old")
        existing.chmod(0o600 if umask != 0o077 else 0o644)
        atomic_write_text(existing, "new")
    finally:
        os.umask(old)
    expected = 0o666 & ~umask  # what open(path, "w") gives a new file
    assert stat.S_IMODE((tmp_path / "new.txt").stat().st_mode) == expected
    assert stat.S_IMODE(existing.stat().st_mode) == expected


def test_text_and_json_writers(tmp_path: Path) -> None:
    atomic_write_text(tmp_path / "t.txt", "a\nb\r\nc")
    assert (tmp_path / "t.txt").read_bytes() == b"a\nb\r\nc"  # newlines as given
    atomic_write_text(tmp_path / "l.txt", "é", encoding="latin-1")
    assert (tmp_path / "l.txt").read_bytes() == b"\xe9"
    atomic_write_json(tmp_path / "a.json", {"b": 1, "a": "｜é｜"})
    text = (tmp_path / "a.json").read_text(encoding="utf-8")
    assert text == '{\n  "b": 1,\n  "a": "｜é｜"\n}\n'
    atomic_write_json(tmp_path / "s.json", {"b": 1, "a": [2]}, sort_keys=True)
    assert (tmp_path / "s.json").read_text() == '{\n  "a": [\n    2\n  ],\n  "b": 1\n}\n'


def test_atomic_save_safetensors(tmp_path: Path) -> None:
    weight = torch.arange(6.0).reshape(2, 3).t()  # non-contiguous
    path = atomic_save_safetensors(
        tmp_path / "w.safetensors",
        {"w": weight, "h": torch.ones(2, dtype=torch.bfloat16)},
        {"k": "v"},
    )
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata() == {"k": "v"}
        assert torch.equal(f.get_tensor("w"), weight)
        assert f.get_tensor("h").dtype == torch.bfloat16
    assert os.listdir(tmp_path) == ["w.safetensors"]


# -- read_json_object -----------------------------------------------------------------------------
def test_read_json_object(tmp_path: Path) -> None:
    path = tmp_path / "c.json"
    path.write_text('{"a": [1, 2], "b": "ü"}', encoding="utf-8")
    assert read_json_object(str(path)) == {"a": [1, 2], "b": "ü"}


@pytest.mark.parametrize(
    ("content", "error", "message"),
    [
        (None, FileNotFoundError, "no such file: {path}"),
        (b"{", ValueError, "{path} is not valid JSON: "),
        (b"", ValueError, "{path} is not valid JSON: "),
        (b'{"a": "\xff"}', ValueError, "{path} is not valid JSON: "),
        (b"[1, 2]", ValueError, "{path} must hold a JSON object, got list"),
        (b"null", ValueError, "{path} must hold a JSON object, got NoneType"),
    ],
    ids=["missing", "truncated", "empty", "not-utf8", "array", "null"],
)
def test_read_json_object_errors_name_the_file(
    tmp_path: Path, content: bytes | None, error: type[Exception], message: str
) -> None:
    path = tmp_path / "c.json"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(error) as info:
        read_json_object(path)
    assert str(info.value).startswith(message.format(path=path))


# -- check_state_dict -----------------------------------------------------------------------------
def test_check_state_dict_accepts_an_exact_match() -> None:
    own = torch.nn.Linear(3, 2).state_dict()
    check_state_dict(own, {k: torch.zeros_like(v) for k, v in own.items()}, "w.safetensors")


def test_check_state_dict_names_every_bad_key_with_both_shapes() -> None:
    own = {"a": torch.zeros(2, 3), "b": torch.zeros(4), "c": torch.zeros(1), "d": torch.zeros(5)}
    loaded = {"a": torch.zeros(3, 2), "b": torch.zeros(4), "x": torch.zeros(1), "y": torch.zeros(1)}
    with pytest.raises(ValueError) as info:
        check_state_dict(own, loaded, "w.safetensors")
    assert str(info.value) == (
        "w.safetensors does not match the model:\n"
        "  2 missing: c, d\n"
        "  2 unexpected: x, y\n"
        "  1 mis-shaped: a: expected (2, 3), got (3, 2)"
    )
    with pytest.raises(ValueError) as info:
        check_state_dict(own, loaded, "the state dict", prefix="vq.")
    message = str(info.value)
    assert "2 missing: vq.c, vq.d" in message and "2 unexpected: vq.x, vq.y" in message
    assert "vq.a: expected (2, 3), got (3, 2)" in message


# -- pretrained folders ---------------------------------------------------------------------------
def saved(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    state = {"w": torch.randn(3, 2), "h": torch.arange(4, dtype=torch.int64)}
    folder = save_pretrained_folder(tmp_path / "deep" / "m", state, {"width": 3}, "toy")
    return folder, state


def test_pretrained_folder_round_trip(tmp_path: Path) -> None:
    folder, state = saved(tmp_path)
    assert folder == tmp_path / "deep" / "m"
    assert sorted(os.listdir(folder)) == ["config.json", "model.safetensors"]
    assert json.loads((folder / "config.json").read_text()) == {"kineflow_type": "toy", "width": 3}
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        assert f.metadata() == {"format": "pt", "kineflow_type": "toy"}
    config, weights = load_pretrained_folder(str(folder), "toy", "toy model")
    assert config == {"width": 3}
    assert weights.keys() == state.keys()
    for k, v in state.items():
        assert torch.equal(weights[k], v) and weights[k].dtype == v.dtype
    # Saving again overwrites in place.
    save_pretrained_folder(folder, {"w": torch.zeros(1)}, {"width": 1}, "toy")
    config, weights = load_pretrained_folder(folder, "toy", "toy model")
    assert config == {"width": 1} and list(weights) == ["w"]


def test_save_pretrained_folder_rejects_a_type_field(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="must not hold 'kineflow_type'"):
        save_pretrained_folder(tmp_path, {}, {"kineflow_type": "x"}, "toy")
    assert os.listdir(tmp_path) == []


def test_load_pretrained_folder_missing_things(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"no toy model folder at .*nowhere \(no such"):
        load_pretrained_folder(tmp_path / "nowhere", "toy", "toy model")
    folder, _ = saved(tmp_path)
    (folder / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError) as info:
        load_pretrained_folder(folder, "toy", "toy model")
    assert str(info.value) == (
        f"{folder} has no model.safetensors; a toy model folder holds config.json and "
        "model.safetensors"
    )
    (folder / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"has no config\.json; a toy model folder"):
        load_pretrained_folder(folder, "toy", "toy model")


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ("{", "config.json is not valid JSON"),
        ("[]", "config.json must hold a JSON object, got list"),
        ('{"kineflow_type": "vq"}', "config.json is of type 'vq'; expected a toy model"),
        ('{"width": 3}', "config.json has no kineflow_type field; expected a toy model"),
    ],
)
def test_load_pretrained_folder_bad_config(tmp_path: Path, config: str, message: str) -> None:
    folder, _ = saved(tmp_path)
    (folder / "config.json").write_text(config)
    with pytest.raises(ValueError) as info:
        load_pretrained_folder(folder, "toy", "toy model")
    assert message in str(info.value)
    assert str(folder / "config.json") in str(info.value)


def test_load_pretrained_folder_points_at_the_diffusers_loader(tmp_path: Path) -> None:
    folder = tmp_path / "vae"
    folder.mkdir()  # a diffusers folder: its weights have another name
    (folder / "config.json").write_text('{"_class_name": "AutoencoderKL"}')
    with pytest.raises(ValueError) as info:
        load_pretrained_folder(
            folder, "toy", "toy model", diffusers_hints={"AutoencoderKL": "use Toy.from_diffusers"}
        )
    assert str(info.value) == (
        f"{folder / 'config.json'} has no kineflow_type field; expected a toy model "
        "(kineflow_type 'toy'); it looks like a diffusers AutoencoderKL folder: "
        "use Toy.from_diffusers"
    )
    (folder / "config.json").write_text('{"_class_name": "VQModel"}')  # no advice for it
    with pytest.raises(ValueError) as info:
        load_pretrained_folder(
            folder, "toy", "toy model", diffusers_hints={"AutoencoderKL": "use Toy.from_diffusers"}
        )
    assert str(info.value).endswith("; it looks like a diffusers VQModel folder")


def linear(config: dict) -> torch.nn.Linear:
    return torch.nn.Linear(config["inputs"], config["outputs"])


def test_load_pretrained_builds_checks_and_loads(tmp_path: Path) -> None:
    model = torch.nn.Linear(3, 2).to(torch.bfloat16)
    config = {"inputs": 3, "outputs": 2}
    folder = save_pretrained_folder(tmp_path / "m", model.state_dict(), config, "linear")
    loaded = load_pretrained(folder, "linear", "linear model", linear)
    assert loaded.weight.dtype == torch.bfloat16  # the stored dtype
    assert torch.equal(loaded.weight, model.weight) and torch.equal(loaded.bias, model.bias)
    as_float = load_pretrained(folder, "linear", "linear model", linear, dtype=torch.float32)
    assert as_float.weight.dtype == torch.float32
    assert torch.equal(as_float.weight, model.weight.float())
    # Mixed floating dtypes: the model keeps the dtype it was built with.
    mixed = {"weight": model.weight.float(), "bias": model.bias}
    save_pretrained_folder(folder, mixed, config, "linear")
    assert load_pretrained(folder, "linear", "linear model", linear).bias.dtype == torch.float32


def test_load_pretrained_errors(tmp_path: Path) -> None:
    config = {"inputs": 3, "outputs": 2}
    folder = save_pretrained_folder(
        tmp_path / "m", torch.nn.Linear(3, 2).state_dict(), config, "linear"
    )
    with pytest.raises(ValueError, match="is of type 'linear'; expected a conv"):
        load_pretrained(folder, "conv", "conv", linear)

    def picky(config: dict) -> torch.nn.Linear:
        raise ValueError("outputs must be even")

    with pytest.raises(ValueError) as info:
        load_pretrained(folder, "linear", "linear model", picky)
    assert str(info.value) == f"{folder / 'config.json'}: outputs must be even"
    with pytest.raises(ValueError) as info:
        load_pretrained(folder, "linear", "linear model", lambda c: linear({**c, "outputs": 4}))
    assert str(info.value).startswith(f"{folder / 'model.safetensors'} does not match the model")
    assert "weight: expected (4, 3), got (2, 3)" in str(info.value)
