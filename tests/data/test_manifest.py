"""JSONL manifests: round trips for every task, image conversion, and every error naming its
manifest line."""

from __future__ import annotations

import io
import json
import os
import pickle
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from kineflow.data.example import image_to_tensor, tensor_to_array
from kineflow.data.manifest import (
    ManifestDataset,
    ManifestError,
    ManifestRecord,
    read_manifest,
    validate_manifest,
    write_manifest,
)


def pixels(height: int, width: int, seed: int = 0) -> np.ndarray:
    """Random uint8 RGB pixels [H, W, 3]."""
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def save_png(path: Path, array: np.ndarray, mode: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode).save(path)
    return path


def write_lines(path: Path, lines: list[object]) -> Path:
    """Write a manifest verbatim: dicts as JSON, strings as they are."""
    text = "\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines)
    path.write_text(text + "\n", encoding="utf-8")
    return path


def png_header(width: int, height: int) -> bytes:
    """A PNG holding only a header (no pixel data) that claims ``width x height``."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def assert_error(error: ManifestError, manifest: Path, line: int, problem: str) -> None:
    """The message is "{manifest}:{line}: ..." and mentions ``problem``."""
    message = str(error)
    assert message.startswith(f"{manifest}:{line}: "), message
    assert manifest.name in message
    assert problem in message, message
    assert error.line == line
    assert error.path == manifest


# -- round trips -----------------------------------------------------------------------------


def test_caption_round_trip_recovers_pixels_exactly(tmp_path: Path) -> None:
    a, b = pixels(6, 8, seed=1), pixels(6, 8, seed=2)
    save_png(tmp_path / "a.png", a)
    save_png(tmp_path / "b.png", b)
    manifest = write_lines(
        tmp_path / "m.jsonl",
        [{"image": "a.png", "caption": "a cat"}, {"image": "b.png", "caption": " two dogs "}],
    )
    ds = ManifestDataset(manifest)
    assert len(ds) == 2
    item = ds[0]
    assert set(item) == {"task", "id", "image", "caption"}
    assert item["task"] == "caption" and item["id"] == "1" and item["caption"] == "a cat"
    assert item["image"].dtype == torch.float32 and item["image"].shape == (3, 6, 8)
    assert torch.equal(item["image"], image_to_tensor(a))
    assert np.array_equal(tensor_to_array(ds[1]["image"]), b)
    assert ds[1]["caption"] == " two dogs "  # text is kept exactly as written
    assert ds[1]["id"] == "2"


def test_vqa_round_trip(tmp_path: Path) -> None:
    a = pixels(5, 7)
    save_png(tmp_path / "q.png", a)
    manifest = write_lines(
        tmp_path / "m.jsonl",
        [{"id": "q-1", "image": "q.png", "question": "what colour?", "answer": "red"}],
    )
    item = ManifestDataset(manifest)[0]
    assert set(item) == {"task", "id", "image", "question", "answer"}
    assert (item["task"], item["id"]) == ("vqa", "q-1")
    assert (item["question"], item["answer"]) == ("what colour?", "red")
    assert np.array_equal(tensor_to_array(item["image"]), a)


def test_edit_round_trip_loads_target_as_image(tmp_path: Path) -> None:
    source, target = pixels(4, 4, seed=3), pixels(4, 4, seed=4)
    save_png(tmp_path / "src.png", source)
    save_png(tmp_path / "dst.png", target)
    manifest = write_lines(
        tmp_path / "m.jsonl",
        [{"image": "src.png", "instruction": "make it blue", "target": "dst.png"}],
    )
    item = ManifestDataset(manifest)[0]
    assert set(item) == {"task", "id", "image", "instruction", "target"}
    assert item["instruction"] == "make it blue"
    assert item["target"].dtype == torch.float32 and item["target"].shape == (3, 4, 4)
    assert np.array_equal(tensor_to_array(item["image"]), source)
    assert np.array_equal(tensor_to_array(item["target"]), target)


def test_write_then_read_round_trip(tmp_path: Path) -> None:
    save_png(tmp_path / "a.png", pixels(4, 4))
    meta = {"scene": [{"shape": "circle", "xy": [1, 2]}], "note": "é"}
    records = [
        {"image": Path("a.png"), "caption": "x", "meta": meta},
        {"id": "v", "answer": "yes", "question": "is it?", "image": "a.png"},
        {"instruction": "flip", "target": tmp_path / "a.png", "image": "a.png"},
    ]
    out = write_manifest(tmp_path / "w.jsonl", iter(records))
    assert out == tmp_path / "w.jsonl"
    lines = out.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 3
    # Keys in canonical order, paths as strings, non-ASCII kept.
    assert list(json.loads(lines[1])) == ["id", "image", "question", "answer"]
    assert list(json.loads(lines[2])) == ["image", "instruction", "target"]
    assert "é" in lines[0]

    caption, vqa, edit = read_manifest(out)
    assert caption == ManifestRecord(
        line=1, id="1", task="caption", image=tmp_path / "a.png", caption="x", meta=meta
    )
    assert caption.texts() == {"caption": "x"}
    assert (vqa.id, vqa.task, vqa.question, vqa.answer) == ("v", "vqa", "is it?", "yes")
    assert vqa.texts() == {"question": "is it?", "answer": "yes"}
    assert (edit.task, edit.instruction, edit.target) == ("edit", "flip", tmp_path / "a.png")
    assert edit.texts() == {"instruction": "flip"}
    assert caption.caption is not None and edit.caption is None and edit.meta is None


def test_meta_passes_through_and_is_copied(tmp_path: Path) -> None:
    save_png(tmp_path / "a.png", pixels(4, 4))
    meta = {"objects": [{"kind": "square", "size": 3}], "seed": 7}
    manifest = write_lines(
        tmp_path / "m.jsonl",
        [{"image": "a.png", "caption": "c", "meta": meta}, {"image": "a.png", "caption": "d"}],
    )
    ds = ManifestDataset(manifest)
    item = ds[0]
    assert item["meta"] == meta
    item["meta"]["objects"].clear()  # mutating an item must not change the dataset
    assert ds[0]["meta"] == meta
    assert "meta" not in ds[1]


def test_blank_lines_are_skipped_but_counted(tmp_path: Path) -> None:
    save_png(tmp_path / "a.png", pixels(4, 4))
    manifest = write_lines(
        tmp_path / "m.jsonl",
        ["", {"image": "a.png", "caption": "c"}, "   ", "", {"image": "a.png", "caption": "d"}],
    )
    records = read_manifest(manifest)
    assert [(r.line, r.id) for r in records] == [(2, "2"), (5, "5")]


def test_byte_order_mark_and_crlf_are_accepted(tmp_path: Path) -> None:
    save_png(tmp_path / "a.png", pixels(4, 4))
    manifest = tmp_path / "m.jsonl"
    line = json.dumps({"image": "a.png", "caption": "c"})
    manifest.write_bytes(("\ufeff" + line + "\r\n" + line.replace('"c"', '"d"') + "\r\n").encode())
    assert [r.caption for r in read_manifest(manifest)] == ["c", "d"]


# -- crop and resize -------------------------------------------------------------------------


@pytest.mark.parametrize("height,width", [(8, 12), (12, 8)])
def test_image_size_centre_crops_then_resizes(tmp_path: Path, height: int, width: int) -> None:
    # A constant centre square with differently coloured margins: a correct centre crop sees
    # only the centre colour, at any output size (bicubic of a constant is that constant).
    array = np.zeros((height, width, 3), np.uint8)
    array[...] = (255, 0, 0)
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    array[top + side :, :] = array[:, left + side :] = (0, 0, 255)
    array[top : top + side, left : left + side] = (10, 200, 90)
    save_png(tmp_path / "a.png", array)
    manifest = write_lines(tmp_path / "m.jsonl", [{"image": "a.png", "caption": "c"}])
    for size in (3, 5, 16):
        image = ManifestDataset(manifest, image_size=size)[0]["image"]
        assert image.shape == (3, size, size)
        assert (tensor_to_array(image) == np.array([10, 200, 90], np.uint8)).all()


def test_image_size_matches_pil_crop_and_bicubic(tmp_path: Path) -> None:
    array = pixels(9, 14, seed=5)
    save_png(tmp_path / "a.png", array)
    manifest = write_lines(tmp_path / "m.jsonl", [{"image": "a.png", "caption": "c"}])
    got = tensor_to_array(ManifestDataset(manifest, image_size=6)[0]["image"])
    left = (14 - 9) // 2
    expected = (
        Image.fromarray(array).crop((left, 0, left + 9, 9)).resize((6, 6), Image.Resampling.BICUBIC)
    )
    assert np.array_equal(got, np.asarray(expected))


def test_image_size_of_a_square_image_keeps_pixels(tmp_path: Path) -> None:
    array = pixels(7, 7, seed=6)
    save_png(tmp_path / "a.png", array)
    manifest = write_lines(tmp_path / "m.jsonl", [{"image": "a.png", "caption": "c"}])
    assert np.array_equal(
        tensor_to_array(ManifestDataset(manifest, image_size=7)[0]["image"]), array
    )


def crop_and_resize(array: np.ndarray, size: int) -> np.ndarray:
    """Reference: PIL's centre square crop, then bicubic resize to ``size``."""
    height, width = array.shape[:2]
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    square = Image.fromarray(array).crop((left, top, left + side, top + side))
    return np.asarray(square.resize((size, size), Image.Resampling.BICUBIC))


def test_image_size_resizes_edit_targets_and_mixed_sizes(tmp_path: Path) -> None:
    source, target = pixels(10, 6, seed=1), pixels(5, 9, seed=2)
    save_png(tmp_path / "s.png", source)
    save_png(tmp_path / "t.png", target)
    manifest = write_lines(
        tmp_path / "m.jsonl", [{"image": "s.png", "instruction": "i", "target": "t.png"}]
    )
    item = ManifestDataset(manifest, image_size=4)[0]
    assert item["image"].shape == item["target"].shape == (3, 4, 4)
    # Each picture is cropped and resized on its own (a tall source, a wide target).
    assert np.array_equal(tensor_to_array(item["image"]), crop_and_resize(source, 4))
    assert np.array_equal(tensor_to_array(item["target"]), crop_and_resize(target, 4))


def test_without_image_size_sizes_must_match_first_record(tmp_path: Path) -> None:
    save_png(tmp_path / "a.png", pixels(4, 6))
    save_png(tmp_path / "b.png", pixels(5, 6))
    manifest = write_lines(
        tmp_path / "m.jsonl",
        [
            {"image": "a.png", "caption": "c"},
            {"image": "a.png", "instruction": "i", "target": "b.png"},
            {"image": "b.png", "caption": "d"},
        ],
    )
    ds = ManifestDataset(manifest)
    # The reference is the first record's image even when another item is loaded first.
    with pytest.raises(ManifestError) as info:
        ds[2]
    assert_error(info.value, manifest, 3, f"image {tmp_path / 'b.png'} is 6x5")
    assert "first image (line 1) is 6x4" in str(info.value)
    with pytest.raises(ManifestError) as info:
        ds[1]  # an edit target must match too
    assert_error(info.value, manifest, 2, "is 6x5, but the first image (line 1) is 6x4")
    assert ds[0]["image"].shape == (3, 4, 6)


# -- tasks and paths -------------------------------------------------------------------------


def mixed_manifest(tmp_path: Path) -> Path:
    save_png(tmp_path / "a.png", pixels(4, 4, seed=1))
    save_png(tmp_path / "b.png", pixels(4, 4, seed=2))
    return write_lines(
        tmp_path / "mixed.jsonl",
        [
            {"image": "a.png", "caption": "one"},
            {"image": "b.png", "question": "q1", "answer": "a1"},
            {"image": "a.png", "instruction": "edit", "target": "b.png"},
            {"image": "b.png", "caption": "two"},
            {"image": "a.png", "question": "q2", "answer": "a2"},
        ],
    )


def test_mixed_manifest_and_task_filter(tmp_path: Path) -> None:
    manifest = mixed_manifest(tmp_path)
    assert [r.task for r in read_manifest(manifest)] == ["caption", "vqa", "edit", "caption", "vqa"]
    vqa = read_manifest(manifest, task="vqa")
    assert [(r.line, r.id, r.question) for r in vqa] == [(2, "2", "q1"), (5, "5", "q2")]

    everything = ManifestDataset(manifest)
    assert len(everything) == 5
    assert everything.tasks == {"caption": 2, "vqa": 2, "edit": 1}
    assert repr(everything) == (
        f"ManifestDataset({str(manifest)!r}, 5 records: caption 2, vqa 2, edit 1, image_size=None)"
    )
    assert [everything[i]["task"] for i in range(5)] == ["caption", "vqa", "edit", "caption", "vqa"]

    captions = ManifestDataset(manifest, task="caption")
    assert captions.tasks == {"caption": 2, "vqa": 0, "edit": 0}
    assert [r.line for r in captions.records] == [1, 4]
    assert [captions[i]["caption"] for i in range(2)] == ["one", "two"]
    edits = ManifestDataset(manifest, task="edit")
    assert len(edits) == 1 and edits[0]["id"] == "3"


def test_unknown_task_is_rejected(tmp_path: Path) -> None:
    manifest = mixed_manifest(tmp_path)
    with pytest.raises(ValueError, match="task must be one of"):
        read_manifest(manifest, task="captions")
    with pytest.raises(ValueError, match="task must be one of"):
        ManifestDataset(manifest, task="video")


def test_filter_with_no_matching_records_fails_at_construction(tmp_path: Path) -> None:
    save_png(tmp_path / "a.png", pixels(4, 4))
    manifest = write_lines(tmp_path / "m.jsonl", [{"image": "a.png", "caption": "c"}])
    assert read_manifest(manifest, task="edit") == []
    with pytest.raises(ManifestError) as info:
        ManifestDataset(manifest, task="edit")
    assert_error(info.value, manifest, 1, "manifest has no edit records")


def test_relative_and_absolute_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    near, far = pixels(4, 4, seed=1), pixels(4, 4, seed=2)
    save_png(tmp_path / "data" / "imgs" / "near.png", near)
    elsewhere = save_png(tmp_path / "elsewhere" / "far.png", far)
    write_lines(
        tmp_path / "data" / "m.jsonl",
        [
            {"image": "imgs/near.png", "caption": "relative to the manifest"},
            {"image": str(elsewhere), "caption": "absolute"},
        ],
    )
    # Relative paths are resolved against the manifest's folder, not the working directory,
    # and the dataset keeps working after the working directory changes.
    monkeypatch.chdir(tmp_path)
    ds = ManifestDataset(Path("data") / "m.jsonl")
    assert ds.records[0].image == tmp_path / "data" / "imgs" / "near.png"
    assert ds.records[1].image == elsewhere
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert np.array_equal(tensor_to_array(ds[0]["image"]), near)
    assert np.array_equal(tensor_to_array(ds[1]["image"]), far)


# -- image modes -----------------------------------------------------------------------------


def load_one(tmp_path: Path, image: Image.Image) -> np.ndarray:
    image.save(tmp_path / "img.png")
    manifest = write_lines(tmp_path / "m.jsonl", [{"image": "img.png", "caption": "c"}])
    return tensor_to_array(ManifestDataset(manifest)[0]["image"])


def test_rgba_is_composited_on_white(tmp_path: Path) -> None:
    rgba = np.array(
        [[[0, 0, 255, 255], [255, 0, 0, 0], [0, 0, 0, 128], [40, 80, 120, 255]]], np.uint8
    )
    got = load_one(tmp_path, Image.fromarray(rgba, "RGBA"))
    assert got.shape == (1, 4, 3)
    assert got[0, 0].tolist() == [0, 0, 255]  # opaque: its colour
    assert got[0, 1].tolist() == [255, 255, 255]  # transparent: white, whatever its colour
    assert np.abs(got[0, 2].astype(int) - 127).max() <= 1  # half-transparent black: mid grey
    assert got[0, 3].tolist() == [40, 80, 120]


def test_gray_is_replicated_to_three_channels(tmp_path: Path) -> None:
    gray = np.array([[0, 17, 128, 255]], np.uint8)
    got = load_one(tmp_path, Image.fromarray(gray, "L"))
    assert np.array_equal(got, np.repeat(gray[..., None], 3, axis=-1))


def test_gray_alpha_is_composited_on_white(tmp_path: Path) -> None:
    la = np.array([[[10, 0], [20, 255]]], np.uint8)
    got = load_one(tmp_path, Image.fromarray(la, "LA"))
    assert got.tolist() == [[[255, 255, 255], [20, 20, 20]]]


def test_palette_is_looked_up(tmp_path: Path) -> None:
    image = Image.new("P", (3, 1))
    image.putpalette([255, 0, 0, 0, 255, 0, 1, 2, 3] + [0] * (768 - 9))
    for x in range(3):
        image.putpixel((x, 0), x)
    assert load_one(tmp_path, image).tolist() == [[[255, 0, 0], [0, 255, 0], [1, 2, 3]]]


def test_palette_transparency_is_composited_on_white(tmp_path: Path) -> None:
    image = Image.new("P", (2, 1))
    image.putpalette([255, 0, 0, 0, 255, 0] + [0] * (768 - 6))
    image.putpixel((1, 0), 1)
    image.info["transparency"] = 0  # palette entry 0 (red) is fully transparent
    assert load_one(tmp_path, image).tolist() == [[[255, 255, 255], [0, 255, 0]]]


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    array = pixels(2, 4, seed=8)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    Image.fromarray(array).save(tmp_path / "img.png", exif=exif)
    manifest = write_lines(tmp_path / "m.jsonl", [{"image": "img.png", "caption": "c"}])
    got = tensor_to_array(ManifestDataset(manifest)[0]["image"])
    assert np.array_equal(got, np.rot90(array, k=-1))


# -- structural errors -----------------------------------------------------------------------

GOOD = {"image": "a.png", "caption": "fine"}


@pytest.mark.parametrize(
    "line,problem",
    [
        ('{"image": "a.png", "caption": }', "invalid JSON (Expecting value at column 31)"),
        ('{"image": "a.png"', "invalid JSON"),
        ('["a.png", "a cat"]', "expected a JSON object, got array"),
        ('"a cat"', "expected a JSON object, got string"),
        ({"image": "a.png", "caption": "c", "extra": 1}, "unknown field 'extra'"),
        ({"image": "a.png", "captoin": "c"}, "unknown field 'captoin'"),
        ({"image": "a.png", "question": "q"}, "missing field 'answer' for a vqa record"),
        ({"caption": "c"}, "missing field 'image' for a caption record"),
        ({"image": "a.png", "instruction": "i"}, "missing field 'target' for a edit record"),
        ({"image": "a.png"}, "no task fields"),
        ({"image": "a.png", "id": "x"}, "no task fields"),
        ({"image": "a.png", "caption": "c", "question": "q"}, "mixes fields of caption"),
        (
            {"image": "a.png", "caption": "c", "instruction": "i", "target": "b.png"},
            "mixes fields of caption ('caption') and edit ('instruction', 'target')",
        ),
        ({"image": "a.png", "caption": 3}, "field 'caption' must be a string, got number"),
        ({"image": "a.png", "caption": None}, "field 'caption' must be a string, got null"),
        ({"image": "a.png", "question": "q", "answer": True}, "'answer' must be a string, got"),
        ({"image": "a.png", "caption": "  \t"}, "field 'caption' is empty"),
        ({"image": "a.png", "question": "q", "answer": ""}, "field 'answer' is empty"),
        ({"image": ["a.png"], "caption": "c"}, "field 'image' must be a path string, got array"),
        ({"image": " ", "caption": "c"}, "field 'image' is an empty path"),
        (
            {"image": "a.png", "instruction": "i", "target": 5},
            "field 'target' must be a path string, got number",
        ),
        ({"image": "a.png", "caption": "c", "id": 7}, "field 'id' must be a string, got number"),
        ({"image": "a.png", "caption": "c", "id": ""}, "field 'id' is empty"),
        ({"image": "a.png", "caption": "c", "meta": [1]}, "'meta' must be a JSON object, got arr"),
        ({"image": "a.png", "caption": "c", "id": "1"}, "duplicate id '1' (first used on line 1)"),
    ],
)
def test_structural_errors_name_file_line_and_problem(
    tmp_path: Path, line: object, problem: str
) -> None:
    save_png(tmp_path / "a.png", pixels(4, 4))
    save_png(tmp_path / "b.png", pixels(4, 4))
    # The bad record is on line 3, after a good one and a blank line.
    manifest = write_lines(tmp_path / "bad.jsonl", [GOOD, "", line, GOOD])
    with pytest.raises(ManifestError) as info:
        read_manifest(manifest)
    assert_error(info.value, manifest, 3, problem)
    # The dataset raises at construction, and validation reports the same message.
    with pytest.raises(ManifestError) as info_ds:
        ManifestDataset(manifest)
    assert str(info_ds.value) == str(info.value)
    report = validate_manifest(manifest)
    assert report.errors == [str(info.value)]
    assert not report.ok


def test_duplicate_explicit_and_implicit_ids(tmp_path: Path) -> None:
    # An explicit id may collide with a later record's default id (its line number).
    manifest = write_lines(tmp_path / "m.jsonl", [{**GOOD, "id": "2"}, GOOD])
    with pytest.raises(ManifestError) as info:
        read_manifest(manifest)
    assert_error(info.value, manifest, 2, "duplicate id '2' (first used on line 1)")


def test_invalid_utf8_is_reported(tmp_path: Path) -> None:
    manifest = tmp_path / "m.jsonl"
    manifest.write_bytes(json.dumps(GOOD).encode() + b'\n{"image": "\xff.png", "caption": "c"}\n')
    with pytest.raises(ManifestError) as info:
        read_manifest(manifest)
    assert_error(info.value, manifest, 2, "line is not valid UTF-8")


def test_missing_manifest_is_file_not_found(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        read_manifest(tmp_path / "nope.jsonl")
    with pytest.raises(FileNotFoundError):
        validate_manifest(tmp_path / "nope.jsonl")


def test_empty_manifest(tmp_path: Path) -> None:
    manifest = write_lines(tmp_path / "m.jsonl", ["", ""])
    assert read_manifest(manifest) == []
    with pytest.raises(ManifestError) as info:
        ManifestDataset(manifest)
    assert_error(info.value, manifest, 1, "manifest has no records")
    report = validate_manifest(manifest)
    assert not report.ok and report.num_records == 0
    assert report.errors == [f"{manifest}:1: manifest has no records"]


def test_manifest_error_pickles(tmp_path: Path) -> None:
    error = ManifestError(tmp_path / "m.jsonl", 4, "field 'caption' is empty")
    assert isinstance(error, ValueError)
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is ManifestError
    assert str(copy) == str(error) == f"{tmp_path / 'm.jsonl'}:4: field 'caption' is empty"
    assert (copy.path, copy.line, copy.problem) == (error.path, 4, "field 'caption' is empty")


# -- image errors ----------------------------------------------------------------------------


def truncated_png(path: Path) -> Path:
    buffer = io.BytesIO()
    Image.fromarray(pixels(16, 16)).save(buffer, "PNG")
    path.write_bytes(buffer.getvalue()[:60])
    return path


def bad_checksum_png(path: Path) -> Path:
    buffer = io.BytesIO()
    Image.fromarray(pixels(16, 16)).save(buffer, "PNG")
    data = bytearray(buffer.getvalue())
    data[data.find(b"IDAT") + 10] ^= 0xFF
    path.write_bytes(bytes(data))
    return path


def i16_png(path: Path) -> Path:
    Image.fromarray(np.array([[0, 65535]], np.uint16)).save(path)
    return path


@pytest.mark.parametrize(
    "make,problem",
    [
        (lambda p: None, "image file not found: {path}"),
        (lambda p: p.mkdir(), "image path is not a file: {path}"),
        (lambda p: p.write_bytes(b"not an image at all"), "cannot read image {path}"),
        (truncated_png, "cannot read image {path}: "),
        (lambda p: p.write_bytes(png_header(5000, 5000)), "image {path} is too large: 5000x5000"),
        # Past PIL's own decompression-bomb limit, which Image.open itself enforces.
        (lambda p: p.write_bytes(png_header(20000, 20000)), "image {path} is too large"),
        (i16_png, "unsupported image mode 'I;16'"),
    ],
)
@pytest.mark.parametrize("field", ["image", "target"])
def test_image_errors_name_file_line_and_image(
    tmp_path: Path, make, problem: str, field: str
) -> None:
    save_png(tmp_path / "ok.png", pixels(4, 4))
    bad = tmp_path / "imgs" / "bad.png"
    bad.parent.mkdir()
    make(bad)
    record = {"image": "ok.png", "instruction": "i", "target": "ok.png"}
    record[field] = "imgs/bad.png"
    manifest = write_lines(tmp_path / "m.jsonl", [{"image": "ok.png", "caption": "c"}, record])
    problem = problem.format(path=bad)
    ds = ManifestDataset(manifest)  # structure is fine: images are decoded lazily
    assert ds[0]["image"].shape == (3, 4, 4)
    with pytest.raises(ManifestError) as info:
        ds[1]
    assert_error(info.value, manifest, 2, problem)
    report = validate_manifest(manifest)
    assert len(report.errors) == 1
    assert report.errors[0].startswith(f"{manifest}:2: ") and problem in report.errors[0]


def test_max_pixels_is_checked_before_decoding(tmp_path: Path) -> None:
    # A header-only file: decoding it would fail, so "too large" proves no decode happened.
    (tmp_path / "big.png").write_bytes(png_header(64, 64))
    manifest = write_lines(tmp_path / "m.jsonl", [{"image": "big.png", "caption": "c"}])
    with pytest.raises(ManifestError) as info:
        ManifestDataset(manifest, max_pixels=64 * 64 - 1)[0]
    assert_error(info.value, manifest, 1, "64x64 = 4096 pixels > max_pixels = 4095")
    with pytest.raises(ManifestError, match="cannot read image"):
        ManifestDataset(manifest, max_pixels=64 * 64)[0]  # at the limit: decoded, and broken


def test_validate_verifies_checksums(tmp_path: Path) -> None:
    bad = bad_checksum_png(tmp_path / "crc.png")
    manifest = write_lines(tmp_path / "m.jsonl", [{"image": "crc.png", "caption": "c"}])
    report = validate_manifest(manifest)
    assert len(report.errors) == 1
    assert report.errors[0].startswith(f"{manifest}:1: cannot read image {bad}")


def test_validate_runs_verify_beyond_a_decode(tmp_path: Path) -> None:
    # A PNG cut off after its pixel data decodes fine; only verify() sees the missing end.
    buffer = io.BytesIO()
    Image.fromarray(pixels(4, 4)).save(buffer, "PNG")
    (tmp_path / "cut.png").write_bytes(buffer.getvalue()[:-12])  # drop the IEND chunk
    manifest = write_lines(tmp_path / "m.jsonl", [{"image": "cut.png", "caption": "c"}])
    assert ManifestDataset(manifest)[0]["image"].shape == (3, 4, 4)
    report = validate_manifest(manifest)
    assert report.errors == [
        f"{manifest}:1: cannot read image {tmp_path / 'cut.png'}: truncated PNG file"
    ]


def test_bad_arguments(tmp_path: Path) -> None:
    manifest = mixed_manifest(tmp_path)
    for kwargs in ({"image_size": 0}, {"image_size": 2.5}, {"max_pixels": 0}):
        with pytest.raises(ValueError, match="must be a positive int"):
            ManifestDataset(manifest, **kwargs)
    for kwargs in ({"max_errors": 0}, {"image_size": -1}, {"max_pixels": True}):
        with pytest.raises(ValueError, match="must be a positive int"):
            validate_manifest(manifest, **kwargs)


# -- validation ------------------------------------------------------------------------------


def test_validate_good_manifest(tmp_path: Path) -> None:
    manifest = mixed_manifest(tmp_path)
    report = validate_manifest(manifest)
    assert report.ok and report.errors == [] and not report.truncated
    assert report.num_records == 5
    assert report.tasks == {"caption": 2, "vqa": 2, "edit": 1}
    assert report.image_sizes == {(4, 4)}
    text = report.format()
    assert "5 records (caption 2, vqa 2, edit 1)" in text
    assert "image sizes: 4x4" in text
    assert text.splitlines()[-1] == "OK"


def test_validate_collects_every_error(tmp_path: Path) -> None:
    save_png(tmp_path / "a.png", pixels(4, 6))
    save_png(tmp_path / "wide.png", pixels(4, 9))
    (tmp_path / "broken.png").write_bytes(b"garbage")
    manifest = write_lines(
        tmp_path / "m.jsonl",
        [
            {"image": "a.png", "caption": "good"},  # 1
            "{not json",  # 2
            {"image": "missing.png", "caption": "c"},  # 3
            {"image": "broken.png", "question": "q", "answer": "a"},  # 4
            {"image": "wide.png", "caption": "c"},  # 5
            {"image": "a.png", "caption": "c", "id": "1"},  # 6
            {"image": "a.png", "caption": "c", "colour": "red"},  # 7
            {"image": "a.png", "instruction": "i", "target": "broken.png"},  # 8
            {"image": "a.png", "question": "q", "answer": "a"},  # 9
        ],
    )
    report = validate_manifest(manifest)
    expected = [
        (2, "invalid JSON"),
        (3, f"image file not found: {tmp_path / 'missing.png'}"),
        (4, f"cannot read image {tmp_path / 'broken.png'}"),
        (5, f"image {tmp_path / 'wide.png'} is 9x4, but the first image (line 1) is 6x4"),
        (6, "duplicate id '1' (first used on line 1)"),
        (7, "unknown field 'colour'"),
        (8, f"cannot read image {tmp_path / 'broken.png'}"),  # reported on every line using it
    ]
    assert len(report.errors) == len(expected)
    for error, (line, problem) in zip(report.errors, expected, strict=True):
        assert error.startswith(f"{manifest}:{line}: ") and problem in error, error
    assert not report.ok and not report.truncated
    # Structurally valid records (lines 1, 3, 4, 5, 8, 9) are counted even when their images
    # are bad.
    assert report.num_records == 6
    assert report.tasks == {"caption": 3, "vqa": 2, "edit": 1}
    assert report.image_sizes == {(6, 4), (9, 4)}
    text = report.format()
    assert "7 errors:" in text and text.splitlines()[-1] == "FAILED"
    assert all(f"  {error}" in text.splitlines() for error in report.errors)

    # With an image_size every size is fine; the other problems remain.
    resized = validate_manifest(manifest, image_size=32)
    assert len(resized.errors) == 6
    assert not any("but the first image" in error for error in resized.errors)


def test_validate_stops_after_max_errors(tmp_path: Path) -> None:
    save_png(tmp_path / "a.png", pixels(4, 4))
    lines: list[object] = ["{bad"] * 5 + [{"image": "a.png", "caption": "c"}]
    manifest = write_lines(tmp_path / "m.jsonl", lines)
    report = validate_manifest(manifest, max_errors=3)
    assert [e.split(": ")[0] for e in report.errors] == [f"{manifest}:{n}" for n in (1, 2, 3)]
    assert report.truncated and not report.ok
    assert report.num_records == 0  # line 6 was never reached
    assert "more than 3 errors" in report.format()
    # Exactly max_errors problems is not a truncation.
    exact = validate_manifest(manifest, max_errors=5)
    assert len(exact.errors) == 5 and not exact.truncated and exact.num_records == 1


# -- writing ---------------------------------------------------------------------------------


def test_write_rejects_bad_record_and_leaves_existing_file(tmp_path: Path) -> None:
    path = tmp_path / "m.jsonl"
    path.write_text("original contents\n")

    def records():
        yield {"image": "a.png", "caption": "one"}
        yield {"image": "b.png", "caption": "two"}
        yield {"image": "c.png", "question": "only a question"}
        raise AssertionError("write_manifest must stop at the bad record")

    with pytest.raises(ManifestError) as info:
        write_manifest(path, records())
    assert_error(info.value, path, 3, "record 2: missing field 'answer' for a vqa record")
    assert path.read_text() == "original contents\n"
    assert sorted(os.listdir(tmp_path)) == ["m.jsonl"]  # no temporary file left behind


def test_write_failing_iterator_leaves_no_file(tmp_path: Path) -> None:
    path = tmp_path / "new.jsonl"

    def records():
        yield {"image": "a.png", "caption": "one"}
        raise RuntimeError("source exhausted badly")

    with pytest.raises(RuntimeError, match="source exhausted badly"):
        write_manifest(path, records())
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(
    "record,problem",
    [
        ({"image": "a.png", "caption": "c", "extra": 1}, "record 1: unknown field 'extra'"),
        ({"image": "a.png", "caption": ""}, "record 1: field 'caption' is empty"),
        (["a.png", "c"], "record 1: expected a JSON object, got array"),
        ({"image": "a.png", "caption": "c", "id": "1"}, "record 1: duplicate id '1'"),
        (
            {"image": "a.png", "caption": "c", "meta": {"x": float("nan")}},
            "record 1: field 'meta' is not JSON-serialisable",
        ),
        (
            {"image": "a.png", "caption": "c", "meta": {"x": {1, 2}}},
            "record 1: field 'meta' is not JSON-serialisable",
        ),
    ],
)
def test_write_errors_name_the_record(tmp_path: Path, record: object, problem: str) -> None:
    path = tmp_path / "m.jsonl"
    with pytest.raises(ManifestError) as info:
        write_manifest(path, [{"image": "a.png", "caption": "first"}, record])
    assert_error(info.value, path, 2, problem)
    assert not path.exists()


def test_write_replaces_existing_file(tmp_path: Path) -> None:
    path = tmp_path / "m.jsonl"
    path.write_text("old\n")
    write_manifest(path, [{"image": "a.png", "caption": "new"}])
    assert [json.loads(line) for line in path.read_text().splitlines()] == [
        {"image": "a.png", "caption": "new"}
    ]
    assert sorted(os.listdir(tmp_path)) == ["m.jsonl"]


# -- dataset protocol ------------------------------------------------------------------------


def test_indexing(tmp_path: Path) -> None:
    ds = ManifestDataset(mixed_manifest(tmp_path))
    assert ds[-1]["id"] == ds[4]["id"] == "5"
    assert ds[-5]["id"] == "1"
    assert ds[np.int64(2)]["task"] == "edit"
    for index in (5, -6, 100):
        with pytest.raises(IndexError, match="out of range for 5 records"):
            ds[index]
    with pytest.raises(TypeError):
        ds["1"]


def test_dataloader_default_collate(tmp_path: Path) -> None:
    arrays = [pixels(5, 6, seed=s) for s in range(5)]
    for s, array in enumerate(arrays):
        save_png(tmp_path / f"{s}.png", array)
    manifest = write_lines(
        tmp_path / "m.jsonl",
        [{"image": f"{s}.png", "caption": f"caption {s}", "id": f"im{s}"} for s in range(5)],
    )
    batches = list(DataLoader(ManifestDataset(manifest), batch_size=2))
    assert [len(b["id"]) for b in batches] == [2, 2, 1]
    first = batches[0]
    assert first["image"].shape == (2, 3, 5, 6) and first["image"].dtype == torch.float32
    assert first["caption"] == ["caption 0", "caption 1"]
    assert first["id"] == ["im0", "im1"] and first["task"] == ["caption", "caption"]
    images = torch.cat([b["image"] for b in batches])
    assert np.array_equal(tensor_to_array(images), np.stack(arrays))


def test_dataloader_workers_and_resize(tmp_path: Path) -> None:
    manifest = mixed_manifest(tmp_path)
    loader = DataLoader(
        ManifestDataset(manifest, task="vqa", image_size=2), batch_size=2, num_workers=2
    )
    (batch,) = list(loader)
    assert batch["image"].shape == (2, 3, 2, 2)
    assert batch["question"] == ["q1", "q2"] and batch["answer"] == ["a1", "a2"]
    # The vqa records are b.png then a.png, resized in the workers exactly as in the process.
    expected = [crop_and_resize(pixels(4, 4, seed=s), 2) for s in (2, 1)]
    assert np.array_equal(tensor_to_array(batch["image"]), np.stack(expected))


def test_worker_errors_keep_the_manifest_line(tmp_path: Path) -> None:
    save_png(tmp_path / "a.png", pixels(4, 4))
    manifest = write_lines(
        tmp_path / "m.jsonl",
        [{"image": "a.png", "caption": "c"}, {"image": "gone.png", "caption": "d"}],
    )
    loader = DataLoader(ManifestDataset(manifest), batch_size=2, num_workers=1)
    # torch re-raises a worker's exception as a RuntimeError holding its traceback text (it
    # cannot rebuild a ManifestError from one string); the manifest location survives.
    with pytest.raises(RuntimeError) as info:
        list(loader)
    message = str(info.value)
    assert "Caught ManifestError" in message
    assert f"{manifest}:2: image file not found: {tmp_path / 'gone.png'}" in message
