"""FUDOKI training: batches, the shifted region loss, objectives, resume, init, errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import kineflow
from kineflow.data.shapes.dataset import corpus
from kineflow.tokenizers.autoencoder import AutoencoderConfig
from kineflow.tokenizers.text import train_text_tokenizer
from kineflow.tokenizers.vq import VQConfig, VQModel
from kineflow.train.fudoki import FudokiTask, FudokiTrainConfig, build_model, train_fudoki

MODEL = {
    "language": {"hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
                 "num_attention_heads": 4, "max_position_embeddings": 256},
    "vision": {"image_size": 32, "patch_size": 16, "hidden_size": 16, "intermediate_size": 32,
               "num_hidden_layers": 1, "num_attention_heads": 2, "select_layer": -1},
    "aligner_hidden": 32,
    "gen_aligner_hidden": 32,
    "gen_head_hidden": 24,
}  # fmt: skip


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("assets")
    torch.manual_seed(0)
    vq = VQModel(
        VQConfig(
            autoencoder=AutoencoderConfig(
                channels=8, channel_mult=(1, 2, 2, 2), num_res_blocks=1, z_channels=8,
                norm_groups=4,
            ),
            codebook_size=32,
            codebook_dim=4,
            image_size=32,
        )
    )  # fmt: skip
    vq.save_pretrained(root / "vq")
    train_text_tokenizer(corpus(n=200), vocab_size=400).save(root / "text")
    return {"vq": str(root / "vq"), "text": str(root / "text")}


def make_config(
    assets, out: Path, kind: str = "metric", steps: int = 4, **data
) -> FudokiTrainConfig:
    return FudokiTrainConfig.from_dict(
        {
            "model": MODEL,
            "vq": assets["vq"],
            "text_tokenizer": assets["text"],
            "out": str(out),
            "objective": {"kind": kind},
            "data": {"vqa_answer_tokens": 2, "caption_tokens": 40, "text_budget": 64, **data},
            "optim": {"steps": steps, "batch_size": 4, "lr": 1e-3, "warmup": 1},
            "log_every": 1,
            "ckpt_every": 2,
        }
    )


def make_task(assets, tmp_path, kind="metric", **data) -> FudokiTask:
    from kineflow.tokenizers.text import TextTokenizer

    config = make_config(assets, tmp_path, kind, **data)
    tok = TextTokenizer.load(assets["text"])
    model = build_model(config, tok)
    K = model.config.gen_vision.codebook_size
    return FudokiTask(
        model,
        tok,
        config,
        model.language_model.model.embed_tokens.weight.detach().clone(),
        model.gen_vision_model.quantize.codebook()[:K],
    )


def prepared(task: FudokiTask, indices: list[int]) -> dict:
    """``task.batch(indices)`` with what ``losses`` adds on the device: the clean targets
    ``x1`` (VQ codes of the pictures) and the corrupted input ``xt``."""
    batch = task.batch(indices)
    x1 = task.targets(batch)
    return {**batch, "x1": x1, "xt": task.corrupt(batch, x1), "pictures": None}


def test_only_rank_0_writes_the_final_model(assets, tmp_path, monkeypatch) -> None:
    """After the loop has left torchrun's process group, ranks are told apart by ``RANK``:
    a rank other than 0 trains and returns the summary but writes no model folder (every
    rank holds the same weights; writing them all into one folder raced)."""
    monkeypatch.setenv("RANK", "1")
    summary = train_fudoki(make_config(assets, tmp_path / "r1", steps=2), progress=False)
    assert summary["steps"] == 2
    assert not (tmp_path / "r1" / "model").exists()
    assert not (tmp_path / "r1" / "summary.json").exists()
    monkeypatch.setenv("RANK", "0")
    train_fudoki(make_config(assets, tmp_path / "r0", steps=2), progress=False)
    assert (tmp_path / "r0" / "model" / "model.safetensors").is_file()


def test_loss_is_the_shifted_region_cross_entropy(assets, tmp_path) -> None:
    task = make_task(assets, tmp_path)
    batch = prepared(task, list(range(8)))
    lay = batch["layout"]
    assert batch["is_gen"].any() and (~batch["is_gen"]).any()  # a mixed batch
    # Only the region is corrupted; prompts, placeholders and padding are untouched.
    assert torch.equal(batch["xt"][~lay.region], batch["x1"][~lay.region])
    model = task.model
    with torch.no_grad():
        # Sharpen the heads: at initialisation every logit row is nearly uniform, so the loss
        # hardly depends on which hidden state a position is read from.
        for head in (model.gen_head, model.language_model.lm_head):
            for p in head.parameters():
                p.mul_(5.0)
        got = task.losses(batch, model)
        hidden = model(batch["xt"], image_mask=lay.image_mask,
                       understanding_mask=lay.understanding_mask, pixel_values=batch["pixels"],
                       attention_mask=lay.attention_mask)  # fmt: skip
        shifted, unshifted = [], []
        for b in range(8):
            # The heads on their own, unshifted: logits[i] is read from hidden[i]. Position c
            # of the region is predicted from the hidden state one to its left, c - 1.
            head = model.gen_head if batch["is_gen"][b] else model.language_model.lm_head
            logits = head(hidden[b])
            cols = lay.region[b].nonzero()[:, 0]
            assert cols.min() >= 1
            targets = batch["x1"][b, cols]
            shifted.append(F.cross_entropy(logits[cols - 1], targets))
            unshifted.append(F.cross_entropy(logits[cols], targets))
    want = torch.stack(shifted).mean()
    torch.testing.assert_close(got["loss"], want, rtol=1e-5, atol=1e-6)
    assert (torch.stack(unshifted).mean() - want).abs() > 0.1  # the shift is not a no-op
    torch.testing.assert_close(got["loss_gen"] + got["loss_und"], got["loss"])


def test_samples_do_not_depend_on_their_batch(assets, tmp_path) -> None:
    task = make_task(assets, tmp_path)
    together = prepared(task, [3, 4, 5])
    for k, index in enumerate([3, 4, 5]):
        alone = prepared(task, [index])
        region = together["layout"].region[k]
        assert torch.equal(together["xt"][k][region], alone["xt"][0][alone["layout"].region[0]])
        assert torch.equal(together["x1"][k][region], alone["x1"][0][alone["layout"].region[0]])


def test_objectives_corrupt_as_documented(assets, tmp_path) -> None:
    ar = prepared(make_task(assets, tmp_path, "ar"), list(range(6)))
    assert torch.equal(ar["xt"], ar["x1"])  # teacher forcing
    task = make_task(assets, tmp_path, "masked")
    masked = prepared(task, list(range(6)))
    K = task.model.config.gen_vision.codebook_size
    pad = task.tokenizer.pad_id
    for b in range(6):
        region = masked["layout"].region[b]
        mask_id = K if masked["is_gen"][b] else pad
        xt, x1 = masked["xt"][b][region], masked["x1"][b][region]
        assert ((xt == x1) | (xt == mask_id)).all()
    assert task.model.gen_embed.weight.shape[0] == K + 1  # the image mask is an input id
    # CFG dropout: with probability 1 every generation prompt is blanked with pad.
    dropped = prepared(make_task(assets, tmp_path, cfg_dropout=1.0), list(range(6)))
    lay = dropped["layout"]
    for b in range(6):
        if dropped["is_gen"][b]:
            assert (dropped["x1"][b][lay.prompt_span[b]] == pad).all()


def test_run_resumes_exactly_and_saves_a_loadable_model(assets, tmp_path) -> None:
    straight = tmp_path / "straight"
    train_fudoki(make_config(assets, straight, steps=4), progress=False)
    resumed = tmp_path / "resumed"
    real = FudokiTask.batch

    def dies_at_step_4(self, indices):
        if indices[0] == 3 * 4:
            raise KeyboardInterrupt
        return real(self, indices)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(FudokiTask, "batch", dies_at_step_4)
        with pytest.raises(KeyboardInterrupt):
            train_fudoki(make_config(assets, resumed, steps=4), progress=False)
    train_fudoki(make_config(assets, resumed, steps=4), progress=False)

    def losses(out: Path) -> list[float]:
        return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").open()]

    assert losses(resumed) == losses(straight) and len(losses(straight)) == 4
    pipe = kineflow.load(straight / "model")
    out = pipe.text_to_image(["a red circle"], steps=2, seed=0)
    assert out.codes.shape == (1, 4, 4)
    assert pipe.answer(out.images[0], "how many shapes are there?", steps=2).texts


def test_ar_initialises_the_flow_model(assets, tmp_path) -> None:
    ar_config = make_config(assets, tmp_path / "ar", "ar", steps=2)
    ar_config.export_steps = [1]  # the AR half of an equal-compute AR -> DFM run
    train_fudoki(ar_config, progress=False)
    half = kineflow.load(tmp_path / "ar" / "model_step1").model.state_dict()
    config = make_config(assets, tmp_path / "dfm", steps=1)
    config.init_from = str(tmp_path / "ar" / "model")
    config.optim.lr = 1e-12  # one step that barely moves: the weights are the AR ones
    train_fudoki(config, progress=False)
    ar_pipe = kineflow.load(tmp_path / "ar" / "model")
    assert ar_pipe.config.path == "ar"  # an AR run samples left to right with a KV cache
    assert ar_pipe.text_to_image(["a red circle"], seed=0).timings["nfe"] == 16
    ar = ar_pipe.model.state_dict()
    dfm = kineflow.load(tmp_path / "dfm" / "model").model.state_dict()
    key = "language_model.model.layers.0.mlp.up_proj.weight"
    torch.testing.assert_close(dfm[key], ar[key], atol=1e-6, rtol=0)
    assert not torch.equal(half[key], ar[key])  # step 1 of 2, exported mid-run


def test_init_from_a_model_without_a_position_table_starts_it_at_zero(assets, tmp_path) -> None:
    """``model.understanding_positions`` on a run that starts from a model without the
    table: every shared tensor is copied, the table starts at zero and trains."""
    train_fudoki(make_config(assets, tmp_path / "base", steps=1), progress=False)
    config = make_config(assets, tmp_path / "pos", steps=2, understanding_ratio=1.0)
    config.model = {**MODEL, "understanding_positions": True}
    config.init_from = str(tmp_path / "base" / "model")
    config.optim.lr = 1e-12  # steps that barely move: the weights stay the copied ones
    task = make_task(assets, tmp_path / "probe")  # the shapes of a model without the table
    assert "understanding_pos_embed" not in task.model.state_dict()
    train_fudoki(config, progress=False)
    pipe = kineflow.load(tmp_path / "pos" / "model")
    table = pipe.model.understanding_pos_embed
    assert table is not None and table.shape == (4, 32)  # 32 px / 16-px patches, width 32
    assert 0 < table.abs().max() < 1e-9  # two AdamW steps from zero moved it, by ~lr
    base = kineflow.load(tmp_path / "base" / "model").model.state_dict()
    for key in ("vision_model.vision_tower.patch_embed.proj.weight", "aligner.layers.0.weight",
                "language_model.model.layers.0.mlp.up_proj.weight"):  # fmt: skip
        torch.testing.assert_close(pipe.model.state_dict()[key], base[key], atol=1e-6, rtol=0)


def test_a_stage_may_swap_the_vq_under_a_trained_model(assets, tmp_path) -> None:
    """``init_from`` with another ``vq``: the run keeps its own VQ (never the folder's), its code
    embeddings restart from that VQ's codebook, as do the metric tables; everything else is the
    folder's. With the folder's own VQ the learnt code embeddings are copied as usual."""
    from safetensors.torch import load_file

    train_fudoki(make_config(assets, tmp_path / "base", steps=1), progress=False)
    base = load_file(str(tmp_path / "base" / "model" / "model.safetensors"))
    torch.manual_seed(7)  # another VQ of the same shape (another codebook, other weights)
    other = VQModel(VQModel.from_pretrained(assets["vq"]).config)
    other.save_pretrained(tmp_path / "vq2")
    K = other.codebook_size
    for vq, swapped in ((assets["vq"], False), (str(tmp_path / "vq2"), True)):
        out = tmp_path / f"stage_{swapped}"
        config = make_config(assets, out, steps=1)
        config.vq, config.init_from = vq, str(tmp_path / "base" / "model")
        config.optim.lr = 1e-12  # one step that barely moves: the weights are the start's
        train_fudoki(config, progress=False)
        got = load_file(str(out / "model" / "model.safetensors"))
        own_vq = VQModel.from_pretrained(vq)
        for key, value in own_vq.state_dict().items():
            torch.testing.assert_close(got[f"gen_vision_model.{key}"], value, atol=0, rtol=0)
        codebook = own_vq.quantize.codebook()[:K]
        start = codebook if swapped else base["gen_embed.weight"][:K]
        torch.testing.assert_close(got["gen_embed.weight"][:K], start, atol=1e-6, rtol=0)
        torch.testing.assert_close(load_file(str(out / "metric.safetensors"))["image"], codebook)
        key = "language_model.model.layers.0.mlp.up_proj.weight"
        torch.testing.assert_close(got[key], base[key], atol=1e-6, rtol=0)
    assert not torch.equal(base["gen_embed.weight"][:K], codebook)


def test_a_stage_refuses_to_resume_when_its_init_from_weights_changed(assets, tmp_path) -> None:
    """Running a finished (or interrupted) stage again resumes it — unless the ``init_from``
    folder now holds other weights than the ones the run copied at step 0: then the run says
    so instead of going on from the old ones. Unchanged, it reports the run complete."""
    from safetensors.torch import load_file, save_file

    train_fudoki(make_config(assets, tmp_path / "base", steps=1), progress=False)
    config = make_config(assets, tmp_path / "stage", steps=1)
    config.init_from = str(tmp_path / "base" / "model")
    train_fudoki(config, progress=False)
    assert train_fudoki(config, progress=False)["already_complete_at"] == 1
    file = tmp_path / "base" / "model" / "model.safetensors"
    weights = load_file(str(file))
    key = "gen_head.output_mlp_projector.weight"
    weights[key] = weights[key] + 1  # a retrained base
    save_file(weights, str(file))
    with pytest.raises(ValueError, match=r"stage: this run started from init_from .* now holds "
                                         r"other weights .* delete"):  # fmt: skip
        train_fudoki(config, progress=False)
    shutil.rmtree(tmp_path / "stage")  # starting over records the new weights
    train_fudoki(config, progress=False)
    assert train_fudoki(config, progress=False)["already_complete_at"] == 1


def test_config_errors(assets, tmp_path) -> None:
    config = make_config(assets, tmp_path)
    config.model = {**MODEL, "language": {**MODEL["language"], "vocab_size": 99}}
    with pytest.raises(ValueError, match="vocabularies must match"):
        train_fudoki(config, progress=False)
    config = make_config(assets, tmp_path / "short", caption_tokens=3, caption_ratio=1.0,
                         understanding_ratio=1.0)  # fmt: skip
    with pytest.raises(ValueError, match="does not fit in 3 slots"):
        train_fudoki(config, progress=False)
    with pytest.raises(ValueError, match="export_steps must be steps"):
        FudokiTrainConfig.from_dict({**config.to_dict(), "export_steps": [0]})
    with pytest.raises(ValueError, match=r"objective\.kind must be one of"):
        FudokiTrainConfig.from_dict({**make_config(assets, tmp_path).to_dict(),
                                     "objective": {"kind": "diffusion"}})  # fmt: skip
    with pytest.raises(ValueError, match=r"unknown config key\(s\) \['data.ratio'\]"):
        FudokiTrainConfig.from_dict({**make_config(assets, tmp_path).to_dict(),
                                     "data": {"ratio": 1}})  # fmt: skip


def test_text_samples_draw_t_from_their_own_range(assets, tmp_path) -> None:
    task = make_task(assets, tmp_path, vqa_answer_tokens=4)
    task.obj.text_t_max = 0.2
    batch = task.batch(list(range(40)))  # t is drawn per sample in batch(), used in losses()
    seen = {"text": batch["t"][~batch["is_gen"]].tolist(), "image": batch["t"][batch["is_gen"]]}
    assert len(seen["text"]) and len(seen["image"])
    assert max(seen["text"]) <= 0.2 < float(seen["image"].max())
    with pytest.raises(ValueError, match="need 0 <= t_min < text_t_max <= 1"):
        FudokiTrainConfig.from_dict({**make_config(assets, tmp_path).to_dict(),
                                     "objective": {"text_t_max": 1.5}})  # fmt: skip


@pytest.mark.parametrize("train_vision", [False, True])
def test_pretrained_siglip_is_frozen_unless_asked(assets, tmp_path, train_vision) -> None:
    from kineflow.io import save_pretrained_folder
    from kineflow.models.siglip import SiglipConfig, SiglipVisionModel
    from kineflow.tokenizers.text import TextTokenizer
    from kineflow.train.siglip import VISION_KIND

    vision = SiglipConfig.from_dict(MODEL["vision"])
    tower = SiglipVisionModel(vision)
    save_pretrained_folder(tmp_path / "siglip", tower.state_dict(), vision.to_dict(), VISION_KIND)
    config = make_config(assets, tmp_path / "run")
    config.vision = str(tmp_path / "siglip")
    config.train_vision = train_vision
    model = build_model(config, TextTokenizer.load(assets["text"]))
    params = list(model.vision_model.vision_tower.parameters())
    assert all(p.requires_grad == train_vision for p in params)
    for name, value in model.vision_model.vision_tower.state_dict().items():
        torch.testing.assert_close(value, tower.state_dict()[name])  # starts from the folder
