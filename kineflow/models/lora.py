"""Low-rank adapters (LoRA) for any ``nn.Linear`` of a kineflow network.

A wrapped linear keeps its weight ``W`` [out, in] (and bias) frozen and adds a trainable
low-rank update:

    y = x Wᵀ + b + s · dropout(x) Aᵀ Bᵀ,     A: [r, in],  B: [out, r],  s = α / r

``A`` starts Kaiming-uniform (``a = √5``, as ``nn.Linear`` initialises its weight) and ``B`` at
zero, so a freshly wrapped model computes exactly what the base model does. Merging folds the
update into the weight, ``W' = W + s · B A``, and gives a plain ``nn.Linear`` again.

The adapter's tensors are named ``{module}.lora_A`` / ``{module}.lora_B`` (the base weight
becomes ``{module}.base.weight``), so :func:`lora_state_dict` is a small dict that can be saved
on its own. Everything is plain modules and parameters: DDP, FSDP and ``torch.compile`` see
nothing unusual.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import Tensor, nn

__all__ = [
    "LoRALinear",
    "apply_lora",
    "load_lora_state_dict",
    "lora_modules",
    "lora_state_dict",
    "match_target",
    "merge_lora",
    "merged_view",
]


class LoRALinear(nn.Module):
    """``base`` (an ``nn.Linear``, frozen here) plus the update ``s · B A`` (module docstring).

    Args:
        base: the linear layer to adapt; its parameters get ``requires_grad=False``.
        rank: ``r >= 1``.
        alpha: the scale numerator (``s = alpha / rank``).
        dropout: dropout probability on the adapter's input (0: none; it draws from the
            process's RNG, so runs with dropout > 0 are not equal across process counts).
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__()
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(f"lora rank must be an integer >= 1, got {rank!r}")
        if not 0 <= dropout < 1:
            raise ValueError(f"lora dropout must be in [0, 1), got {dropout!r}")
        self.base = base.requires_grad_(False)
        self.rank, self.alpha = rank, float(alpha)
        self.scale = self.alpha / rank
        w = base.weight
        self.lora_A = nn.Parameter(
            torch.empty(rank, base.in_features, device=w.device, dtype=w.dtype)
        )
        self.lora_B = nn.Parameter(
            torch.zeros(base.out_features, rank, device=w.device, dtype=w.dtype)
        )
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def delta_weight(self) -> Tensor:
        """``s · B A`` [out, in]: what merging adds to the base weight."""
        return (self.lora_B @ self.lora_A) * self.scale

    def forward(self, x: Tensor) -> Tensor:
        """``x`` [..., in] -> [..., out] (module docstring)."""
        update = nn.functional.linear(
            nn.functional.linear(self.dropout(x), self.lora_A), self.lora_B
        )
        return self.base(x) + update * self.scale

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        """The base linear with ``W + s · B A`` (computed in float32, stored in W's dtype)."""
        w = self.base.weight
        w.copy_((w.float() + self.delta_weight().float()).to(w.dtype))
        return self.base

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha:g}"


def match_target(name: str, targets: Iterable[str]) -> bool:
    """True when the module path ``name`` is one of ``targets``: a target matches the path's
    last component(s) (``"q_proj"`` matches ``…layers.0.self_attn.q_proj``,
    ``"mlp.up_proj"`` matches ``…layers.3.mlp.up_proj``), or, written ``re:PATTERN``, the
    whole path by regular expression."""
    for t in targets:
        if t.startswith("re:"):
            if re.fullmatch(t[3:], name):
                return True
        elif name == t or name.endswith("." + t):
            return True
    return False


def apply_lora(
    model: nn.Module,
    targets: Iterable[str],
    rank: int,
    alpha: float,
    dropout: float = 0.0,
    *,
    generator: torch.Generator | None = None,
) -> list[str]:
    """Replace every ``nn.Linear`` of ``model`` whose path matches ``targets``
    (:func:`match_target`) by a :class:`LoRALinear` around it, in place; returns the replaced
    paths in module order. ``generator`` (optional) seeds the ``A`` initialisations.

    Raises:
        ValueError: no linear matches (naming the targets), or a target that matches a
            module which is not an ``nn.Linear``.
    """
    targets = list(targets)
    replaced: list[str] = []
    for name, module in list(model.named_modules()):
        if not name or not match_target(name, targets) or isinstance(module, LoRALinear):
            continue
        if not isinstance(module, nn.Linear):
            if isinstance(getattr(module, "base", None), nn.Linear):
                continue  # the base inside an already-wrapped linear
            raise ValueError(f"lora target {name} is a {type(module).__name__}, not an nn.Linear")
        wrapped = LoRALinear(module, rank, alpha, dropout)
        if generator is not None:
            with torch.no_grad():
                a = torch.empty(wrapped.lora_A.shape)
                bound = 1 / math.sqrt(module.in_features)  # kaiming_uniform_(a=√5)'s bound
                a.uniform_(-bound, bound, generator=generator)
                wrapped.lora_A.copy_(a)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, wrapped)
        replaced.append(name)
    if not replaced:
        raise ValueError(f"lora targets {targets} match no nn.Linear of the model")
    return replaced


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    """Every :class:`LoRALinear` of ``model`` by path."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def lora_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The adapter tensors only: ``{path}.lora_A`` [r, in] and ``{path}.lora_B`` [out, r]
    (detached, contiguous, on the CPU)."""
    out: dict[str, Tensor] = {}
    for name, m in lora_modules(model).items():
        out[f"{name}.lora_A"] = m.lora_A.detach().cpu().contiguous()
        out[f"{name}.lora_B"] = m.lora_B.detach().cpu().contiguous()
    return out


@torch.no_grad()
def load_lora_state_dict(model: nn.Module, weights: Mapping[str, Tensor]) -> None:
    """Copy :func:`lora_state_dict` tensors into ``model``'s adapters.

    Raises:
        ValueError: an adapter missing from ``weights``, an unknown or mis-shaped tensor.
    """
    own = {f"{n}.{k}": getattr(m, k) for n, m in lora_modules(model).items()
           for k in ("lora_A", "lora_B")}  # fmt: skip
    missing = sorted(set(own) - set(weights))
    unknown = sorted(set(weights) - set(own))
    if missing or unknown:
        raise ValueError(f"adapter does not fit the model: missing {missing[:4]}, "
                         f"unknown {unknown[:4]}")  # fmt: skip
    for k, p in own.items():
        if tuple(weights[k].shape) != tuple(p.shape):
            raise ValueError(f"adapter tensor {k} is {tuple(weights[k].shape)}, the model's "
                             f"{tuple(p.shape)}")  # fmt: skip
        p.copy_(weights[k].to(p.dtype))


def merge_lora(model: nn.Module) -> int:
    """Fold every adapter into its base weight (``W ← W + s · B A``) and put the plain
    ``nn.Linear`` back in its place, in place; returns how many were merged."""
    found = lora_modules(model)
    for name, m in found.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, m.merged())
    return len(found)


@contextmanager
def merged_view(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, ``model`` computes and saves as if merged: every :class:`LoRALinear`
    is replaced by a plain ``nn.Linear`` whose weight is a new tensor ``W + s · B A``
    (float32 sum, stored in W's dtype; the bias is shared), so its ``state_dict`` has the
    base model's key names. On exit the wrapped layers come back untouched (their ``W``,
    ``A``, ``B`` are never written): a run can export merged weights mid-training and go on
    exactly. Costs one copy of the adapted weights only."""
    found = lora_modules(model)
    try:
        for name, m in found.items():
            w = m.base.weight
            plain = nn.Linear(m.in_features, m.out_features, bias=False, device="meta")
            with torch.no_grad():
                merged = (w.float() + m.delta_weight().float()).to(w.dtype)
            plain.weight = nn.Parameter(merged, requires_grad=False)
            plain.bias = m.base.bias
            _put(model, name, plain)
        yield model
    finally:
        for name, m in found.items():
            _put(model, name, m)


def _put(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)
