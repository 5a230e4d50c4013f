"""MAR's diffusion loss (``DiffLoss`` in LTH14/mar, ``models/diffloss.py``) as a kineflow
:class:`~kineflow.models.diffusion_head.DiffusionHead`, and back.

The two networks are the same ``SimpleMLPAdaLN`` (see the head's module docstring); only the
parameter names differ. Under MAR's ``net.`` (``diffloss.net.`` in a whole MAR model):

======================================  ================================================
MAR                                     kineflow (``DiffusionHead``)
======================================  ================================================
``time_embed.mlp.0``, ``.mlp.2``        ``net.time_embed.0``, ``net.time_embed.2``
``cond_embed``, ``input_proj``          ``net.cond_embed``, ``net.input_proj``
``res_blocks.i.in_ln``                  ``net.blocks.i.norm``
``res_blocks.i.mlp.0``, ``.mlp.2``      ``net.blocks.i.mlp.0``, ``net.blocks.i.mlp.2``
``res_blocks.i.adaLN_modulation.1``     ``net.blocks.i.modulation.1``
``final_layer.adaLN_modulation.1``      ``net.final_modulation.1``
``final_layer.linear``                  ``net.output``
======================================  ================================================

each with a ``weight`` and a ``bias``. MAR's ``final_layer.norm_final`` has no parameters, like
kineflow's ``net.final_norm``. Shapes give the config: ``input_proj.weight`` is
``[width, token_dim]``, ``cond_embed.weight`` ``[width, cond_dim]``, the blocks count is the
depth; ``steps`` is MAR's 1000, and the sampling chain (MAR's ``num_sampling_steps``) and draws
per token (``diffusion_batch_mul``) are arguments, 100 and 4 by default as in MAR.

A MAR checkpoint file (``checkpoint-last.pth``) pickles a dict whose ``"model"`` and
``"model_ema"`` entries are whole-model state dicts; read one with ``torch.load`` (its other
entries need ``weights_only=False``: only for files you trust) and pass the state dict here.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from torch import Tensor

from kineflow.io import check_state_dict
from kineflow.models.diffusion_head import DiffusionHead, DiffusionHeadConfig

__all__ = ["config_from_mar", "from_mar", "head_from_mar", "to_mar"]

# MAR module name (after its prefix) -> kineflow module name (after "net."), block-free parts.
_TOP = {
    "time_embed.mlp.0": "time_embed.0",
    "time_embed.mlp.2": "time_embed.2",
    "cond_embed": "cond_embed",
    "input_proj": "input_proj",
    "final_layer.adaLN_modulation.1": "final_modulation.1",
    "final_layer.linear": "output",
}
# Inside residual block i: MAR "res_blocks.i.<name>" -> kineflow "blocks.i.<name>".
_BLOCK = {
    "in_ln": "norm",
    "mlp.0": "mlp.0",
    "mlp.2": "mlp.2",
    "adaLN_modulation.1": "modulation.1",
}
_PREFIXES = ("net.", "diffloss.net.")  # a DiffLoss state dict, a whole MAR model's
_MAR_KEY = re.compile(r"res_blocks\.(\d+)\.(.+)\.(weight|bias)|(.+)\.(weight|bias)")
_OURS_KEY = re.compile(r"net\.blocks\.(\d+)\.(.+)\.(weight|bias)|net\.(.+)\.(weight|bias)")
_MAR_FREQUENCY_DIM = 256  # MAR's TimestepEmbedder.frequency_embedding_size, kineflow's too


def _mar_prefix(state: Mapping[str, Tensor], prefix: str | None) -> str:
    if prefix is not None:
        if not any(k.startswith(prefix) for k in state):
            raise ValueError(f"MAR state dict has no key under prefix {prefix!r}")
        return prefix
    for candidate in _PREFIXES:
        if any(k.startswith(candidate + "input_proj.") for k in state):
            return candidate
    raise ValueError(
        "not a MAR DiffLoss state dict: no 'net.input_proj.weight' (DiffLoss) or "
        "'diffloss.net.input_proj.weight' (whole MAR model); pass prefix= for another layout"
    )


def _rename(key: str, pattern: re.Pattern, top: Mapping[str, str], block: Mapping[str, str],
            block_to: str, to_prefix: str) -> str | None:  # fmt: skip
    """``key`` in the other naming, or None when it is not one of the mapped parameters."""
    match = pattern.fullmatch(key)
    if match is None:
        return None
    i, name, kind, top_name, top_kind = match.groups()
    if i is not None and name in block:
        return f"{to_prefix}{block_to}.{i}.{block[name]}.{kind}"
    if i is None and top_name in top:
        return f"{to_prefix}{top[top_name]}.{top_kind}"
    return None


def config_from_mar(
    state: Mapping[str, Tensor],
    *,
    sample_steps: int = 100,
    draws: int = 4,
    prefix: str | None = None,
) -> DiffusionHeadConfig:
    """The :class:`DiffusionHeadConfig` of a MAR DiffLoss state dict, read off its shapes.

    Args:
        state: MAR's ``DiffLoss.state_dict()`` (keys ``net.*``) or a whole MAR model's
            (``diffloss.net.*``; its other keys are ignored).
        sample_steps: the sampling chain (MAR's ``--num_sampling_steps``).
        draws: (t, ε) draws per token in training (MAR's ``--diffusion_batch_mul``).
        prefix: where the DiffLoss network's keys start (default: found as above).

    Raises:
        ValueError: not a MAR DiffLoss layout.
    """
    p = _mar_prefix(state, prefix)
    for name in ("input_proj.weight", "cond_embed.weight"):
        if p + name not in state or state[p + name].ndim != 2:
            raise ValueError(f"MAR state dict: {p}{name} is missing or not a matrix")
    width, token_dim = state[p + "input_proj.weight"].shape
    block = re.compile(re.escape(p) + r"res_blocks\.(\d+)\.")
    blocks = {int(m.group(1)) for m in map(block.match, state) if m is not None}
    return DiffusionHeadConfig(
        token_dim=int(token_dim),
        cond_dim=int(state[p + "cond_embed.weight"].shape[1]),
        width=int(width),
        depth=max(blocks, default=-1) + 1,
        sample_steps=sample_steps,
        draws=draws,
    )


def from_mar(state: Mapping[str, Tensor], *, prefix: str | None = None) -> dict[str, Tensor]:
    """MAR DiffLoss parameters renamed to a :class:`DiffusionHead` state dict (same tensors).

    Only the keys under the DiffLoss prefix are read; every one of them must be a parameter of
    MAR's ``SimpleMLPAdaLN``.

    Raises:
        ValueError: a key under the prefix that MAR's network does not have (named).
    """
    p = _mar_prefix(state, prefix)
    out, unknown = {}, []
    for key, value in state.items():
        if not key.startswith(p):
            continue
        ours = _rename(key[len(p) :], _MAR_KEY, _TOP, _BLOCK, "blocks", "net.")
        if ours is None:
            unknown.append(key)
        else:
            out[ours] = value
    if unknown:
        raise ValueError(
            f"MAR state dict: {len(unknown)} key(s) not in MAR's DiffLoss network: "
            + ", ".join(sorted(unknown))
        )
    return out


def to_mar(head: DiffusionHead | Mapping[str, Tensor], prefix: str = "net.") -> dict[str, Tensor]:
    """A :class:`DiffusionHead` (or its state dict) as MAR's ``DiffLoss.state_dict()``;
    ``prefix="diffloss.net."`` names the keys as in a whole MAR model."""
    state = head.state_dict() if isinstance(head, DiffusionHead) else head
    top = {v: k for k, v in _TOP.items()}
    block = {v: k for k, v in _BLOCK.items()}
    out, unknown = {}, []
    for key, value in state.items():
        mar = _rename(key, _OURS_KEY, top, block, "res_blocks", prefix)
        if mar is None:
            unknown.append(key)
        else:
            out[mar] = value
    if unknown:
        raise ValueError(
            f"not a DiffusionHead state dict: {len(unknown)} key(s) MAR has no name for: "
            + ", ".join(sorted(unknown))
        )
    return out


def head_from_mar(
    state: Mapping[str, Tensor],
    *,
    sample_steps: int = 100,
    draws: int = 4,
    prefix: str | None = None,
) -> DiffusionHead:
    """A :class:`DiffusionHead` holding the weights of a MAR DiffLoss state dict.

    Arguments as :func:`config_from_mar`. The head's loss and sampler are MAR's (up to the
    ``t = 0`` bound term, see :mod:`kineflow.models.diffusion_head`); its parameters stay in
    the head's dtype (float32), the tensors are copied in.

    Raises:
        ValueError: not a MAR DiffLoss layout, or keys missing, unexpected or mis-shaped
            (every one named, in MAR's naming).
    """
    p = _mar_prefix(state, prefix)
    config = config_from_mar(state, sample_steps=sample_steps, draws=draws, prefix=p)
    head = DiffusionHead(config)
    expected = to_mar(head, prefix="")
    given = {k[len(p) :]: v for k, v in state.items() if k.startswith(p)}
    check_state_dict(expected, given, "MAR DiffLoss state dict", prefix=p)
    head.load_state_dict(from_mar(state, prefix=p), strict=True)
    return head
