"""The naive reference step of ``bench/solver_speed.py``: one Euler step of FUDOKI's metric
path done the straightforward way the official sampler does it (see that script's docstring,
"What is measured"), written from the formulas, for speed and correctness comparisons
against :class:`kineflow.flow.EulerSolver`.

Path: ``d(x, y) = ‖ê_x − ê_y‖⁴`` on L2-normalised embeddings, ``β_t = c (t/(1−t))^a`` with
``a`` = :data:`A`, ``c`` = :data:`C` (exponent :data:`EXPONENT`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

A, C, EXPONENT = 0.9, 3.0, 4.0


def _naive_distances(z: Tensor, embeddings: Tensor) -> Tensor:
    """``(‖ẑ‖² + ‖ê‖² − 2 ẑ·ê)²`` for Float[M, D] queries against the whole table: Float[M, V].

    The table is re-normalised on every call, as the official path's metric does.
    """
    table = F.normalize(embeddings, p=2, dim=-1)
    z = F.normalize(z, p=2, dim=-1)
    squared = (
        (z * z).sum(-1, keepdim=True)
        + (table * table).sum(-1)
        - 2 * torch.einsum("md,vd->mv", z, table)
    )
    return squared**2


def reference_rates(
    x_t: Tensor, x1: Tensor, embeddings: Tensor, t: float, a: float = A, c: float = C
) -> Tensor:
    """The naive rate rows ``u_t(·, x_t | x_1)`` with a zero diagonal: Float[..., V].

    ``u(x) = p_t(x|x_1) · β̇_t · relu(d(x_t, x_1) − d(x, x_1))`` with
    ``p_t = softmax(−β_t d(·, x_1))``, ``d = ‖ê_x − ê_y‖⁴``, ``β_t = c (t/(1−t))^a``.
    """
    V = embeddings.shape[0]
    lead = x1.shape
    beta = c * (t / (1 - t)) ** a
    beta_dot = c * a * (t / (1 - t)) ** (a - 1) / (1 - t) ** 2
    z1 = embeddings[x1.reshape(-1)]
    zt = embeddings[x_t.reshape(-1)]
    p_t = torch.softmax(-beta * _naive_distances(z1, embeddings), dim=-1)
    # Computed a second time for the rate, as the official solver does.
    d = _naive_distances(z1, embeddings)
    zt_hat, z1_hat = F.normalize(zt, p=2, dim=-1), F.normalize(z1, p=2, dim=-1)
    d_t = (
        (zt_hat * zt_hat).sum(-1, keepdim=True)
        + (z1_hat * z1_hat).sum(-1, keepdim=True)
        - 2 * (zt_hat * z1_hat).sum(-1, keepdim=True)
    ) ** 2
    u = (p_t * beta_dot * F.relu(d_t - d)).reshape(*lead, V)
    diagonal = F.one_hot(x_t, num_classes=V)
    return torch.where(diagonal.bool(), torch.zeros_like(u), u)


def reference_step(
    logits: Tensor,
    x_t: Tensor,
    embeddings: Tensor,
    t: float,
    h: float,
    generator: torch.Generator | None = None,
    a: float = A,
    c: float = C,
) -> Tensor:
    """One naive Euler step with the plain Euler rate ``h·β̇_t``; updates and returns ``x_t``.

    Args:
        logits: Float[B, N, V] model logits for x_1.
        x_t: Long[B, N], the current state (modified in place).
        embeddings: Float[V, D], the raw (un-normalised) embedding table.
        t, h: the time and the step size.
    """
    B, N, V = logits.shape
    probs = torch.softmax(logits.float(), dim=-1)
    x1 = torch.multinomial(probs.reshape(-1, V), 1, generator=generator).reshape(B, N)
    u = reference_rates(x_t, x1, embeddings, t, a, c)
    intensity = u.sum(-1)
    noise = torch.rand(intensity.shape, generator=generator, device=intensity.device)
    jump = noise < 1 - torch.exp(-h * intensity)
    if jump.sum() > 0:
        x_t[jump] = torch.multinomial(u[jump], 1, generator=generator).squeeze(-1)
    return x_t
