"""Nearest-neighbour vector quantisation against a learned codebook (LlamaGen's, as in Janus).

Latents ``z`` (one ``d``-vector per grid cell) become codebook indices and back:

    z [B, d, h, w] -> nearest codebook row   id [B, h, w] in [0, K)
    id -> codebook row                       z_q [B, d, h, w]

With ``l2_norm`` (LlamaGen, Janus) only directions matter: the latent and every codebook row
``e_k`` are put on the unit sphere before comparing them,

    ẑ = z / ||z||,   ê_k = e_k / ||e_k||,   id = argmin_k ||ẑ − ê_k||²  (= argmax_k ⟨ẑ, ê_k⟩),

and decoding looks up ``ê_id``. Training passes gradients through the non-differentiable
argmin with the straight-through estimator ``z_q = ẑ + sg(ê_id − ẑ)`` (forward value ``ê_id``,
identity Jacobian to ``ẑ``) and adds the VQ-VAE terms, ``sg`` = stop-gradient,

    L_codebook = mean ||sg(ẑ) − ê_id||²          (moves the codes towards the latents)
    L_commit   = β · mean ||ẑ − sg(ê_id)||²      (keeps the latents near their codes)

and, optionally, LlamaGen's entropy regulariser on the soft assignment
``p_n = softmax(−||ẑ_n − ê||² / τ)`` over the codes,

    L_entropy = λ · (mean_n H(p_n) − H(mean_n p_n)),

low when each latent picks one code confidently while the batch as a whole spreads over the
codebook (a remedy against dead codes). :class:`CodebookUsage` counts codes over many batches.
The nearest-code search always runs in float32 so that ids do not flip with the compute dtype.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "CodebookUsage",
    "QuantizerOutput",
    "VectorQuantizer",
    "check_code_range",
    "check_positive_int",
    "usage_stats",
]


def check_positive_int(name: str, value: Any) -> None:
    """Raise a ValueError unless ``value`` is an int >= 1 (bools refused)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


class QuantizerOutput(NamedTuple):
    """What :meth:`VectorQuantizer.forward` returns.

    ``z_q`` Float[B, d, h, w] (value: the chosen normalised codes, gradient: straight-through
    to the latents, input dtype); ``ids`` Long[B, h, w]; ``losses`` float32 scalars
    ``codebook``, ``commitment`` (already times β) and ``entropy`` (already times λ, zero when
    λ = 0); ``usage`` the fraction of the K codes used in this batch and ``perplexity``
    ``exp(H)`` of the batch's code histogram (both float32 scalars, no gradient).
    """

    z_q: Tensor
    ids: Tensor
    losses: dict[str, Tensor]
    usage: Tensor
    perplexity: Tensor


def check_code_range(name: str, ids: Tensor, codebook_size: int) -> None:
    """Raise a ValueError naming the first id outside ``[0, codebook_size)`` and its index."""
    if ids.numel() == 0:
        return
    bad = (ids < 0) | (ids >= codebook_size)
    if bad.any():
        where = tuple(torch.nonzero(bad)[0].tolist())
        raise ValueError(
            f"{name} must lie in [0, {codebook_size}); found {int(ids[where])} at index "
            f"{list(where)} ({int(bad.sum())} id(s) out of range, min {int(ids.min())}, "
            f"max {int(ids.max())})"
        )


def usage_stats(ids: Tensor, codebook_size: int) -> tuple[Tensor, Tensor]:
    """Fraction of codes that occur in ``ids`` and ``exp`` of the entropy of their histogram
    (the perplexity: 1 when one code is used, K when all are used equally often)."""
    counts = torch.bincount(ids.detach().flatten(), minlength=codebook_size).float()
    p = counts / counts.sum().clamp_min(1.0)
    return (counts > 0).float().mean(), torch.exp(-torch.special.xlogy(p, p).sum())


class VectorQuantizer(nn.Module):
    """Nearest-neighbour quantisation against a learned codebook ``embedding.weight [K, d]``.

    See the module docstring for the maths. The nearest-code search runs without gradient in
    float32, over blocks of at most :attr:`chunk_elements` distances, so memory stays
    ``O(rows * K)`` and never ``O(N * K * d)``; the entropy regulariser (only when its ratio is
    positive) does need the full differentiable ``[N, K]`` distance matrix.
    """

    #: Largest ``[rows, K]`` block of distances the nearest-code search materialises at once.
    chunk_elements: int = 1 << 22

    def __init__(
        self,
        codebook_size: int,
        codebook_dim: int,
        *,
        l2_norm: bool = True,
        commit_beta: float = 0.25,
        entropy_loss_ratio: float = 0.0,
        entropy_temperature: float = 0.01,
    ) -> None:
        super().__init__()
        check_positive_int("codebook_size", codebook_size)
        check_positive_int("codebook_dim", codebook_dim)
        self.codebook_size = codebook_size
        self.codebook_dim = codebook_dim
        self.l2_norm = l2_norm
        self.commit_beta = float(commit_beta)
        self.entropy_loss_ratio = float(entropy_loss_ratio)
        self.entropy_temperature = float(entropy_temperature)
        self.embedding = nn.Embedding(codebook_size, codebook_dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """LlamaGen's initialisation: ``U(-1/K, 1/K)``, rows then normalised if ``l2_norm``."""
        with torch.no_grad():
            w = self.embedding.weight
            w.uniform_(-1.0 / self.codebook_size, 1.0 / self.codebook_size)
            if self.l2_norm:
                w.copy_(F.normalize(w, dim=-1))

    def extra_repr(self) -> str:
        return (
            f"codebook_size={self.codebook_size}, codebook_dim={self.codebook_dim}, "
            f"l2_norm={self.l2_norm}, commit_beta={self.commit_beta}, "
            f"entropy_loss_ratio={self.entropy_loss_ratio}"
        )

    def codebook(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """Float[K, d]: the vectors latents are compared with and decoded from (unit rows when
        ``l2_norm``). Normalised in float32 whatever the parameter dtype, then cast."""
        w = self.embedding.weight.float()
        if self.l2_norm:
            w = F.normalize(w, dim=-1)
        return w.to(dtype)

    def _flat_latents(self, z: Tensor) -> Tensor:
        """Float[B, d, h, w] -> float32 [B h w, d], normalised when ``l2_norm``."""
        if not isinstance(z, Tensor) or z.ndim != 4 or z.shape[1] != self.codebook_dim:
            shape = tuple(z.shape) if isinstance(z, Tensor) else type(z).__name__
            raise ValueError(f"latents must be [B, {self.codebook_dim}, h, w], got {shape}")
        if not z.is_floating_point():
            raise ValueError(f"latents must be floating point, got dtype {z.dtype}")
        flat = z.permute(0, 2, 3, 1).reshape(-1, self.codebook_dim).float()
        return F.normalize(flat, dim=-1) if self.l2_norm else flat

    @staticmethod
    def _sq_distances(z: Tensor, e: Tensor) -> Tensor:
        """``||z_n − e_k||²`` for all pairs, expanded as ``|z|² + |e|² − 2 z·e`` so that only a
        ``[N, K]`` matrix is formed: [N, d], [K, d] -> [N, K]."""
        return z.square().sum(-1, keepdim=True) + e.square().sum(-1) - 2.0 * (z @ e.T)

    @torch.no_grad()
    def nearest(self, flat: Tensor) -> Tensor:
        """Float32 [N, d] (already normalised if ``l2_norm``) -> Long[N], the nearest code.

        Ties go to the lowest index (``argmin``). On GPUs, enabling TF32 matmuls
        (``torch.backends.cuda.matmul.allow_tf32``) would make this search less precise."""
        e = self.codebook()
        rows = max(1, self.chunk_elements // self.codebook_size)
        ids = torch.empty(flat.shape[0], dtype=torch.long, device=flat.device)
        for start in range(0, flat.shape[0], rows):
            ids[start : start + rows] = self._sq_distances(flat[start : start + rows], e).argmin(-1)
        return ids

    def encode(self, z: Tensor) -> Tensor:
        """Latents Float[B, d, h, w] -> ids Long[B, h, w] (no gradient, no losses)."""
        B, _, h, w = z.shape
        return self.nearest(self._flat_latents(z).detach()).view(B, h, w)

    def entropy_loss(self, flat: Tensor, codebook: Tensor) -> Tensor:
        """``mean_n H(p_n) − H(mean_n p_n)`` with ``p_n = softmax(−||z_n − e||² / τ)``, unscaled.

        This is the exact entropy. LlamaGen adds ``1e-5`` inside the log of the average, which
        lowers that term by up to ``K · 1e-5`` nats (a near-constant offset, so gradients
        barely differ); its per-sample term is the same."""
        logp = torch.log_softmax(-self._sq_distances(flat, codebook) / self.entropy_temperature, -1)
        p = logp.exp()
        per_sample = -(p * logp).sum(-1).mean()
        avg = p.mean(0)
        # Clamped log: an average probability can underflow to exactly 0 (logits span 4 / τ).
        return per_sample + (avg * avg.clamp_min(1e-30).log()).sum()

    def forward(self, z: Tensor) -> QuantizerOutput:
        """Quantise latents ``z`` Float[B, d, h, w]; see :class:`QuantizerOutput`."""
        B, _, h, w = z.shape
        flat = self._flat_latents(z)
        ids = self.nearest(flat.detach())
        codebook = self.codebook()
        q = codebook[ids]  # differentiable in embedding.weight: the codebook loss trains it
        losses = {
            "codebook": F.mse_loss(q, flat.detach()),
            "commitment": self.commit_beta * F.mse_loss(flat, q.detach()),
            "entropy": (
                self.entropy_loss_ratio * self.entropy_loss(flat, codebook)
                if self.entropy_loss_ratio > 0
                else flat.new_zeros(())
            ),
        }
        z_q = flat + (q - flat).detach()
        z_q = z_q.view(B, h, w, self.codebook_dim).permute(0, 3, 1, 2).contiguous().to(z.dtype)
        usage, perplexity = usage_stats(ids, self.codebook_size)
        return QuantizerOutput(z_q, ids.view(B, h, w), losses, usage, perplexity)

    def lookup(self, ids: Tensor) -> Tensor:
        """Ids Long[B, h, w] -> codebook vectors Float[B, d, h, w] (normalised when ``l2_norm``)
        in the parameter dtype."""
        if not isinstance(ids, Tensor) or ids.dtype != torch.long or ids.ndim != 3:
            got = f"{ids.dtype} {tuple(ids.shape)}" if isinstance(ids, Tensor) else type(ids)
            raise ValueError(f"ids must be a torch.long tensor [B, h, w], got {got}")
        check_code_range("ids", ids, self.codebook_size)
        return F.embedding(ids, self.codebook(self.embedding.weight.dtype)).permute(0, 3, 1, 2)


class CodebookUsage:
    """Code counts accumulated over many batches, for reporting usage and dead codes.

    ``usage = CodebookUsage(K); for x in loader: usage.update(model.encode(x))``, then
    :meth:`summary`. Counts live on the CPU as int64.
    """

    def __init__(self, codebook_size: int) -> None:
        check_positive_int("codebook_size", codebook_size)
        self.codebook_size = codebook_size
        self.counts = torch.zeros(codebook_size, dtype=torch.long)

    def reset(self) -> None:
        self.counts.zero_()

    def update(self, ids: Tensor) -> None:
        """Add the codes of an id tensor of any shape (Long, values in ``[0, K)``)."""
        if not isinstance(ids, Tensor) or ids.dtype != torch.long:
            got = ids.dtype if isinstance(ids, Tensor) else type(ids).__name__
            raise ValueError(f"ids must be a torch.long tensor, got {got}")
        check_code_range("ids", ids, self.codebook_size)
        self.counts += torch.bincount(ids.detach().flatten(), minlength=self.codebook_size).cpu()

    @property
    def total(self) -> int:
        """Number of ids counted so far."""
        return int(self.counts.sum())

    def used_fraction(self) -> float:
        return float((self.counts > 0).float().mean())

    def perplexity(self) -> float:
        p = self.counts.double() / max(self.total, 1)
        return float(torch.exp(-torch.special.xlogy(p, p).sum()))

    def dead_codes(self) -> Tensor:
        """Long[M]: the codes never seen, ascending."""
        return torch.nonzero(self.counts == 0).flatten()

    def summary(self) -> dict[str, float | int]:
        return {
            "tokens": self.total,
            "used_fraction": self.used_fraction(),
            "perplexity": self.perplexity(),
            "dead_codes": int((self.counts == 0).sum()),
        }
