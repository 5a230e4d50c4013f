"""One solver step with fixed shapes and no host reads: the step a GPU wants.

The step is the one of :mod:`kineflow.flow.solver` (draw ``x_1`` from the model, total
unit-clock rate ``λ``, jump with probability ``1 − exp(−Δs·λ)`` to a state drawn from the
rates), computed for **all** M positions being generated, whatever the data:

* every position draws a jump uniform and a destination, and ``torch.where`` keeps the old
  token where it does not jump: no ``jump.any()`` test, no boolean compaction ``x[jump]``, so
  every tensor's shape is known from ``M`` and ``V`` alone;
* the metric path computes ``p_t(·|x_1)`` for every position, without the CPU step's
  de-duplication of repeated targets (``torch.unique`` has a data-dependent shape) and without
  testing ``β_t`` for infinity on the host (:meth:`DiscretePath.fixed_shape_unit_rates`);
* bad logits (NaN, +inf, or no valid target left) are not checked on the host: the step
  returns a Bool[M] flag and carries on with a uniform row in their place; the solver reads the
  flags once, after the last step, and raises then;
* all random numbers are drawn *before* the step (:func:`draw_noise`), so the step itself is a
  pure tensor function that ``torch.compile(fullgraph=True)`` or a CUDA graph can capture.

Two exact samplers for the categorical draws:

* ``"inverse_cdf"``: :func:`~kineflow.flow.sampling.categorical`, one Float64 uniform per row,
  the CPU solver's sampler. With the same generator it consumes the random stream in the same
  order as the CPU step (target, jump, destination), so where every position jumps (or none
  is random) both steps give the same samples.
* ``"race"``: :func:`~kineflow.flow.sampling.race`, ``argmax w/E`` with Exp(1) noise Float[M, V]:
  one elementwise pass and one ``argmax``, no prefix sums or searches; more random numbers, but
  on a GPU those are cheap and the kernels few.

Both give the same next-state law as the CPU step (``tests/flow/test_static_step.py`` checks it
against the exact transition).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from kineflow.flow.jumps import jump_probability
from kineflow.flow.path import DiscretePath
from kineflow.flow.sampling import categorical, race, uniforms, widened

Sampler = Literal["inverse_cdf", "race"]
SAMPLERS: tuple[str, ...] = ("inverse_cdf", "race")


@dataclass
class StepNoise:
    """The random numbers of one fixed-shape step over M positions.

    Attributes:
        target: for the ``x_1`` draw; ``None`` when it is greedy. ``"inverse_cdf"``:
            Float64[M, 1] uniforms; ``"race"``: Float[M, K] Exp(1), K = top-k or V.
        jump: Float[M] uniforms, compared with the jump probabilities; ``None`` on the last step.
        move: for the destination of a jump; ``None`` on the last step. ``"inverse_cdf"``:
            Float64[M, 1]; ``"race"``: Float[M, V].
    """

    target: Tensor | None
    jump: Tensor | None
    move: Tensor | None


def is_greedy(temperature: float, top_k: int | None) -> bool:
    """Temperature 0 or top-1 draws ``x_1 = argmax``, consuming no randomness."""
    return temperature == 0 or top_k == 1


def exponentials(
    shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device | str
) -> Tensor:
    """Float[shape] i.i.d. Exp(1), kept above 0 so that ``w / E`` is never ``0/0``."""
    e = torch.empty(shape, device=device).exponential_(generator=generator)
    return e.clamp_(min=torch.finfo(e.dtype).tiny)


def draw_noise(
    sampler: Sampler,
    rows: int,
    vocab_size: int,
    *,
    temperature: float,
    top_k: int | None,
    final: bool,
    generator: torch.Generator | None,
    device: torch.device | str,
) -> StepNoise:
    """Draw the random numbers of one step for ``rows`` positions, in the CPU step's order."""
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
    width = vocab_size if top_k is None else min(top_k, vocab_size)

    def one(columns: int) -> Tensor:
        if sampler == "race":
            return exponentials((rows, columns), generator, device)
        return uniforms(rows, generator, device)

    target = None if is_greedy(temperature, top_k) else one(width)
    if final:
        return StepNoise(target, None, None)
    jump = torch.rand(rows, generator=generator, device=device)
    return StepNoise(target, jump, one(vocab_size))


def _draw(sampler: Sampler, weights: Tensor, noise: Tensor) -> Tensor:
    if sampler == "race":
        return race(weights, noise)
    return categorical(weights, u=noise)


def draw_targets(
    logits: Tensor,
    noise: Tensor | None,
    *,
    temperature: float,
    top_k: int | None,
    sampler: Sampler,
) -> Tensor:
    """``x_1`` per row from Float[M, V] logits, as :func:`~kineflow.flow.sampling.sample_logits`
    does (temperature, then top-k, then softmax), with pre-drawn ``noise``: Long[M]."""
    if is_greedy(temperature, top_k):
        return logits.argmax(-1)
    if temperature != 1:
        logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        values, index = logits.topk(top_k, dim=-1)
        choice = _draw(sampler, torch.softmax(values, dim=-1), noise)
        return index.gather(-1, choice.unsqueeze(-1)).squeeze(-1)
    return _draw(sampler, torch.softmax(logits, dim=-1), noise)


def static_step(
    path: DiscretePath,
    rate: str,
    x_t: Tensor,
    logits: Tensor,
    t: Tensor,
    t_next: Tensor,
    noise: StepNoise,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    final: bool = False,
    sampler: Sampler = "race",
) -> tuple[Tensor, Tensor, Tensor]:
    """One step of ``M`` positions from ``t`` to ``t_next`` with fixed shapes.

    Args:
        path: the positions' path; rate: the clock increment (``"integrated"``, ``"euler"``,
            ``"official"``; see :mod:`kineflow.flow.solver`).
        x_t: Long[M], the current tokens; logits: Float[M, V], the model's predictions of x_1.
        t, t_next: 0-d float tensors.
        noise: from :func:`draw_noise` with the same sampler, temperature, top-k and ``final``.
        final: the last step of a grid ending at 1: move to ``path.final_state(x_t, x_1)``.
    Returns:
        ``(x_next Long[M], x_1 Long[M], bad Bool[M])``; ``bad`` marks rows whose logits had
        NaN or +inf, or no valid target: their ``x_1`` was drawn from a uniform stand-in.
    """
    logits = path.without_invalid_targets(widened(logits))
    # max() propagates NaN and +inf, and is -inf only when no valid target is left.
    bad = ~torch.isfinite(logits.amax(-1))
    logits = torch.where(bad.unsqueeze(-1), torch.zeros_like(logits), logits)
    x1 = draw_targets(logits, noise.target, temperature=temperature, top_k=top_k, sampler=sampler)
    if final:
        return path.final_state(x_t, x1), x1, bad
    rates = path.fixed_shape_unit_rates(x_t, x1, t)
    total = rates.sum(-1)
    p_jump = jump_probability(path, rate, t, t_next, total)
    # Rows that cannot move draw from a stand-in (never used): the samplers need a positive row.
    weights = torch.where((total > 0).unsqueeze(-1), rates, torch.ones_like(rates))
    moved = _draw(sampler, weights, noise.move)
    return torch.where(noise.jump < p_jump, moved, x_t), x1, bad
