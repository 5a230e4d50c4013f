"""Classifier-free guidance for discrete denoisers.

    logits = (1 + w) · logits(x | c) − w · logits(x | ∅)

``w = 0`` is the conditional model; FUDOKI uses ``w = 5`` on its image logits. The
unconditional input is the same sequence with the prompt span replaced by the pad token.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping

import torch
from torch import Tensor


def classifier_free_guidance(cond: Tensor, uncond: Tensor, scale: float) -> Tensor:
    """``(1 + scale) · cond − scale · uncond`` for two logits tensors of the same shape."""
    if cond.shape != uncond.shape:
        raise ValueError(
            f"conditional and unconditional logits differ in shape: {tuple(cond.shape)} vs "
            f"{tuple(uncond.shape)}"
        )
    return torch.lerp(uncond, cond, 1.0 + scale)  # = uncond + (1 + w)(cond − uncond)


def blank_span(span: Tensor, pad_id: int) -> Callable[[Tensor], Tensor]:
    """The unconditional input maker: ``x -> x`` with positions in ``span`` (Bool[B, N]) set to
    ``pad_id``."""
    return lambda x: x.masked_fill(span, pad_id)


class GuidedModel:
    """Wrap ``model_fn(x, t)`` so each call evaluates the conditional and unconditional inputs
    in one batch of 2B and returns guided logits (one model call per solver step).

    Args:
        model_fn: ``(Long[B, N], Float[B]) -> Float[B, N, V]`` or a mapping of such per modality.
        unconditional: ``x -> x_uncond`` (e.g. :func:`blank_span`).
        scale: guidance weight ``w``; 0 skips the unconditional half entirely.
        modalities: for mapping outputs, the names to guide (default: all); the others keep
            their conditional logits (FUDOKI guides image logits only).
    """

    def __init__(
        self,
        model_fn: Callable[[Tensor, Tensor], Tensor | Mapping[str, Tensor]],
        unconditional: Callable[[Tensor], Tensor],
        scale: float,
        modalities: Collection[str] | None = None,
    ) -> None:
        self.model_fn = model_fn
        self.unconditional = unconditional
        self.scale = float(scale)
        self.modalities = None if modalities is None else set(modalities)

    def __call__(self, x: Tensor, t: Tensor) -> Tensor | dict[str, Tensor]:
        if self.scale == 0:
            return self.model_fn(x, t)
        both = self.model_fn(torch.cat([x, self.unconditional(x)]), torch.cat([t, t]))
        if isinstance(both, Tensor):
            return classifier_free_guidance(*both.chunk(2), self.scale)
        out = {}
        for name, logits in both.items():
            cond, uncond = logits.chunk(2)
            guide = self.modalities is None or name in self.modalities
            out[name] = classifier_free_guidance(cond, uncond, self.scale) if guide else cond
        return out
