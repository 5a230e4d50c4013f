"""The inputs of ``bench/solver_speed.py``: the benchmark's cases (sizes), LM-like embedding
tables, model-like logits and states drawn from the path at chosen times (the script's
docstring, "Inputs", says why they look like this)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from reference_step import EXPONENT, A, C
from torch import Tensor

from kineflow.flow import MetricPath
from kineflow.flow.sampling import categorical, sample_logits


@dataclass(frozen=True)
class CaseSpec:
    """Sizes of one benchmark case: B sequences of N positions over V tokens of dimension D."""

    name: str
    B: int
    N: int
    V: int
    D: int
    default_repeats: int


CASES = {
    "image": CaseSpec("image", B=8, N=576, V=16384, D=8, default_repeats=3),
    "text": CaseSpec("text", B=4, N=128, V=102400, D=2048, default_repeats=2),
}


def text_embeddings(V: int, D: int, generator: torch.Generator, rank: int = 64) -> Tensor:
    """Anisotropic LM-like embeddings Float[V, D]: shared mean + low rank + noise
    (``bench/solver_speed.py``'s docstring, "Inputs")."""
    rank = min(rank, D)
    mean = F.normalize(torch.randn(D, generator=generator), dim=0)
    basis, _ = torch.linalg.qr(torch.randn(D, rank, generator=generator))
    spectrum = torch.arange(1, rank + 1, dtype=torch.float32).rsqrt()
    spectrum = spectrum / spectrum.norm()
    out = torch.empty(V, D)
    # Row blocks keep the transient memory of building the table small next to the table.
    for start in range(0, V, 4096):
        rows = min(4096, V - start)
        low = (torch.randn(rows, rank, generator=generator) * spectrum) @ basis.T
        noise = torch.randn(rows, D, generator=generator).mul_(math.sqrt(0.45 / D))
        out[start : start + rows] = noise.add_(low, alpha=math.sqrt(0.35)).add_(
            mean, alpha=math.sqrt(0.2)
        )
    return out


def model_like_logits(
    B: int,
    N: int,
    V: int,
    generator: torch.Generator,
    shared_fraction: float,
    shared_sets: int,
    per_sequence: bool,
    plausible: int = 8,
) -> Tensor:
    """Float[B, N, V]: N(0, 1) noise plus a decreasing bonus on a few plausible tokens per
    position, some positions sharing their plausible set with others
    (``bench/solver_speed.py``'s docstring, "Inputs")."""
    logits = torch.randn(B, N, V, generator=generator)
    k = min(plausible, V)
    fresh = torch.randint(V, (B, N, k), generator=generator)
    pool = torch.randint(V, (B if per_sequence else 1, shared_sets, k), generator=generator)
    which = torch.randint(shared_sets, (B, N), generator=generator)
    shared = torch.rand(B, N, generator=generator) < shared_fraction
    seq = torch.arange(B)[:, None] if per_sequence else torch.zeros(B, 1, dtype=torch.long)
    ids = torch.where(shared[..., None], pool[seq, which], fresh)
    confidence = math.log(V) + 2.5 + 1.5 * torch.randn(B, N, 1, generator=generator)
    confidence = confidence + 2.0 * shared[..., None]
    bonus = confidence - torch.arange(k, dtype=torch.float32)
    return logits.scatter_add_(-1, ids, bonus)


def path_states(
    path: MetricPath, x1: Tensor, times: Sequence[float], generator: torch.Generator
) -> dict[float, Tensor]:
    """``x_t ~ p_t(·|x1)`` for each t (Long like x1), computing each distinct d(·, x1) once."""
    flat = x1.reshape(-1)
    targets, inverse = torch.unique(flat, return_inverse=True)
    out = {t: torch.empty_like(flat) for t in times}
    block = max(1, (1 << 24) // path.vocab_size)
    for start in range(0, targets.numel(), block):
        rows = ((inverse >= start) & (inverse < start + block)).nonzero().squeeze(-1)
        d = path.distances(targets[start : start + block])
        for t in times:
            probs = torch.softmax(d * -path.beta(torch.tensor(t)), dim=-1)
            out[t][rows] = categorical(probs[inverse[rows] - start], generator)
    return {t: x.reshape(x1.shape) for t, x in out.items()}


def build_inputs(spec: CaseSpec, times: Sequence[float], seed: int = 0) -> dict:
    """Embeddings, logits and one x_t per time for a case, plus descriptive statistics."""
    g = torch.Generator().manual_seed(seed)
    if spec.name == "text":
        E = text_embeddings(spec.V, spec.D, g)
        logits = model_like_logits(spec.B, spec.N, spec.V, g, 0.25, 8, per_sequence=False)
    else:
        E = torch.randn(spec.V, spec.D, generator=g)
        logits = model_like_logits(spec.B, spec.N, spec.V, g, 0.5, 4, per_sequence=True)
    path = MetricPath.from_embeddings(E, EXPONENT, A, C)
    flat_logits = logits.reshape(-1, spec.V)
    x1 = torch.cat([sample_logits(part, generator=g) for part in flat_logits.split(256)])
    x1 = x1.reshape(spec.B, spec.N)
    states = path_states(path, x1, times, g)
    pairs = torch.randint(spec.V, (2, 4000), generator=g)
    cos = F.cosine_similarity(E[pairs[0]], E[pairs[1]], dim=-1)
    entropy = torch.cat(
        [
            -(torch.log_softmax(part, -1).exp() * torch.log_softmax(part, -1)).sum(-1)
            for part in flat_logits.split(256)
        ]
    )
    top1 = torch.cat([torch.softmax(part, -1).amax(-1) for part in flat_logits.split(256)])
    stats = {
        "embedding_cos_mean": round(float(cos.mean()), 4),
        "embedding_cos_std": round(float(cos.std()), 4),
        "logits_entropy_nats_mean": round(float(entropy.mean()), 3),
        "logits_top1_prob_mean": round(float(top1.mean()), 3),
        "distinct_target_fraction": round(x1.unique().numel() / x1.numel(), 4),
        "x_t_equals_target_fraction": {
            str(t): round(float((states[t] == x1).float().mean()), 4) for t in times
        },
    }
    return {"embeddings": E, "logits": logits, "states": states, "path": path, "stats": stats}
