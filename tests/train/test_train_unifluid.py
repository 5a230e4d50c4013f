"""The UniFluid trainer: mixed batches, the loss, exact resume."""

from __future__ import annotations

import copy
import json
import re

import numpy as np
import pytest
import torch

from kineflow.data.shapes.dataset import corpus
from kineflow.tokenizers.kl_vae import AutoencoderKL, KLConfig
from kineflow.tokenizers.text import TextTokenizer, train_text_tokenizer
from kineflow.train.unifluid import (
    UnifluidTask,
    UnifluidTrainConfig,
    build_unifluid,
    token_range,
    train_unifluid,
)

MODEL = {
    "language": {"hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
                 "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8,
                 "max_position_embeddings": 256, "hidden_act": "gelu_tanh", "norm_offset": True,
                 "embed_scale": True, "sandwich_norms": True, "query_pre_attn_scalar": 8,
                 "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0},
    "vision": {"image_size": 32, "patch_size": 16, "hidden_size": 16, "intermediate_size": 32,
               "num_hidden_layers": 1, "num_attention_heads": 2},
    "head": {"width": 32, "depth": 1, "steps": 50, "sample_steps": 5, "draws": 2},
}  # fmt: skip

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("unifluid")
    torch.manual_seed(0)
    vae = AutoencoderKL(KLConfig(channels=8, channel_mult=(1, 2, 2), num_res_blocks=1,
                                 z_channels=4, norm_groups=4, image_size=32))  # fmt: skip
    vae.save_pretrained(root / "vae")
    train_text_tokenizer(corpus(n=200), vocab_size=400).save(root / "text")
    return {"vae": str(root / "vae"), "text": str(root / "text")}


def make_config(assets, out, steps=4, **data) -> UnifluidTrainConfig:
    return UnifluidTrainConfig.from_dict({
        "model": MODEL, "vae": assets["vae"], "text_tokenizer": assets["text"], "out": str(out),
        "data": {"vqa_answer_tokens": 3, "caption_tokens": 40, **data},
        "optim": {"steps": steps, "batch_size": 6, "lr": 1e-3, "warmup": 1},
        "log_every": 1, "ckpt_every": 2,
    })  # fmt: skip


def make_task(assets, out) -> UnifluidTask:
    config = make_config(assets, out)
    tok = TextTokenizer.load(assets["text"])
    return UnifluidTask(build_unifluid(config, tok), tok, config)


def test_batches_mix_generation_editing_and_understanding(assets, tmp_path) -> None:
    task = make_task(assets, tmp_path)
    tok, model = task.tokenizer, task.model
    batch = task.encoded(task.batch(list(range(24))))  # the KL-VAE runs in losses()
    gen, edit, und = batch["gen"], batch["edit"], batch["und"]
    assert gen is not None and edit is not None and und is not None
    L, C = model.config.num_image_tokens, model.config.vae.token_dim
    assert gen["tokens"].shape[1:] == (L, C) and (gen["ids"][:, -1] == tok.boi_id).all()
    P = model.config.vision.num_patches
    assert (edit["image_mask"].sum(1) == L).all() and edit["source"].shape == (
        len(edit["ids"]),
        L,
        C,
    )
    assert not torch.equal(edit["source"], edit["tokens"])  # the source is not the target
    assert (und["targets"][und["target_mask"]] >= 0).all() and und["prefix"].min() > P
    # Teacher forcing: the model reads the answer itself in the answer slots.
    assert torch.equal(und["ids"], und["targets"])
    assert (und["ids"][und["target_mask"]] != tok.pad_id).all()
    losses = task.losses(batch, model)
    assert torch.isfinite(losses["loss"])
    torch.testing.assert_close(losses["loss_image"] + losses["loss_text"], losses["loss"])
    losses["loss"].backward()
    assert model.pos_next.grad is not None  # in the graph (zero while the head is at its init)
    assert all(p.grad is None for p in model.vae.parameters())  # frozen


def test_a_samples_losses_do_not_depend_on_its_batch(assets, tmp_path) -> None:
    """Each generation / editing sample draws its diffusion (t, ε) from its own generator:
    its image loss is the same whichever samples share its batch (and so under any number of
    processes or loader workers)."""
    task = make_task(assets, tmp_path)
    task.model.eval()

    def image_losses(indices: list[int]) -> dict[int, float]:
        batch = task.encoded(task.batch(indices))
        with torch.no_grad():
            out = task.model(batch)
        kinds = {i: int(task.record(i)["kind"]) for i in indices}
        order = [i for i in indices if kinds[i] == 0] + [i for i in indices if kinds[i] == 1]
        return dict(zip(order, out["image"].tolist(), strict=True))

    together = image_losses(list(range(12)))
    for part in (list(range(0, 12, 2)), list(range(1, 12, 2)), [11, 3, 7]):
        alone = image_losses(part)
        for i, value in alone.items():
            assert value == pytest.approx(together[i], rel=1e-5, abs=1e-6), i
    assert len(together) >= 4  # the batch holds several generation / editing samples


def test_resumed_run_equals_straight_run(assets, tmp_path) -> None:
    straight = tmp_path / "straight"
    train_unifluid(make_config(assets, straight), progress=False)
    resumed = tmp_path / "resumed"
    real = UnifluidTask.batch

    def dies_at_step_4(self, indices):
        if indices[0] == 3 * 6:  # batch size 6: step 4 starts at sample 18
            raise KeyboardInterrupt
        return real(self, indices)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(UnifluidTask, "batch", dies_at_step_4)
        with pytest.raises(KeyboardInterrupt):
            train_unifluid(make_config(assets, resumed), progress=False)
    train_unifluid(make_config(assets, resumed), progress=False)

    def losses(out) -> list[float]:
        return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").open()]

    assert losses(resumed) == losses(straight) and len(losses(straight)) == 4
    assert (straight / "model" / "model.safetensors").is_file()
    assert (straight / "model" / "tokenizer.json").is_file()


def test_only_rank_0_writes_the_final_model(assets, tmp_path, monkeypatch) -> None:
    """As for FUDOKI (tests/train/test_train_fudoki.py): RANK 1 trains, writes no model."""
    monkeypatch.setenv("RANK", "1")
    summary = train_unifluid(make_config(assets, tmp_path / "r1", steps=2), progress=False)
    assert summary["steps"] == 2 and not (tmp_path / "r1" / "model").exists()


def test_vocabulary_mismatch(assets, tmp_path) -> None:
    config = make_config(assets, tmp_path)
    config.model = {**MODEL, "language": {**MODEL["language"], "vocab_size": 99}}
    with pytest.raises(ValueError, match="vocabularies must match"):
        train_unifluid(config, progress=False)


@pytest.fixture(scope="module")
def trained_folder(assets, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    train_unifluid(make_config(assets, out, steps=2), progress=False)
    return out / "model"


def test_init_from_starts_a_stage_from_a_saved_model(assets, trained_folder, tmp_path) -> None:
    """``init_from`` (a second stage of a recipe): the run starts from the folder's weights,
    with its own data mix and schedule; a folder of another shape is named in the error."""
    from safetensors.torch import load_file

    saved = load_file(str(trained_folder / "model.safetensors"))
    config = make_config(assets, tmp_path / "stage2", steps=1, understanding_ratio=0.6)
    config.init_from = str(trained_folder)
    config.optim.lr = 1e-12  # one step that barely moves: the weights are the saved ones
    train_unifluid(config, progress=False)
    got = load_file(str(tmp_path / "stage2" / "model" / "model.safetensors"))
    assert got.keys() == saved.keys()
    for key in ("backbone.layers.0.mlp.up_proj.weight", "diffusion_head.net.blocks.0.mlp.0.weight"):
        torch.testing.assert_close(got[key], saved[key], atol=1e-6, rtol=0)
    fresh = make_config(assets, tmp_path / "fresh", steps=1)
    tok = TextTokenizer.load(assets["text"])
    torch.manual_seed(1)  # a model built afresh differs: the copy is what made them equal
    key = "backbone.layers.0.mlp.up_proj.weight"
    assert not torch.equal(build_unifluid(fresh, tok).state_dict()[key], saved[key])
    wide = make_config(assets, tmp_path / "wide", steps=1)
    wide.model = {**MODEL, "head": {**MODEL["head"], "width": 48}}
    wide.init_from = str(trained_folder)
    misfit = re.escape(f"init_from {trained_folder} does not fit the model: mis-shaped")
    with pytest.raises(ValueError, match=misfit):
        train_unifluid(wide, progress=False)
    wide.init_from = str(tmp_path)
    with pytest.raises(ValueError, match=r"no model\.safetensors there"):
        train_unifluid(wide, progress=False)


def test_a_stage_keeps_its_own_vae(assets, trained_folder, tmp_path) -> None:
    """``init_from`` never copies the folder's frozen KL-VAE over the one the config names."""
    from safetensors.torch import load_file

    torch.manual_seed(3)
    other = AutoencoderKL(AutoencoderKL.from_pretrained(assets["vae"]).config)
    other.save_pretrained(tmp_path / "vae2")
    config = make_config(assets, tmp_path / "stage2", steps=1)
    config.vae, config.init_from = str(tmp_path / "vae2"), str(trained_folder)
    config.optim.lr = 1e-12
    train_unifluid(config, progress=False)
    got = load_file(str(tmp_path / "stage2" / "model" / "model.safetensors"))
    for key, value in other.state_dict().items():
        torch.testing.assert_close(got[f"vae.{key}"], value, atol=0, rtol=0)
    saved = load_file(str(trained_folder / "model.safetensors"))
    key = "backbone.layers.0.mlp.up_proj.weight"
    torch.testing.assert_close(got[key], saved[key], atol=1e-6, rtol=0)


@pytest.fixture(scope="module")
def trained(trained_folder):
    import kineflow

    return kineflow.load(trained_folder)


def test_pipeline_generates_edits_and_answers(trained) -> None:
    from PIL import Image

    from kineflow.pipelines.unifluid import UnifluidPipeline

    pipe = trained
    assert isinstance(pipe, UnifluidPipeline)
    assert pipe.config.clip_x0 is not None and pipe.config.clip_x0 > 0  # saved by the trainer
    out = pipe.text_to_image(["a red circle", "two blue squares left of a cyan circle"], seed=0)
    assert len(out.images) == 2 and out.images[0].size == (32, 32)
    again = pipe.text_to_image(["a red circle", "two blue squares left of a cyan circle"], seed=0)
    assert torch.equal(out.codes, again.codes)  # seeded
    raster = pipe.text_to_image(["a red circle"], seed=0, cfg_scale=1.0,
                                order=torch.arange(16)[None])  # fmt: skip
    assert raster.codes.shape == (1, 16, 16)
    source = Image.new("RGB", (32, 32), "white")
    edited = pipe.edit([source], ["make the circle cyan."], seed=1)
    assert edited.images[0].size == (32, 32)
    answers = pipe.answer([source, source], ["how many circles are there?", "is it red?"],
                          max_tokens=4)  # fmt: skip
    assert len(answers.texts) == 2 and all(len(ids) <= 4 for ids in answers.ids)
    beam = pipe.caption(source, beams=2)
    assert isinstance(beam.texts[0], str)
    with pytest.raises(ValueError, match="empty prompt"):
        pipe.text_to_image(["  "])
    with pytest.raises(ValueError, match="special token"):
        pipe.text_to_image(["a <begin_of_image> circle"])
    with pytest.raises(ValueError, match="1 image"):
        pipe.edit([source], ["a", "b"])


def test_edit_takes_pictures_or_latents_and_names_bad_input(trained, tmp_path) -> None:
    from PIL import Image

    from kineflow.data.image_file import ImageFileError

    pipe = trained
    source = Image.new("RGB", (32, 32), "white")
    source.paste((255, 0, 0), (4, 4, 14, 14))
    tokens = pipe.encode([source])
    assert tokens.shape == (1, 16, 16)
    by_picture = pipe.edit([source], ["make the square cyan."], seed=3)
    by_tokens = pipe.edit(tokens, ["make the square cyan."], seed=3)
    assert torch.equal(by_picture.codes, by_tokens.codes)
    larger = pipe.encode(source.resize((96, 96), Image.Resampling.NEAREST))
    assert larger.shape == tokens.shape  # any square size is resized to the VAE's
    with pytest.raises(ValueError, match="empty prompt / instruction"):
        pipe.edit([source], [" "])
    with pytest.raises(ValueError, match=r"source image tokens must be \[B, 16, 16\]"):
        pipe.edit(tokens[:, :4], ["make the square cyan."])
    with pytest.raises(ValueError, match="got 1 image"):
        pipe.edit(tokens, ["a", "b"])
    with pytest.raises(ValueError, match="48x32: UniFluid edits square pictures"):
        pipe.edit([Image.new("RGB", (48, 32))], ["remove the square."])
    not_a_picture = tmp_path / "notes.png"
    not_a_picture.write_text("not an image")
    with pytest.raises(ImageFileError, match=r"notes\.png"):
        pipe.edit([str(not_a_picture)], ["remove the square."])


def sensitive_copy(trained):
    """A copy of the trained pipeline whose pictures depend strongly on their inputs. Two
    training steps leave the diffusion head near its zero-initialised identity (its draws
    barely depend on the hidden state) and the source projection at zero: a test of editing
    would not see a dropped source or a wrong hidden state. Random weights make both visible."""
    pipe = copy.deepcopy(trained)
    model = pipe.model
    head = model.diffusion_head.net
    g = torch.Generator().manual_seed(0)
    layers = [model.source_in, head.final_modulation[-1], head.output]
    layers += [block.modulation[-1] for block in head.blocks]
    with torch.no_grad():
        for layer in layers:
            layer.weight.copy_(0.3 * torch.randn(layer.weight.shape, generator=g))
    return pipe


def red_square():
    from PIL import Image

    source = Image.new("RGB", (32, 32), "white")
    source.paste((255, 0, 0), (4, 4, 14, 14))
    return source


def white_picture():
    from PIL import Image

    return Image.new("RGB", (32, 32), "white")


def assert_edit_replays(pipe, codes, prompt, mask, source, seed: int) -> None:
    """Each edited token is the diffusion head's draw (the pipeline's noise, replayed in its
    order: cells, then noise) from the training forward's hidden state for ``prompt``,
    teacher-forced on the edit's own ``codes``."""
    from kineflow.models.unifluid import generation_order

    model, c = pipe.model, pipe.config
    g = pipe._generator(seed)
    L = model.config.num_image_tokens
    order = generation_order(1, L, model.config.order, g)
    with torch.no_grad():
        z = model.generation_hidden(prompt, mask, codes, order, source)
        for j in range(L):
            x = model.diffusion_head.sample(
                z[:, j], temperature=c.temperature, generator=g, clip_x0=c.clip_x0
            )
            torch.testing.assert_close(codes[:, order[0, j]], x, atol=1e-3, rtol=1e-3)


def test_edit_conditions_on_the_source_as_training_does(trained) -> None:
    """Each token of an edit is the diffusion head's draw (same noise) from the hidden state
    that the *training* forward computes, teacher-forced on the tokens the edit produced: the
    KV-cached loop sees the source (prompt and announced cells) exactly as training does."""

    pipe = sensitive_copy(trained)
    model = pipe.model
    instruction, seed = "make the square cyan.", 3
    out = pipe.edit([red_square()], [instruction], seed=seed)
    source = pipe.encode([red_square()])
    ids, mask = pipe._left_pad(pipe._prompt_rows([instruction], "instruction", True))
    prompt = model.edit_embeds(ids, ids == pipe.tokenizer.image_id, source)
    assert_edit_replays(pipe, out.codes, prompt, mask, source, seed)
    # The source matters: another picture gives another edit from the same noise.
    other = pipe.edit([white_picture()], [instruction], seed=seed)
    assert (other.codes - out.codes).abs().max() > 0.05


def reference_decode(model, embeds, mask, prefix, *, max_tokens, eos_id, beams):
    """Beam search (greedy for one beam) without a KV cache: every step runs the whole
    sequence through the backbone and reads the last position."""
    B = embeds.shape[0]
    results = []
    for b in range(B):
        live = [(0.0, [])]  # (sum of log-probabilities, tokens)
        for _ in range(max_tokens):
            grown = []
            for score, seq in live:
                if seq and seq[-1] == eos_id:
                    grown.append((score, [*seq, eos_id]))  # finished: EOS again, for free
                    continue
                tokens = torch.tensor([seq], dtype=torch.long)
                inputs = torch.cat([embeds[b : b + 1], model.backbone.embed(tokens)], 1)
                attention = torch.cat(
                    [mask[b : b + 1], torch.ones(1, len(seq), dtype=torch.bool)], 1
                )
                hidden = model.backbone(
                    inputs_embeds=inputs, attention_mask=attention, mask="prefix",
                    prefix_lengths=prefix[b : b + 1],
                )  # fmt: skip
                logp = torch.log_softmax(model.text_logits(hidden[0, -1]).double(), -1)
                top = logp.topk(beams)
                grown += [(score + float(v), [*seq, int(i)]) for v, i in zip(*top, strict=True)]
            live = sorted(grown, key=lambda item: -item[0])[:beams]
            if all(seq[-1] == eos_id for _, seq in live):
                break
        best = live[0][1]
        results.append(best[: best.index(eos_id)] if eos_id in best else best)
    return results


@pytest.mark.parametrize("beams", [1, 3])
def test_answers_and_captions_equal_uncached_decoding(trained, monkeypatch, beams) -> None:
    """Greedy answers and beam-search captions equal a plain, uncached decoder's."""
    pipe = copy.deepcopy(trained)
    model = pipe.model
    # A random, untied text head: the trained one says EOS first (an empty, trivially equal
    # answer), and with the tied embeddings the beams never swap places, so a KV cache that
    # is not reordered with them would go unnoticed.
    g = torch.Generator().manual_seed(5)
    language = model.config.language
    W = torch.randn(language.vocab_size, language.hidden_size, generator=g)
    monkeypatch.setattr(model, "text_logits", lambda hidden: hidden.float() @ W.t())
    seen = []
    real = model.generate_text

    def spy(embeds, attention_mask, prefix_lengths, **kw):
        seen.append((embeds, attention_mask, prefix_lengths, kw))
        return real(embeds, attention_mask, prefix_lengths, **kw)

    monkeypatch.setattr(model, "generate_text", spy)
    pictures = [red_square(), white_picture()]
    if beams == 1:
        out = pipe.answer(pictures, ["how many squares are there?", "what colour?"], max_tokens=5)
    else:
        out = pipe.caption(pictures, beams=beams)
    ((embeds, mask, prefix, kw),) = seen
    assert kw["beams"] == beams
    with torch.no_grad():
        expected = reference_decode(model, embeds, mask, prefix, max_tokens=kw["max_tokens"],
                                    eos_id=kw["eos_id"], beams=beams)  # fmt: skip
    assert out.ids == expected
    assert out.texts == [pipe.tokenizer.decode(ids) for ids in expected]
    assert all(len(ids) > 1 for ids in expected) and expected[0] != expected[1]


def test_trajectory_shows_the_tokens_arriving_in_order(trained) -> None:
    import numpy as np

    from kineflow.pipelines.unifluid import NOT_YET

    pipe = trained
    order = torch.arange(16).flip(0)[None]  # reversed raster: the bottom row of cells first
    out = pipe.text_to_image(["a red circle"], seed=0, order=order, return_trajectory=True,
                             frames=4)  # fmt: skip
    frames = [np.asarray(f) for f in out.trajectory[0]]
    final = np.asarray(out.images[0])
    assert len(frames) == 5  # after 0, 4, 8, 12, 16 tokens (a 4 x 4 grid of 8 px cells)
    assert (frames[0] == NOT_YET).all() and np.array_equal(frames[-1], final)
    # After 4 tokens the bottom row of cells is drawn, the rest is still waiting.
    assert np.array_equal(frames[1][24:], final[24:]) and (frames[1][:24] == NOT_YET).all()
    assert np.array_equal(frames[3][8:], final[8:]) and (frames[3][:8] == NOT_YET).all()
    random = pipe.text_to_image(["a red circle"], seed=0, return_trajectory=True)
    assert len(random.trajectory[0]) == 17  # one frame per token by default


def test_load_image_takes_arrays_and_names_unsupported_input() -> None:
    import numpy as np

    from kineflow.inputs.images import load_image

    array = np.zeros((8, 6, 3), dtype=np.uint8)
    assert load_image(array).size == (6, 8)
    with pytest.raises(ValueError, match=r"uint8 \[H, W, 3\].*float64 \[8, 6, 3\]"):
        load_image(array.astype(float))
    with pytest.raises(ValueError, match=r"\[8, 6, 4\]"):
        load_image(np.zeros((8, 6, 4), dtype=np.uint8))
    with pytest.raises(TypeError, match="unsupported image list"):
        load_image([1, 2, 3])


def test_cli_selects_the_family_and_edits(trained_folder, tmp_path, capsys) -> None:
    from PIL import Image

    from kineflow.cli import main

    picture = tmp_path / "p.png"
    Image.new("RGB", (32, 32), "white").save(picture)
    model = ["--model", str(trained_folder)]
    assert main(["generate", *model, "a red circle", "--out", str(tmp_path / "gen")]) == 0
    assert (tmp_path / "gen" / "sample_0.png").is_file()
    assert main(["answer", *model, "--image", str(picture), "how many circles are there?",
                 "--answer-tokens", "3", "--beams", "2"]) == 0  # fmt: skip
    assert "A: " in capsys.readouterr().out
    assert main(["edit", *model, "--image", str(picture), "make the circle cyan.",
                 "--out", str(tmp_path / "edit")]) == 0  # fmt: skip
    assert (tmp_path / "edit" / "edit_0.png").is_file()
    assert (tmp_path / "edit" / "edit_0_refine.gif").is_file()  # token by token
    assert (tmp_path / "gen" / "sample_0_refine.gif").is_file()
    assert main(["answer", *model, "how many?"]) == 2  # UniFluid needs a picture
    assert "give --image" in capsys.readouterr().out


def test_edit_refuses_a_fudoki_checkpoint(tmp_path, capsys) -> None:
    from pathlib import Path

    from PIL import Image

    from kineflow.cli import main

    picture = tmp_path / "p.png"
    Image.new("RGB", (32, 32), "white").save(picture)
    shipped = Path(__file__).resolve().parents[2] / "checkpoints" / "fudoki-shapes"
    assert main(["edit", "--model", str(shipped), "--image", str(picture), "make it red."]) == 2
    assert "not a UniFluid checkpoint" in capsys.readouterr().out


def test_tokens_are_scaled_to_unit_variance(assets, tmp_path) -> None:
    task = make_task(assets, tmp_path)
    config, tok, model = task.config, task.tokenizer, task.model
    batch = task.encoded(task.batch(list(range(256))))
    std = float(batch["gen"]["tokens"].std())
    assert 0.7 < std < 1.3, std  # the generation samples of the first 256 indices
    # The pipeline clamps x0 to the range of the calibration tokens, which these are among.
    r = token_range(model, config.data)
    assert r % 0.5 == 0 and float(batch["gen"]["tokens"].abs().max()) <= r
    config.token_scale = 2.5
    assert build_unifluid(config, tok).config.vae.scaling_factor == 2.5


def test_cli_train_unifluid(assets, tmp_path, capsys) -> None:
    import yaml

    from kineflow.cli import main

    config = make_config(assets, tmp_path / "run").to_dict()
    path = tmp_path / "uf.yaml"
    path.write_text(yaml.safe_dump(config))
    argv = ["train", "unifluid", "--config", str(path), "--steps", "1", "--no-progress"]
    assert main(argv) == 0
    assert (tmp_path / "run" / "model" / "config.json").is_file()
    config["data"]["edit_ratio"] = 0.9  # with understanding_ratio 0.4: more than the batch
    path.write_text(yaml.safe_dump(config))
    assert main(argv) == 2 and "edit_ratio" in capsys.readouterr().out


def test_shared_evaluation_runs_on_unifluid_with_editing(trained) -> None:
    from kineflow.eval.benchmark import evaluate_model, summary

    report = evaluate_model(trained, max_prompts_per_category=1, vqa_items=2, caption_items=1,
                            edit_items=3, batch_size=4, progress=False)  # fmt: skip
    numbers = summary(report)
    assert numbers["edit"]["n"] == 3 and 0 <= numbers["edit"]["accuracy"] <= 1
    assert numbers["vqa"]["n"] == 2 and numbers["t2i_test"]["n"] > 0


def test_export_steps_write_the_live_weights_of_those_steps(assets, tmp_path) -> None:
    """``export_steps`` (a VQA-against-steps curve, bench/understanding_curve.py): after step
    ``s`` the run writes ``out/model_step{s}``, a folder ``kineflow.load`` reads; the last
    step's export holds exactly the final model's weights, an earlier one other weights."""
    from safetensors.torch import load_file

    import kineflow

    config = make_config(assets, tmp_path / "run", steps=2)
    config.export_steps = [1, 2]
    train_unifluid(config, progress=False)
    final = load_file(str(tmp_path / "run" / "model" / "model.safetensors"))
    last = load_file(str(tmp_path / "run" / "model_step2" / "model.safetensors"))
    first = load_file(str(tmp_path / "run" / "model_step1" / "model.safetensors"))
    assert last.keys() == final.keys() == first.keys()
    assert all(torch.equal(last[k], final[k]) for k in final)
    key = "backbone.layers.0.mlp.up_proj.weight"
    assert not torch.equal(first[key], final[key])  # one optimizer step apart
    assert (
        kineflow.load(tmp_path / "run" / "model_step1")
        .answer(np.zeros((32, 32, 3), np.uint8), "how many shapes are there?")
        .texts
    )
    for bad, error in (([0], "must be steps in [1, optim.steps=2], got [0]"), ([3], "got [3]"),
                       ([True], "export_steps[0] must be an integer, got True")):  # fmt: skip
        with pytest.raises(ValueError, match=re.escape(error)):
            UnifluidTrainConfig.from_dict({**config.to_dict(), "export_steps": bad})


def test_evaluation_leaves_out_tasks_asked_for_no_items(trained) -> None:
    from kineflow.eval.benchmark import evaluate_model, summary

    report = evaluate_model(trained, images_per_prompt=0, vqa_items=2, caption_items=0,
                            batch_size=4, progress=False)  # fmt: skip
    assert set(report) == {"vqa"} and summary(report)["vqa"]["n"] == 2
