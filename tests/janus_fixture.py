"""A tiny random FUDOKI checkpoint in the exact Janus release layout, written by tests.

Folder contents, as in ``LucasJinWang/FUDOKI`` (sizes aside): ``config.json`` (``model_type:
multi_modality`` with its six sub-configs), the weights (``model.safetensors``, sharded
safetensors + index, or ``pytorch_model.bin``) with Janus's key names and unused buffers,
``tokenizer.json`` with Janus's special tokens appended after the BPE vocabulary (so their ids
are not 0..5), ``processor_config.json``, ``preprocessor_config.json`` and the metric tables
``text_embedding.pt`` / ``image_embedding.pt`` as pickled ``nn.Embedding`` modules.

The only field a real release does not have is ``params.kineflow_config`` in the vision and
gen-vision configs: Janus fixes those two architectures by name (SigLIP-L, VQ-16), far too big
for a unit test.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

from kineflow.interop.janus import janus_config_from_fudoki
from kineflow.models.fudoki import FudokiConfig, FudokiModel
from kineflow.models.llama import LlamaConfig
from kineflow.models.siglip import SiglipConfig
from kineflow.pipelines import FudokiPipeline, FudokiPipelineConfig
from kineflow.tokenizers.autoencoder import AutoencoderConfig
from kineflow.tokenizers.text import BOI, BOS, EOI, EOS, IMAGE, PAD, TextTokenizer
from kineflow.tokenizers.vq import VQConfig

CORPUS = [
    "a red circle above a blue square",
    "two green triangles left of a yellow circle",
    "how many shapes are there? three",
    "what colour is the large square? purple",
    "is there a blue circle? yes no",
] * 8
EXTRA_MODEL_VOCAB = 10  # Janus's model vocabulary (102400) is larger than its tokenizer's
IMAGE_SIDE = 16  # understanding picture side; SigLIP patch 8 -> 4 placeholder tokens
GEN_SIDE = 8  # generation picture side; VQ downsample 2 -> 4 x 4 = 16 image tokens


def janus_tokenizer() -> TextTokenizer:
    """Byte-level BPE with the six Janus specials added after it, in Janus's order
    (BOS, EOS first as special tokens, then pad and the image tokens)."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(CORPUS, trainer)
    backend.add_special_tokens([AddedToken(BOS, special=True), AddedToken(EOS, special=True)])
    backend.add_tokens([PAD, BOI, IMAGE, EOI])
    return TextTokenizer(backend)


def tiny_config(vocab_size: int) -> FudokiConfig:
    return FudokiConfig(
        language=LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        ),
        vision=SiglipConfig(
            image_size=IMAGE_SIDE,
            patch_size=8,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            select_layer=-1,
        ),
        gen_vision=VQConfig(
            autoencoder=AutoencoderConfig(
                channels=16, channel_mult=(1, 2), num_res_blocks=1, z_channels=8, norm_groups=8
            ),
            codebook_size=64,
            codebook_dim=4,
            image_size=GEN_SIDE,
        ),
        aligner_hidden=32,
        gen_aligner_hidden=32,
        gen_head_hidden=24,
    )


def random_model(config: FudokiConfig, seed: int = 0) -> FudokiModel:
    """Random weights with every tensor perturbed (norm scales included), so a swapped or
    dropped tensor changes the outputs."""
    torch.manual_seed(seed)
    model = FudokiModel(config)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model.eval()


def tiny_pipeline(path: str = "metric", dtype: torch.dtype = torch.float32) -> FudokiPipeline:
    """A random tiny pipeline (text budget 48, 4 steps, no system prompt) on ``path``."""
    tok = janus_tokenizer()
    config = tiny_config(tok.vocab_size + 10)
    config.image_mask_token = path == "masked"
    model = random_model(config).to(dtype)
    return FudokiPipeline(
        model,
        tok,
        model.language_model.model.embed_tokens.weight,
        model.gen_vision_model.quantize.embedding.weight,
        FudokiPipelineConfig(text_budget=48, steps=4, system_prompt="", path=path),
    )


def janus_state_dict(model: FudokiModel) -> dict[str, torch.Tensor]:
    """The model's tensors under Janus's names, plus Janus's unused VQ buffer."""
    sd = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    sd["gen_vision_model.quantize.codebook_used"] = torch.zeros(1000)
    return sd


def write_janus_checkpoint(
    folder: Path,
    weights: str = "safetensors",
    metric_files: bool = True,
    seed: int = 0,
) -> tuple[Path, FudokiModel, TextTokenizer]:
    """Write the checkpoint; ``weights`` is "safetensors", "sharded" or "bin".

    Returns the folder, the model the weights came from and the tokenizer.
    """
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = janus_tokenizer()
    config = tiny_config(tokenizer.vocab_size + EXTRA_MODEL_VOCAB)
    model = random_model(config, seed)
    janus_config = janus_config_from_fudoki(config)
    janus_config["torch_dtype"] = "float32"
    janus_config["transformers_version"] = "4.38.2"
    (folder / "config.json").write_text(json.dumps(janus_config, indent=2))
    sd = janus_state_dict(model)
    if weights == "safetensors":
        save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})
    elif weights == "sharded":
        keys = sorted(sd)
        halves = {
            "model-00001-of-00002.safetensors": keys[: len(keys) // 2],
            "model-00002-of-00002.safetensors": keys[len(keys) // 2 :],
        }
        weight_map = {}
        for file, part in halves.items():
            save_file({k: sd[k] for k in part}, str(folder / file), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(part, file))
        index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    elif weights == "bin":
        torch.save(sd, folder / "pytorch_model.bin")
    else:
        raise ValueError(weights)
    tokenizer.backend.save(str(folder / "tokenizer.json"))
    processor = {
        "add_special_token": False,
        "ignore_id": -100,
        "image_tag": IMAGE,
        "mask_prompt": True,
        "num_image_tokens": config.vision.num_patches,
        "processor_class": "VLChatProcessor",
        "sft_format": "deepseek",
    }
    (folder / "processor_config.json").write_text(json.dumps(processor))
    preprocessor = {
        "background_color": [127, 127, 127],
        "do_normalize": True,
        "image_mean": [0.5, 0.5, 0.5],
        "image_processor_type": "VLMImageProcessor",
        "image_size": IMAGE_SIDE,
        "image_std": [0.5, 0.5, 0.5],
        "min_size": 14,
        "processor_class": "VLChatProcessor",
        "rescale_factor": 0.00392156862745098,
    }
    (folder / "preprocessor_config.json").write_text(json.dumps(preprocessor))
    if metric_files:
        # As the official release: whole nn.Embedding modules, pickled.
        for file, table in (
            ("text_embedding.pt", model.language_model.model.embed_tokens.weight),
            ("image_embedding.pt", model.gen_vision_model.quantize.embedding.weight),
        ):
            torch.save(torch.nn.Embedding.from_pretrained(table.detach().clone()), folder / file)
    return folder, model, tokenizer
