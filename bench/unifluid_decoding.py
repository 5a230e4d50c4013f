"""UniFluid image generation: KV cache vs re-running the sequence for every token.

For a randomly initialised UniFluid (the ShapesWorld model's shapes: Gemma-2-style backbone,
hidden 128, 4 layers; diffusion head width 128, depth 2, 100 sampling steps as shipped) and a
batch of ShapesWorld prompts with CFG, one text-to-image call:

* ``cache``: :meth:`UnifluidModel.generate_tokens`: one prompt pass, then one single-token
  backbone step per image token;
* ``no_cache``: the same tokens produced by re-running the whole teacher-forced sequence
  (:meth:`UnifluidModel.generation_hidden`) for every token; it draws the same diffusion noise,
  so both give the same tokens (checked, max difference reported).

At 32 px (L = 16 tokens) and 64 px (L = 64). Medians of ``--repeats`` calls after a warm-up
(on CUDA the device is synchronised at the end of each call); ``image_tokens_per_s`` is
``batch · L / cache_s``, the rate at which the cached decoder delivers image tokens (each one a
backbone step plus the diffusion head's 100-step reverse chain, CFG included). ``--device`` /
``--dtype`` run it elsewhere; ``--no-baseline`` skips the slow re-running baseline. One JSON
object on stdout and in ``--out``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from kineflow.data.shapes.prompts import prompt_set
from kineflow.interop.gemma import llama_config_from_gemma2
from kineflow.models.unifluid import UnifluidConfig, UnifluidModel, generation_order
from kineflow.tokenizers.kl_vae import KLConfig
from kineflow.tokenizers.text import train_text_tokenizer

# bench/ holds scripts, not a package: make the shared helpers importable however we are run.
sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import median_time, timing_parser, write_result


def build(vocab: int, image_size: int) -> UnifluidModel:
    language = llama_config_from_gemma2({
        "vocab_size": vocab, "hidden_size": 128, "intermediate_size": 344,
        "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": 32, "query_pre_attn_scalar": 32, "sliding_window": 4096,
        "max_position_embeddings": 512,
    })  # fmt: skip
    vae = KLConfig(channels=32, channel_mult=(1, 2, 2), num_res_blocks=1, z_channels=4,
                   image_size=image_size)  # fmt: skip
    head = {"width": 128, "depth": 2, "sample_steps": 100}
    torch.manual_seed(0)
    return UnifluidModel(UnifluidConfig(language, vae, None, head)).eval()


@torch.no_grad()
def no_cache(model, ids, mask, uncond, w, order, generator) -> torch.Tensor:
    B, L, C = ids.shape[0], model.config.num_image_tokens, model.config.vae.token_dim
    tokens = torch.zeros(B, L, C, device=ids.device, dtype=next(model.parameters()).dtype)
    for j in range(L):
        z = model.generation_hidden(ids, mask, tokens, order)[:, j]
        zu = model.generation_hidden(uncond, mask, tokens, order)[:, j]
        wj = 1.0 + (w - 1.0) * (j + 1) / L
        x = model.diffusion_head.sample(z, z_uncond=zu, cfg_scale=wj, generator=generator)
        tokens[torch.arange(B, device=ids.device), order[:, j]] = x
    return tokens


def main() -> None:
    parser = timing_parser(__doc__, "unifluid_decoding", repeats=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--no-baseline", action="store_true", help="time the KV-cache path only")
    args = parser.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)

    def synced(fn):
        def call():
            out = fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            return out

        return call

    torch.set_num_threads(args.threads)
    from kineflow.data.shapes.dataset import corpus

    tok = train_text_tokenizer(corpus(n=300), vocab_size=512)
    prompts = [p.text for p in prompt_set("test")[: args.batch]]
    rows = []
    for size in (32, 64):
        model = build(tok.vocab_size, size).to(device, dtype)
        L = model.config.num_image_tokens
        chat = [tok.encode(f"User: {p}\n\nAssistant:", bos=True) for p in prompts]
        encoded = [[*r, tok.boi_id] for r in chat]
        N = max(map(len, encoded))
        ids = torch.full((len(encoded), N), tok.pad_id)
        mask = torch.zeros(len(encoded), N, dtype=torch.bool)
        for b, r in enumerate(encoded):
            ids[b, N - len(r) :], mask[b, N - len(r) :] = torch.tensor(r), True
        uncond = torch.where(mask, tok.pad_id, ids)
        uncond[:, -1] = tok.boi_id
        order = generation_order(len(encoded), L, "random", torch.Generator().manual_seed(0))
        ids, mask, uncond, order = (x.to(device) for x in (ids, mask, uncond, order))

        def cached(model=model, ids=ids, mask=mask, uncond=uncond, order=order):
            return model.generate_tokens(ids, mask, uncond=uncond, cfg_scale=3.0, order=order,
                                         generator=torch.Generator().manual_seed(1))  # fmt: skip

        def naive(model=model, ids=ids, mask=mask, uncond=uncond, order=order):
            return no_cache(model, ids, mask, uncond, 3.0, order, torch.Generator().manual_seed(1))

        t_cache, a = median_time(synced(cached), args.repeats)
        row = {"image_size": size, "image_tokens": L, "batch": len(encoded), "cache_s": t_cache,
               "image_tokens_per_s": len(encoded) * L / t_cache}  # fmt: skip
        if not args.no_baseline:
            t_naive, b = median_time(synced(naive), args.repeats)
            row |= {"no_cache_s": t_naive, "speedup": t_naive / t_cache,
                    "max_abs_difference": float((a - b).abs().max())}  # fmt: skip
        rows.append(row)
        print(json.dumps(row))
    write_result(args, rows)


if __name__ == "__main__":
    main()
