"""Evidence for self-correction: do tokens change after the sampler first sets them?

Token level, on a trajectory ``states`` Long[S, B, L] (the ids at every grid time, the
source draw first). A token is *set* at the first step where it takes a value it did not have
at the start: for a masked path, when it leaves the mask; for FUDOKI's mask-free path, its
first jump away from the uniform source draw; for AR decoding, when the decoder reaches it.
It is *revised* when it changes again at any later step. The masked path and AR decoding never
revise a token (0 by construction); a mask-free path can.

Picture level, with the ShapesWorld detector: a sample is *corrected* when the picture decoded
from some intermediate state in the second half of the trajectory fails its prompt (e.g.
"red circle: want exactly 2, found 1") and the final picture passes. The converse (passing
midway, failing at the end) is counted too, so the two can be compared.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image
from torch import Tensor

from kineflow.data.shapes.prompts import Prompt, check
from kineflow.eval.detector import detect

__all__ = ["picture_corrections", "token_revisions"]


def token_revisions(states: Tensor) -> dict[str, Any]:
    """Token-level statistics of a trajectory ``states`` Long[S, B, L] (S >= 2).

    Returns:
        ``revised_fraction``: tokens that change after first being set;
        ``set_value_wrong_fraction``: tokens whose value right after being set is not their
        final value (each of these was revised);
        ``mean_changes_per_token``: value changes over the whole trajectory;
        ``never_set_fraction``: tokens that keep their source value to the end;
        ``settled_fraction``: per grid time, tokens already at their final value.
    """
    if states.ndim != 3 or states.shape[0] < 2:
        raise ValueError(f"states must be [S >= 2, B, L], got shape {tuple(states.shape)}")
    changed = states[1:] != states[:-1]  # [S-1, B, L]
    # Changes counted from the first one on: the first is the setting, the rest revisions.
    count = changed.long().cumsum(0)
    ever_set = count[-1] > 0
    revised = count[-1] > 1
    first = changed.long().argmax(0)  # step index of the first change (0 when none)
    set_value = states[1:].gather(0, first[None]).squeeze(0)
    wrong_when_set = ever_set & (set_value != states[-1])
    at_final = states == states[-1]
    return {
        "revised_fraction": float(revised.float().mean()),
        "set_value_wrong_fraction": float(wrong_when_set.float().mean()),
        "mean_changes_per_token": float(changed.sum(0).float().mean()),
        "never_set_fraction": float((~ever_set).float().mean()),
        "settled_fraction": [round(float(f), 4) for f in at_final.float().mean((1, 2))],
    }


def picture_corrections(
    prompts: Sequence[Prompt], frames: Sequence[Sequence[Image.Image]], start: float = 0.5
) -> dict[str, Any]:
    """Picture-level corrections over ``frames[b]`` (the decoded trajectory of sample ``b``,
    prompted by ``prompts[b]``), looking at frames from ``start`` of the way on.

    Returns counts (``corrected``, ``broken``: passing midway then failing, ``samples``) and
    ``examples``: per corrected sample, its index, the frame where it last failed, that frame's
    failures and the frame count.
    """
    if len(prompts) != len(frames):
        raise ValueError(f"{len(prompts)} prompts but {len(frames)} trajectories")
    corrected, broken, examples = 0, 0, []
    for b, (prompt, run) in enumerate(zip(prompts, frames, strict=True)):
        first = int(start * (len(run) - 1))
        shown = list(run[first:])
        scenes = detect(np.stack([np.asarray(f) for f in shown]))
        failures = [check(prompt, s) for s in scenes]
        final_ok = not failures[-1]
        mid_failed = [k for k, f in enumerate(failures[:-1]) if f]
        if final_ok and mid_failed:
            corrected += 1
            k = mid_failed[-1]
            examples.append({
                "sample": b, "prompt": prompt.text, "failed_frame": first + k,
                "frames": len(run), "failures": failures[k],
            })  # fmt: skip
        elif not final_ok and len(mid_failed) < len(failures) - 1:
            broken += 1
    return {"samples": len(prompts), "corrected": corrected, "broken": broken,
            "examples": examples}  # fmt: skip
