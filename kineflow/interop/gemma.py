"""Hugging Face Gemma-2 checkpoints -> kineflow's Llama-style backbone (UniFluid's language model).

A ``Gemma2Config`` (``config.json`` with ``model_type: gemma2``) maps to a
:class:`~kineflow.models.llama.LlamaConfig` with every Gemma-2 option on
(:func:`llama_config_from_gemma2`; the options are described in :mod:`kineflow.models.llama`),
and a local folder's weights (``Gemma2Model`` or ``Gemma2ForCausalLM``) load strictly into a
:class:`~kineflow.models.llama.LlamaModel` (:func:`load_hf_gemma2`): the parameter names are
``Gemma2Model``'s, under ``model.`` in a causal-LM checkpoint.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from kineflow.interop.checkpoint_files import read_weights
from kineflow.io import check_state_dict, read_json_object
from kineflow.models.llama import LlamaConfig, LlamaModel

__all__ = ["llama_config_from_gemma2", "load_hf_gemma2"]


def llama_config_from_gemma2(config: Mapping[str, Any]) -> LlamaConfig:
    """The backbone of a Hugging Face ``Gemma2Config`` (its ``config.json`` as a dict);
    fields it leaves out take Gemma-2's defaults. Layer types alternate sliding / full
    starting with sliding, as in ``transformers``, unless ``layer_types`` is given."""
    c = dict(config)
    L = int(c["num_hidden_layers"])
    act = c.get("hidden_activation") or c.get("hidden_act") or "gelu_pytorch_tanh"
    if act not in ("gelu_pytorch_tanh", "gelu_tanh"):
        raise ValueError(f"Gemma-2 uses the tanh GELU; this config asks for {act!r}")
    return LlamaConfig(
        vocab_size=int(c["vocab_size"]),
        hidden_size=int(c["hidden_size"]),
        intermediate_size=int(c["intermediate_size"]),
        num_hidden_layers=L,
        num_attention_heads=int(c["num_attention_heads"]),
        num_key_value_heads=int(c.get("num_key_value_heads", c["num_attention_heads"])),
        head_dim=int(c.get("head_dim", 256)),
        rms_norm_eps=float(c.get("rms_norm_eps", 1e-6)),
        rope_theta=float(c.get("rope_theta", 10000.0)),
        max_position_embeddings=int(c.get("max_position_embeddings", 8192)),
        attention_bias=bool(c.get("attention_bias", False)),
        hidden_act="gelu_tanh",
        norm_offset=True,
        embed_scale=True,
        sandwich_norms=True,
        query_pre_attn_scalar=float(c.get("query_pre_attn_scalar", 256)),
        attn_logit_softcapping=c.get("attn_logit_softcapping", 50.0),
        final_logit_softcapping=c.get("final_logit_softcapping", 30.0),
        sliding_window=c.get("sliding_window", 4096),
        layer_types=c.get("layer_types")
        or ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(L)],
    )


def load_hf_gemma2(folder: str | os.PathLike[str]) -> LlamaModel:
    """The Gemma-2 backbone of a local Hugging Face folder (``config.json`` with
    ``model_type: gemma2`` and its weights, from ``Gemma2Model`` or ``Gemma2ForCausalLM``),
    in the checkpoint's dtype. Gemma-2 ties its LM head to ``embed_tokens``: read logits as
    ``softcap(h @ embed_tokens.weight.T, config.final_logit_softcapping)``.

    Raises:
        FileNotFoundError, ValueError: a missing file, another model type, or weights that do
            not fit (each missing, unexpected or mis-shaped tensor named).
    """
    folder = Path(folder)
    config = read_json_object(folder / "config.json")
    if config.get("model_type") != "gemma2":
        raise ValueError(
            f"{folder / 'config.json'}: model_type is {config.get('model_type')!r}, not 'gemma2'"
        )
    weights = read_weights(folder)
    head = weights.pop("lm_head.weight", None)
    prefix = "model." if any(k.startswith("model.") for k in weights) else ""
    state = {k.removeprefix(prefix): v for k, v in weights.items()}
    model = LlamaModel(llama_config_from_gemma2(config))
    check_state_dict(model.state_dict(), state, str(folder), prefix=prefix)
    if head is not None and not torch.equal(head, state["embed_tokens.weight"]):
        raise ValueError(f"{folder}: lm_head.weight differs from embed_tokens (Gemma-2 ties them)")
    dtypes = {t.dtype for t in state.values()}
    model.to(dtypes.pop() if len(dtypes) == 1 else torch.float32)
    model.load_state_dict(state)
    return model.eval()
