"""UniFluid inference: text-to-image, image editing, VQA and captioning with one model.

Prompts use the same chat template and special tokens as the trainer
(:mod:`kineflow.train.unifluid`), left-padded so every row's last prompt token sits in the
same column:

    text-to-image  BOS "User: {prompt}\\n\\nAssistant:" <boi>          → L image tokens
    editing        BOS "User: " <boi> <img>×L <eoi> "{instruction}\\n\\nAssistant:" <boi>
    understanding  BOS "User: " <boi> <img>×P <eoi> "{question}\\n\\nAssistant:"  → text

Images are generated token by token in a random (or raster) order with a KV cache and the
per-token diffusion head; classifier-free guidance blanks the text prompt (pad after BOS) and
raises the weight over the tokens. Text is greedy or beam search, cut at EOS.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from kineflow.config import check_config_keys
from kineflow.data.example import tensor_to_image
from kineflow.inputs.checks import check_device, check_options, check_texts, too_many_positions
from kineflow.inputs.images import (
    as_image_list,
    load_image,
    pair_images,
    preprocess_understanding,
)
from kineflow.inputs.layout import understanding_layout
from kineflow.io import check_state_dict, load_pretrained_folder
from kineflow.models.diffusion_head import add_identity_norms
from kineflow.models.unifluid import UnifluidConfig, UnifluidModel, generation_order
from kineflow.pipelines.base import Pipeline, register
from kineflow.pipelines.checkpoints import load_checked
from kineflow.pipelines.first_answer import UnifluidFirstAnswer
from kineflow.pipelines.infill import UnifluidInfill
from kineflow.pipelines.judge import self_judged
from kineflow.pipelines.results import ImageResult, TextResult
from kineflow.pipelines.sampling_options import SamplingOptions
from kineflow.pipelines.unifluid_saving import UnifluidSaving
from kineflow.tokenizers.text import TextTokenizer

__all__ = ["KIND", "UnifluidPipeline", "UnifluidPipelineConfig"]

KIND = "unifluid"
#: The colour of cells not generated yet in trajectory frames.
NOT_YET = np.array([96, 96, 96], dtype=np.uint8)
#: The options both image tasks use (see :class:`~kineflow.pipelines.base.Pipeline`).
_IMAGES = frozenset({"temperature", "seed", "return_trajectory", "frames", "progress"})


@dataclass
class UnifluidPipelineConfig:
    """Defaults of the sampling calls and the text budget of understanding prompts.

    ``clip_x0``: the diffusion head's ``x̂_0`` is clamped to ``[−c, c]``. Without it the first,
    near-pure-noise steps amplify the head's ε error (see :meth:`DiffusionHead.sample`): on the
    ShapesWorld model after 1000 steps the pictures are noise without it. The trainer saves
    the range its tokens occupy (:func:`kineflow.train.unifluid.token_range`, ~8.5 for the
    ShapesWorld KL-VAE); ±3σ, tried first, shifted the colours of saturated objects, 15 % of
    whose tokens lie beyond it. None turns it off (MAR's choice)."""

    cfg_scale: float = 3.0
    temperature: float = 1.0
    clip_x0: float | None = None
    text_budget: int = 64
    answer_tokens: int = 16
    caption_tokens: int = 40
    caption_instruction: str = "Describe the picture."

    def __post_init__(self) -> None:
        # The sampling defaults obey the rules of the calls' own options (a config.json with
        # cfg_scale NaN would otherwise draw black pictures).
        check_options(cfg_scale=self.cfg_scale, temperature=self.temperature,
                      answer_tokens=self.answer_tokens, max_tokens=self.caption_tokens)  # fmt: skip
        budget = self.text_budget
        if isinstance(budget, bool) or not isinstance(budget, int) or budget < 2:
            raise ValueError(f"text_budget must be an integer >= 2, got {budget!r}")
        if self.clip_x0 is not None and not (math.isfinite(self.clip_x0) and self.clip_x0 > 0):
            raise ValueError(f"clip_x0 must be None or a finite number > 0, got {self.clip_x0!r}")
        check_texts(self.caption_instruction, "caption_instruction")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> UnifluidPipelineConfig:
        check_config_keys(d, cls, "UniFluid pipeline config")
        return cls(**d)


@register
class UnifluidPipeline(UnifluidFirstAnswer, UnifluidInfill, UnifluidSaving, Pipeline):
    """A UniFluid model with its text tokenizer (see the module docstring; saving:
    :class:`~kineflow.pipelines.unifluid_saving.UnifluidSaving`)."""

    kineflow_type = KIND
    display_name = "UniFluid"
    # answer also accepts steps, seed and return_trajectory, for a common interface with
    # FUDOKI, but uses none of them.
    task_options: ClassVar[Mapping[str, frozenset[str]]] = {
        "text_to_image": _IMAGES | {"cfg_scale", "order", "best_of", "judge"},
        "edit": _IMAGES,
        "infill": _IMAGES | {"cfg_scale"},
        "answer": frozenset({"max_tokens", "answer_tokens", "beams"}),
        "caption": frozenset({"beams"}),
    }
    option_reasons: ClassVar[Mapping[str, str]] = {
        "steps": "they take one backbone step per token",
        "top_k": "their image tokens are continuous",
        "return_trajectory": "they decode left to right",
    }

    def __init__(
        self,
        model: UnifluidModel,
        tokenizer: TextTokenizer,
        config: UnifluidPipelineConfig | None = None,
    ) -> None:
        V = model.config.language.vocab_size
        if tokenizer.vocab_size > V:
            raise ValueError(
                f"the tokenizer has {tokenizer.vocab_size} tokens but the model's vocabulary "
                f"has {V}: this tokenizer does not belong to this model"
            )
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.config = config or UnifluidPipelineConfig()

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def to(
        self, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> UnifluidPipeline:
        """Move the model in place; returns self.

        Raises:
            ValueError: a device string torch does not know, or a device not present here.
        """
        self.model.to(device=check_device(device), dtype=dtype)
        return self

    @property
    def max_positions(self) -> int:
        """The longest sequence the model reads (``max_position_embeddings``)."""
        return self.model.config.language.max_position_embeddings

    # -- prompts ---------------------------------------------------------------------------------
    def _prompt_rows(self, texts: Any, what: str, image: bool) -> list[list[int]]:
        """The token rows of prompts / instructions (see the module docstring), each checked
        (:func:`~kineflow.inputs.checks.check_texts`) and, before any model work, refused
        when it and the picture it asks for exceed the model's positions."""
        tok, L = self.tokenizer, self.model.config.num_image_tokens
        rows = []
        for i, text in enumerate(check_texts(texts, what, tok.special_tokens.as_tuple())):
            message = (tok.image_span(1) if image else "") + text
            ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": message}],
                                                     system=""), bos=True)  # fmt: skip
            if image:
                at = ids.index(tok.image_id)
                ids[at : at + 1] = [tok.image_id] * self.model.config.edit_placeholders
            ids.append(tok.boi_id)
            counted = f"the chat template{' and the source picture' if image else ''}"
            error = too_many_positions(what, i, len(ids), self.max_positions, L, "the picture",
                                       including=counted)  # fmt: skip
            if error is not None:
                raise error
            rows.append(ids)
        return rows

    def _left_pad(self, rows: list[list[int]]) -> tuple[Tensor, Tensor]:
        N = max(len(r) for r in rows)
        ids = torch.full((len(rows), N), self.tokenizer.pad_id)
        mask = torch.zeros(len(rows), N, dtype=torch.bool)
        for b, r in enumerate(rows):
            ids[b, N - len(r) :] = torch.tensor(r)
            mask[b, N - len(r) :] = True
        return ids.to(self.device), mask.to(self.device)

    def _features(self, images: Sequence[Any]) -> Tensor:
        if self.model.vision_model is None:
            raise ValueError("this model has no understanding encoder (config.vision is None)")
        pictures = [load_image(im) for im in images]
        size = self.model.config.vision.image_size
        pixels = preprocess_understanding(pictures, size).to(self.device, self.model.pos_in.dtype)
        return self.model.encode_images(pixels)

    def _generator(self, seed: int | None) -> torch.Generator:
        """The generator of a sampling call: on the CPU (the head moves its noise), seeded."""
        return SamplingOptions(seed=seed).generator_on(torch.device("cpu"))

    # -- tasks -----------------------------------------------------------------------------------
    def check_prompts(self, prompts: str | Sequence[str]) -> None:
        """Raise what :meth:`text_to_image` would raise for these prompts (not a str, empty,
        not UTF-8, too long), without sampling: a caller that samples in batches checks every
        prompt first, each named by its index in the whole list."""
        self._prompt_rows(prompts, "prompt", image=False)

    @self_judged
    @torch.no_grad()
    def text_to_image(
        self,
        prompts: str | Sequence[str],
        *,
        cfg_scale: float | None = None,
        temperature: float | None = None,
        seed: int | None = None,
        order: Tensor | None = None,
        steps: int | None = None,
        return_trajectory: bool = False,
        frames: int = 16,
        progress: bool = False,
    ) -> ImageResult:
        """One picture per prompt, sampled in one batch (``cfg_scale`` 1: no guidance; >= 0
        and finite, as ``temperature``; None: the config's).

        ``return_trajectory``: also the picture as the tokens arrive (``frames + 1`` pictures
        per prompt, at evenly spaced token counts; cells not generated yet are grey), for GIFs
        of the generation order. ``progress``: a tqdm bar over the generated tokens.

        ``steps`` is accepted for a common interface with the FUDOKI pipeline and must be
        None: UniFluid takes one backbone step per token (and the diffusion head's own
        ``sample_steps`` per token).

        Raises:
            ValueError: an option out of range, an empty prompt or one that, with the picture,
                exceeds the model's ``max_position_embeddings`` (checked before any sampling).
        """
        if steps is not None:
            raise ValueError("UniFluid has no solver steps (one backbone step per token): "
                             "leave steps=None")  # fmt: skip
        options = SamplingOptions(cfg_scale=cfg_scale, temperature=temperature, seed=seed,
                                  return_trajectory=return_trajectory,
                                  progress=progress)  # fmt: skip
        frames = check_options(frames=frames)["frames"]
        rows = self._prompt_rows(prompts, "prompt", image=False)
        ids, mask = self._left_pad(rows)
        return self._images(ids, mask, self._blank(ids, mask), options, order=order,
                            frames=frames)  # fmt: skip

    def _blank(self, ids: Tensor, mask: Tensor) -> Tensor:
        """The unconditional prompts of guidance: every token but BOS and ``<boi>`` := pad."""
        uncond = ids.clone()
        uncond[:, :-1] = torch.where(mask[:, :-1], self.tokenizer.pad_id, uncond[:, :-1])
        uncond[torch.arange(len(ids)), mask.float().argmax(1)] = self.tokenizer.bos_id
        return uncond

    @torch.no_grad()
    def encode(self, images: Sequence[Any] | Any) -> Tensor:
        """Pictures (paths, PIL images or uint8 arrays) as the latent tokens ``[B, L, C]``: the
        VAE's posterior mode, scaled and patchified. A square picture of any size is resized
        (bicubic) to the VAE's ``S x S``; a picture that is not square is refused rather than
        distorted or padded."""
        S = self.model.config.vae.image_size
        arrays = []
        for i, image in enumerate(as_image_list(images)):
            picture = load_image(image)
            if picture.width != picture.height:
                raise ValueError(
                    f"image {i} is {picture.width}x{picture.height}: UniFluid edits square "
                    f"pictures ({S}x{S}, or larger ones it resizes); crop it first"
                )
            if picture.size != (S, S):
                picture = picture.resize((S, S), Image.Resampling.BICUBIC)
            arrays.append(np.asarray(picture, dtype=np.float32))
        x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) / 127.5 - 1.0
        vae = self.model.vae
        return vae.images_to_tokens(x.to(self.device, self.model.pos_in.dtype))

    @torch.no_grad()
    def edit(
        self,
        images: Sequence[Any] | Any,
        instructions: str | Sequence[str],
        *,
        temperature: float | None = None,
        seed: int | None = None,
        return_trajectory: bool = False,
        frames: int = 16,
        progress: bool = False,
    ) -> ImageResult:
        """The picture ``images[i]`` changed as ``instructions[i]`` says. ``images`` are
        pictures (see :meth:`encode`) or their latent tokens ``[B, L, C]``. No guidance: the
        trainer never blanks editing prompts. ``return_trajectory``, ``progress``: as in
        :meth:`text_to_image`. The options and instructions are checked (lengths included)
        before any picture is read or encoded. A model with ``edit_features`` also reads the
        source with its understanding tower (given latent tokens: their decoded picture)."""
        # No guidance (cfg_scale 1): the trainer never blanks editing prompts.
        options = SamplingOptions(cfg_scale=1.0, temperature=temperature, seed=seed,
                                  return_trajectory=return_trajectory,
                                  progress=progress)  # fmt: skip
        frames = check_options(frames=frames)["frames"]
        if isinstance(images, Tensor):
            tokens = images.to(self.device)
            self.model.check_tokens(tokens, "source image tokens")
            instructions = [instructions] if isinstance(instructions, str) else list(instructions)
            if len(instructions) != tokens.shape[0]:
                raise ValueError(
                    f"got {tokens.shape[0]} image(s) for {len(instructions)} instruction(s)"
                )
        else:
            images, instructions = pair_images(images, instructions, "instruction")
        # The instructions are checked before any picture is read or encoded.
        ids, mask = self._left_pad(self._prompt_rows(instructions, "instruction", image=True))
        features = None
        if not isinstance(images, Tensor):
            if self.model.config.edit_features:  # read each file once: the VAE and the tower
                images = [load_image(im) for im in images]
            tokens = self.encode(images)
        if self.model.config.edit_features:  # latent tokens given: read their decoded pictures
            features = self._features(self.decode(tokens) if isinstance(images, Tensor)
                                      else images)  # fmt: skip
        prompt = self.model.edit_embeds(ids, ids == self.tokenizer.image_id, tokens, features)
        return self._images(prompt, mask, None, options, frames=frames, source=tokens)

    def _images(
        self,
        prompt: Tensor,
        mask: Tensor,
        uncond: Tensor | None,
        options: SamplingOptions,
        *,
        frames: int,
        order: Tensor | None = None,
        source: Tensor | None = None,
        keep: tuple[Tensor, Tensor] | None = None,
    ) -> ImageResult:
        """Generate the image tokens after ``prompt`` (ids Long[B, N] or embeddings
        Float[B, N, D], ``mask`` Bool[B, N]) and decode them; ``uncond``: the blanked prompt
        for guidance (used when the weight is not 1); ``frames``: the trajectory's frames
        when ``options.return_trajectory``; ``source``: the tokens an edit starts from;
        ``keep``: ``(given [B, L, C], Bool[B, L])``, tokens fed in, not sampled (infilling)."""
        c, model = self.config, self.model
        if options.temperature is None:
            options = replace(options, temperature=c.temperature)
        w = c.cfg_scale if options.cfg_scale is None else options.cfg_scale
        generator = self._generator(options.seed)
        B, L = mask.shape[0], model.config.num_image_tokens
        if order is None:  # drawn here (as generate_tokens would) to draw the trajectory
            order = generation_order(B, L, model.config.order, generator)
        start = time.perf_counter()
        tokens = model.generate_tokens(
            prompt, mask, uncond=uncond if w != 1.0 else None, cfg_scale=w,
            temperature=options.temperature, order=order, generator=generator, clip_x0=c.clip_x0,
            source=source, progress=options.progress, given=None if keep is None else keep[0],
            keep=None if keep is None else keep[1],
        )  # fmt: skip
        model_s = time.perf_counter() - start
        start = time.perf_counter()
        images = self.decode(tokens)
        trajectory = None
        if options.return_trajectory:
            trajectory = self._trajectory(images, order, frames)
        timings = {"model_s": model_s, "decode_s": time.perf_counter() - start,
                   "nfe": float(L)}  # fmt: skip
        return ImageResult(images, tokens.cpu(), trajectory, timings=timings)

    @torch.no_grad()
    def decode(self, tokens: Tensor) -> list[Image.Image]:
        """Latent tokens ``[B, L, C]`` (grid order) as pictures."""
        self.model.check_tokens(tokens, "image tokens")
        pixels = self.model.vae.tokens_to_images(tokens.to(self.device, self.model.pos_in.dtype))
        return [tensor_to_image(p.float().clamp(-1, 1).cpu()) for p in pixels]

    def _trajectory(
        self, images: list[Image.Image], order: Tensor, frames: int
    ) -> list[list[Image.Image]]:
        """Per sample, the picture revealed cell by cell in generation order: after ``0,
        L/frames, …, L`` tokens, the cells generated so far show the final pixels, the others
        :data:`NOT_YET` grey. (An AR token never changes once drawn, so the final pixels are
        those of the moment; decoding the partial token grid instead would fill the rest with
        whatever the VAE makes of a made-up latent.)"""
        L = order.shape[1]
        grid = self.model.config.vae.grid_size
        counts = sorted({round(k * L / frames) for k in range(frames + 1)})
        out = []
        for b, image in enumerate(images):
            final = np.asarray(image)
            cell = final.shape[0] // grid
            rank = torch.empty(L, dtype=torch.long)
            rank[order[b].cpu()] = torch.arange(L)  # when each grid cell is generated
            # [S, S]: the generation step of the cell under each pixel
            when = rank.view(grid, grid).repeat_interleave(cell, 0).repeat_interleave(cell, 1)
            when = when.numpy()[..., None]
            out.append([Image.fromarray(np.where(when < n, final, NOT_YET)) for n in counts])
        return out

    @torch.no_grad()
    def answer(
        self,
        images: Sequence[Any] | Any,
        questions: str | Sequence[str],
        *,
        max_tokens: int | None = None,
        beams: int = 1,
        answer_tokens: int | None = None,
        steps: int | None = None,
        seed: int | None = None,
        return_trajectory: bool = False,
    ) -> TextResult:
        """Answer ``questions[i]`` about ``images[i]``: greedy, or beam search with ``beams``.

        ``answer_tokens`` is a synonym of ``max_tokens`` (default: the config's);
        ``steps``, ``seed`` and ``return_trajectory`` are accepted for a common interface with
        the FUDOKI pipeline: decoding is deterministic and left to right, so ``steps`` must be
        None and ``return_trajectory`` False (the result's ``trajectory`` is None).

        Raises:
            ValueError: an option out of range or not supported, an empty question, or one
                that with its answer exceeds the text budget or the model's positions (all
                checked before any picture is read).
        """
        if steps is not None:
            raise ValueError("UniFluid has no solver steps (one backbone step per token): "
                             "leave steps=None")  # fmt: skip
        if return_trajectory:
            raise ValueError("return_trajectory is not supported by UniFluid models (they "
                             "decode left to right, one token per step)")  # fmt: skip
        o = check_options(max_tokens=max_tokens, answer_tokens=answer_tokens, beams=beams,
                          seed=seed)  # fmt: skip
        if None not in (max_tokens, answer_tokens) and o["max_tokens"] != o["answer_tokens"]:
            raise ValueError(f"max_tokens={max_tokens} and answer_tokens={answer_tokens} "
                             "disagree; give one of them")  # fmt: skip
        images, questions = pair_images(images, questions, "question")
        c, tok = self.config, self.tokenizer
        n = o["max_tokens"] or o["answer_tokens"] or c.answer_tokens
        P = self.model.config.vision.num_patches if self.model.config.vision else 0
        lay = understanding_layout(tok, questions, P, c.text_budget, n,
                                   max_positions=self.max_positions).to(self.device)  # fmt: skip
        lo = lay.window[0]  # the prompts end at column lo (the n answer slots after it)
        ids, image_mask = lay.input_ids[:, :lo], lay.understanding_mask[:, :lo]
        mask = lay.attention_mask[:, :lo]
        start = time.perf_counter()
        embeds = self.model.understanding_embeds(ids, image_mask, self._features(images))
        out = self.model.generate_text(
            embeds, mask, mask.sum(1), max_tokens=n, eos_id=tok.eos_id, beams=o["beams"],
        )  # fmt: skip
        known = [[i for i in row if i < tok.vocab_size] for row in out]
        texts = [tok.decode(row) for row in known]
        return TextResult(texts, out, None, {"model_s": time.perf_counter() - start})

    def caption(self, images: Sequence[Any] | Any, *, beams: int = 3) -> TextResult:
        """Captions with the trained instruction (beam search by default)."""
        images = as_image_list(images)
        c = self.config
        return self.answer(images, [c.caption_instruction] * len(images),
                           max_tokens=c.caption_tokens, beams=beams)  # fmt: skip

    # -- checkpoints -----------------------------------------------------------------------------
    @classmethod
    def load_checkpoint(
        cls,
        folder: Path,
        config: Mapping[str, Any],
        *,
        max_bytes: int | None = None,
        check_finite: bool | None = None,
    ) -> UnifluidPipeline:
        """:meth:`from_pretrained` after :func:`~kineflow.pipelines.checkpoints.load_checked`'s
        checks (see :func:`kineflow.load`)."""
        return load_checked(
            folder, lambda: UnifluidConfig(**config["model"]), UnifluidModel, cls.from_pretrained,
            max_bytes=max_bytes, check_finite=check_finite,
        )  # fmt: skip

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike[str]) -> UnifluidPipeline:
        """Read what :meth:`save_pretrained` wrote; every tensor must fit."""
        folder = Path(folder)
        config, weights = load_pretrained_folder(folder, KIND, "UniFluid checkpoint")
        try:
            model_config = UnifluidConfig(**config["model"])
            pipeline_config = UnifluidPipelineConfig.from_dict(config.get("pipeline", {}))
        except (TypeError, ValueError, KeyError) as e:
            raise ValueError(f"{folder / 'config.json'}: {e}") from e
        model = UnifluidModel(model_config)
        # Folders saved before the head's block norms became affine lack their identity values.
        weights = add_identity_norms(weights, "diffusion_head.net.")
        check_state_dict(model.state_dict(), weights, str(folder / "model.safetensors"))
        model.load_state_dict(weights)
        return cls(model, TextTokenizer.load(folder), pipeline_config)
