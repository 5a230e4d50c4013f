"""kineflow.load: Janus / FUDOKI release folders (tiny, exact layout) and kineflow folders."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from janus_fixture import EXTRA_MODEL_VOCAB, write_janus_checkpoint
from safetensors.torch import load_file, save_file

import kineflow
from kineflow.models.fudoki import FudokiModel
from kineflow.pipelines import FudokiPipeline, checkpoints

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def janus(tmp_path_factory) -> tuple[Path, FudokiModel]:
    folder, model, _ = write_janus_checkpoint(tmp_path_factory.mktemp("janus") / "FUDOKI")
    return folder, model


def copy_folder(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def outputs(model: FudokiModel) -> tuple[torch.Tensor, torch.Tensor]:
    """Text and image logits plus understanding features on a fixed input: a swapped, missing
    or mis-loaded tensor anywhere changes one of them."""
    g = torch.Generator().manual_seed(0)
    V = model.config.language.vocab_size
    K = model.config.gen_vision.codebook_size
    P = model.config.vision.num_patches
    ids = torch.randint(0, V, (1, 3 + P + 16), generator=g)
    und = torch.zeros_like(ids, dtype=torch.bool)
    und[0, 2 : 2 + P] = True
    img = torch.zeros_like(und)
    img[0, 3 + P :] = True
    ids[img] = torch.randint(0, K, (16,), generator=g)
    pixels = torch.rand(1, 3, 16, 16, generator=g) * 2 - 1
    with torch.no_grad():
        h = model(ids, image_mask=img, understanding_mask=und, pixel_values=pixels)
        pictures = model.gen_vision_model.decode(ids[img].reshape(1, 4, 4))
    return torch.cat([model.text_logits(h).flatten(), model.image_logits(h).flatten()]), pictures


@pytest.mark.parametrize("weights", ["safetensors", "sharded", "bin"])
def test_janus_release_loads_every_tensor(tmp_path: Path, weights: str) -> None:
    folder, model, tokenizer = write_janus_checkpoint(tmp_path / "ckpt", weights=weights)
    pipe = kineflow.load(folder)
    assert pipe.dtype == torch.float32 and pipe.device.type == "cpu"
    loaded = pipe.model.state_dict()
    assert loaded.keys() == model.state_dict().keys()
    for key, value in model.state_dict().items():
        assert torch.equal(loaded[key], value), key
    for got, want in zip(outputs(pipe.model), outputs(model), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    # The tokenizer is Janus's: specials after the BPE vocabulary, not at 0..5.
    assert pipe.tokenizer.bos_id == tokenizer.bos_id > 5
    assert pipe.tokenizer.vocab_size + EXTRA_MODEL_VOCAB == model.config.language.vocab_size


def test_metric_tables_provenance(janus: tuple[Path, FudokiModel], tmp_path: Path) -> None:
    folder, model = janus
    pipe = FudokiPipeline.from_pretrained(folder)
    assert "equals language_model.model.embed_tokens.weight" in pipe.provenance["text"]
    assert "equals gen_vision_model.quantize.embedding.weight" in pipe.provenance["image"]
    torch.testing.assert_close(pipe.text_embeddings, model.language_model.model.embed_tokens.weight)

    # Without the .pt files the tables are derived from the weights, and say so.
    bare = copy_folder(folder, tmp_path / "bare")
    (bare / "text_embedding.pt").unlink()
    (bare / "image_embedding.pt").unlink()
    pipe = kineflow.load(bare)
    assert pipe.provenance["text"].startswith("derived: language_model.model.embed_tokens")
    assert pipe.provenance["image"].startswith("derived: gen_vision_model.quantize.embedding")
    torch.testing.assert_close(
        pipe.image_embeddings, model.gen_vision_model.quantize.embedding.weight
    )

    # A table that is none of the model's tensors is used, and reported as such.
    other = copy_folder(folder, tmp_path / "other")
    table = torch.randn(model.config.gen_vision.codebook_size, 4)
    torch.save(torch.nn.Embedding.from_pretrained(table), other / "image_embedding.pt")
    pipe = kineflow.load(other)
    assert "equals none of" in pipe.provenance["image"]
    torch.testing.assert_close(pipe.image_embeddings, table)


def test_wrong_size_metric_table_is_named(janus, tmp_path: Path) -> None:
    folder, _ = janus
    bad = copy_folder(folder, tmp_path / "bad")
    torch.save(torch.nn.Embedding(7, 4), bad / "image_embedding.pt")
    with pytest.raises(ValueError, match=r"image metric table has shape \(7, 4\).*image_embedding"):
        kineflow.load(bad)


def test_pickled_code_in_metric_file_is_refused(janus, tmp_path: Path, capsys) -> None:
    folder, _ = janus
    bad = copy_folder(folder, tmp_path / "evil")
    torch.save(torch.nn.Linear(2, 2), bad / "text_embedding.pt")
    with pytest.raises(ValueError, match="will not execute"):
        kineflow.load(bad)


@pytest.mark.parametrize("problem", ["missing", "extra", "shape"])
def test_weight_problems_are_named(janus, tmp_path: Path, problem: str) -> None:
    folder, _ = janus
    bad = copy_folder(folder, tmp_path / problem)
    sd = load_file(str(bad / "model.safetensors"))
    key = "gen_aligner.layers.2.weight"
    if problem == "missing":
        del sd[key]
    elif problem == "extra":
        sd["language_model.model.layers.9.mlp.up_proj.weight"] = torch.zeros(1)
        key = "language_model.model.layers.9.mlp.up_proj.weight"
    else:
        sd[key] = torch.zeros(3, 3)
    save_file(sd, str(bad / "model.safetensors"))
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        kineflow.load(bad)


def test_tokenizer_larger_than_model_vocab(janus, tmp_path: Path) -> None:
    folder, _ = janus
    bad = copy_folder(folder, tmp_path / "vocab")
    config = json.loads((bad / "config.json").read_text())
    # Shrink the model's text vocabulary below the tokenizer's (weights cut to match).
    V = config["language_config"]["vocab_size"] - EXTRA_MODEL_VOCAB - 3
    config["language_config"]["vocab_size"] = V
    (bad / "config.json").write_text(json.dumps(config))
    sd = load_file(str(bad / "model.safetensors"))
    for key in ("language_model.model.embed_tokens.weight", "language_model.lm_head.weight"):
        sd[key] = sd[key][:V].contiguous()
    save_file(sd, str(bad / "model.safetensors"))
    (bad / "text_embedding.pt").unlink()
    with pytest.raises(ValueError, match=r"tokenizer has \d+ tokens but the model's text vocab"):
        kineflow.load(bad)


@pytest.mark.parametrize(
    ("file", "field", "value", "message"),
    [
        ("processor_config.json", "num_image_tokens", 576, "num_image_tokens 576 differs"),
        ("processor_config.json", "sft_format", "llama-2", "sft_format 'llama-2'"),
        ("preprocessor_config.json", "image_size", 384, "image_size 384 differs"),
    ],
)
def test_processor_settings_must_fit(janus, tmp_path, file, field, value, message) -> None:
    folder, _ = janus
    bad = copy_folder(folder, tmp_path / "proc")
    data = json.loads((bad / file).read_text())
    data[field] = value
    (bad / file).write_text(json.dumps(data))
    with pytest.raises(ValueError, match=message):
        kineflow.load(bad)


def test_missing_files_are_named(janus, tmp_path: Path) -> None:
    folder, _ = janus
    no_tok = copy_folder(folder, tmp_path / "notok")
    (no_tok / "tokenizer.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"no tokenizer.json"):
        kineflow.load(no_tok)
    no_weights = copy_folder(folder, tmp_path / "noweights")
    (no_weights / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"model.safetensors"):
        kineflow.load(no_weights)
    with pytest.raises(FileNotFoundError, match=r"no config.json"):
        kineflow.load(tmp_path)  # a folder, but not a checkpoint
    with pytest.raises(NotADirectoryError, match="is a file"):
        kineflow.load(folder / "config.json")
    unknown = copy_folder(folder, tmp_path / "unknown")
    (unknown / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="describes 'llama'"):
        kineflow.load(unknown)
    broken = copy_folder(folder, tmp_path / "broken")
    config = json.loads((broken / "config.json").read_text())
    del config["gen_head_config"]
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"lacks required field.*gen_head_config"):
        kineflow.load(broken)


def test_hub_id_unreachable_names_the_local_path(monkeypatch, tmp_path: Path) -> None:
    def offline(repo_id: str) -> str:
        raise OSError("Cannot reach https://huggingface.co: network is unreachable")

    monkeypatch.setattr(checkpoints, "_snapshot_download", offline)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError) as info:
        kineflow.load("LucasJinWang/FUDOKI")
    message = str(info.value)
    assert str(tmp_path / "LucasJinWang" / "FUDOKI") in message
    assert "network is unreachable" in message and "--local-dir" in message
    # A path that is not a hub id is not sent to the hub at all.
    with pytest.raises(FileNotFoundError, match="no checkpoint folder at"):
        kineflow.load("./nowhere/at/all")


def test_hub_id_is_fetched_when_reachable(monkeypatch, janus) -> None:
    folder, model = janus
    calls = []

    def fetch(repo_id: str) -> str:
        calls.append(repo_id)
        return str(folder)

    monkeypatch.setattr(checkpoints, "_snapshot_download", fetch)
    pipe = kineflow.load("LucasJinWang/FUDOKI")
    assert calls == ["LucasJinWang/FUDOKI"]
    assert torch.equal(pipe.model.gen_embed.weight, model.gen_embed.weight)


def test_own_folder_round_trip(janus, tmp_path: Path) -> None:
    folder, _ = janus
    pipe = kineflow.load(folder)
    pipe.config.text_budget = 40
    pipe.config.system_prompt = ""
    pipe.save_pretrained(tmp_path / "ours")
    saved = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert saved["kineflow_type"] == "fudoki" and saved["pipeline"]["text_budget"] == 40
    again = kineflow.load(tmp_path / "ours")
    assert again.provenance["text"].endswith("metric.safetensors[text]")
    for key, value in pipe.model.state_dict().items():
        assert torch.equal(again.model.state_dict()[key], value), key
    a = pipe.text_to_image(["a red circle", "two squares"], steps=3, seed=5)
    b = again.text_to_image(["a red circle", "two squares"], steps=3, seed=5)
    assert torch.equal(a.codes, b.codes)

    # bfloat16 on request; a bf16 save loads back as bf16.
    half = kineflow.load(tmp_path / "ours", dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16
    half.save_pretrained(tmp_path / "half")
    assert kineflow.load(tmp_path / "half").dtype == torch.bfloat16

    # A damaged metric file is named.
    (tmp_path / "ours" / "metric.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match=r"metric.safetensors is not a readable"):
        kineflow.load(tmp_path / "ours")
