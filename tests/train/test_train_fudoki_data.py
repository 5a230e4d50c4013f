"""FUDOKI's data path: the batched device-side corruption draws exactly the tokens of the
per-sample corruption, and samples read from shards equal those made on the fly."""

from __future__ import annotations

import json
import math
from collections import Counter

import pytest
import torch
from test_train_fudoki import assets, make_config, make_task  # noqa: F401 (the fixture)

from kineflow.train.common import encode_shards
from kineflow.train.fudoki import train_fudoki
from kineflow.train.loop import sample_generator

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("kind", ["metric", "masked"])
def test_batched_corruption_is_the_per_sample_one(assets, tmp_path, kind) -> None:  # noqa: F811
    task = make_task(assets, tmp_path, kind)
    indices = list(range(5, 15))
    batch = task.batch(indices)
    x1 = task.targets(batch)
    xt = task.corrupt(batch, x1)
    assert batch["is_gen"].any() and (~batch["is_gen"]).any()
    lay, o = batch["layout"], task.obj
    for b, index in enumerate(indices):
        # Today's path: the sample's own generator, past its data draws, draws t and then the
        # corruption of its region in one path.sample call.
        _, g = task._draw(index)
        assert torch.equal(g.get_state(), task._sample(index)[1].get_state())
        t = o.t_min + (o.t_max - o.t_min) * float(torch.rand((), generator=g))
        target = x1[b, lay.region[b]]
        path = task.image_path if batch["is_gen"][b] else task.text_path
        want = path.sample(target, torch.full(target.shape, t), g)
        assert torch.equal(xt[b, lay.region[b]], want), (kind, index)
    assert torch.equal(xt[~lay.region], x1[~lay.region])  # prompts and padding untouched
    assert (xt != x1).any()


def test_batch_is_cpu_work_with_the_draws_of_its_samples(assets, tmp_path) -> None:  # noqa: F811
    task = make_task(assets, tmp_path)
    together = task.batch([3, 4, 5])
    assert together["pictures"].dtype == torch.uint8  # the VQ runs in losses, on the device
    for k, index in enumerate([3, 4, 5]):
        alone = task.batch([index])
        assert together["t"][k] == alone["t"][0]
        reg, reg1 = together["layout"].region[k], alone["layout"].region[0]
        assert torch.equal(together["u"][k][reg], alone["u"][0][reg1])
        g = sample_generator(task.data.seed, index)
        assert 0 < float(together["t"][k]) < 1 and g is not None


def test_shards_round_trip_and_train_the_same(assets, tmp_path) -> None:  # noqa: F811
    task = make_task(assets, tmp_path)
    index = encode_shards(task, tmp_path / "shards", 13, shard_size=5)
    assert [s["samples"] for s in index["shards"]] == [5, 5, 3]
    assert index["samples"] == 13 and (tmp_path / "shards" / "index.json").is_file()
    from_shards = make_task(assets, tmp_path, shards=str(tmp_path / "shards"))
    for i in (0, 4, 5, 12):
        want = task.encode_records([task.record(i)])[0]
        got = from_shards.shards.get(i)
        assert got.keys() == want.keys()
        for key, value in want.items():
            assert torch.equal(got[key], value), (i, key)
    fly, read = task.batch(list(range(8))), from_shards.batch(list(range(8)))
    assert read["pictures"] is None
    torch.testing.assert_close(from_shards.targets(read), task.targets(fly), rtol=0, atol=0)
    for key in ("t", "u", "is_gen", "pixels"):
        torch.testing.assert_close(read[key], fly[key], rtol=0, atol=0)
    # Training: 3 steps of 4 samples from the shards = 3 steps on the fly.
    losses = {}
    for name, data in (("fly", {}), ("shards", {"shards": str(tmp_path / "shards")})):
        out = tmp_path / name
        train_fudoki(make_config(assets, out, steps=3, **data), progress=False)
        losses[name] = [json.loads(r)["loss"] for r in (out / "metrics.jsonl").open()]
    assert len(losses["fly"]) == 3
    assert losses["shards"] == pytest.approx(losses["fly"], rel=1e-6)


def test_bad_shards_are_named(assets, tmp_path) -> None:  # noqa: F811
    with pytest.raises(ValueError, match="is not a folder"):
        make_task(assets, tmp_path, shards=str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"has no index\.json"):
        make_task(assets, tmp_path, shards=str(tmp_path / "empty"))
    encode_shards(make_task(assets, tmp_path), tmp_path / "s", 4)
    with pytest.raises(ValueError, match=r"data\.seed=0 but this run has data\.seed=3"):
        make_task(assets, tmp_path, shards=str(tmp_path / "s"), seed=3)
    with pytest.raises(ValueError, match="holds 4 samples, training asked for sample 4"):
        make_task(assets, tmp_path, shards=str(tmp_path / "s")).batch([2, 3, 4])


def test_position_questions_fit_the_shipped_answer_slots() -> None:
    """``data.question_weights`` with number-answered position questions: with the shipped
    tokenizer and two answer slots, every position answer is one token and EOS; the weights
    change the question, not the picture."""
    from pathlib import Path

    from kineflow.data.shapes.language import ORDINAL_ANSWERS, QUESTION_TYPES
    from kineflow.data.shapes.scene import ShapesWorld
    from kineflow.tokenizers.text import TextTokenizer
    from kineflow.train.common import ShapesData, understanding_sample

    tok = TextTokenizer.load(Path(__file__).resolve().parents[2] / "checkpoints/fudoki-shapes")
    assert all(len(tok.encode(a)) == 1 for a in ORDINAL_ANSWERS)
    world, positions = ShapesWorld(), 0
    base = ShapesData(vqa_answer_tokens=2, caption_tokens=40, caption_ratio=0.0)
    only_position = {t: 0 for t in QUESTION_TYPES} | {"position": 1}
    data = ShapesData(vqa_answer_tokens=2, caption_tokens=40, caption_ratio=0.0,
                      question_weights=only_position)  # fmt: skip
    for i in range(40):
        got = understanding_sample(world, data, tok, i, sample_generator(0, i), 9)
        ref = understanding_sample(world, base, tok, i, sample_generator(0, i), 9)
        assert (got.picture == ref.picture).all()  # the same scene either way
        answer = tok.decode(got.target[:1])
        if answer in ORDINAL_ANSWERS:
            positions += 1
            assert got.target[1] == tok.eos_id
    assert positions > 30  # every scene whose objects are not all named by their cell


def test_position_words_fit_four_answer_slots() -> None:
    """Position questions answered in words (``position_words``) need ``vqa_answer_tokens: 4``
    with the shipped tokenizer: each answer is at most 3 tokens, then EOS, and decodes back."""
    from pathlib import Path

    from kineflow.data.shapes.language import COLUMN_WORDS, QUESTION_TYPES, ROW_WORDS
    from kineflow.data.shapes.scene import ShapesWorld
    from kineflow.tokenizers.text import TextTokenizer
    from kineflow.train.common import ShapesData, understanding_sample

    tok = TextTokenizer.load(Path(__file__).resolve().parents[2] / "checkpoints/fudoki-shapes")
    assert max(len(tok.encode(a)) for a in (*ROW_WORDS, *COLUMN_WORDS)) == 3
    only_words = {t: 0 for t in QUESTION_TYPES} | {"position_words": 1}
    data = ShapesData(vqa_answer_tokens=4, caption_tokens=40, caption_ratio=0.0,
                      question_weights=only_words)  # fmt: skip
    answers = Counter()
    for i in range(40):
        got = understanding_sample(ShapesWorld(), data, tok, i, sample_generator(0, i), 9)
        ids = list(got.target)
        n = ids.index(tok.eos_id)
        assert set(ids[n:]) == {tok.eos_id} and len(ids) == 4
        answers[tok.decode(ids[:n])] += 1
    words = {a: n for a, n in answers.items() if a in (*ROW_WORDS, *COLUMN_WORDS)}
    assert sum(words.values()) > 30  # the rest: scenes whose objects are all named by cell
    assert len(words) == 5  # top, center, bottom, left, right all asked


def test_block_time_draws_one_t_per_block_of_the_picture(assets, tmp_path) -> None:  # noqa: F811
    """``objective.block_time``: off, nothing is drawn (``t_tokens`` None, the batch as
    before); on, a generation sample's picture takes one ``t`` per 3 × 3 block of its token
    grid (4 × 4 here: blocks of 3 and 1 per side), drawn by its own generator after its other
    draws (an oracle replays them), understanding samples keep their one ``t``, and the
    corruption of each block is the path's at that block's ``t``."""

    from dataclasses import replace

    from kineflow.flow.sampling import uniforms
    from kineflow.train.fudoki import Objective

    task = make_task(assets, tmp_path)
    indices = list(range(5, 15))
    assert task.batch(indices)["t_tokens"] is None
    task.obj = replace(task.obj, block_time=1.0, block_size=3)
    batch = task.batch(indices)
    x1 = task.targets(batch)
    xt = task.corrupt(batch, x1)
    lay, o, seen = batch["layout"], task.obj, 0
    for b, index in enumerate(indices):
        times = batch["t_tokens"][b, lay.region[b]]
        if not batch["is_gen"][b]:
            assert (times == batch["t"][b]).all()
            continue
        seen += 1
        _, g = task._draw(index)
        float(torch.rand((), generator=g))  # t
        uniforms(int(lay.region[b].sum()), g, "cpu")  # the corruption's uniforms
        assert float(torch.rand((), generator=g)) < 1.0  # the block_time draw
        side = math.isqrt(len(times))
        k = -(-side // 3)
        blocks = o.t_min + (o.t_max - o.t_min) * torch.rand(k, k, generator=g)
        grid = times.view(side, side)
        target = x1[b, lay.region[b]].view(side, side)
        u = batch["u"][b, lay.region[b]].view(side, side)
        assert k == 2 and len(set(blocks.flatten().tolist())) == 4
        for i in range(k):
            for j in range(k):
                rows, cols = slice(3 * i, 3 * i + 3), slice(3 * j, 3 * j + 3)
                assert (grid[rows, cols] == blocks[i, j]).all()
                cell = target[rows, cols].flatten()
                want = task.image_path.sample(
                    cell,
                    torch.full(cell.shape, float(blocks[i, j])),
                    u=u[rows, cols].reshape(-1, 1),
                )
                got = xt[b, lay.region[b]].view(side, side)[rows, cols].flatten()
                assert torch.equal(got, want), (index, i, j)
    assert seen > 0
    with pytest.raises(ValueError, match="block_time"):
        Objective(block_time=1.5)
    with pytest.raises(ValueError, match="block_size"):
        Objective(block_size=0)
