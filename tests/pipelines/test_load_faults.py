"""Faults in the files kineflow loads: integer-typed and non-finite weights (named by file and
tensor), unreadable tokenizer files, JSON nested past the recursion limit, decompression-bomb
pictures. Each must end in one error line, never a traceback."""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
import subprocess
import sys
import warnings
import zlib
from pathlib import Path

import pytest
import torch
from janus_fixture import write_janus_checkpoint
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer
from tokenizers.models import WordLevel

import kineflow
from kineflow.data.image_file import ImageFileError
from kineflow.data.manifest import ManifestError, read_manifest
from kineflow.inputs.images import load_image
from kineflow.interop import load_checks
from kineflow.io import check_state_dict, read_json_object, read_jsonl
from kineflow.tokenizers.text import TextTokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[2]
CHECKPOINTS = ROOT / "checkpoints"
EMBED = "language_model.model.embed_tokens.weight"
DEEP = 100_000  # far past Python's recursion limit (1000)


def copy_of(name: str, tmp_path: Path) -> Path:
    return shutil.copytree(CHECKPOINTS / name, tmp_path / name)


def edit_safetensors(path: Path, edit) -> None:
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path))


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "kineflow", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd, timeout=120)


def single_error(done: subprocess.CompletedProcess) -> str:
    """The one ``error:`` line of a CLI run that must fail cleanly with exit code 2."""
    assert done.returncode == 2, done.stdout + done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    errors = [line for line in done.stdout.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, done.stdout
    return errors[0]


@pytest.fixture(scope="module")
def janus(tmp_path_factory) -> Path:
    return write_janus_checkpoint(tmp_path_factory.mktemp("janus") / "FUDOKI")[0]


def janus_copy(janus: Path, tmp_path: Path) -> Path:
    return shutil.copytree(janus, tmp_path / "FUDOKI")


# -- integer-typed weights ------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.int64, torch.bool])
def test_integer_weight_in_a_kineflow_folder_is_named(tmp_path, dtype) -> None:
    folder = copy_of("fudoki-shapes", tmp_path)
    edit_safetensors(folder / "model.safetensors", lambda t: t.update({EMBED: t[EMBED].to(dtype)}))
    with pytest.raises(ValueError) as info:
        kineflow.load(folder)
    name = str(dtype).removeprefix("torch.")
    assert str(info.value) == (
        f"{folder / 'model.safetensors'}: {EMBED} is {name}, expected a floating-point tensor"
    )


def test_integer_metric_table_in_a_kineflow_folder_is_named(tmp_path) -> None:
    folder = copy_of("fudoki-shapes", tmp_path)
    edit_safetensors(folder / "metric.safetensors", lambda t: t.update(text=t["text"].long()))
    with pytest.raises(ValueError) as info:
        kineflow.load(folder)
    assert str(info.value) == (
        f"{folder / 'metric.safetensors'}: text is int64, expected a floating-point tensor"
    )


def test_integer_weight_in_a_unifluid_folder_is_named(tmp_path) -> None:
    folder = copy_of("unifluid-shapes", tmp_path)
    key = "diffusion_head.net.output.weight"
    edit_safetensors(folder / "model.safetensors", lambda t: t.update({key: t[key].int()}))
    with pytest.raises(ValueError, match=f"model.safetensors: {key} is int32, expected a float"):
        kineflow.load(folder)


@pytest.mark.parametrize("weights", ["safetensors", "sharded", "bin"])
def test_integer_weight_in_a_janus_release_is_named(tmp_path, weights) -> None:
    folder, _, _ = write_janus_checkpoint(tmp_path / "FUDOKI", weights=weights)
    if weights == "bin":
        state = torch.load(folder / "pytorch_model.bin", weights_only=True)
        state[EMBED] = state[EMBED].long()
        torch.save(state, folder / "pytorch_model.bin")
        file = folder / "pytorch_model.bin"
    else:
        index = folder / "model.safetensors.index.json"
        shard = json.loads(index.read_text())["weight_map"][EMBED] if index.is_file() else None
        file = folder / (shard or "model.safetensors")
        edit_safetensors(file, lambda t: t.update({EMBED: t[EMBED].long()}))
    with pytest.raises(ValueError) as info:
        kineflow.load(folder)
    assert str(info.value) == f"{file}: {EMBED} is int64, expected a floating-point tensor"


def test_janus_unused_integer_buffer_is_fine(janus) -> None:
    # The fixture ships Janus's float codebook_used; as int64 (unused, skipped) it must load.
    state = load_file(str(janus / "model.safetensors"))
    assert "gen_vision_model.quantize.codebook_used" in state
    folder = janus.parent / "int-buffer"
    shutil.copytree(janus, folder)
    key = "gen_vision_model.quantize.codebook_used"
    edit_safetensors(folder / "model.safetensors", lambda t: t.update({key: t[key].long()}))
    assert kineflow.load(folder).model is not None


def test_check_state_dict_names_integer_tensors() -> None:
    own = {"w": torch.zeros(2, 3), "steps": torch.zeros(1, dtype=torch.int64)}
    loaded = {"w": torch.zeros(2, 3, dtype=torch.int16), "steps": torch.ones(1, dtype=torch.int64)}
    with pytest.raises(ValueError) as info:
        check_state_dict(own, loaded, "f.safetensors", prefix="vq.")
    assert "1 not floating-point: vq.w is int16, expected a floating-point tensor" in str(
        info.value
    )
    check_state_dict(own, {**loaded, "w": torch.zeros(2, 3, dtype=torch.float16)}, "f")


# -- non-finite weights ---------------------------------------------------------------------------
@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_non_finite_weight_in_a_kineflow_folder_is_named(tmp_path, value) -> None:
    folder = copy_of("fudoki-shapes", tmp_path)
    key = "gen_head.vision_head.weight"

    def poison(t):
        t[key][3, :2] = value

    edit_safetensors(folder / "model.safetensors", poison)
    with pytest.raises(ValueError) as info:
        kineflow.load(folder)
    message = str(info.value)
    assert message.startswith(
        f"{folder / 'model.safetensors'}: {key} holds 2 non-finite value(s) (NaN or inf)"
    )
    assert "check_finite=False" in message
    pipe = kineflow.load(folder, check_finite=False)  # asked for: loads as it is
    assert not torch.isfinite(pipe.model.gen_head.vision_head.weight).all()


def test_non_finite_check_is_skipped_above_the_size_threshold(tmp_path, monkeypatch) -> None:
    folder = copy_of("unifluid-shapes", tmp_path)
    key = "backbone.embed_tokens.weight"

    def poison(t):
        t[key][0, 0] = math.nan

    edit_safetensors(folder / "model.safetensors", poison)
    with pytest.raises(ValueError, match=f"model.safetensors: {key} holds 1 non-finite"):
        kineflow.load(folder)
    # Default (None): checked below FINITE_CHECK_BYTES of weight files only.
    monkeypatch.setattr(load_checks, "FINITE_CHECK_BYTES", 1000)
    assert kineflow.load(folder).model is not None
    with pytest.raises(ValueError, match="holds 1 non-finite"):
        kineflow.load(folder, check_finite=True)


def test_non_finite_metric_table_in_a_kineflow_folder_is_named(tmp_path) -> None:
    folder = copy_of("fudoki-shapes", tmp_path)

    def poison(t):
        t["image"][5, 0] = math.nan

    edit_safetensors(folder / "metric.safetensors", poison)
    with pytest.raises(ValueError, match=r"metric\.safetensors: image holds 1 non-finite"):
        kineflow.load(folder)


def test_non_finite_weight_in_a_janus_release_is_named(janus, tmp_path) -> None:
    folder = janus_copy(janus, tmp_path)
    key = "aligner.layers.0.weight"

    def poison(t):
        t[key][1, 1] = -math.inf

    edit_safetensors(folder / "model.safetensors", poison)
    with pytest.raises(ValueError) as info:
        kineflow.load(folder)
    assert str(info.value).startswith(
        f"{folder / 'model.safetensors'}: {key} holds 1 non-finite value(s)"
    )
    assert kineflow.load(folder, check_finite=False).model is not None


def test_non_finite_janus_metric_file_is_named(janus, tmp_path) -> None:
    folder = janus_copy(janus, tmp_path)
    table = torch.load(folder / "text_embedding.pt", weights_only=False)
    with torch.no_grad():
        table.weight[2, 0] = math.nan
    torch.save(table, folder / "text_embedding.pt")
    with pytest.raises(ValueError) as info:
        kineflow.load(folder)
    assert str(info.value).startswith(
        f"{folder / 'text_embedding.pt'}: the text metric table holds 1 non-finite"
    )


# -- tokenizer files ------------------------------------------------------------------------------
def bad_tokenizers() -> dict[str, str]:
    good = json.loads((CHECKPOINTS / "fudoki-shapes" / "tokenizer.json").read_text())
    return {
        "not json": "this is not JSON {",
        "deep nesting": json.dumps(good)[:-1] + ', "x": ' + "[" * DEEP + "]" * DEEP + "}",
        "unknown model type": json.dumps({**good, "model": {**good["model"], "type": "Nope"}}),
        "no special tokens": Tokenizer(WordLevel({"a": 0, "?": 1}, unk_token="?")).to_str(),
    }


@pytest.mark.parametrize("case", list(bad_tokenizers()))
def test_bad_tokenizer_file_is_named(tmp_path, case) -> None:
    file = tmp_path / "tokenizer.json"
    file.write_text(bad_tokenizers()[case])
    with pytest.raises(ValueError) as info:
        TextTokenizer.load(tmp_path)
    message = str(info.value)
    assert message.startswith(f"{file}") and "\n" not in message


def test_deeply_nested_tokenizer_config_is_named(tmp_path) -> None:
    folder = copy_of("fudoki-shapes", tmp_path)
    (folder / "tokenizer_config.json").write_text("[" * DEEP + "]" * DEEP)
    with pytest.raises(
        ValueError, match=r"tokenizer_config\.json is not valid JSON: .* too deeply"
    ):
        TextTokenizer.load(folder)


def test_cli_answer_with_a_bad_tokenizer_names_the_file(tmp_path) -> None:
    folder = copy_of("fudoki-shapes", tmp_path)
    (folder / "tokenizer.json").write_text("{" * DEEP)
    done = run_cli("answer", "--model", str(folder), "--no-progress", "what?", cwd=tmp_path)
    assert str(folder / "tokenizer.json") in single_error(done)


# -- deeply nested JSON ---------------------------------------------------------------------------
def test_deep_json_objects_and_lines_are_named(tmp_path) -> None:
    config = tmp_path / "config.json"
    config.write_text('{"a": ' + "[" * DEEP + "]" * DEEP + "}")
    with pytest.raises(ValueError, match=r"config\.json is not valid JSON: .* nested too deeply"):
        read_json_object(config)
    lines = tmp_path / "out.jsonl"
    lines.write_text('{"id": 1}\n' + "[" * DEEP + "]" * DEEP + "\n")
    with pytest.raises(ValueError, match=r"out\.jsonl:2: bad JSON \(.* nested too deeply\)"):
        read_jsonl(lines)


def deep_manifest(tmp_path: Path) -> Path:
    tmp_path.joinpath("a.png").write_bytes(png(4, 4))
    manifest = tmp_path / "m.jsonl"
    deep = '{"image": "a.png", "caption": "x", "meta": ' + "[" * DEEP + "]" * DEEP + "}"
    manifest.write_text('{"image": "a.png", "caption": "ok"}\n' + deep + "\n")
    return manifest


def test_deep_manifest_line_is_a_manifest_error(tmp_path) -> None:
    manifest = deep_manifest(tmp_path)
    with pytest.raises(ManifestError) as info:
        read_manifest(manifest)
    assert info.value.line == 2 and "nested too deeply" in info.value.problem


def test_cli_data_validate_reports_a_deep_line_like_other_bad_records(tmp_path) -> None:
    manifest = deep_manifest(tmp_path)
    done = run_cli("data", "validate", str(manifest), cwd=tmp_path)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    assert f"  {manifest}:2: invalid JSON (arrays / objects nested too deeply)" in done.stdout
    assert "1 error:" in done.stdout and done.stdout.rstrip().endswith("FAILED")


# -- decompression bombs --------------------------------------------------------------------------
def png(width: int, height: int) -> bytes:
    """A tiny PNG file whose header claims ``width x height`` pixels (the pixel data is a
    token; a header is all a decompression-bomb check reads)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    pixels = zlib.compress(b"\0" * (1 + 3 * width) * min(height, 4))
    signature = b"\x89PNG\r\n\x1a\n"
    return signature + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")


# PIL warns from 89M pixels and refuses from twice that.
BOMBS = {"refused by PIL": (20_000, 20_000), "warned by PIL": (10_000, 10_000)}


@pytest.mark.parametrize("case", list(BOMBS))
def test_cli_eval_shapes_refuses_a_bomb_picture(tmp_path, case) -> None:
    samples = tmp_path / "edits"
    samples.mkdir()
    picture = samples / "test-edit-000000.png"
    picture.write_bytes(png(*BOMBS[case]))
    done = run_cli("eval", "shapes", "--task", "edit", "--samples", str(samples), cwd=tmp_path)
    line = single_error(done)
    assert str(picture) in line and "too large" in line
    assert "DecompressionBomb" not in done.stderr  # no warning printed either


@pytest.mark.parametrize("case", list(BOMBS))
def test_load_image_refuses_a_bomb_picture_quietly(tmp_path, case) -> None:
    picture = tmp_path / "bomb.png"
    picture.write_bytes(png(*BOMBS[case]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # PIL's DecompressionBombWarning must not escape
        with pytest.raises(ImageFileError, match=f"image {picture} is too large"):
            load_image(picture)
