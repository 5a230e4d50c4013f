"""Packing several sequences into each row of a batch, so that padding costs no compute.

A training batch of ``B`` left-padded rows ``[B, N]`` spends ``B · N`` token slots on
``S = Σ_b n_b`` real tokens (``n_b`` = real tokens of row ``b``). Packing lays the real
tokens of whole samples end to end into ``R`` rows of ``L`` slots (``L`` ≥ every ``n_b``),
chosen by first-fit decreasing: samples by length, longest first, each into the first row
with room. Each packed token keeps

- its **segment** (the sample it came from): attention never crosses segments
  (``segment_ids`` of :func:`kineflow.models.masking.build_attention_mask`);
- its **position** within its own sample (0 … n_b − 1, the running count of real tokens that
  :func:`~kineflow.models.masking.default_position_ids` gives the unpacked row).

Padding keys are never attended and position ids count real tokens only, so a packed row
computes, for every real token, exactly what its unpacked row computes (up to float
summation order): the per-sample losses are the same, at ``R · L`` instead of ``B · N``
slots. Empty slots (``segment_ids`` = −1) are padding of the packed rows.

A plan maps every real token once (``source`` → ``target`` flat indices), so one
:meth:`PackPlan.pack` call moves any per-position tensor (ids, masks, targets, per-token
draws) into the packed layout, on whichever device it lives.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import Tensor

__all__ = ["PackPlan", "pack_inputs", "plan_packing"]


@dataclass
class PackPlan:
    """Where every real token of ``[B, N]`` rows goes in ``[R, L]`` packed rows.

    ``source`` Long[S]: flat index ``b · N + i`` of each real token; ``target`` Long[S]: the
    flat index ``r · L + j`` of its slot. ``segment_ids`` Long[R, L]: the sample ``b`` in each
    slot (−1: empty); ``position_ids`` Long[R, L]: the token's position in its sample (0 in
    empty slots); ``attention_mask`` Bool[R, L]: the slot holds a token. ``order`` Long[B]:
    the samples in packed row-major order (the order in which a row-major walk of the packed
    rows meets them), e.g. to reorder per-sample inputs such as understanding pictures.
    """

    source: Tensor
    target: Tensor
    segment_ids: Tensor
    position_ids: Tensor
    attention_mask: Tensor
    order: Tensor
    unpacked_shape: tuple[int, int]

    @property
    def shape(self) -> tuple[int, int]:
        """``(R, L)``: packed rows and their length."""
        return tuple(self.segment_ids.shape)  # type: ignore[return-value]

    def pack(self, x: Tensor, fill: float | bool = 0) -> Tensor:
        """``x [B, N, ...]`` → ``[R, L, ...]``: real tokens moved to their slots, ``fill``
        in the empty ones."""
        B, N = self.unpacked_shape
        if tuple(x.shape[:2]) != (B, N):
            raise ValueError(f"expected a [{B}, {N}, ...] tensor, got {tuple(x.shape)}")
        R, L = self.shape
        rest = tuple(x.shape[2:])
        out = x.new_full((R * L, *rest), fill)
        out[self.target] = x.reshape(B * N, *rest)[self.source]
        return out.view(R, L, *rest)

    def order_among(self, selected: Tensor) -> Tensor:
        """For per-sample inputs stored only for the ``selected`` samples (Bool[B], in sample
        order, e.g. the pictures of understanding samples): the index Long[I] that puts them
        in packed order, ``inputs[index]``."""
        selected = selected.to(self.order.device)
        rank = torch.cumsum(selected.long(), 0) - 1  # rank of a selected sample among them
        packed = self.order[selected[self.order]]
        return rank[packed]

    def to(self, device: torch.device | str) -> PackPlan:
        """The same plan with its index tensors on ``device``."""
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        for name, value in moved.items():
            if isinstance(value, Tensor):
                moved[name] = value.to(device, non_blocking=True)
        return PackPlan(**moved)


def plan_packing(attention_mask: Tensor, length: int | None = None) -> PackPlan:
    """The packing of rows whose real tokens ``attention_mask`` (Bool[B, N]) marks.

    ``length`` is the packed rows' length ``L`` (default: the longest sample, ``max_b n_b``,
    so packing never lengthens the batch). Rows are filled first-fit decreasing (ties by
    sample index, so the plan depends only on the lengths); inside a row, samples keep their
    batch order. Deterministic and CPU-only (a handful of Python operations per sample).

    Raises:
        ValueError: a sample longer than ``length``, or a mask that is not ``[B, N]``.
    """
    if attention_mask.ndim != 2:
        raise ValueError(f"attention_mask must be [B, N], got {tuple(attention_mask.shape)}")
    mask = attention_mask.bool().cpu()
    B, N = mask.shape
    lengths = mask.sum(1).tolist()
    L = max(lengths, default=1) if length is None else int(length)
    if max(lengths, default=0) > L:
        raise ValueError(f"a sample of {max(lengths)} tokens does not fit packed rows of {L}")
    rows: list[list[int]] = []
    room: list[int] = []
    for b in sorted(range(B), key=lambda b: (-lengths[b], b)):
        r = next((r for r, free in enumerate(room) if free >= lengths[b]), None)
        if r is None:
            rows.append([])
            room.append(L)
            r = len(rows) - 1
        rows[r].append(b)
        room[r] -= lengths[b]
    R = max(len(rows), 1)
    segment_ids = torch.full((R, L), -1, dtype=torch.long)
    position_ids = torch.zeros(R, L, dtype=torch.long)
    sources, targets, order = [], [], []
    real_at = [mask[b].nonzero().flatten() for b in range(B)]
    for r, members in enumerate(rows):
        j = 0
        for b in sorted(members):
            n = lengths[b]
            sources.append(real_at[b] + b * N)
            targets.append(torch.arange(r * L + j, r * L + j + n))
            segment_ids[r, j : j + n] = b
            position_ids[r, j : j + n] = torch.arange(n)
            order.append(b)
            j += n
    empty = torch.zeros(0, dtype=torch.long)
    return PackPlan(
        source=torch.cat(sources) if sources else empty,
        target=torch.cat(targets) if targets else empty,
        segment_ids=segment_ids,
        position_ids=position_ids,
        attention_mask=segment_ids >= 0,
        order=torch.tensor(order, dtype=torch.long),
        unpacked_shape=(B, N),
    )


def pack_inputs(
    plan: PackPlan,
    inputs: dict[str, Tensor | None],
    pictures: Tensor | None = None,
    has_picture: Tensor | None = None,
) -> tuple[dict[str, Tensor | None], Tensor | None]:
    """A model's inputs for the packed rows of ``plan``: every per-position tensor of
    ``inputs`` (``[B, N, ...]``; None stays None) packed (bool masks filled with False, the
    rest with 0), ``attention_mask`` = the filled slots, and the per-sample ``pictures`` (those
    of the samples ``has_picture`` Bool[B] marks, in sample order) reordered to the packed
    order in which a row-major placeholder mask meets them. The plan moves to the device of
    ``inputs["input_ids"]``."""
    plan = plan.to(inputs["input_ids"].device)
    packed = {k: None if v is None else plan.pack(v, False if v.dtype == torch.bool else 0)
              for k, v in inputs.items()}  # fmt: skip
    packed["attention_mask"] = plan.attention_mask
    if pictures is not None and has_picture is not None:
        pictures = pictures[plan.order_among(has_picture).to(pictures.device)]
    return packed, pictures
