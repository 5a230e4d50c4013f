"""Learning-rate schedules."""

from __future__ import annotations

import math


def warmup_cosine(step: int, total: int, warmup: int, min_ratio: float = 0.1) -> float:
    """LR multiplier: linear warm-up over ``warmup`` steps, then cosine decay to ``min_ratio``.

    ``m(s) = (s + 1) / warmup`` for ``s < warmup``, else
    ``min_ratio + (1 - min_ratio) (1 + cos(pi p)) / 2``, ``p = (s - warmup) / (total - warmup)``.
    """
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
