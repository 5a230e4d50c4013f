"""FUDOKI inference: text-to-image, image understanding and text generation with one model.

Each task lays out a batch (:mod:`kineflow.inputs.layout`), draws the region from the
metric path's source (uniform over the vocabulary, no mask token) and runs the Euler CTMC
solver (:class:`kineflow.flow.EulerSolver`) with the model as denoiser ``p_θ(x_1 | x_t)``:

    text-to-image   region = image codes,  path over the image metric table,
                    logits = (1 + w)·image_logits(x) − w·image_logits(x with prompt := pad)
    understanding   region = answer slots, path over the text metric table, greedy targets
                    (top-k = 1), answer = the slots up to the first EOS
    text            as understanding without an image

The solver only sees the *window* of columns that holds the region (left padding aligns it
across rows); the model still reads the whole sequence, which is rebuilt around the window at
every step. Tokens outside the region never change, so this is exact, and the solver's work and
the head's logits scale with the region, not with the sequence.

Understanding features (SigLIP + aligner) are computed once per call, not once per step.

``path="ar"`` reads the same network causally and fills the region left to right with a KV
cache instead (:mod:`kineflow.pipelines.autoregressive`): the AR baseline, sampled with the
same layouts, guidance and tokenizer.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any, ClassVar

import torch
from PIL import Image
from torch import Tensor

from kineflow.data.example import tensor_to_image
from kineflow.flow import EulerSolver, classifier_free_guidance
from kineflow.flow.sampling import widened
from kineflow.inputs.checks import check_device, check_options
from kineflow.inputs.images import load_image, pair_images, preprocess_understanding
from kineflow.inputs.layout import (
    Layout,
    text_layout,
    text_to_image_layout,
    understanding_layout,
)
from kineflow.models.fudoki import FudokiModel
from kineflow.pipelines.autoregressive import decode_autoregressive
from kineflow.pipelines.base import Pipeline, register
from kineflow.pipelines.first_answer import FudokiFirstAnswer
from kineflow.pipelines.fudoki_checkpoints import FudokiCheckpoints
from kineflow.pipelines.fudoki_config import (
    JANUS_SYSTEM_PROMPT,
    KIND,
    FudokiPipelineConfig,
    make_paths,
)
from kineflow.pipelines.infill import FudokiInfill
from kineflow.pipelines.judge import self_judged
from kineflow.pipelines.results import ImageResult, TextResult
from kineflow.pipelines.sampling_options import SamplingOptions
from kineflow.tokenizers.text import TextTokenizer

__all__ = [
    "JANUS_SYSTEM_PROMPT",
    "FudokiPipeline",
    "FudokiPipelineConfig",
    "ImageResult",
    "TextResult",
]

#: The options each task uses (see :class:`~kineflow.pipelines.base.Pipeline`).
_SAMPLING = frozenset({"steps", "seed", "generator", "return_trajectory", "progress"})


class _Clock:
    """Wall time of the model calls inside a sampling run (synchronised on accelerators)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.model_s = 0.0

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


@register
class FudokiPipeline(FudokiFirstAnswer, FudokiInfill, FudokiCheckpoints, Pipeline):
    """A FUDOKI model with its text tokenizer and metric tables, ready to sample (saving and
    loading: :class:`~kineflow.pipelines.fudoki_checkpoints.FudokiCheckpoints`).

    Args:
        model: the network.
        tokenizer: its text tokenizer; every id it can produce must be a model text id.
        text_embeddings: Float[V, d_t], the text metric table (V = the model's text vocab).
        image_embeddings: Float[K, d_i], the image metric table (K = the codebook size).
        config: sampling and preprocessing settings.
        provenance: where each metric table came from (for messages and ``describe()``).

    Raises:
        ValueError: a tokenizer / model vocabulary mismatch, or a table of the wrong size.
    """

    kineflow_type = KIND
    display_name = "FUDOKI"
    task_options: ClassVar[Mapping[str, frozenset[str]]] = {
        "text_to_image": _SAMPLING | {"cfg_scale", "temperature", "top_k", "best_of", "judge"},
        "infill": _SAMPLING | {"cfg_scale", "temperature", "top_k"},
        "infill_text": _SAMPLING | {"blank_tokens", "temperature", "top_k"},
        "answer": _SAMPLING | {"answer_tokens", "system_prompt"},
        "generate_text": _SAMPLING | {"max_tokens", "chat", "system_prompt", "temperature",
                                      "top_k"},
    }  # fmt: skip
    option_reasons: ClassVar[Mapping[str, str]] = {"beams": "they answer with the flow solver"}
    foreign_formats: ClassVar[Mapping[str, str]] = {"multi_modality": "Janus / FUDOKI releases"}

    def __init__(
        self,
        model: FudokiModel,
        tokenizer: TextTokenizer,
        text_embeddings: Tensor,
        image_embeddings: Tensor,
        config: FudokiPipelineConfig | None = None,
        provenance: Mapping[str, str] | None = None,
    ) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.config = config or FudokiPipelineConfig()
        self.provenance = dict(provenance or {})
        V = model.config.language.vocab_size
        K = model.config.gen_vision.codebook_size
        if tokenizer.vocab_size > V:
            raise ValueError(
                f"the tokenizer has {tokenizer.vocab_size} tokens but the model's text vocabulary "
                f"has {V} (language.vocab_size): this tokenizer does not belong to this model"
            )
        for name, table, rows in (("text", text_embeddings, V), ("image", image_embeddings, K)):
            if table.ndim != 2 or table.shape[0] != rows:
                raise ValueError(
                    f"the {name} metric table has shape {tuple(table.shape)}; it needs one row "
                    f"per {name} token, i.e. [{rows}, d]"
                )
        c = self.config
        self.text_embeddings = text_embeddings.detach().float().cpu()
        self.image_embeddings = image_embeddings.detach().float().cpu()
        self.text_path, self.image_path = make_paths(
            c, self.text_embeddings, self.image_embeddings, tokenizer.pad_id, model.config
        )
        self.to(self.device)

    # -- placement ------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def to(
        self, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> FudokiPipeline:
        """Move the model (and the paths) in place; returns self. The paths' tables stay
        float32 under a float32, bfloat16 or float16 model (cosines near 1 need the bits) and
        follow a float64 one, which then samples in float64 end to end.

        Raises:
            ValueError: a device string torch does not know, or a device not present here.
        """
        device = check_device(device)
        self.model.to(device=device, dtype=dtype)
        tables = torch.float64 if self.dtype == torch.float64 else torch.float32
        for path in (self.text_path, self.image_path):
            if path is not None:
                path.to(self.device, tables)
        return self

    @property
    def num_image_tokens(self) -> int:
        return self.model.config.image_token_count

    @property
    def max_positions(self) -> int:
        """The longest sequence the model reads (``max_position_embeddings``)."""
        return self.model.config.language.max_position_embeddings

    # -- tasks ----------------------------------------------------------------------------------
    def check_prompts(self, prompts: str | Sequence[str]) -> None:
        """Raise what :meth:`text_to_image` would raise for these prompts (not a str, empty,
        not UTF-8, too long), without sampling: a caller that samples in batches checks every
        prompt first, each named by its index in the whole list."""
        prompts = [prompts] if isinstance(prompts, str) else prompts
        text_to_image_layout(self.tokenizer, prompts, self.num_image_tokens,
                             self.config.text_budget, max_positions=self.max_positions)  # fmt: skip

    @self_judged
    @torch.no_grad()
    def text_to_image(
        self,
        prompts: str | Sequence[str],
        *,
        steps: int | None = None,
        cfg_scale: float | None = None,
        temperature: float = 1.0,
        top_k: int | None = None,
        seed: int | None = None,
        generator: torch.Generator | None = None,
        return_trajectory: bool = False,
        progress: bool = False,
    ) -> ImageResult:
        """One picture per prompt (prompts may differ), sampled in one batch.

        ``cfg_scale`` (default: the config's, 5.0) is ``w`` of docs/design.md §1.4; 0 turns
        guidance off and halves the work. ``seed`` (or a ``generator`` on the model's device)
        makes the result reproducible. ``progress``: a tqdm bar over the solver steps.

        Raises:
            ValueError: an option out of range (see :mod:`kineflow.inputs.checks`), an
                empty prompt or one too long for the model, before any sampling.
        """
        options = SamplingOptions(steps=steps, cfg_scale=cfg_scale, temperature=temperature,
                                  top_k=top_k, seed=seed, generator=generator,
                                  return_trajectory=return_trajectory,
                                  progress=progress)  # fmt: skip
        prompts = [prompts] if isinstance(prompts, str) else prompts
        layout = text_to_image_layout(
            self.tokenizer, prompts, self.num_image_tokens, self.config.text_budget,
            max_positions=self.max_positions,
        ).to(self.device)  # fmt: skip
        w = self.config.cfg_scale if cfg_scale is None else options.cfg_scale
        return self._image_result(self._solve(layout, "image", options=options, cfg_scale=w))

    def _image_result(self, run: dict[str, Any]) -> ImageResult:
        """The pictures of an image ``_solve`` run (its window is the whole image span): the
        codes Long[B, h, w], and with ``run["states"]`` every state decoded as a frame."""
        h, w_ = self.model.gen_vision_model.tokens_shape(self.model.config.gen_vision.image_size)
        start = time.perf_counter()
        codes = run["samples"].reshape(-1, h, w_)
        trajectory = states = run.get("states")  # [n + 1, B, L]; the last state is the result
        if states is not None:
            frames = [self._decode_images(s.reshape(-1, h, w_)) for s in states]
            images = frames[-1]
            trajectory = [[frames[k][b] for k in range(len(frames))] for b in range(len(images))]
        else:
            images = self._decode_images(codes)
        run["timings"]["decode_s"] = time.perf_counter() - start
        return ImageResult(images, codes.cpu(), trajectory, states, run["timings"])

    @torch.no_grad()
    def answer(
        self,
        images: Sequence[str | os.PathLike[str] | Image.Image]
        | str
        | os.PathLike[str]
        | Image.Image,
        questions: str | Sequence[str],
        *,
        steps: int | None = None,
        answer_tokens: int | None = None,
        system_prompt: str | None = None,
        seed: int | None = None,
        generator: torch.Generator | None = None,
        return_trajectory: bool = False,
        progress: bool = False,
    ) -> TextResult:
        """Answer ``questions[i]`` about ``images[i]`` (paths or PIL pictures).

        Greedy targets (top-k = 1), as FUDOKI; ``answer_tokens=None`` uses the config's
        (None there: the official layout, the answer fills the text budget), a number gives
        every row that many slots. ``trajectory`` of the result is None unless
        ``return_trajectory=True``. The questions are checked before any picture is read.
        """
        o = check_options(answer_tokens=answer_tokens)
        # Greedy targets (top-k = 1) at temperature 1, as FUDOKI.
        options = SamplingOptions(steps=steps, temperature=1.0, top_k=1, seed=seed,
                                  generator=generator, return_trajectory=return_trajectory,
                                  progress=progress)  # fmt: skip
        if self.model.vision_model is None:
            raise ValueError("this model has no understanding encoder (config.vision is None)")
        images, questions = pair_images(images, questions, "question")
        c = self.config
        vision = self.model.config.vision
        system = c.system_prompt if system_prompt is None else system_prompt
        if not isinstance(system, str):
            raise TypeError(f"system_prompt must be a str, got {type(system).__name__}")
        answer_tokens = c.answer_tokens if answer_tokens is None else o["answer_tokens"]
        layout = understanding_layout(
            self.tokenizer, questions, vision.num_patches, c.text_budget, answer_tokens, system,
            max_positions=self.max_positions,
        ).to(self.device)  # fmt: skip
        pictures = [load_image(im) for im in images]
        pixels = preprocess_understanding(
            pictures, vision.image_size, c.image_mean, c.image_std, c.background
        )
        start = time.perf_counter()
        features = self.model.encode_images(pixels.to(self.device, self.dtype))
        encode_s = time.perf_counter() - start
        result = self._generate_text(layout, options, features)
        result.timings["encode_s"] = encode_s  # SigLIP + aligner, once per call
        return result

    @torch.no_grad()
    def generate_text(
        self,
        prompts: str | Sequence[str],
        *,
        max_tokens: int | None = None,
        chat: bool = True,
        system_prompt: str = "",
        steps: int | None = None,
        temperature: float = 1.0,
        top_k: int | None = 1,
        seed: int | None = None,
        generator: torch.Generator | None = None,
        return_trajectory: bool = False,
        progress: bool = False,
    ) -> TextResult:
        """Text-only generation: a chat reply (``chat=True``) or a plain continuation of each
        prompt, in ``max_tokens`` slots cut at the first EOS. Greedy targets by default.

        ``max_tokens=None`` gives each prompt what the text budget leaves after it, at most
        :data:`~kineflow.inputs.layout.DEFAULT_TEXT_TOKENS` (64). ``trajectory`` of the
        result is None unless ``return_trajectory=True``.
        """
        o = check_options(max_tokens=max_tokens)
        options = SamplingOptions(steps=steps, temperature=temperature, top_k=top_k, seed=seed,
                                  generator=generator, return_trajectory=return_trajectory,
                                  progress=progress)  # fmt: skip
        if not isinstance(system_prompt, str):
            raise TypeError(f"system_prompt must be a str, got {type(system_prompt).__name__}")
        prompts = [prompts] if isinstance(prompts, str) else prompts
        layout = text_layout(
            self.tokenizer, prompts, o["max_tokens"], self.config.text_budget, chat,
            system_prompt, max_positions=self.max_positions,
        ).to(self.device)  # fmt: skip
        return self._generate_text(layout, options)

    # -- shared machinery -----------------------------------------------------------------------
    def _generate_text(
        self, layout: Layout, options: SamplingOptions, features: Tensor | None = None
    ) -> TextResult:
        """Sample the layout's answer slots (no guidance) and cut each row at its EOS."""
        run = self._solve(layout, "text", options=options, cfg_scale=0.0, features=features)
        start = time.perf_counter()
        lo = layout.window[0]
        # Each row's answer starts at its own column (its region), possibly after lo.
        starts = [int(r.nonzero()[0]) - lo for r in layout.region.cpu()]
        rows = run["samples"].tolist()
        cut = [self._cut(row[s:]) for row, s in zip(rows, starts, strict=True)]
        texts, ids = [c[0] for c in cut], [c[1] for c in cut]
        trajectory = None
        if options.return_trajectory:
            trajectory = [
                [self._cut(state[b].tolist()[s:])[0] for state in run["states"]]
                for b, s in enumerate(starts)
            ]
        run["timings"]["decode_s"] = time.perf_counter() - start
        return TextResult(texts, ids, trajectory, run["timings"])

    def _cut(self, ids: list[int]) -> tuple[str, list[int]]:
        """The answer up to the first EOS, decoded without special tokens; ids the tokenizer
        does not know (a model vocabulary may be larger) are dropped."""
        eos = self.tokenizer.eos_id
        if eos in ids:
            ids = ids[: ids.index(eos)]
        known = [i for i in ids if i < self.tokenizer.vocab_size]
        return self.tokenizer.decode(known), ids

    def _model_fn(
        self,
        layout: Layout,
        head: str,
        cfg_scale: float,
        features: Tensor | None = None,
    ) -> tuple[Callable[[Tensor, Tensor], Tensor], _Clock]:
        """``(x_window: Long[B, W], t) -> logits Float[B, W, V]`` for the solver (see the
        module docstring), guided when ``cfg_scale > 0``."""
        lo, hi = layout.window
        ids, attention = layout.input_ids, layout.attention_mask
        image_mask, und_mask = layout.image_mask, layout.understanding_mask
        guided = cfg_scale > 0
        if guided:
            uncond = ids.masked_fill(layout.prompt_span, self.tokenizer.pad_id)
            ids = torch.cat([ids, uncond])
            attention = torch.cat([attention, attention])
            image_mask = None if image_mask is None else torch.cat([image_mask, image_mask])
            if und_mask is not None:
                und_mask = torch.cat([und_mask, und_mask])
                features = torch.cat([features, features])
        read = self.model.image_logits if head == "image" else self.model.text_logits
        clock = _Clock(self.device)

        def fn(x: Tensor, t: Tensor) -> Tensor:
            clock.sync()
            start = time.perf_counter()
            full = ids.clone()
            full[:, lo:hi] = torch.cat([x, x]) if guided else x
            hidden = self.model(
                full,
                image_mask=image_mask,
                understanding_mask=und_mask,
                understanding_features=features,
                attention_mask=attention,
            )
            # Shifted logits: column i is read from the hidden state at i - 1 (lo >= 1).
            logits = widened(read(hidden[:, lo - 1 : hi - 1], shift=False))
            if head == "image" and self.config.path == "masked":
                # The mask id K is a state of the path but never a prediction.
                logits = torch.nn.functional.pad(logits, (0, 1), value=-torch.inf)
            if guided:
                logits = classifier_free_guidance(*logits.chunk(2), cfg_scale)
            clock.sync()
            clock.model_s += time.perf_counter() - start
            return logits

        return fn, clock

    def _solve(
        self,
        layout: Layout,
        head: str,
        *,
        options: SamplingOptions,
        cfg_scale: float,
        features: Tensor | None = None,
    ) -> dict[str, Any]:
        """Sample the layout's region with the ``head`` ("image" / "text") path and logits,
        guided with weight ``cfg_scale`` (0: off); ``options.temperature=None`` is 1,
        ``options.steps=None`` the config's. Returns ``samples`` Long[B, W] (the window),
        ``timings`` and, with ``options.return_trajectory``, ``states`` [n + 1, B, W]."""
        if options.temperature is None:
            options = replace(options, temperature=1.0)
        generator = options.generator_on(self.device)
        start = time.perf_counter()
        if self.config.path == "ar":
            run = decode_autoregressive(
                self.model, layout, head, pad_id=self.tokenizer.pad_id, cfg_scale=cfg_scale,
                features=features, stop_id=self.tokenizer.eos_id if head == "text" else None,
                temperature=options.temperature, top_k=options.top_k, generator=generator,
                return_trajectory=options.return_trajectory, progress=options.progress,
            )  # fmt: skip
            nfe, model_s = run["nfe"], run["model_s"]
        else:
            path = self.image_path if head == "image" else self.text_path
            fn, clock = self._model_fn(layout, head, cfg_scale, features)
            lo, hi = layout.window
            region = layout.region[:, lo:hi]
            solver = EulerSolver(path)
            x0 = solver.init_state(layout.input_ids[:, lo:hi], region, generator)
            result = solver.solve(
                fn, x0, self.config.steps if options.steps is None else options.steps, region,
                generator, temperature=options.temperature, top_k=options.top_k,
                return_trajectory=options.return_trajectory, progress=options.progress,
            )  # fmt: skip
            clock.sync()
            run = {"samples": result.samples, "states": result.states}
            nfe, model_s = result.nfe, clock.model_s
        total = time.perf_counter() - start
        timings = {"nfe": float(nfe), "model_s": model_s, "solver_s": total - model_s}
        out: dict[str, Any] = {"samples": run["samples"], "timings": timings}
        if options.return_trajectory:
            out["states"] = run["states"]
        return out

    def _decode_images(self, codes: Tensor) -> list[Image.Image]:
        """Long[B, h, w] -> pictures; the masked path's mask id ``K`` (only in trajectory
        states) is drawn as a mid-grey cell."""
        masked = codes >= self.model.config.gen_vision.codebook_size
        pixels = self.model.gen_vision_model.decode(codes.masked_fill(masked, 0))
        if bool(masked.any()):
            cell = pixels.shape[-1] // codes.shape[-1]
            cells = masked.repeat_interleave(cell, 1).repeat_interleave(cell, 2)
            pixels = pixels.masked_fill(cells[:, None], 0.0)  # 0 in [-1, 1] is mid grey
        return [tensor_to_image(p.float().cpu()) for p in pixels]
