"""Each family's logits for the first answer token to a question about a picture: what the
self-judge of best-of-N text-to-image reads (:mod:`kineflow.pipelines.judge`).

``first_answer_logits(images, questions) -> Float[M, V]`` for M (picture, question) pairs,
V the model's text vocabulary. One model pass per batch, no sampling:

* **FUDOKI** (:class:`FudokiFirstAnswer`): the understanding layout of ``answer`` (the
  config's answer slots and system prompt), the slots at the text path's source state, i.e.
  t = 0 (metric path: uniform over the vocabulary; masked path: the mask), one full-attention
  forward pass; the logits are the text head's at each row's first slot, the model's
  prediction of ``x_1`` there given the picture and the question. The source draw is the
  same for every row (a generator seeded 0 per row), so scores are deterministic and two
  candidates are compared under the same noise. The ``ar`` path reads causally (its first
  slot does not see the others).
* **UniFluid** (:class:`UnifluidFirstAnswer`): the prompt of ``answer`` (picture + question,
  ending with ``"Assistant:"``), one prefix-LM pass, the text head at the last column: the
  next-token logits greedy decoding would start from.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from kineflow.inputs.images import load_image, preprocess_understanding
from kineflow.inputs.layout import understanding_layout

__all__ = ["FudokiFirstAnswer", "UnifluidFirstAnswer"]

#: The seed of FUDOKI's source draw for the answer slots (the same for every row and call).
SOURCE_SEED = 0


class FudokiFirstAnswer:
    """Mixin of :class:`~kineflow.pipelines.fudoki.FudokiPipeline` (see the module docstring)."""

    model: Any
    tokenizer: Any
    config: Any
    text_path: Any
    device: torch.device
    dtype: torch.dtype
    max_positions: int

    @torch.no_grad()
    def first_answer_logits(self, images: Sequence[Any], questions: Sequence[str]) -> Tensor:
        """Float[M, V]: the text head at each row's first answer slot, slots at t = 0."""
        if self.model.vision_model is None:
            raise ValueError("this model has no understanding encoder (config.vision is None)")
        c, vision = self.config, self.model.config.vision
        layout = understanding_layout(
            self.tokenizer, list(questions), vision.num_patches, c.text_budget, c.answer_tokens,
            c.system_prompt, max_positions=self.max_positions,
        ).to(self.device)  # fmt: skip
        ids, region = layout.input_ids.clone(), layout.region
        if self.text_path is not None:  # metric / masked: the path's source, one draw per row
            for b in range(ids.shape[0]):
                cols = region[b].nonzero()[:, 0]
                generator = torch.Generator(self.device).manual_seed(SOURCE_SEED)
                ids[b, cols] = self.text_path.sample_prior((len(cols),), generator, self.device)
        pictures = [load_image(im) for im in images]
        pixels = preprocess_understanding(
            pictures, vision.image_size, c.image_mean, c.image_std, c.background
        )
        features = self.model.encode_images(pixels.to(self.device, self.dtype))
        hidden = self.model(
            ids, understanding_mask=layout.understanding_mask, understanding_features=features,
            attention_mask=layout.attention_mask, mask="causal" if c.path == "ar" else "full",
        )  # fmt: skip
        first = region.long().argmax(1)  # each row's first answer column (>= 1)
        h = hidden[torch.arange(ids.shape[0], device=ids.device), first - 1]
        return self.model.text_logits(h[:, None], shift=False)[:, 0].float()


class UnifluidFirstAnswer:
    """Mixin of :class:`~kineflow.pipelines.unifluid.UnifluidPipeline` (module docstring)."""

    model: Any
    tokenizer: Any
    config: Any
    device: torch.device
    max_positions: int
    _features: Callable[[Sequence[Any]], Tensor]  # UnifluidPipeline's understanding features

    @torch.no_grad()
    def first_answer_logits(self, images: Sequence[Any], questions: Sequence[str]) -> Tensor:
        """Float[M, V]: the next-token logits after each picture + question prompt."""
        vision = self.model.config.vision
        P = vision.num_patches if vision is not None else 0
        lay = understanding_layout(self.tokenizer, list(questions), P, self.config.text_budget,
                                   1, max_positions=self.max_positions).to(self.device)  # fmt: skip
        lo = lay.window[0]  # the prompts end at column lo - 1 (left-padded)
        mask = lay.attention_mask[:, :lo]
        hidden = self.model.understanding_hidden(
            lay.input_ids[:, :lo], mask, lay.understanding_mask[:, :lo],
            self._features(list(images)), mask.sum(1),
        )  # fmt: skip
        return self.model.text_logits(hidden[:, -1]).float()
