"""SigLIP pre-training: the sigmoid loss, gradients, a short run, exact resume, configs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from kineflow.train import siglip as siglip_mod
from kineflow.train.siglip import (
    SiglipPretrainModel,
    SiglipTrainConfig,
    load_siglip_vision,
    shapes_pairs,
    sigmoid_loss,
    train_siglip,
)

TINY_MODEL = {
    "image_size": 32,
    "patch_size": 8,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "embed_dim": 16,
    "text_width": 32,
    "text_layers": 1,
    "text_heads": 2,
    "text_max_len": 48,
}


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tokenizer():
    from kineflow.data.shapes.dataset import corpus
    from kineflow.tokenizers.text import train_text_tokenizer

    return train_text_tokenizer(corpus(n=30), vocab_size=300)


def _config(out: Path, steps: int = 5, **extra) -> SiglipTrainConfig:
    return SiglipTrainConfig.from_dict(
        {
            "model": TINY_MODEL,
            "out": str(out),
            "optim": {"steps": steps, "batch_size": 8, "lr": 1e-3, "warmup": 2},
            "log_every": 1,
            "ckpt_every": 2,
            "eval_pairs": 16,
            **extra,
        }
    )


def _losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_sigmoid_loss_matches_the_naive_double_sum():
    g = torch.Generator().manual_seed(0)
    B, E = 5, 7
    x = F.normalize(torch.randn(B, E, generator=g, dtype=torch.float64), dim=-1)
    y = F.normalize(torch.randn(B, E, generator=g, dtype=torch.float64), dim=-1)
    log_t, b = torch.tensor(math.log(10.0), dtype=torch.float64), torch.tensor(-3.0)
    total = 0.0
    for i in range(B):
        for j in range(B):
            z = 1.0 if i == j else -1.0
            logit = math.exp(float(log_t)) * float(x[i] @ y[j]) + float(b)
            total += -math.log(1 / (1 + math.exp(-z * logit)))
    assert float(sigmoid_loss(x, y, log_t, b.double())) == pytest.approx(total / B, rel=1e-10)
    # Matched pairs minimise it: aligned embeddings beat the same embeddings shuffled.
    aligned = sigmoid_loss(x, x, log_t, b.double())
    shuffled = sigmoid_loss(x, x[torch.tensor([1, 2, 3, 4, 0])], log_t, b.double())
    assert aligned < shuffled
    with pytest.raises(ValueError, match=r"\[B, E\]"):
        sigmoid_loss(x, y[:3], log_t, b)


def test_gradients_reach_both_towers_and_t_b(tokenizer):
    torch.manual_seed(0)
    config = _config(Path("unused"))
    model = SiglipPretrainModel(config.pretrain_config(), tokenizer)
    assert (
        float(model.log_t.detach().exp()) == pytest.approx(10.0)
        and float(model.b.detach()) == -10.0
    )
    pixels, texts, _ = shapes_pairs(config.data, list(range(6)))
    assert pixels.shape == (6, 3, 32, 32) and pixels.min() >= -1 and pixels.max() <= 1
    ids, mask = model.tokenize(texts)
    assert ids.shape == mask.shape and ids.shape[0] == 6 and (ids[~mask] == tokenizer.pad_id).all()
    out = model(pixels, ids, mask)
    out["loss"].backward()
    for name in ("vision.patch_embed.proj.weight", "vision.blocks.0.attn.qkv.weight",
                 "vision.pos_embed", "text.embed.weight", "image_proj.weight",
                 "text_proj.weight", "log_t", "b"):  # fmt: skip
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name
    assert set(model.state_dict()) >= {"log_t", "b"}
    assert all(not k.startswith("tokenizer") for k in model.state_dict())


def test_run_writes_outputs_and_resumes_exactly(tokenizer, tmp_path):
    straight = tmp_path / "straight"
    report = train_siglip(_config(straight), tokenizer, progress=False)
    assert len(_losses(straight)) == 5
    saved = json.loads((straight / "eval.json").read_text())
    assert saved["pairs"] == 16 and saved["chance"] == pytest.approx(1 / 16)
    assert 0 <= saved["i2t_top1"] <= 1 and saved["i2t_top1"] == pytest.approx(report["i2t_top1"])
    assert (straight / "vision" / "model.safetensors").is_file()

    # The saved tower loads back identical to the trained one.
    vision = load_siglip_vision(straight / "vision")
    config = _config(straight)
    torch.manual_seed(0)
    model = SiglipPretrainModel(config.pretrain_config(), tokenizer)
    from kineflow.train.checkpoint import load_checkpoint

    load_checkpoint(straight / "checkpoint", model)
    assert vision.config == model.vision.config
    for k, v in model.vision.state_dict().items():
        assert torch.equal(vision.state_dict()[k], v), k
    pixels = shapes_pairs(config.data, [0, 1])[0]
    assert torch.equal(vision(pixels), model.vision.eval()(pixels))

    # Interrupted at step 4 (after the step-2 checkpoint), then started again.
    resumed = tmp_path / "resumed"
    real_batch = siglip_mod._SiglipTask.batch

    def dies_at_step_4(self, indices):
        if indices[0] == 3 * 8:  # the first sample of step 4 (batch size 8)
            raise KeyboardInterrupt
        return real_batch(self, indices)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(siglip_mod._SiglipTask, "batch", dies_at_step_4)
        with pytest.raises(KeyboardInterrupt):
            train_siglip(_config(resumed), tokenizer, progress=False)
    assert len(_losses(resumed)) == 3  # steps 1-3 logged, 1-2 checkpointed
    train_siglip(_config(resumed), tokenizer, progress=False)
    assert _losses(resumed) == _losses(straight)


def test_config_errors_name_the_key(tmp_path):
    path = tmp_path / "c.yaml"

    def write(**raw):
        path.write_text(yaml.safe_dump({"model": TINY_MODEL, "out": "x", **raw}))

    write(optim={"stepz": 3})
    with pytest.raises(ValueError, match=r"c\.yaml: unknown config key\(s\) \['optim\.stepz'\]"):
        SiglipTrainConfig.from_yaml(path)
    write(data={"splitt": "train"})
    with pytest.raises(ValueError, match=r"\['data\.splitt'\]"):
        SiglipTrainConfig.from_yaml(path)
    write(data={"split": "dev"})
    with pytest.raises(ValueError, match=r"data\.split must be one of"):
        SiglipTrainConfig.from_yaml(path)
    write(eval_pair=3)
    with pytest.raises(ValueError, match=r"\['eval_pair'\]"):
        SiglipTrainConfig.from_yaml(path)
    path.write_text(yaml.safe_dump({"model": {**TINY_MODEL, "text_widht": 8}, "out": "x"}))
    with pytest.raises(ValueError, match=r"\['model\.text_widht'\]"):
        SiglipTrainConfig.from_yaml(path)
    path.write_text(yaml.safe_dump({"model": {**TINY_MODEL, "patch_size": 5}, "out": "x"}))
    with pytest.raises(ValueError, match="not divisible by patch_size 5"):
        SiglipTrainConfig.from_yaml(path)
    path.write_text(yaml.safe_dump({"model": {**TINY_MODEL, "text_heads": 3}, "out": "x"}))
    with pytest.raises(ValueError, match=r"model\.text_width 32 is not divisible"):
        SiglipTrainConfig.from_yaml(path)
    path.write_text(yaml.safe_dump({"out": "x"}))
    with pytest.raises(ValueError, match=r"needs \['model'\]"):
        SiglipTrainConfig.from_yaml(path)
    write(optim={"steps": 0})
    with pytest.raises(ValueError, match=r"optim\.steps must be an integer >= 1"):
        SiglipTrainConfig.from_yaml(path)
    path.write_text("model: [unclosed")
    with pytest.raises(ValueError, match="not valid YAML"):
        SiglipTrainConfig.from_yaml(path)
    config = _config(tmp_path / "run")
    assert SiglipTrainConfig.from_dict(config.to_dict()) == config


def test_shipped_config_builds(tokenizer):
    path = Path(__file__).parents[2] / "configs" / "siglip_shapes.yaml"
    config = SiglipTrainConfig.from_yaml(path)
    model = SiglipPretrainModel(config.pretrain_config(), tokenizer)
    # 32-px renders resized to 48 px: 16-px patches, one token per cell of the 3 x 3 grid.
    assert config.data.image_size == 32
    v = model.vision.config
    assert (v.image_size, v.patch_size, v.num_patches) == (48, 16, 9)
    assert v.image_size % 3 == 0 and v.image_size // v.patch_size == 3
    assert config.optim.grad_accum == 1


def test_pairs_resized_for_a_larger_tower_as_the_models_resize_them():
    """A 48-px tower (16-px patches: one per grid cell) trains on the 32-px renders resized by
    the same function the FUDOKI / UniFluid trainers and pipelines use."""
    from PIL import Image

    from kineflow.data.shapes.dataset import draw_item
    from kineflow.data.shapes.render import render
    from kineflow.data.shapes.scene import Scene
    from kineflow.inputs.images import preprocess_understanding

    data = siglip_mod.PairData(random_template=False)
    native = shapes_pairs(data, [0, 1, 2])[0]
    resized, _, keys = shapes_pairs(data, [0, 1, 2], tower_size=48)
    assert native.shape == (3, 3, 32, 32) and resized.shape == (3, 3, 48, 48)
    assert torch.equal(shapes_pairs(data, [0, 1, 2], tower_size=32)[0], native)
    world = siglip_mod._world(data)
    for i, picture in enumerate(resized):
        scene = Scene.from_key(draw_item(world, "caption", "train", i).scene_key)
        assert scene.key() == keys[i]
        own = preprocess_understanding([Image.fromarray(render(scene, 32))], 48)[0]
        assert torch.equal(picture, own)
    assert resized.min() >= -1 and resized.max() <= 1
