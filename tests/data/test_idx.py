"""IDX reading/writing and the captioned IDX datasets.

The reader is checked against files built byte by byte with ``struct`` (independent of numpy
and of ``write_idx``), the writer against the same hand-built bytes, and the two against each
other for every dtype. Every error case checks that its message names the file and the problem.
"""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from kineflow.data.idx import (
    DEFAULT_FASHION_MNIST_ROOT,
    FASHION_MNIST_CLASSES,
    MNIST_CLASSES,
    IdxDataset,
    IdxError,
    fashion_mnist,
    mnist,
    read_idx,
    write_idx,
)

# type code, struct format of one element, numpy dtype, values exercising sign, range and byte
# order (258 = 0x0102 and 0x01020304 read differently in the wrong byte order).
DTYPE_CASES = [
    (0x08, "B", np.uint8, [0, 1, 127, 128, 254, 255]),
    (0x09, "b", np.int8, [-128, -1, 0, 1, 2, 127]),
    (0x0B, "h", np.int16, [-32768, -1, 0, 258, 1000, 32767]),
    (0x0C, "i", np.int32, [-(2**31), -1, 0, 0x01020304, 7, 2**31 - 1]),
    (0x0D, "f", np.float32, [-2.25, -0.0, 0.0, 1.5, 3.0e38, 1.0e-30]),
    (0x0E, "d", np.float64, [-1e300, -0.5, 0.0, np.pi, 1e-300, 6.02e23]),
]


def idx_bytes(code: int, shape: tuple[int, ...], payload: bytes) -> bytes:
    """An IDX file by hand: 00 00 code ndim, big-endian uint32 dims, then the payload."""
    return (
        struct.pack(">BBBB", 0, 0, code, len(shape))
        + struct.pack(f">{len(shape)}I", *shape)
        + payload
    )


def be(fmt: str, values: list) -> bytes:
    return struct.pack(f">{len(values)}{fmt}", *values)


def put(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


# -- read_idx against hand-built files ----------------------------------------------------------
@pytest.mark.parametrize(("code", "fmt", "dtype", "values"), DTYPE_CASES)
def test_read_hand_built_every_dtype(tmp_path, code, fmt, dtype, values):
    path = put(tmp_path / "a.idx", idx_bytes(code, (2, 3), be(fmt, values)))
    array = read_idx(path)
    assert array.dtype == dtype and array.dtype.isnative
    assert array.shape == (2, 3)
    np.testing.assert_array_equal(array, np.array(values, dtype=dtype).reshape(2, 3))
    # Signed zero survives (compare bit patterns, not values).
    if dtype in (np.float32, np.float64):
        assert np.signbit(array.reshape(-1)[1]) == np.signbit(values[1])
    array[0, 0] = 1  # writable: callers may normalise in place


def test_read_hand_built_four_dims_is_c_order(tmp_path):
    values = list(range(2 * 3 * 4 * 5))
    path = put(tmp_path / "a", idx_bytes(0x0B, (2, 3, 4, 5), be("h", values)))
    array = read_idx(path)
    assert array.shape == (2, 3, 4, 5)
    # Last index varies fastest: element [i, j, k, l] is the (((i*3 + j)*4 + k)*5 + l)-th value.
    assert array[1, 2, 3, 4] == values[-1]
    assert array[1, 0, 2, 3] == ((1 * 3 + 0) * 4 + 2) * 5 + 3


def test_read_gzip_by_suffix_and_by_magic(tmp_path):
    raw = idx_bytes(0x0C, (4,), be("i", [1, -2, 3, 70000]))
    by_suffix = put(tmp_path / "x.idx.gz", gzip.compress(raw))
    by_magic = put(tmp_path / "x-no-suffix", gzip.compress(raw))  # compressed, name says nothing
    plain_named_gz = put(tmp_path / "plain.gz", raw)  # a mislabelled plain file still reads
    for path in (by_suffix, by_magic, plain_named_gz):
        np.testing.assert_array_equal(read_idx(path), [1, -2, 3, 70000])
    assert read_idx(str(by_suffix)).dtype == np.int32  # str paths too


# -- write_idx against hand-built bytes ---------------------------------------------------------
def test_write_header_and_data_byte_for_byte(tmp_path):
    values = [[-32768, -1, 0], [258, 1000, 32767]]
    expected = idx_bytes(0x0B, (2, 3), be("h", [v for row in values for v in row]))
    assert expected[:12] == bytes([0, 0, 0x0B, 2, 0, 0, 0, 2, 0, 0, 0, 3])
    write_idx(tmp_path / "a.idx", np.array(values, dtype=np.int16))
    assert (tmp_path / "a.idx").read_bytes() == expected
    write_idx(tmp_path / "a.idx.gz", np.array(values, dtype=np.int16))
    compressed = (tmp_path / "a.idx.gz").read_bytes()
    assert compressed[:2] == b"\x1f\x8b"
    assert gzip.decompress(compressed) == expected


@pytest.mark.parametrize(("code", "fmt", "dtype", "values"), DTYPE_CASES)
def test_write_matches_hand_built_every_dtype(tmp_path, code, fmt, dtype, values):
    write_idx(tmp_path / "a", np.array(values, dtype=dtype))
    assert (tmp_path / "a").read_bytes() == idx_bytes(code, (len(values),), be(fmt, values))


def test_write_big_endian_input_and_lists(tmp_path):
    # The input's byte order must not leak into the file.
    write_idx(tmp_path / "big", np.array([1, 258], dtype=">i4"))
    write_idx(tmp_path / "little", np.array([1, 258], dtype="<i4"))
    expected = idx_bytes(0x0C, (2,), be("i", [1, 258]))
    assert (tmp_path / "big").read_bytes() == expected
    assert (tmp_path / "little").read_bytes() == expected
    # Nested lists go through np.asarray: floats become float64.
    write_idx(tmp_path / "list", [[1.5, -2.0]])
    assert (tmp_path / "list").read_bytes() == idx_bytes(0x0E, (1, 2), be("d", [1.5, -2.0]))


def test_write_gzip_is_deterministic(tmp_path):
    array = np.arange(1000, dtype=np.float32).reshape(10, 100)
    write_idx(tmp_path / "a.gz", array)
    first = (tmp_path / "a.gz").read_bytes()
    assert first[4:8] == bytes(4)  # gzip header mtime field is 0, not the clock
    assert first[3] & 0x08 == 0  # no FNAME field: the temporary file's name is not recorded
    write_idx(tmp_path / "a.gz", array)
    assert (tmp_path / "a.gz").read_bytes() == first


# -- round trips --------------------------------------------------------------------------------
@pytest.mark.parametrize("suffix", ["", ".gz"])
@pytest.mark.parametrize("shape", [(7,), (3, 5), (2, 3, 4), (2, 1, 3, 2, 3)])
@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64])
def test_round_trip(tmp_path, dtype, shape, suffix):
    rng = np.random.default_rng(0)
    if np.dtype(dtype).kind == "f":
        array = (rng.standard_normal(shape) * 1e3).astype(dtype)
    else:
        info = np.iinfo(dtype)
        array = rng.integers(info.min, info.max, size=shape, endpoint=True).astype(dtype)
    path = tmp_path / f"a.idx{suffix}"
    write_idx(path, array)
    back = read_idx(path)
    assert back.dtype == array.dtype and back.shape == array.shape
    assert back.tobytes() == array.tobytes()  # bit-exact, NaN/-0.0 safe
    assert (path.read_bytes()[:2] == b"\x1f\x8b") == (suffix == ".gz")


def test_round_trip_non_contiguous_input(tmp_path):
    array = np.arange(24, dtype=np.int32).reshape(4, 6)[:, ::2].T  # strided and transposed
    write_idx(tmp_path / "a", array)
    np.testing.assert_array_equal(read_idx(tmp_path / "a"), array)


# -- write_idx: atomicity and argument errors ---------------------------------------------------
def test_write_replaces_atomically_and_cleans_up_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "a.idx"
    write_idx(path, np.zeros(3, np.uint8))
    write_idx(path, np.ones(5, np.uint8))  # overwrite
    np.testing.assert_array_equal(read_idx(path), np.ones(5, np.uint8))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.idx"]  # no temp file left

    def failing_replace(src, dst):
        raise OSError("disk on fire")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk on fire"):
        write_idx(path, np.full(9, 7, np.uint8))
    monkeypatch.undo()
    # The old file is intact and the half-done temporary file is gone.
    np.testing.assert_array_equal(read_idx(path), np.ones(5, np.uint8))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.idx"]


def test_write_rejects_what_idx_cannot_store(tmp_path):
    with pytest.raises(TypeError, match="int64"):
        write_idx(tmp_path / "a", np.zeros(3, np.int64))
    with pytest.raises(TypeError, match="bool"):
        write_idx(tmp_path / "a", np.zeros(3, bool))
    with pytest.raises(ValueError, match="1 to 255 dimensions"):
        write_idx(tmp_path / "a", np.array(5, np.uint8))
    with pytest.raises(ValueError, match=r"\[1, 2\*\*32\)"):
        write_idx(tmp_path / "a", np.zeros((3, 0), np.uint8))
    assert list(tmp_path.iterdir()) == []


# -- read_idx errors ----------------------------------------------------------------------------
def read_error(path: Path) -> str:
    with pytest.raises(IdxError) as info:
        read_idx(path)
    assert isinstance(info.value, ValueError)
    assert info.value.path == str(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ")
    return message


def test_missing_file_names_it(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        read_idx(tmp_path / "nope.idx")
    assert str(tmp_path / "nope.idx") in str(info.value)
    assert info.value.filename == str(tmp_path / "nope.idx")


def test_bad_magic(tmp_path):
    message = read_error(put(tmp_path / "a", b"\x01\x00\x08\x01\x00\x00\x00\x01\x05"))
    assert "not an IDX file" in message and "01 00" in message
    # A file named .gz that is neither gzip nor IDX gets a hint.
    message = read_error(put(tmp_path / "b.gz", b"hello world"))
    assert "not gzip-compressed" in message


def test_unknown_type_code(tmp_path):
    message = read_error(put(tmp_path / "a", idx_bytes(0x0A, (1,), b"\x00\x00")))
    assert "unknown IDX type code 0x0A" in message and "0x08 uint8" in message


def test_too_short_and_truncated_header(tmp_path):
    assert "too short for an IDX header: 3 bytes" in read_error(put(tmp_path / "a", b"\0\0\x08"))
    short = struct.pack(">BBBB2I", 0, 0, 0x08, 3, 2, 2)  # ndim 3, two sizes
    message = read_error(put(tmp_path / "b", short))
    assert "truncated header" in message and "need 12 bytes" in message and "found 8" in message


def test_truncated_data_counts_bytes(tmp_path):
    message = read_error(put(tmp_path / "a", idx_bytes(0x08, (3, 4), bytes(10))))
    assert "truncated data" in message and "needs 12 bytes, found 10" in message
    # Counts are in bytes, not elements: 2 x 3 int32 is 24 bytes.
    message = read_error(put(tmp_path / "b", idx_bytes(0x0C, (2, 3), bytes(23))))
    assert "(2, 3) of int32 needs 24 bytes, found 23" in message
    # A header promising far more than the file holds fails on the count, without trying to
    # allocate the promised 4 * 2**32 * 2**32 bytes.
    huge = struct.pack(">BBBB2I", 0, 0, 0x0C, 2, 2**32 - 1, 2**32 - 1) + bytes(8)
    assert "found 8" in read_error(put(tmp_path / "c", huge))
    # The same inside a valid gzip stream.
    message = read_error(put(tmp_path / "d.gz", gzip.compress(idx_bytes(0x08, (5,), bytes(3)))))
    assert "needs 5 bytes, found 3" in message


def test_trailing_bytes(tmp_path):
    message = read_error(put(tmp_path / "a", idx_bytes(0x08, (4,), bytes(6))))
    assert "2 unexpected trailing bytes" in message and "after the 4 data bytes" in message


def test_zero_dims(tmp_path):
    message = read_error(put(tmp_path / "a", idx_bytes(0x08, (2, 0), b"")))
    assert "dimension 1 is 0" in message
    message = read_error(put(tmp_path / "b", idx_bytes(0x08, (), b"\x07")))
    assert "0 dimensions" in message


def test_corrupt_gzip(tmp_path):
    compressed = gzip.compress(idx_bytes(0x08, (64,), bytes(range(64))))
    message = read_error(put(tmp_path / "a.gz", compressed[:-10]))  # a cut-off download
    assert "corrupt or truncated gzip data" in message
    flipped = bytearray(compressed)
    flipped[-8] ^= 0xFF  # CRC mismatch
    assert "corrupt or truncated gzip data" in read_error(put(tmp_path / "b.gz", bytes(flipped)))


# -- IdxDataset ---------------------------------------------------------------------------------
def make_split(
    folder: Path, images: np.ndarray, labels: np.ndarray, suffix: str = ""
) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    images_path, labels_path = folder / f"images{suffix}", folder / f"labels{suffix}"
    write_idx(images_path, images)
    write_idx(labels_path, labels)
    return images_path, labels_path


def gray_images(n: int = 5, h: int = 4, w: int = 6) -> np.ndarray:
    images = np.random.default_rng(1).integers(0, 256, size=(n, h, w), dtype=np.uint8)
    images[0, 0, 0], images[0, 0, 1] = 0, 255  # both ends of the range
    return images


def test_dataset_grayscale_items(tmp_path):
    images = gray_images()
    labels = np.array([3, 0, 9, 8, 1], np.uint8)
    ds = IdxDataset(*make_split(tmp_path, images, labels), MNIST_CLASSES)
    assert len(ds) == 5
    for i in range(5):
        item = ds[i]
        assert set(item) == {"task", "id", "image", "caption", "label"}
        assert item["task"] == "caption" and item["id"] == str(i)
        assert item["label"] == int(labels[i]) and isinstance(item["label"], int)
        image = item["image"]
        assert image.dtype == torch.float32 and image.shape == (3, 4, 6)  # [3, H, W]
        expected = torch.from_numpy(images[i].astype(np.float32)) * 2 / 255 - 1
        for c in range(3):  # grayscale replicated exactly into R, G and B
            assert torch.equal(image[c], image[0])
        torch.testing.assert_close(image[0], expected, rtol=0, atol=1e-6)
        assert image.min() >= -1 and image.max() <= 1
    assert ds[0]["image"].min() == -1 and ds[0]["image"].max() == 1
    assert [ds[i]["caption"] for i in range(5)] == [
        "a photo of a three",
        "a photo of a zero",
        "a photo of a nine",
        "a photo of an eight",
        "a photo of a one",
    ]


def test_dataset_rgb_keeps_channel_order(tmp_path):
    rgb = np.random.default_rng(2).integers(0, 256, size=(3, 5, 7, 3), dtype=np.uint8)
    ds = IdxDataset(*make_split(tmp_path, rgb, np.array([0, 1, 2], np.int32)), ["r", "g", "b"])
    image = ds[1]["image"]
    assert image.shape == (3, 5, 7)
    for c in range(3):
        expected = torch.from_numpy(rgb[1, :, :, c].astype(np.float32)) / 127.5 - 1
        torch.testing.assert_close(image[c], expected, rtol=0, atol=1e-6)


def test_dataset_indexing(tmp_path):
    ds = IdxDataset(*make_split(tmp_path, gray_images(), np.arange(5, dtype=np.uint8)), "abcde")
    assert ds[-1]["id"] == "4" and torch.equal(ds[-1]["image"], ds[4]["image"])
    assert ds[-5]["id"] == "0"
    assert ds[np.int64(2)]["label"] == 2 and ds[torch.tensor(3)]["label"] == 3
    for bad in (5, -6, 100):
        with pytest.raises(IndexError, match="out of range for 5 items"):
            ds[bad]
    with pytest.raises(TypeError):
        ds[1.0]


def test_dataset_batches_with_default_collate(tmp_path):
    ds = IdxDataset(
        *make_split(tmp_path, gray_images(), np.array([1, 1, 0, 0, 1], np.uint8)), ["cat", "owl"]
    )
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=4)))
    assert batch["image"].shape == (4, 3, 4, 6)
    assert batch["caption"] == ["a photo of an owl"] * 2 + ["a photo of a cat"] * 2
    assert batch["label"].tolist() == [1, 1, 0, 0]


def test_dataset_resize(tmp_path):
    images = gray_images()
    images[1] = 200  # a constant image
    ds = IdxDataset(*make_split(tmp_path, images, np.zeros(5, np.uint8)), ["x"], image_size=8)
    image = ds[0]["image"]
    assert image.shape == (3, 8, 8)
    assert torch.equal(image[1], image[0]) and torch.equal(image[2], image[0])
    # Equal to PIL's bicubic resize of the RGB image (the dataset resizes the gray plane first).
    rgb = np.repeat(images[0][:, :, None], 3, axis=2)
    pil = np.array(Image.fromarray(rgb).resize((8, 8), Image.Resampling.BICUBIC))
    torch.testing.assert_close(
        image, torch.from_numpy(pil).permute(2, 0, 1).float() / 127.5 - 1, rtol=0, atol=1e-6
    )
    # Bicubic weights sum to one: a constant image stays that constant.
    torch.testing.assert_close(ds[1]["image"], torch.full((3, 8, 8), 200 / 127.5 - 1))
    # Resizing to the current size is the identity; RGB images resize too.
    square = np.random.default_rng(3).integers(0, 256, size=(2, 6, 6, 3), dtype=np.uint8)
    same = IdxDataset(*make_split(tmp_path / "sq", square, np.zeros(2, np.uint8)), ["x"])
    sized = IdxDataset(same.images_path, same.labels_path, ["x"], image_size=6)
    assert torch.equal(same[1]["image"], sized[1]["image"])
    small = IdxDataset(same.images_path, same.labels_path, ["x"], image_size=3)
    assert small[0]["image"].shape == (3, 3, 3)


def test_dataset_caption_template(tmp_path):
    paths = make_split(tmp_path, gray_images(), np.array([9, 0, 1, 2, 3], np.uint8))
    ds = IdxDataset(*paths, FASHION_MNIST_CLASSES)
    assert ds[0]["caption"] == "a photo of an ankle boot"
    assert ds[1]["caption"] == "a photo of a t-shirt"
    assert ds[2]["caption"] == "a photo of a pair of trousers"
    custom = IdxDataset(*paths, FASHION_MNIST_CLASSES, caption_template="{name} ({a_name})")
    assert custom[0]["caption"] == "ankle boot (an ankle boot)"
    with pytest.raises(ValueError, match=r"'\{nope\}' is not a valid template"):
        IdxDataset(*paths, FASHION_MNIST_CLASSES, caption_template="{nope}")
    with pytest.raises(ValueError, match="class_names is empty"):
        IdxDataset(*paths, [])
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="image_size"):
            IdxDataset(*paths, FASHION_MNIST_CLASSES, image_size=bad)


def test_dataset_label_out_of_range_names_index_and_label(tmp_path):
    images_path, labels_path = make_split(
        tmp_path, gray_images(), np.array([0, 1, 10, 2, 11], np.uint8)
    )
    with pytest.raises(IdxError) as info:
        IdxDataset(images_path, labels_path, MNIST_CLASSES)
    message = str(info.value)
    assert message.startswith(f"{labels_path}: ")
    assert "label 10 at index 2 is outside [0, 10)" in message and "2 bad labels" in message
    write_idx(labels_path, np.array([0, 1, 2, -1, 0], np.int8))
    with pytest.raises(IdxError, match=r"label -1 at index 3"):
        IdxDataset(images_path, labels_path, MNIST_CLASSES)


def test_dataset_shape_and_dtype_errors(tmp_path):
    images_path, labels_path = make_split(tmp_path, gray_images(), np.zeros(4, np.uint8))
    with pytest.raises(IdxError, match=r"4 labels but .*images holds 5 images") as info:
        IdxDataset(images_path, labels_path, MNIST_CLASSES)
    assert str(info.value).startswith(f"{labels_path}: ")

    bad_images = [
        np.zeros((5, 4, 6), np.float32),  # not uint8
        np.zeros((5, 24), np.uint8),  # flat
        np.zeros((5, 4, 6, 2), np.uint8),  # two channels
    ]
    write_idx(labels_path, np.zeros(5, np.uint8))
    for images in bad_images:
        write_idx(images_path, images)
        with pytest.raises(IdxError, match=r"expected uint8 images \[N, H, W\]") as info:
            IdxDataset(images_path, labels_path, MNIST_CLASSES)
        assert str(info.value).startswith(f"{images_path}: ")

    write_idx(images_path, gray_images())
    for labels in (np.zeros(5, np.float32), np.zeros((5, 1), np.uint8)):
        write_idx(labels_path, labels)
        with pytest.raises(IdxError, match=r"expected integer labels \[N\]"):
            IdxDataset(images_path, labels_path, MNIST_CLASSES)


def test_class_name_constants():
    assert MNIST_CLASSES == (
        "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
    )  # fmt: skip
    assert len(FASHION_MNIST_CLASSES) == 10 == len(set(FASHION_MNIST_CLASSES))
    assert all(n == n.lower() and "/" not in n for n in FASHION_MNIST_CLASSES)
    # The official order: 0 T-shirt/top, 1 Trouser, ..., 5 Sandal, ..., 9 Ankle boot.
    assert FASHION_MNIST_CLASSES[0] == "t-shirt" and "trousers" in FASHION_MNIST_CLASSES[1]
    assert FASHION_MNIST_CLASSES[5] == "sandal" and FASHION_MNIST_CLASSES[9] == "ankle boot"


# -- fashion_mnist() / mnist() discovery --------------------------------------------------------
def debian_layout(root: Path, suffix: str = ".gz") -> dict[str, np.ndarray]:
    """A fake Fashion-MNIST folder laid out like Debian's package (gzipped, standard names)."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(4)
    arrays = {}
    for prefix, n in (("train", 6), ("t10k", 3)):  # different sizes tell the splits apart
        arrays[prefix] = rng.integers(0, 10, size=n).astype(np.uint8)
        write_idx(root / f"{prefix}-images-idx3-ubyte{suffix}", np.zeros((n, 28, 28), np.uint8))
        write_idx(root / f"{prefix}-labels-idx1-ubyte{suffix}", arrays[prefix])
    return arrays


def test_fashion_mnist_finds_debian_layout(tmp_path):
    root = tmp_path / "usr/share/datasets/fashion-mnist"
    labels = debian_layout(root)
    train, test = fashion_mnist(root), fashion_mnist(str(root), split="test", image_size=32)
    assert len(train) == 6 and len(test) == 3
    assert train.images_path == str(root / "train-images-idx3-ubyte.gz")
    assert test.labels_path == str(root / "t10k-labels-idx1-ubyte.gz")
    assert [train[i]["label"] for i in range(6)] == labels["train"].tolist()
    assert (
        train[0]["caption"]
        == f"a photo of {'an' if labels['train'][0] == 9 else 'a'} "
        + (FASHION_MNIST_CLASSES[labels["train"][0]])
    )
    assert test[0]["image"].shape == (3, 32, 32) and train[0]["image"].shape == (3, 28, 28)


def test_fashion_mnist_plain_files_preferred_over_gz(tmp_path):
    debian_layout(tmp_path, suffix=".gz")
    write_idx(tmp_path / "train-images-idx3-ubyte", np.zeros((6, 2, 2), np.uint8))
    ds = fashion_mnist(tmp_path)
    assert ds.images_path == str(tmp_path / "train-images-idx3-ubyte")
    assert ds.labels_path == str(tmp_path / "train-labels-idx1-ubyte.gz")
    assert ds[0]["image"].shape == (3, 2, 2)


def test_fashion_mnist_missing_folder_message(tmp_path):
    root = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError) as info:
        fashion_mnist(root, split="test")
    message = str(info.value)
    assert f"the folder {root} does not exist" in message
    assert "t10k-images-idx3-ubyte[.gz]" in message and "t10k-labels-idx1-ubyte[.gz]" in message
    assert "dataset-fashion-mnist" in message and DEFAULT_FASHION_MNIST_ROOT in message


def test_fashion_mnist_missing_file_message(tmp_path):
    debian_layout(tmp_path)
    (tmp_path / "train-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(
        FileNotFoundError, match=r"lacks train-labels-idx1-ubyte\[\.gz\] \("
    ) as info:
        fashion_mnist(tmp_path)
    assert str(tmp_path) in str(info.value)
    fashion_mnist(tmp_path, split="test")  # the other split is complete
    with pytest.raises(ValueError, match="split must be one of"):
        fashion_mnist(tmp_path, split="val")


@pytest.mark.skipif(
    Path(DEFAULT_FASHION_MNIST_ROOT).exists(), reason="dataset-fashion-mnist is installed"
)
def test_fashion_mnist_default_root_absent():
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist") as info:
        fashion_mnist()
    assert DEFAULT_FASHION_MNIST_ROOT in str(info.value)


@pytest.mark.skipif(
    not Path(DEFAULT_FASHION_MNIST_ROOT).exists(), reason="dataset-fashion-mnist not installed"
)
def test_fashion_mnist_real_data_when_installed():
    train, test = fashion_mnist(), fashion_mnist(split="test")
    assert len(train) == 60000 and len(test) == 10000
    assert train.images.shape == (60000, 28, 28)
    assert np.bincount(train.labels).tolist() == [6000] * 10
    assert train[0]["caption"] == "a photo of an ankle boot"  # the first training image


def test_mnist_discovery_and_caption(tmp_path):
    labels = debian_layout(tmp_path, suffix="")
    ds = mnist(tmp_path, "test")
    label = int(labels["t10k"][0])
    assert ds[0]["caption"] == f"a handwritten digit {MNIST_CLASSES[label]}"
    assert mnist(tmp_path, caption_template="{name}")[0]["caption"] in MNIST_CLASSES
    with pytest.raises(FileNotFoundError, match="MNIST train split not found") as info:
        mnist(tmp_path / "empty")
    assert str(tmp_path / "empty") in str(info.value)
