"""AR baseline decoding: KV cache vs re-running the prefix, and AR vs FUDOKI sampling cost.

For a randomly initialised generation model (speed does not depend on the weights' values)
and a batch of ShapesWorld prompts with CFG (w = 3, doubled batch), one text-to-image call:

* ``ar_cache``: :func:`decode_autoregressive` with the KV cache (one forward of the prompt,
  then one single-token forward per image token);
* ``ar_no_cache``: the same decoder re-running the whole sequence for every token (what a
  cache-less implementation costs; the samples are identical, tested);
* ``fudoki_{S}``: the flow sampler with S Euler steps over the same network (full attention).

Configurations: hidden 128 / 4 layers (the ShapesWorld models) with 8 x 8 = 64 image tokens,
and hidden 256 / 6 layers with 16 x 16 = 256 image tokens (the cache matters more as L grows).
Each number is the median of ``--repeats`` calls after a warm-up; one JSON object on stdout.

    python bench/ar_decoding.py [--threads 2] [--repeats 3] [--out bench/results/ar_decoding.json]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from kineflow.data.shapes.prompts import prompt_set
from kineflow.inputs.layout import text_to_image_layout
from kineflow.models.fudoki import FudokiConfig, FudokiModel
from kineflow.models.llama import LlamaConfig
from kineflow.pipelines import FudokiPipeline, FudokiPipelineConfig
from kineflow.pipelines.autoregressive import decode_autoregressive
from kineflow.tokenizers.autoencoder import AutoencoderConfig
from kineflow.tokenizers.text import train_text_tokenizer
from kineflow.tokenizers.vq import VQConfig

# bench/ holds scripts, not a package: make the shared helpers importable however we are run.
sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import median_time, timing_parser, write_result

SETTINGS = (
    {"hidden": 128, "layers": 4, "image_size": 32, "batch": 16},
    {"hidden": 256, "layers": 6, "image_size": 64, "batch": 8},
)


def build(tokenizer, hidden: int, layers: int, image_size: int) -> FudokiModel:
    torch.manual_seed(0)
    config = FudokiConfig(
        language=LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=hidden,
                             intermediate_size=int(hidden * 2.7), num_hidden_layers=layers,
                             num_attention_heads=4, max_position_embeddings=1024),
        gen_vision=VQConfig(
            autoencoder=AutoencoderConfig(channels=32, channel_mult=(1, 2, 2), num_res_blocks=1,
                                          z_channels=32),
            codebook_size=512, codebook_dim=8, image_size=image_size),
        gen_aligner_hidden=hidden, gen_head_hidden=hidden,
    )  # fmt: skip
    return FudokiModel(config).eval()


def main() -> None:
    args = timing_parser(__doc__, "ar_decoding", repeats=3).parse_args()
    torch.set_num_threads(args.threads)
    from kineflow.data.shapes.dataset import corpus

    tokenizer = train_text_tokenizer(corpus(n=300), vocab_size=512)
    prompts = [p.text for p in prompt_set("test")]
    rows = []
    for s in SETTINGS:
        model = build(tokenizer, s["hidden"], s["layers"], s["image_size"])
        batch = prompts[: s["batch"]]
        layout = text_to_image_layout(tokenizer, batch, model.config.image_token_count, 64)
        table_t = model.language_model.model.embed_tokens.weight
        table_i = model.gen_vision_model.quantize.codebook()[:512]

        def ar(cache: bool, layout=layout, model=model) -> None:
            with torch.no_grad():
                decode_autoregressive(model, layout, "image", pad_id=tokenizer.pad_id,
                                      cfg_scale=3.0, generator=torch.Generator().manual_seed(0),
                                      use_cache=cache)  # fmt: skip

        row = {**s, "image_tokens": model.config.image_token_count,
               "ar_cache_s": median_time(lambda: ar(True), args.repeats)[0],
               "ar_no_cache_s": median_time(lambda: ar(False), args.repeats)[0]}  # fmt: skip
        row["cache_speedup"] = row["ar_no_cache_s"] / row["ar_cache_s"]
        pipe = FudokiPipeline(model, tokenizer, table_t, table_i,
                              FudokiPipelineConfig(text_budget=64, system_prompt=""))  # fmt: skip
        for steps in (16, 32):
            row[f"fudoki_{steps}_s"] = median_time(
                lambda st=steps, p=pipe, b=batch: p.text_to_image(
                    b, steps=st, cfg_scale=3.0, seed=0
                ),
                args.repeats,
            )[0]
        rows.append(row)
        print(json.dumps(row), file=sys.stderr)
    write_result(args, rows)


if __name__ == "__main__":
    main()
