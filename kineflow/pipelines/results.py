"""What the sampling pipelines return: pictures or texts, with optional trajectories."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image
from torch import Tensor

from kineflow.inputs.images import save_gif, save_strip

__all__ = ["ImageResult", "TextResult"]


@dataclass
class ImageResult:
    """Output of the pipelines' ``text_to_image`` (and UniFluid's ``edit``).

    Attributes:
        images: one PIL picture per prompt.
        codes: FUDOKI: Long[B, h, w], the VQ ids; UniFluid: Float[B, L, C], the latent tokens.
        trajectory: per prompt, the pictures along the way (FUDOKI: the decoded ``x_t`` at
            every grid time, ``steps + 1`` frames, noise first; UniFluid: the canvas filling
            in token by token). None unless the call had ``return_trajectory=True``.
        states: FUDOKI only: Long[steps + 1, B, h·w], the ids at every grid time; None unless
            ``return_trajectory=True``.
        timings: seconds spent in the model, in the solver and in decoding, and the NFE
            (with ``best_of`` > 1 also ``judge_s`` and ``candidates``).
        scores: with ``best_of`` > 1 (:mod:`kineflow.pipelines.judge`): per prompt, the kept
            candidate's self-judge score (yes − no logit); else None.
        chosen: with ``best_of`` > 1: per prompt, the kept candidate's index among its N.
        candidate_scores: with ``best_of`` > 1: Float[B, N], every candidate's score.
    """

    images: list[Image.Image]
    codes: Tensor
    trajectory: list[list[Image.Image]] | None = None
    states: Tensor | None = None
    timings: dict[str, float] = field(default_factory=dict)
    scores: list[float] | None = None
    chosen: list[int] | None = None
    candidate_scores: Tensor | None = None

    def save(
        self,
        folder: str | os.PathLike[str],
        prefix: str = "sample",
        scale: int = 1,
        first_index: int = 0,
    ) -> list[Path]:
        """Write ``{prefix}_{k}.png`` and, with a trajectory, ``{prefix}_{k}_refine.gif`` and a
        ``{prefix}_{k}_refine.png`` strip (at most 12 frames), ``k = first_index + i`` for the
        i-th picture; ``scale`` enlarges with nearest-neighbour pixels. Returns the paths."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        written = []
        for i, image in enumerate(self.images):
            name = f"{prefix}_{first_index + i}"
            written.append(folder / f"{name}.png")
            size = (image.width * scale, image.height * scale)
            big = image.resize(size, Image.Resampling.NEAREST)
            big.save(written[-1])
            if self.trajectory is not None:
                frames = self.trajectory[i]
                written.append(save_gif(frames, folder / f"{name}_refine.gif", scale=scale))
                strip = [frames[k] for k in _spread(len(frames), 12)]
                written.append(save_strip(strip, folder / f"{name}_refine.png", scale=scale))
        return written


@dataclass
class TextResult:
    """Output of the pipelines' ``answer`` / ``caption`` and FUDOKI's ``generate_text``.

    Attributes:
        texts: one answer per row, cut at the first EOS.
        ids: per row, the token ids of that answer (EOS excluded).
        trajectory: FUDOKI only: per row, the decoded answer after every step (``steps + 1``
            strings, the uniform noise first). None unless the call had
            ``return_trajectory=True``; UniFluid decodes left to right and refuses that option.
        timings: as :attr:`ImageResult.timings`.
    """

    texts: list[str]
    ids: list[list[int]]
    trajectory: list[list[str]] | None = None
    timings: dict[str, float] = field(default_factory=dict)


def _spread(n: int, k: int) -> list[int]:
    """At most ``k`` indices spread evenly over ``range(n)``, first and last included."""
    if n <= k:
        return list(range(n))
    return sorted({round(i * (n - 1) / (k - 1)) for i in range(k)})
