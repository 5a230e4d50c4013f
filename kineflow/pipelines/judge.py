"""Best-of-N text-to-image with the model judging its own pictures (``judge="self"``).

``text_to_image(prompts, best_of=N, judge="self")`` draws N candidates per prompt in **one**
batched call (the B prompts each repeated N times, consecutively: row ``b·N + j`` is candidate
``j`` of prompt ``b``), scores every candidate with the model's own understanding path and
keeps the highest-scoring one per prompt. ``best_of=1`` is exactly the plain call (no judging).

**The score.** The question ``q = "does the picture show exactly: {prompt}?"`` is asked about
each candidate picture ``x``; with ``ℓ = first_answer_logits(x, q)`` (Float[B·N, V], the model's
logits for the *first answer token*)::

    score(x, prompt) = ℓ[yes] − ℓ[no] = log p(yes | x, q) − log p(no | x, q)
                     = logit of p(yes | x, q, answer ∈ {yes, no})        Float[B·N] → [B, N]
    chosen[b]        = argmax_j score[b, j]   (the first on ties)         Long[B]

Each family supplies only ``first_answer_logits(images, questions) -> Float[M, V]``
(:mod:`kineflow.pipelines.first_answer`): FUDOKI one forward pass with the answer slots at the
path's source state (t = 0, so the first slot's logits are its prediction of x_1 given the
picture and the question); UniFluid the next-token logits after the question (one prompt pass).

**Why yes/no rather than the caption's likelihood.** ``p(prompt | x)`` under the captioning
path mixes how well the picture matches with how likely the *wording* is (prompt length,
GenEval phrasings the models never saw as captions, the order objects are named in), and for
FUDOKI it is not even available: a discrete flow model has no tractable sequence likelihood,
only per-slot predictions given a noisy answer. The yes/no log-odds is one token, read the same
way by both families, cancels the wording's prior (both answers see the same question) and
costs one forward pass per candidate. It is only as good as the model's yes/no answers: a
model never trained on the question answers it near chance; ShapesWorld's training-only
``verify`` questions (:mod:`kineflow.data.shapes.verify`) teach it, answered yes exactly when the
picture shows the prompt's objects and nothing else (docs/best_of.md).

The judge reads only the pictures and the prompts: no detector, no ground truth.
"""

from __future__ import annotations

import functools
import inspect
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from PIL import Image
from torch import Tensor

from kineflow.data.shapes.language import VERIFY_QUESTION
from kineflow.inputs.checks import check_options
from kineflow.pipelines.results import ImageResult

__all__ = ["JUDGES", "QUESTION", "check_best_of", "keep_best", "self_judged", "self_scores"]

#: The judges ``text_to_image(judge=...)`` accepts.
JUDGES = ("self",)
#: The question the model answers about each candidate: ShapesWorld's verification question,
#: which training can teach (``data.question_weights: {verify: w}``).
QUESTION = VERIFY_QUESTION


def check_best_of(best_of: Any, judge: Any) -> int:
    """``best_of`` as an int >= 1, after checking ``judge``.

    Raises:
        ValueError: ``best_of`` not an integer >= 1, or a judge other than ``"self"`` (each
            message names the option and the value given).
    """
    n = check_options(best_of=best_of)["best_of"]
    if n is None:
        raise ValueError("best_of must be an integer >= 1, got None")
    if not isinstance(judge, str) or judge not in JUDGES:
        raise ValueError(
            f"judge must be one of {', '.join(map(repr, JUDGES))} (the model judging its own "
            f"pictures), got {judge!r}"
        )
    return n


@torch.no_grad()
def self_scores(
    pipe: Any, images: Sequence[Image.Image], prompts: Sequence[str], batch_size: int = 64
) -> Tensor:
    """Float[M]: ``ℓ[yes] − ℓ[no]`` (module docstring) of ``images[i]`` for ``prompts[i]``,
    from ``pipe.first_answer_logits``, in batches of ``batch_size``."""
    if len(images) != len(prompts):
        raise ValueError(f"got {len(images)} picture(s) for {len(prompts)} prompt(s)")
    tok = pipe.tokenizer
    (yes,), (no,) = tok.encode("yes", bos=False), tok.encode("no", bos=False)
    out = []
    for lo in range(0, len(images), batch_size):
        questions = [QUESTION.format(prompt=p.strip()) for p in prompts[lo : lo + batch_size]]
        logits = pipe.first_answer_logits(list(images[lo : lo + batch_size]), questions).float()
        out.append((logits[:, yes] - logits[:, no]).cpu())
    return torch.cat(out)


def keep_best(result: ImageResult, scores: Tensor) -> ImageResult:
    """The candidates of ``result`` (B·N rows, see the module docstring) reduced to the
    highest-scoring one per prompt; ``scores`` Float[B, N]. The result records
    ``candidate_scores`` [B, N], ``chosen`` (each kept candidate's index j) and ``scores``
    (its score)."""
    B, N = scores.shape
    chosen = scores.argmax(1)  # the first maximum on ties
    rows = (torch.arange(B) * N + chosen).tolist()
    trajectory = None if result.trajectory is None else [result.trajectory[r] for r in rows]
    states = None if result.states is None else result.states[:, rows]
    return ImageResult(
        images=[result.images[r] for r in rows], codes=result.codes[rows],
        trajectory=trajectory, states=states, timings=dict(result.timings),
        scores=[float(scores[b, j]) for b, j in enumerate(chosen.tolist())],
        chosen=chosen.tolist(), candidate_scores=scores,
    )  # fmt: skip


_BEST_OF_DOC = """
        ``best_of=N`` (``judge="self"``): draw N candidates per prompt and keep the one the
        model itself rates likeliest to show the prompt (:mod:`kineflow.pipelines.judge`).
"""


def self_judged(method: Callable[..., ImageResult]) -> Callable[..., ImageResult]:
    """Decorator of a pipeline's ``text_to_image``: adds ``best_of`` (default 1) and ``judge``
    (default ``"self"``) as in the module docstring; every other option goes to the sampling
    call unchanged (UniFluid's ``order`` Long[B, L] is repeated per candidate).

    With ``best_of > 1`` the result's ``timings`` gain ``judge_s`` (the scoring) and
    ``candidates`` (N); its ``scores`` / ``chosen`` / ``candidate_scores`` are set."""

    @functools.wraps(method)
    def text_to_image(
        self: Any,
        prompts: str | Sequence[str],
        *,
        best_of: int = 1,
        judge: str = "self",
        **options: Any,
    ) -> ImageResult:
        n = check_best_of(best_of, judge)
        if n == 1:
            return method(self, prompts, **options)
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        self.check_prompts(prompts)  # errors name each prompt's index in the caller's list
        if options.get("order") is not None:
            options["order"] = options["order"].repeat_interleave(n, 0)
        many = [p for p in prompts for _ in range(n)]
        result = method(self, many, **options)
        start = time.perf_counter()
        scores = self_scores(self, result.images, many).view(len(prompts), n)
        best = keep_best(result, scores)
        best.timings.update(judge_s=time.perf_counter() - start, candidates=float(n))
        return best

    signature = inspect.signature(method)
    params = [p for p in signature.parameters.values() if p.kind is not p.VAR_KEYWORD]
    extra = [
        inspect.Parameter("best_of", inspect.Parameter.KEYWORD_ONLY, default=1, annotation=int),
        inspect.Parameter("judge", inspect.Parameter.KEYWORD_ONLY, default="self", annotation=str),
    ]
    text_to_image.__signature__ = signature.replace(parameters=params + extra)  # type: ignore[attr-defined]
    text_to_image.__doc__ = (method.__doc__ or "") + _BEST_OF_DOC
    return text_to_image
