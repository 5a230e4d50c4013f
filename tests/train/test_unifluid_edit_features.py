"""``model.edit_features``: an editing prompt also shows the source picture through the
understanding tower (P features before its L latent tokens) — in the training batch, from
shards, and in the pipeline, each checked against its own reconstruction."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from test_train_unifluid import (  # noqa: F401 (assets: the fixture)
    MODEL,
    assert_edit_replays,
    assets,
    red_square,
    sensitive_copy,
)

from kineflow.inputs.images import preprocess_understanding
from kineflow.tokenizers.text import TextTokenizer
from kineflow.train.common import encode_shards
from kineflow.train.unifluid import (
    UnifluidTask,
    UnifluidTrainConfig,
    build_unifluid,
    train_unifluid,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def config(assets, out, steps=3, features=True, **data) -> UnifluidTrainConfig:  # noqa: F811
    return UnifluidTrainConfig.from_dict({
        "model": {**MODEL, "edit_features": features}, "vae": assets["vae"],
        "text_tokenizer": assets["text"], "out": str(out),
        "data": {"vqa_answer_tokens": 3, "caption_tokens": 40, "edit_ratio": 0.4, **data},
        "optim": {"steps": steps, "batch_size": 6, "lr": 1e-3, "warmup": 1},
        "log_every": 1, "ckpt_every": 2,
    })  # fmt: skip


def task_of(assets, out, **kw) -> UnifluidTask:  # noqa: F811
    run = config(assets, out, **kw)
    tok = TextTokenizer.load(assets["text"])
    return UnifluidTask(build_unifluid(run, tok), tok, run)


def view(picture: torch.Tensor, size: int) -> torch.Tensor:
    return preprocess_understanding([Image.fromarray(picture.numpy())], size)[0]


def test_the_batch_shows_the_source_to_the_tower(assets, tmp_path) -> None:  # noqa: F811
    task = task_of(assets, tmp_path)
    model = task.model
    P, L = model.config.vision.num_patches, model.config.num_image_tokens
    size = model.config.vision.image_size
    indices = list(range(16))
    edits = [i for i in indices if int(task.record(i)["kind"]) == 1]
    assert len(edits) >= 3
    batch = task.encoded(task.batch(indices))
    edit = batch["edit"]
    assert (edit["image_mask"].sum(1) == P + L).all()
    for row, i in enumerate(edits):  # the source picture, not the target, as understanding sees it
        record = task.record(i)
        torch.testing.assert_close(edit["source_pixels"][row], view(record["source_picture"], size))
        assert not torch.equal(edit["source_pixels"][row], view(record["picture"], size))
    model.eval()
    head = model.diffusion_head.net  # zero-initialised modulations ignore z: wake them
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in [head.final_modulation[-1], head.output,
                      *(block.modulation[-1] for block in head.blocks)]:  # fmt: skip
            layer.weight.copy_(0.3 * torch.randn(layer.weight.shape, generator=g))
        before = model(batch)["image"]
        shown = dict(batch, edit=dict(edit, source_pixels=edit["source_pixels"].flip(-1)))
        after = model(shown)["image"]
    G = len(batch["gen"]["ids"])
    torch.testing.assert_close(after[:G], before[:G])  # text-to-image rows do not read it
    assert (after[G:] - before[G:]).abs().min() > 0  # every edit row does
    losses = task.losses(batch, model)
    losses["loss"].backward()
    assert model.aligner.weight.grad is not None and model.aligner.weight.grad.abs().sum() > 0


def test_shards_keep_the_source_for_the_tower(assets, tmp_path) -> None:  # noqa: F811
    task = task_of(assets, tmp_path)
    encode_shards(task, tmp_path / "shards", 12, shard_size=5)
    index = json.loads((tmp_path / "shards" / "index.json").read_text())
    assert "edit_features" in json.dumps(index)
    read = task_of(assets, tmp_path, shards=str(tmp_path / "shards"))
    fly = task.encoded(task.batch(list(range(12))))
    shards = read.batch(list(range(12)))
    torch.testing.assert_close(shards["edit"]["source_pixels"], fly["edit"]["source_pixels"])
    losses = {}
    for name, data in (("fly", {}), ("shards", {"shards": str(tmp_path / "shards")})):
        train_unifluid(config(assets, tmp_path / name, steps=2, **data), progress=False)
        rows = (tmp_path / name / "metrics.jsonl").open()
        losses[name] = [json.loads(r)["loss"] for r in rows]
    assert losses["shards"] == pytest.approx(losses["fly"], rel=1e-5)
    # Shards written for a model without the option lack the pictures: refused by name.
    encode_shards(task_of(assets, tmp_path, features=False), tmp_path / "plain", 4)
    with pytest.raises(ValueError, match="edit_features"):
        task_of(assets, tmp_path, shards=str(tmp_path / "plain"))


@pytest.fixture(scope="module")
def pipe(assets, tmp_path_factory):  # noqa: F811
    import kineflow

    out = tmp_path_factory.mktemp("edit_features")
    train_unifluid(config(assets, out, steps=2), progress=False)
    loaded = kineflow.load(out / "model")
    assert loaded.model.config.edit_features  # saved in config.json, read back
    return sensitive_copy(loaded)


def test_the_pipeline_edits_as_training_sees_the_prompt(pipe) -> None:
    """An edit's tokens are the head's draws (same noise) from the hidden states of the
    training forward on the prompt with the source's features; a source given as latent tokens
    is read by the tower from its decoded picture."""
    model = pipe.model
    instruction, seed = "make the square cyan.", 3
    out = pipe.edit([red_square()], [instruction], seed=seed)
    source = pipe.encode([red_square()])
    ids, mask = pipe._left_pad(pipe._prompt_rows([instruction], "instruction", True))
    features = pipe._features([red_square()])
    prompt = model.edit_embeds(ids, ids == pipe.tokenizer.image_id, source, features)
    assert_edit_replays(pipe, out.codes, prompt, mask, source, seed)
    calls = []
    original = pipe._features

    def spy(images):
        calls.append(images)
        return original(images)

    pipe._features = spy
    latent = pipe.edit(source, [instruction], seed=seed)
    del pipe._features
    assert len(calls) == 1 and len(calls[0]) == 1  # the decoded source picture
    assert latent.codes.shape == out.codes.shape
