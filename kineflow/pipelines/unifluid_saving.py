"""Saving a UniFluid pipeline: its folder and model card (the saving half of
:class:`~kineflow.pipelines.unifluid.UnifluidPipeline`; reading stays there)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from kineflow.io import save_pretrained_folder
from kineflow.models.unifluid import UnifluidModel
from kineflow.pipelines.model_card import card_writer
from kineflow.tokenizers.text import TextTokenizer

__all__ = ["UnifluidSaving"]


class UnifluidSaving:
    """``save_pretrained`` for :class:`~kineflow.pipelines.unifluid.UnifluidPipeline`."""

    kineflow_type: str
    model: UnifluidModel
    tokenizer: TextTokenizer
    config: Any

    def save_pretrained(
        self, folder: str | os.PathLike[str], dtype: torch.dtype | None = None, **card: Any
    ) -> Path:
        """``config.json`` (``kineflow_type: unifluid``, model + pipeline configs),
        ``model.safetensors`` (floating tensors cast to ``dtype`` when given, e.g. float16 to
        ship half the bytes; loading casts them back to the model's dtype), the tokenizer
        files and the ``README.md`` model card (``card``: the ``training``, ``scores`` and
        ``name`` of :func:`~kineflow.pipelines.model_card.model_card`), swapped in whole: see
        :func:`kineflow.io.save_pretrained_folder` (and its ValueErrors)."""
        c = self.model.config
        config = {"model": c.to_dict(), "pipeline": self.config.to_dict()}
        weights = self.model.state_dict()
        if dtype is not None:
            weights = {k: v.to(dtype) if v.is_floating_point() else v for k, v in weights.items()}
        facts = {
            "image_size": c.vae.image_size,
            "image_tokens": c.num_image_tokens,
            "token_channels": c.vae.token_dim,
            "text_vocab_size": c.language.vocab_size,
            "layers": c.language.num_hidden_layers,
            "hidden_size": c.language.hidden_size,
            "text_budget": self.config.text_budget,
        }
        extra = card_writer(self, weights, facts, self.tokenizer.save, **card)  # type: ignore[arg-type]
        return save_pretrained_folder(folder, weights, config, self.kineflow_type, extra=extra)
