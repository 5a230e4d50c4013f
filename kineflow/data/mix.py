"""Mixing tasks by ratio, deterministically per sample index.

A training sample's task (and which record of that task it reads) is a pure function of
``(seed, index)``: a 64-bit hash of the two gives a uniform ``u ∈ [0, 1)``, and the task is the
first one whose cumulative normalised ratio exceeds ``u``:

    task(i) = min { k : Σ_{j ≤ k} r_j / Σ_j r_j > u(seed, i) }

so a resumed run, another process count or another batch split sees exactly the same tasks,
and over many indices the tasks come in the asked proportions (each index is an independent
draw). Records are picked the same way with a second hash: ``record(i) = h(seed, i) mod n``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

__all__ = ["TaskMix", "check_mix", "splitmix64"]

_MASK = (1 << 64) - 1


def splitmix64(x: int) -> int:
    """SplitMix64's finaliser: a well-mixed 64-bit hash of the 64-bit integer ``x``."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
    return x ^ (x >> 31)


def _hash(seed: int, index: int, stream: int) -> int:
    return splitmix64(splitmix64(splitmix64(seed & _MASK) ^ (index & _MASK)) ^ stream)


def check_mix(mix: Mapping[str, float], tasks: tuple[str, ...], where: str = "data.mix") -> None:
    """Raise ValueError unless ``mix`` maps names of ``tasks`` to finite ratios >= 0 with a
    positive sum (the error names ``where`` and the offending key)."""
    if not isinstance(mix, Mapping) or not mix:
        raise ValueError(f"{where} must be a mapping of tasks to ratios, got {mix!r}")
    for name, ratio in mix.items():
        if name not in tasks:
            raise ValueError(f"{where}: unknown task {name!r}; the tasks are {list(tasks)}")
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 <= ratio < 1e300:
            raise ValueError(f"{where}.{name} must be a number >= 0, got {ratio!r}")
    if not sum(mix.values()) > 0:
        raise ValueError(f"{where}: the ratios add up to 0")


@dataclass(frozen=True)
class TaskMix:
    """Tasks in proportion to ``ratios`` (normalised; zero-ratio tasks never come), chosen per
    sample index from ``seed`` (module docstring)."""

    ratios: tuple[tuple[str, float], ...]
    seed: int = 0

    @classmethod
    def from_mapping(cls, mix: Mapping[str, float], seed: int = 0) -> TaskMix:
        total = float(sum(mix.values()))
        return cls(tuple((k, float(v) / total) for k, v in mix.items() if v > 0), seed)

    def uniform(self, index: int, stream: int = 0) -> float:
        """``u ∈ [0, 1)`` from the top 53 bits of the hash of ``(seed, index, stream)``."""
        return (_hash(self.seed, index, stream) >> 11) / float(1 << 53)

    def task(self, index: int) -> str:
        """The task of sample ``index``."""
        u, acc = self.uniform(index), 0.0
        for name, share in self.ratios:
            acc += share
            if u < acc:
                return name
        return self.ratios[-1][0]  # u just below 1 against a rounded cumulative sum

    def record(self, index: int, n: int) -> int:
        """Which of ``n`` records sample ``index`` reads (uniform over them)."""
        if n < 1:
            raise ValueError(f"need at least one record, got {n}")
        return _hash(self.seed, index, 1) % n
