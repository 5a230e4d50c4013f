"""Autoregressive decoding of a layout's region with a KV cache: the AR baseline (Janus-style).

The network is the same as FUDOKI's, read with a causal mask. Column ``c`` of the region is
drawn from

    p(x_c | x_<c) = softmax(head(h_{c-1}))        (h: final hidden states, causal attention)

left to right, with ``head`` the image head (``gen_head``) or the text head (``lm_head``).
With a KV cache the prompt (every column before the window) is run once and each later column
costs one forward of a single token over the cached keys; ``use_cache=False`` re-runs the whole
prefix at every step instead, the reference the cache is tested and benchmarked against.

Classifier-free guidance doubles the batch with the prompt span blanked to the pad token and
uses the same formula as the flow sampler, ``(1 + w)·logits(x|c) − w·logits(x|∅)``; the token
drawn from the guided logits is fed to both halves. Text decoding with ``stop_id`` (EOS) fills
a row's remaining slots with ``stop_id`` once it has emitted one and stops when every row has.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from kineflow.flow import classifier_free_guidance
from kineflow.flow.sampling import sample_logits
from kineflow.inputs.layout import Layout
from kineflow.models.fudoki import FudokiModel
from kineflow.models.masking import KVCache

__all__ = ["decode_autoregressive"]

HEADS = ("image", "text")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def decode_autoregressive(
    model: FudokiModel,
    layout: Layout,
    head: str,
    *,
    pad_id: int,
    cfg_scale: float = 0.0,
    features: Tensor | None = None,
    stop_id: int | None = None,
    temperature: float = 1.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
    fill_id: int = 0,
    use_cache: bool = True,
    return_trajectory: bool = False,
    progress: bool = False,
) -> dict[str, Any]:
    """Fill ``layout``'s region left to right.

    Args:
        model: the network (its causal reading is the AR model).
        layout: the batch; its window ``(lo, hi)`` holds every row's region. Columns of the
            window outside a row's region keep the layout's token.
        head: ``"image"`` or ``"text"``.
        pad_id: the token that blanks the prompt span for the unconditional input.
        cfg_scale: guidance weight ``w`` (0: none, the batch is not doubled).
        features: understanding features ``[I, P, D]`` for the layout's placeholders.
        stop_id: text only; see the module docstring.
        fill_id: the value of not-yet-drawn columns in trajectory states.
        use_cache: incremental decoding (True) or a full re-run per token (False).

    Returns:
        ``samples`` Long[B, W] (the window), ``nfe`` (forward passes), ``model_s`` (time in
        the network) and, with ``return_trajectory``, ``states`` Long[S, B, W]: the window
        before the first token and after each drawn column.
    """
    if head not in HEADS:
        raise ValueError(f"head must be one of {HEADS}, got {head!r}")
    if not cfg_scale >= 0:
        raise ValueError(f"cfg_scale must be >= 0, got {cfg_scale!r}")
    lo, hi = layout.window
    ids, attention = layout.input_ids, layout.attention_mask
    image_mask, und_mask = layout.image_mask, layout.understanding_mask
    if und_mask is not None and bool(und_mask[:, lo:].any()):
        raise ValueError("understanding placeholders must all lie before the generated window")
    guided = cfg_scale > 0
    if guided:
        ids = torch.cat([ids, ids.masked_fill(layout.prompt_span, pad_id)])
        attention = torch.cat([attention, attention])
        image_mask = None if image_mask is None else torch.cat([image_mask, image_mask])
        if und_mask is not None:
            und_mask = torch.cat([und_mask, und_mask])
            features = torch.cat([features, features])
    read = model.image_logits if head == "image" else model.text_logits
    device = ids.device
    timer = {"model_s": 0.0, "nfe": 0}

    def last_hidden(start: int, end: int, cache: KVCache | None) -> Tensor:
        """Hidden state ``[B', D]`` of column ``end − 1`` after feeding columns [start, end)."""
        _sync(device)
        t0 = time.perf_counter()
        with_images = und_mask is not None and start == 0
        hidden = model(
            ids[:, start:end],
            image_mask=None if image_mask is None else image_mask[:, start:end],
            understanding_mask=und_mask[:, start:end] if with_images else None,
            understanding_features=features if with_images else None,
            attention_mask=attention[:, start:end],
            mask="causal",
            kv_cache=cache,
        )[:, -1]
        _sync(device)
        timer["model_s"] += time.perf_counter() - t0
        timer["nfe"] += 1
        return hidden

    ids = ids.clone()  # drawn tokens are written into it
    B = layout.input_ids.shape[0]
    region = layout.region[:, lo:hi]
    window = layout.input_ids[:, lo:hi].clone()
    shown = window.masked_fill(region, fill_id)
    states = [shown.clone()] if return_trajectory else []
    done = torch.zeros(B, dtype=torch.bool, device=device)
    cache = KVCache() if use_cache else None
    hidden = last_hidden(0, lo, cache)
    W = hi - lo
    for j in tqdm(range(W), disable=not progress, desc=f"AR {head}", leave=False):
        logits = read(hidden[:, None], shift=False)[:, 0].float()  # [B', V]
        if guided:
            logits = classifier_free_guidance(*logits.chunk(2), cfg_scale)
        token = sample_logits(logits, temperature, top_k, generator)
        if stop_id is not None:
            token = token.masked_fill(done, stop_id)
        token = torch.where(region[:, j], token, window[:, j])
        window[:, j] = token
        if stop_id is not None:
            done |= region[:, j] & (token == stop_id)
        if return_trajectory:
            shown[:, j] = token
            states.append(shown.clone())
        if j == W - 1:
            break
        if stop_id is not None and bool(done.all()):
            rest = region[:, j + 1 :]
            window[:, j + 1 :] = window[:, j + 1 :].masked_fill(rest, stop_id)
            if return_trajectory:
                states.append(window.clone())
            break
        c = lo + j
        ids[:, c] = torch.cat([token, token]) if guided else token
        hidden = last_hidden(c, c + 1, cache) if use_cache else last_hidden(0, c + 1, None)
    out: dict[str, Any] = {"samples": window, "nfe": timer["nfe"], "model_s": timer["model_s"]}
    if return_trajectory:
        out["states"] = torch.stack(states)
    return out
