"""Task mixing: asked proportions, determinism per index, and manifest errors with file:line."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from kineflow.data.manifest import ManifestError, write_manifest
from kineflow.data.mix import TaskMix, check_mix
from kineflow.data.shapes.dataset import corpus
from kineflow.tokenizers.text import train_text_tokenizer
from kineflow.train.own_data import FUDOKI_TASKS, OwnData, default_mix


def test_proportions_over_many_indices() -> None:
    mix = TaskMix.from_mapping({"t2i": 0.5, "vqa": 0.3, "caption": 0.2}, seed=3)
    n = 40_000
    tasks = [mix.task(i) for i in range(n)]
    for name, p in (("t2i", 0.5), ("vqa", 0.3), ("caption", 0.2)):
        share = tasks.count(name) / n
        assert abs(share - p) < 4 * (p * (1 - p) / n) ** 0.5  # within 4 standard errors
    records = np.bincount([mix.record(i, 7) for i in range(n)], minlength=7) / n
    assert np.abs(records - 1 / 7).max() < 0.01


def test_a_sample_task_depends_on_seed_and_index_only() -> None:
    a = TaskMix.from_mapping({"t2i": 1, "vqa": 1}, seed=0)
    b = TaskMix.from_mapping({"t2i": 1, "vqa": 1}, seed=0)
    indices = list(range(100, 164))
    # Any batch split or order (another process count, a resumed run) sees the same tasks.
    whole = [a.task(i) for i in indices]
    pieces = [b.task(i) for i in indices[32:]] + [b.task(i) for i in indices[:32]]
    assert pieces[32:] + pieces[:32] == whole
    assert [TaskMix.from_mapping({"t2i": 1, "vqa": 1}, seed=1).task(i) for i in indices] != whole
    assert TaskMix.from_mapping({"t2i": 0, "vqa": 2}).task(5) == "vqa"  # a zero share never comes


def test_bad_mix_is_named() -> None:
    with pytest.raises(ValueError, match="unknown task 'gen'"):
        check_mix({"gen": 1.0}, FUDOKI_TASKS)
    with pytest.raises(ValueError, match=r"data\.mix\.vqa must be a number >= 0"):
        check_mix({"t2i": 1.0, "vqa": -1}, FUDOKI_TASKS)
    with pytest.raises(ValueError, match="add up to 0"):
        check_mix({"t2i": 0}, FUDOKI_TASKS)


def data(manifest, **kw) -> SimpleNamespace:
    base = dict(manifest=str(manifest), mix=None, seed=0, image_size=32, understanding_ratio=0.5,
                caption_ratio=0.3, caption_tokens=12, vqa_answer_tokens=4, text_budget=64,
                cfg_dropout=0.1, caption_instruction="Describe the picture.")  # fmt: skip
    return SimpleNamespace(**{**base, **kw})


@pytest.fixture(scope="module")
def tokenizer():
    return train_text_tokenizer(corpus(n=100), vocab_size=300)


def test_bad_manifest_line_is_named(tmp_path, tokenizer) -> None:
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "a.png")
    good = '{"image": "a.png", "caption": "a black square"}'
    (tmp_path / "m.jsonl").write_text(good + "\n" + '{"image": "a.png", "answer": "x"}\n')
    with pytest.raises(ManifestError, match=r"m\.jsonl:2: "):
        OwnData(data(tmp_path / "m.jsonl"), FUDOKI_TASKS, tokenizer)
    # An answer too long for its slots names its line too.
    records = [
        {"image": "a.png", "caption": "a black square"},
        {"image": "a.png", "question": "what?", "answer": "a very long answer indeed"},
    ]
    write_manifest(tmp_path / "n.jsonl", records)
    with pytest.raises(ManifestError, match=r"n\.jsonl:2: .*vqa_answer_tokens"):
        OwnData(data(tmp_path / "n.jsonl"), FUDOKI_TASKS, tokenizer)
    # A task with a share but no records.
    write_manifest(tmp_path / "c.jsonl", records[:1])
    with pytest.raises(ManifestError, match=r"c\.jsonl:1: .*'vqa'.*no vqa records"):
        OwnData(data(tmp_path / "c.jsonl", mix={"t2i": 1, "vqa": 1}), FUDOKI_TASKS, tokenizer)


def test_own_data_draws_by_mix(tmp_path, tokenizer) -> None:
    records = []
    for i in range(3):
        Image.fromarray(np.full((40, 40, 3), 60 * i, np.uint8)).save(tmp_path / f"{i}.png")
        records += [{"image": f"{i}.png", "caption": f"shade {i}"},
                    {"image": f"{i}.png", "question": "what?", "answer": f"{i}"}]  # fmt: skip
    write_manifest(tmp_path / "m.jsonl", records)
    own = OwnData(data(tmp_path / "m.jsonl", mix={"t2i": 3, "vqa": 1}), FUDOKI_TASKS, tokenizer)
    draws = [own.draw(i) for i in range(2000)]
    assert abs(sum(t == "t2i" for t, _ in draws) / 2000 - 0.75) < 0.04
    for task, at in draws[:50]:
        assert own.dataset.records[at].task == ("caption" if task == "t2i" else "vqa")
    picture = own.picture(own.draw(0)[1])
    assert picture.shape == (32, 32, 3) and picture.dtype == np.uint8
    assert default_mix(data("x"), FUDOKI_TASKS) == {"t2i": 0.5, "caption": 0.15, "vqa": 0.35}
