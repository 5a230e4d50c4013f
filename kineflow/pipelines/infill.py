"""Infilling: regenerate only part of a picture (or of a text), conditioned on the rest.

**Pixel mask → token cells.** A mask is a picture (or array) the size of its source picture;
a pixel is *masked* (to be regenerated) when it is white (luminance >= 128) in a picture file /
PIL image, or nonzero / True in an array or tensor. A token's cell is regenerated when **any**
of its pixels is masked (max-pooling the mask onto the token grid,
:func:`token_cells`). "Any" rather than "at least half" because every pixel the user marked must
be free to change: with the half rule, an object's last few pixels in a neighbouring token
would stay and leave a fragment of the old object. The price is that a token partly outside the
mask changes too (so it is the *kept tokens* whose codes are guaranteed to stay exactly; their
decoded pixels may differ slightly near the region, since the decoders mix neighbouring tokens).
On the shipped 32 px models a FUDOKI token is 4×4 px and a UniFluid token 8×8 px.

**FUDOKI** (:class:`FudokiInfill`): the picture is VQ-encoded, the codes go into the
text-to-image layout, and the solver's region is narrowed to the masked cells: those start from
the path's source (uniform over the codebook for the metric path), the kept ones sit in
``x_init`` and never move, and every model call reads the prompt and all kept codes. Text
infill (:meth:`FudokiInfill.infill_text`) does the same on ``BOS text`` with the blanks as the
region, read with the text head.

**UniFluid** (:class:`UnifluidInfill`): the picture is encoded to KL tokens; the generation
order puts the kept cells first and the masked ones after (each group in the model's own order,
random or raster, from :func:`~kineflow.models.unifluid.generation_order`); the kept tokens are
fed in (teacher forcing) instead of sampled, so every masked token is generated conditioned on
the prompt and all kept tokens. The random-order model was trained on every such prefix.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from kineflow.data.example import image_to_tensor
from kineflow.inputs.checks import check_options
from kineflow.inputs.images import as_image_list, load_image
from kineflow.inputs.layout import Layout, text_to_image_layout
from kineflow.models.unifluid import generation_order
from kineflow.pipelines.results import ImageResult, TextResult
from kineflow.pipelines.sampling_options import SamplingOptions

__all__ = ["BLANK", "FudokiInfill", "UnifluidInfill", "infill_order", "load_mask", "token_cells"]

#: The marker of a blank in :meth:`FudokiInfill.infill_text`.
BLANK = "[blank]"
MaskLike = str | os.PathLike[str] | Image.Image | np.ndarray | Tensor


def load_mask(mask: MaskLike) -> np.ndarray:
    """A mask as Bool[H, W] (see the module docstring for which pixels are masked).

    Raises:
        ValueError: an unreadable file, or an array that is not 2-D (or [H, W, 3]).
        TypeError: anything else.
    """
    if isinstance(mask, Tensor):
        mask = mask.detach().cpu().numpy()
    if isinstance(mask, np.ndarray):
        if mask.ndim == 3 and mask.shape[2] == 3:
            mask = mask.any(axis=2)
        if mask.ndim != 2:
            raise ValueError(f"a mask array must be [H, W], got shape {list(mask.shape)}")
        return mask != 0
    picture = load_image(mask)  # paths and PIL images; raises for missing files
    return np.asarray(picture.convert("L")) >= 128


def token_cells(mask: np.ndarray, grid: tuple[int, int]) -> Tensor:
    """Bool[H, W] pixels -> Bool[h, w] token cells: a cell is True when any of its pixels is
    (adaptive max-pooling; when ``h`` does not divide ``H`` a border pixel counts for both
    cells it touches)."""
    x = torch.from_numpy(np.ascontiguousarray(mask)).float()[None, None]
    return torch.nn.functional.adaptive_max_pool2d(x, grid)[0, 0] > 0


def _triples(images: Any, masks: Any, prompts: str | Sequence[str]) -> tuple[list, list, list]:
    """Pictures, masks and prompts as three lists of one length; a single one of each is
    repeated to the longest list."""
    images, masks = as_image_list(images), as_image_list(masks)
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    n = max(len(images), len(masks), len(prompts))
    lists = []
    for name, items in (("image", images), ("mask", masks), ("prompt", prompts)):
        if len(items) not in (1, n):
            raise ValueError(f"got {len(items)} {name}(s) for {n} infill(s): give one or {n}")
        lists.append(items * n if len(items) == 1 else items)
    return lists[0], lists[1], lists[2]


def _cells(pictures: list[Image.Image], masks: list, grid: tuple[int, int]) -> Tensor:
    """Bool[B, h·w]: each mask (the size of its picture) on the token grid (row-major)."""
    out = []
    for i, (picture, mask) in enumerate(zip(pictures, masks, strict=True)):
        m = load_mask(mask)
        if m.shape != (picture.height, picture.width):
            raise ValueError(
                f"mask {i} is {m.shape[1]}x{m.shape[0]} but its picture is "
                f"{picture.width}x{picture.height}: the mask must have the picture's size"
            )
        out.append(token_cells(m, grid).flatten())
    return torch.stack(out)


def _square(pictures: list[Image.Image], size: int) -> Tensor:
    """Float[B, 3, S, S] in [-1, 1]: square pictures resized (bicubic) to ``size``."""
    out = []
    for i, p in enumerate(pictures):
        if p.width != p.height:
            raise ValueError(f"image {i} is {p.width}x{p.height}: infill takes square pictures")
        if p.size != (size, size):
            p = p.resize((size, size), Image.Resampling.BICUBIC)
        out.append(image_to_tensor(p))
    return torch.stack(out)


def infill_order(keep: Tensor, kind: str, generator: torch.Generator | None = None) -> Tensor:
    """Long[B, L]: a generation order (``kind`` "random" / "raster", as the model's) with the
    kept cells (``keep`` Bool[B, L]) first and the others after, each group in that order."""
    B, L = keep.shape
    order = generation_order(B, L, kind, generator)
    # A stable sort on "is generated" keeps the permutation's order within each group.
    rank = torch.argsort((~keep).gather(1, order).int(), dim=1, stable=True)
    return order.gather(1, rank)


class FudokiInfill:
    """FUDOKI's ``infill`` and ``infill_text`` (mixed into
    :class:`~kineflow.pipelines.fudoki.FudokiPipeline`; module docstring)."""

    @torch.no_grad()
    def encode_images(self, images: Any) -> Tensor:
        """Square pictures (paths, PIL, uint8 arrays) -> VQ codes Long[B, h, w]."""
        S = self.model.config.gen_vision.image_size
        x = _square([load_image(im) for im in as_image_list(images)], S)
        return self.model.gen_vision_model.encode(x.to(self.device, self.dtype))

    @torch.no_grad()
    def infill(
        self,
        images: Any,
        masks: Any,
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
        """``images[i]`` with the token cells under ``masks[i]`` regenerated for
        ``prompts[i]`` (one of any of the three is repeated). The result's ``codes``
        Long[B, h, w] equal the pictures' VQ codes outside the masks exactly; a mask over
        nothing returns those codes. Options as :meth:`text_to_image`.

        Raises:
            ValueError: a mask not of its picture's size, a picture that is not square, a
                missing file, a bad option or prompt, or the ``"ar"`` path (left to right, it
                cannot condition on what comes after the region).
        """
        if self.config.path == "ar":
            raise ValueError("infill needs the flow solver: this pipeline's path is 'ar'")
        options = SamplingOptions(steps=steps, cfg_scale=cfg_scale, temperature=temperature,
                                  top_k=top_k, seed=seed, generator=generator,
                                  return_trajectory=return_trajectory,
                                  progress=progress)  # fmt: skip
        images, masks, prompts = _triples(images, masks, prompts)
        layout = text_to_image_layout(
            self.tokenizer, prompts, self.num_image_tokens, self.config.text_budget,
            max_positions=self.max_positions,
        ).to(self.device)  # fmt: skip
        pictures = [load_image(im) for im in images]
        S = self.model.config.gen_vision.image_size
        cells = _cells(pictures, masks, self.model.gen_vision_model.tokens_shape(S))
        codes = self.encode_images(pictures)
        # The image span holds the source codes; only the masked cells stay in the region.
        ids, region = layout.input_ids.clone(), layout.region.clone()
        ids[layout.region] = codes.flatten()
        region[layout.region] = cells.flatten().to(self.device)
        layout = Layout(**{**vars(layout), "input_ids": ids, "region": region})
        if not bool(region.any()):  # nothing to regenerate: no model call
            lo, hi = layout.window
            run: dict[str, Any] = {"samples": ids[:, lo:hi], "timings": {"nfe": 0.0}}
            if return_trajectory:
                run["states"] = ids[None, :, lo:hi]
            return self._image_result(run)
        w = self.config.cfg_scale if cfg_scale is None else options.cfg_scale
        return self._image_result(self._solve(layout, "image", options=options, cfg_scale=w))

    @torch.no_grad()
    def infill_text(
        self,
        texts: str | Sequence[str],
        *,
        blank_tokens: int | Sequence[int] = 2,
        steps: int | None = None,
        temperature: float = 1.0,
        top_k: int | None = 1,
        seed: int | None = None,
        generator: torch.Generator | None = None,
        return_trajectory: bool = False,
        progress: bool = False,
    ) -> TextResult:
        """Fill every :data:`BLANK` (``"[blank]"``) of each text with ``blank_tokens`` text
        tokens (one number for every blank, or one per blank of each text), read as
        ``BOS text`` with the blanks as the region: each fill sees the words on both sides.
        Greedy targets by default. Words carry their leading space (``" red"``), so spaces
        just before a blank are dropped. Returns the filled texts; ``ids`` are each text's
        fills, blank after blank.

        Raises:
            ValueError: a text without a blank, a wrong count of ``blank_tokens``, or a text
                longer than the text budget.
        """
        options = SamplingOptions(steps=steps, temperature=temperature, top_k=top_k, seed=seed,
                                  generator=generator, return_trajectory=return_trajectory,
                                  progress=progress)  # fmt: skip
        texts = [texts] if isinstance(texts, str) else list(texts)
        rows, slots = [], []
        for i, text in enumerate(texts):
            if not isinstance(text, str) or BLANK not in text:
                raise ValueError(f"text {i} has no {BLANK} to fill: {text!r}")
            parts = text.split(BLANK)
            lengths = [blank_tokens] * (len(parts) - 1) if isinstance(blank_tokens, int) \
                else list(blank_tokens)  # fmt: skip
            if len(lengths) != len(parts) - 1:
                raise ValueError(f"text {i} has {len(parts) - 1} blanks but blank_tokens gives "
                                 f"{len(lengths)} lengths")  # fmt: skip
            ids, where = [self.tokenizer.bos_id], []
            for part, n in zip(parts, [*lengths, 0], strict=True):
                n = check_options(max_tokens=n)["max_tokens"] if n else 0
                ids += self.tokenizer.encode(part.rstrip(" ") if n else part)
                where += range(len(ids), len(ids) + n)
                ids += [self.tokenizer.pad_id] * n
            if len(ids) > min(self.config.text_budget, self.max_positions):
                raise ValueError(f"text {i} needs {len(ids)} tokens with its blanks, more than "
                                 f"the text budget {self.config.text_budget}")  # fmt: skip
            rows.append(ids)
            slots.append(where)
        layout = _text_layout(rows, slots, self.tokenizer.pad_id).to(self.device)
        run = self._solve(layout, "text", options=options, cfg_scale=0.0)
        lo, hi = layout.window
        filled = layout.input_ids.clone()
        filled[:, lo:hi] = run["samples"]
        region = layout.region.cpu()
        attention = layout.attention_mask.cpu()
        out_texts = [
            self.tokenizer.decode(r[a]) for r, a in zip(filled.cpu(), attention, strict=True)
        ]
        fills = [r[m].tolist() for r, m in zip(filled.cpu(), region, strict=True)]
        trajectory = None
        if return_trajectory:
            trajectory = []
            for b in range(len(rows)):
                row = filled[b].clone()
                steps_b = []
                for state in run["states"]:
                    row[lo:hi] = state[b]
                    steps_b.append(self.tokenizer.decode(row[layout.attention_mask[b]]))
                trajectory.append(steps_b)
        return TextResult(out_texts, fills, trajectory, run["timings"])


def _text_layout(rows: list[list[int]], slots: list[list[int]], pad_id: int) -> Layout:
    """Left-padded ``rows`` whose positions ``slots`` are the region (no image, no prompt
    span: text infill is not guided)."""
    B, N = len(rows), max(len(r) for r in rows)
    ids = torch.full((B, N), pad_id, dtype=torch.long)
    attention = torch.zeros(B, N, dtype=torch.bool)
    region = torch.zeros(B, N, dtype=torch.bool)
    for b, (row, where) in enumerate(zip(rows, slots, strict=True)):
        off = N - len(row)
        ids[b, off:] = torch.tensor(row)
        attention[b, off:] = True
        region[b, [off + k for k in where]] = True
    cols = region.any(0).nonzero().flatten()
    return Layout(ids, attention, region, torch.zeros_like(region), None, None,
                  (int(cols[0]), int(cols[-1]) + 1), [len(r) for r in rows])  # fmt: skip


class UnifluidInfill:
    """UniFluid's ``infill`` (mixed into :class:`~kineflow.pipelines.unifluid.UnifluidPipeline`;
    module docstring)."""

    @torch.no_grad()
    def infill(
        self,
        images: Any,
        masks: Any,
        prompts: str | Sequence[str],
        *,
        cfg_scale: float | None = None,
        temperature: float | None = None,
        seed: int | None = None,
        return_trajectory: bool = False,
        frames: int = 16,
        progress: bool = False,
    ) -> ImageResult:
        """``images[i]`` with the tokens under ``masks[i]`` generated anew for ``prompts[i]``
        after the kept ones (module docstring). The result's ``codes`` Float[B, L, C] equal
        the pictures' KL tokens (:meth:`encode`) outside the masks exactly. Options as
        :meth:`text_to_image`; the trajectory shows the kept cells first.

        Raises:
            ValueError: a mask not of its picture's size, a non-square picture, a missing file,
                a bad option or prompt.
        """
        options = SamplingOptions(cfg_scale=cfg_scale, temperature=temperature, seed=seed,
                                  return_trajectory=return_trajectory,
                                  progress=progress)  # fmt: skip
        frames = check_options(frames=frames)["frames"]
        images, masks, prompts = _triples(images, masks, prompts)
        ids, mask = self._left_pad(self._prompt_rows(prompts, "prompt", image=False))
        pictures = [load_image(im) for im in images]
        grid = self.model.config.vae.grid_size
        keep = ~_cells(pictures, masks, (grid, grid))
        tokens = self.encode(pictures)
        order = infill_order(keep, self.model.config.order, self._generator(options.seed))
        return self._images(ids, mask, self._blank(ids, mask), options, frames=frames,
                            order=order, keep=(tokens, keep.to(self.device)))  # fmt: skip
