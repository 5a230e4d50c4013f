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
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from safetensors.torch import load_file
from torch import Tensor

from kineflow.config import check_config_keys
from kineflow.data.example import tensor_to_image
from kineflow.flow import EulerSolver, MaskedPath, MetricPath, classifier_free_guidance
from kineflow.flow.path import DiscretePath
from kineflow.inputs.checks import check_device, check_options
from kineflow.inputs.images import load_image, pair_images, preprocess_understanding
from kineflow.inputs.layout import (
    Layout,
    text_layout,
    text_to_image_layout,
    understanding_layout,
)
from kineflow.interop.janus import fudoki_model_from_janus
from kineflow.io import atomic_save_safetensors, load_pretrained_folder, save_pretrained_folder
from kineflow.models.fudoki import FudokiConfig, FudokiModel
from kineflow.pipelines.autoregressive import decode_autoregressive
from kineflow.pipelines.results import ImageResult, TextResult
from kineflow.tokenizers.text import TextTokenizer

__all__ = [
    "JANUS_SYSTEM_PROMPT",
    "FudokiPipeline",
    "FudokiPipelineConfig",
    "ImageResult",
    "TextResult",
]

#: The system prompt of Janus's / FUDOKI's understanding processor.
JANUS_SYSTEM_PROMPT = (
    "You are a helpful language and vision assistant. You are able to understand the visual "
    "content that the user provides, and assist the user with a variety of tasks using natural "
    "language."
)
KIND = "fudoki"
PATHS = ("metric", "masked", "ar")
ImageInput = str | os.PathLike[str] | Image.Image
METRIC_FILE = "metric.safetensors"


@dataclass
class FudokiPipelineConfig:
    """Everything besides the network that decides what the pipeline does.

    ``metric_exponent``, ``beta_a``, ``beta_c``: the metric path ``softmax(−β_t d)``,
    ``d = ‖ê_x − ê_y‖^p``, ``β_t = c (t / (1 − t))^a`` (FUDOKI: p = 4, a = 0.9, c = 3).
    ``text_budget``: text tokens a sequence may hold besides the image (FUDOKI's
    ``txt_max_length``, 500). ``image_mean``/``image_std``/``background``: understanding
    preprocessing (:mod:`kineflow.inputs.images`). ``steps``, ``cfg_scale``,
    ``answer_tokens``: defaults of the sampling calls (``answer_tokens=None``: the official
    layout, answers fill the text budget). ``path``: ``"metric"`` (FUDOKI) or ``"masked"``
    (the absorbing-state baseline: text mask = the pad token, image mask = the extra image id
    ``K`` of a model built with ``image_mask_token``) or ``"ar"`` (the autoregressive
    baseline: causal attention, left-to-right decoding with a KV cache; ``steps`` is unused).
    """

    metric_exponent: float = 4.0
    beta_a: float = 0.9
    beta_c: float = 3.0
    text_budget: int = 500
    system_prompt: str = JANUS_SYSTEM_PROMPT
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    background: tuple[int, int, int] = (127, 127, 127)
    steps: int = 50
    cfg_scale: float = 5.0
    answer_tokens: int | None = None
    path: str = "metric"

    def __post_init__(self) -> None:
        if self.path not in PATHS:
            raise ValueError(f"path must be one of {PATHS}, got {self.path!r}")
        # The sampling defaults obey the rules of the calls' own options.
        check_options(answer_tokens=self.answer_tokens, steps=self.steps, cfg_scale=self.cfg_scale)
        for name in ("image_mean", "image_std", "background"):
            value = tuple(getattr(self, name))
            if len(value) != 3:
                raise ValueError(f"{name} must have 3 entries (RGB), got {value!r}")
            setattr(self, name, value)
        if any(not s > 0 for s in self.image_std):
            raise ValueError(f"image_std must be positive, got {self.image_std}")
        budget = self.text_budget
        if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
            raise ValueError(f"text_budget must be a positive integer, got {budget!r}")
        for name in ("metric_exponent", "beta_a", "beta_c"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)!r}")

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> FudokiPipelineConfig:
        check_config_keys(d, cls, "FUDOKI pipeline config")
        return cls(**d)


def make_paths(
    config: FudokiPipelineConfig,
    text_embeddings: Tensor,
    image_embeddings: Tensor,
    pad_id: int,
    model_config: FudokiConfig,
) -> tuple[DiscretePath, DiscretePath] | tuple[None, None]:
    """The text and image paths of ``config.path`` (shared by sampling and training).

    metric: ``softmax(−β_t ‖ê_x − ê_y‖^p)`` over each table; masked: absorbing paths whose
    masks are the pad token (text) and the extra image id ``K``; ar: none (no corruption).
    """
    if config.path == "ar":
        return None, None
    if config.path == "metric":
        return tuple(
            MetricPath.from_embeddings(t, config.metric_exponent, config.beta_a, config.beta_c)
            for t in (text_embeddings, image_embeddings)
        )
    if not model_config.image_mask_token:
        raise ValueError("the masked path needs a model built with image_mask_token=True")
    K = model_config.gen_vision.codebook_size
    return MaskedPath(model_config.language.vocab_size, pad_id), MaskedPath(K + 1, K)


class _Clock:
    """Wall time of the model calls inside a sampling run (synchronised on accelerators)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.model_s = 0.0

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


class FudokiPipeline:
    """A FUDOKI model with its text tokenizer and metric tables, ready to sample.

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
        """Move the model (and the metric paths, which stay float32) in place; returns self.

        Raises:
            ValueError: a device string torch does not know, or a device not present here.
        """
        device = check_device(device)
        self.model.to(device=device, dtype=dtype)
        for path in (self.text_path, self.image_path):
            if path is not None:
                path.to(self.device)
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
        o = check_options(steps=steps, cfg_scale=cfg_scale, temperature=temperature,
                          top_k=top_k, seed=seed)  # fmt: skip
        prompts = [prompts] if isinstance(prompts, str) else prompts
        layout = text_to_image_layout(
            self.tokenizer, prompts, self.num_image_tokens, self.config.text_budget,
            max_positions=self.max_positions,
        ).to(self.device)  # fmt: skip
        w = self.config.cfg_scale if cfg_scale is None else o["cfg_scale"]
        run = self._solve(
            layout,
            "image",
            w,
            None,
            o["steps"],
            o["temperature"],
            o["top_k"],
            o["seed"],
            generator,
            return_trajectory,
            progress,
        )
        h, w_ = self.model.gen_vision_model.tokens_shape(self.model.config.gen_vision.image_size)
        start = time.perf_counter()
        codes = run["samples"].reshape(-1, h, w_)
        trajectory = states = None
        if return_trajectory:
            states = run["states"]  # [n + 1, B, L]; the last state is the result
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
        o = check_options(steps=steps, answer_tokens=answer_tokens, seed=seed)
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
        result = self._generate_text(
            layout, features, o["steps"], 1.0, 1, o["seed"], generator, return_trajectory,
            progress,
        )  # fmt: skip
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
        o = check_options(max_tokens=max_tokens, steps=steps, temperature=temperature,
                          top_k=top_k, seed=seed)  # fmt: skip
        if not isinstance(system_prompt, str):
            raise TypeError(f"system_prompt must be a str, got {type(system_prompt).__name__}")
        prompts = [prompts] if isinstance(prompts, str) else prompts
        layout = text_layout(
            self.tokenizer, prompts, o["max_tokens"], self.config.text_budget, chat,
            system_prompt, max_positions=self.max_positions,
        ).to(self.device)  # fmt: skip
        return self._generate_text(
            layout, None, o["steps"], o["temperature"], o["top_k"], o["seed"], generator,
            return_trajectory, progress,
        )  # fmt: skip

    # -- shared machinery -----------------------------------------------------------------------
    def _generate_text(
        self,
        layout: Layout,
        features: Tensor | None,
        steps: int | None,
        temperature: float,
        top_k: int | None,
        seed: int | None,
        generator: torch.Generator | None,
        return_trajectory: bool,
        progress: bool,
    ) -> TextResult:
        run = self._solve(
            layout,
            "text",
            0.0,
            features,
            steps,
            temperature,
            top_k,
            seed,
            generator,
            return_trajectory,
            progress,
        )
        start = time.perf_counter()
        lo = layout.window[0]
        # Each row's answer starts at its own column (its region), possibly after lo.
        starts = [int(r.nonzero()[0]) - lo for r in layout.region.cpu()]
        rows = run["samples"].tolist()
        cut = [self._cut(row[s:]) for row, s in zip(rows, starts, strict=True)]
        texts, ids = [c[0] for c in cut], [c[1] for c in cut]
        trajectory = None
        if return_trajectory:
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
            logits = read(hidden[:, lo - 1 : hi - 1], shift=False).float()
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
        cfg_scale: float,
        features: Tensor | None,
        steps: int | None,
        temperature: float,
        top_k: int | None,
        seed: int | None,
        generator: torch.Generator | None,
        return_trajectory: bool,
        progress: bool,
    ) -> dict[str, Any]:
        """Sample the layout's region with the ``head`` ("image" / "text") path and logits
        (options already checked; ``temperature=None`` is 1)."""
        temperature = 1.0 if temperature is None else temperature
        if generator is None:
            generator = torch.Generator(self.device)
            if seed is None:
                generator.seed()
            else:
                generator.manual_seed(int(seed))
        elif seed is not None:
            raise ValueError("pass seed or generator, not both")
        if self.config.path == "ar":
            return self._decode_ar(
                layout, head, cfg_scale, features, temperature, top_k, generator,
                return_trajectory, progress,
            )  # fmt: skip
        path = self.image_path if head == "image" else self.text_path
        fn, clock = self._model_fn(layout, head, cfg_scale, features)
        steps = self.config.steps if steps is None else steps
        lo, hi = layout.window
        region = layout.region[:, lo:hi]
        solver = EulerSolver(path)
        start = time.perf_counter()
        x0 = solver.init_state(layout.input_ids[:, lo:hi], region, generator)
        result = solver.solve(
            fn,
            x0,
            steps,
            region,
            generator,
            temperature=temperature,
            top_k=top_k,
            return_trajectory=return_trajectory,
            progress=progress,
        )
        clock.sync()
        total = time.perf_counter() - start
        timings = {
            "nfe": float(result.nfe),
            "model_s": clock.model_s,
            "solver_s": total - clock.model_s,
        }
        out: dict[str, Any] = {"samples": result.samples, "timings": timings}
        if return_trajectory:
            out["states"] = result.states
        return out

    def _decode_ar(
        self,
        layout: Layout,
        head: str,
        cfg_scale: float,
        features: Tensor | None,
        temperature: float,
        top_k: int | None,
        generator: torch.Generator,
        return_trajectory: bool,
        progress: bool,
    ) -> dict[str, Any]:
        start = time.perf_counter()
        run = decode_autoregressive(
            self.model,
            layout,
            head,
            pad_id=self.tokenizer.pad_id,
            cfg_scale=cfg_scale,
            features=features,
            stop_id=self.tokenizer.eos_id if head == "text" else None,
            temperature=temperature,
            top_k=top_k,
            generator=generator,
            return_trajectory=return_trajectory,
            progress=progress,
        )
        total = time.perf_counter() - start
        timings = {"nfe": float(run["nfe"]), "model_s": run["model_s"]}
        timings["solver_s"] = total - run["model_s"]
        out: dict[str, Any] = {"samples": run["samples"], "timings": timings}
        if return_trajectory:
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

    # -- checkpoints ----------------------------------------------------------------------------
    def save_pretrained(self, folder: str | os.PathLike[str]) -> Path:
        """Write a kineflow FUDOKI folder: ``config.json`` (``kineflow_type: fudoki``, the model
        and pipeline configs), ``model.safetensors`` (Janus key names), ``metric.safetensors``
        (``text``, ``image`` tables) and the tokenizer files, swapped in whole: see
        :func:`kineflow.io.save_pretrained_folder` (and its ValueErrors)."""

        def tokenizer_and_tables(temp: Path) -> None:
            self.tokenizer.save(temp)
            atomic_save_safetensors(
                temp / METRIC_FILE,
                {"text": self.text_embeddings, "image": self.image_embeddings},
                {"format": "pt"},
            )

        config = {"model": self.model.config.to_dict(), "pipeline": self.config.to_dict()}
        return save_pretrained_folder(
            folder, self.model.state_dict(), config, KIND, extra=tokenizer_and_tables
        )

    @classmethod
    def from_pretrained(
        cls,
        name: str | os.PathLike[str],
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> FudokiPipeline:
        """:func:`kineflow.load` (a Janus / FUDOKI release, a kineflow folder or a hub id)."""
        from kineflow.pipelines.loading import load

        return load(name, device=device, dtype=dtype)

    @classmethod
    def from_kineflow_folder(cls, folder: str | os.PathLike[str]) -> FudokiPipeline:
        """Read what :meth:`save_pretrained` wrote (see :func:`kineflow.load`)."""
        folder = Path(folder)
        config, weights = load_pretrained_folder(folder, KIND, "FUDOKI checkpoint")
        check_config_keys(config, _SavedConfig, f"{folder / 'config.json'}")
        try:
            model_config = FudokiConfig.from_dict(config["model"])
            pipeline_config = FudokiPipelineConfig.from_dict(config.get("pipeline", {}))
        except (TypeError, ValueError, KeyError) as e:
            raise ValueError(f"{folder / 'config.json'}: {e}") from e
        model = fudoki_model_from_janus(weights, model_config)
        dtypes = {t.dtype for t in weights.values() if t.is_floating_point()}
        if len(dtypes) == 1:  # a bfloat16 save loads as bfloat16 (exact: fp32 holds bf16)
            model.to(dtypes.pop())
        tables = _read_metric_tables(folder / METRIC_FILE)
        tokenizer = TextTokenizer.load(folder)
        provenance = {name: f"{folder / METRIC_FILE}[{name}]" for name in tables}
        return cls(model, tokenizer, tables["text"], tables["image"], pipeline_config, provenance)


def _read_metric_tables(path: Path) -> dict[str, Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"{path.parent} has no {path.name} (the metric tables)")
    try:
        tables = load_file(str(path), device="cpu")
    except Exception as e:  # safetensors raises its own error types for damaged files
        raise ValueError(f"{path} is not a readable safetensors file: {e}") from e
    if set(tables) != {"text", "image"}:
        raise ValueError(
            f"{path} must hold exactly the tensors 'text' and 'image', got {sorted(tables)}"
        )
    return tables


@dataclass
class _SavedConfig:
    """The keys of a kineflow FUDOKI ``config.json`` (for the unknown-key check)."""

    model: dict
    pipeline: dict | None = None
