"""Parameter counts of kineflow's models, computed from their configs alone.

Loading a checkpoint builds its model from ``config.json`` before a single weight is read, so
an absurd config (``hidden_size`` 10**9, a million layers) would allocate until memory runs
out. These functions count the parameters a config asks for, in closed form, without building
anything, so :func:`check_model_size` can refuse such a config with a clear message first.

The counts are exact: each function mirrors its module's constructor (the tests compare them
with ``sum(t.numel() for t in model.state_dict().values())`` of built models), and the models
register no buffers, so parameters are the whole state dict.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch

from kineflow.models.diffusion_head import DiffusionHeadConfig
from kineflow.models.fudoki import FudokiConfig
from kineflow.models.llama import LlamaConfig
from kineflow.models.siglip import SiglipConfig
from kineflow.models.unifluid import UnifluidConfig
from kineflow.tokenizers.autoencoder import AutoencoderConfig
from kineflow.tokenizers.kl_vae import KLConfig
from kineflow.tokenizers.vq import VQConfig

__all__ = [
    "DEFAULT_MAX_MODEL_BYTES",
    "MAX_BYTES_ENV",
    "autoencoder_params",
    "check_model_size",
    "diffusion_head_params",
    "fudoki_params",
    "kl_vae_params",
    "llama_params",
    "max_model_bytes",
    "siglip_params",
    "unifluid_params",
    "vq_params",
]

#: The environment variable that overrides the size limit (bytes, or e.g. ``"200GiB"``).
MAX_BYTES_ENV = "KINEFLOW_MAX_MODEL_BYTES"
#: The fixed cap of the default limit (the machine's RAM, when smaller, is the other).
DEFAULT_MAX_MODEL_BYTES = 64 * 2**30
# DiffusionHead keeps two CosineSchedules of ~10 float64 arrays plus a Python list of ints
# per step; 200 bytes per step bounds them (a 10**9-step config would need ~200 GB).
_SCHEDULE_BYTES_PER_STEP = 200
_UNITS = {"": 1, "B": 1, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


# -- building blocks (mirroring torch.nn) ---------------------------------------------------------
def _linear(n_in: int, n_out: int, bias: bool = True) -> int:
    return n_in * n_out + (n_out if bias else 0)


def _conv(n_in: int, n_out: int, kernel: int) -> int:
    return n_in * n_out * kernel * kernel + n_out


def _group_norm(channels: int) -> int:
    return 2 * channels


# -- towers ---------------------------------------------------------------------------------------
def llama_params(config: LlamaConfig) -> int:
    """:class:`~kineflow.models.llama.LlamaModel` (embedding, blocks, final norm; no LM head)."""
    c = config
    D, F_, bias = c.hidden_size, c.intermediate_size, c.attention_bias
    q_width = c.num_attention_heads * int(c.head_dim)
    kv_width = int(c.num_key_value_heads) * int(c.head_dim)
    attention = _linear(D, q_width, bias) + 2 * _linear(D, kv_width, bias)
    attention += _linear(q_width, D, bias)
    mlp = 3 * D * F_
    norms = (4 if c.sandwich_norms else 2) * D
    return c.vocab_size * D + c.num_hidden_layers * (attention + mlp + norms) + D


def siglip_params(config: SiglipConfig) -> int:
    """:class:`~kineflow.models.siglip.SiglipVisionModel` (only the blocks it builds)."""
    c = config
    D, F_ = c.hidden_size, c.intermediate_size
    block = 2 * 2 * D + _linear(D, 3 * D) + _linear(D, D) + _linear(D, F_) + _linear(F_, D)
    patch = _conv(c.num_channels, D, c.patch_size)
    return patch + c.num_patches * D + c.num_used_layers * block + 2 * D


def _resnet(c_in: int, c_out: int) -> int:
    shortcut = _conv(c_in, c_out, 1) if c_in != c_out else 0
    convs = _conv(c_in, c_out, 3) + _conv(c_out, c_out, 3)
    return _group_norm(c_in) + _group_norm(c_out) + convs + shortcut


def _attention(channels: int) -> int:
    return _group_norm(channels) + 4 * _conv(channels, channels, 1)


def _level(c_in: int, c_out: int, blocks: int, attention: bool, resample: bool) -> int:
    n = sum(_resnet(c_in if j == 0 else c_out, c_out) for j in range(blocks))
    n += blocks * _attention(c_out) if attention else 0
    return n + (_conv(c_out, c_out, 3) if resample else 0)


def autoencoder_params(config: AutoencoderConfig) -> int:
    """The :class:`~kineflow.tokenizers.autoencoder.Encoder` and ``Decoder`` of ``config``."""
    c = config
    widths = [c.channels * m for m in c.channel_mult]
    L, top = len(widths), widths[-1]
    lowest = c.attn_resolutions == "lowest"
    mid = 2 * _resnet(top, top) + _attention(top)
    encoder = _conv(c.in_channels, c.channels, 3) + mid + _group_norm(top)
    encoder += _conv(top, c.z_channels * (2 if c.double_z else 1), 3)
    for i in range(L):
        c_in = c.channels if i == 0 else widths[i - 1]
        encoder += _level(c_in, widths[i], c.num_res_blocks, lowest and i == L - 1, i < L - 1)
    decoder = _conv(c.z_channels, top, 3) + mid + _group_norm(widths[0])
    decoder += _conv(widths[0], c.out_channels, 3)
    for k, i in enumerate(reversed(range(L))):
        c_in = top if k == 0 else widths[i + 1]
        decoder += _level(c_in, widths[i], c.num_res_blocks + 1, lowest and i == L - 1, i > 0)
    return encoder + decoder


def vq_params(config: VQConfig) -> int:
    """:class:`~kineflow.tokenizers.vq.VQModel`: autoencoder, codebook and the 1x1 convs."""
    z, d = config.autoencoder.z_channels, config.codebook_dim
    codebook = config.codebook_size * d
    return autoencoder_params(config.autoencoder) + codebook + _conv(z, d, 1) + _conv(d, z, 1)


def kl_vae_params(config: KLConfig) -> int:
    """:class:`~kineflow.tokenizers.kl_vae.AutoencoderKL`."""
    z = config.z_channels
    n = autoencoder_params(config.autoencoder_config())
    n += _conv(2 * z, 2 * z, 1) if config.use_quant_conv else 0
    return n + (_conv(z, z, 1) if config.use_post_quant_conv else 0)


def diffusion_head_params(config: DiffusionHeadConfig) -> int:
    """:class:`~kineflow.models.diffusion_head.DiffusionHead` (its MLP; the schedules are
    plain tensors, not parameters)."""
    w, C = config.width, config.token_dim
    time_dim = 256  # DiffusionMLP.time_dim
    # Each block: its affine LayerNorm (MAR's in_ln), a two-layer MLP and the AdaLN modulation.
    block = 2 * w + 2 * _linear(w, w) + _linear(w, 3 * w)
    n = _linear(time_dim, w) + _linear(w, w) + _linear(config.cond_dim, w) + _linear(C, w)
    return n + config.depth * block + _linear(w, 2 * w) + _linear(w, 2 * C)


def _aligner(n_in: int, hidden: int, depth: int) -> int:
    return _linear(n_in, hidden) + (depth - 1) * _linear(hidden, hidden)


# -- whole models ---------------------------------------------------------------------------------
def fudoki_params(config: FudokiConfig) -> int:
    """:class:`~kineflow.models.fudoki.FudokiModel` (Janus layout)."""
    c = config
    D, V = c.language.hidden_size, c.language.vocab_size
    K, d = c.gen_vision.codebook_size, c.gen_vision.codebook_dim
    n = llama_params(c.language) + _linear(D, V, bias=False)  # lm_head, untied
    if c.vision is not None:
        n += siglip_params(c.vision)
        n += _aligner(c.vision.hidden_size, c.aligner_hidden, c.aligner_depth)
        n += c.vision.num_patches * D if c.understanding_positions else 0  # the position table
    n += vq_params(c.gen_vision) + _aligner(d, c.gen_aligner_hidden, c.gen_aligner_depth)
    n += _linear(D, c.gen_head_hidden) + _linear(c.gen_head_hidden, K)
    return n + (K + int(c.image_mask_token)) * d


def unifluid_params(config: UnifluidConfig) -> int:
    """:class:`~kineflow.models.unifluid.UnifluidModel` (tied text head)."""
    c = config
    D, C, L = c.language.hidden_size, c.vae.token_dim, c.num_image_tokens
    n = llama_params(c.language) + kl_vae_params(c.vae)
    n += 2 * _linear(C, D) + 2 * L * D  # image_in, source_in, pos_in, pos_next
    if c.vision is not None:
        n += siglip_params(c.vision) + _linear(c.vision.hidden_size, D)
    return n + diffusion_head_params(c.head_config())


#: The configs :func:`check_model_size` can size: whole models and their towers.
ModelConfig = (
    FudokiConfig | UnifluidConfig | LlamaConfig | SiglipConfig | VQConfig | KLConfig
    | DiffusionHeadConfig
)  # fmt: skip
# A config's type -> the function counting the parameters of the model it builds.
_COUNTERS: dict[type, Callable[[Any], int]] = {
    FudokiConfig: fudoki_params,
    UnifluidConfig: unifluid_params,
    LlamaConfig: llama_params,
    SiglipConfig: siglip_params,
    VQConfig: vq_params,
    KLConfig: kl_vae_params,
    DiffusionHeadConfig: diffusion_head_params,
}


def _extra_bytes(config: ModelConfig) -> int:
    """Memory a model takes beyond its parameters: a diffusion head's two schedules."""
    head = config.head_config() if isinstance(config, UnifluidConfig) else config
    if isinstance(head, DiffusionHeadConfig):
        return 2 * (head.steps + 1) * _SCHEDULE_BYTES_PER_STEP
    return 0


# -- the limit ------------------------------------------------------------------------------------
def _physical_memory() -> int | None:
    """The machine's RAM in bytes, or None where the OS does not say."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def _parse_bytes(text: str) -> int:
    """``"68719476736"``, ``"64GiB"``, ``"1.5 TiB"`` -> bytes (binary units only)."""
    s = text.strip().upper().replace(" ", "")
    digits = s.rstrip("BKMGTI")
    unit = s[len(digits) :]
    try:
        value = float(digits) * _UNITS[unit]
    except (KeyError, ValueError):
        raise ValueError(
            f"{MAX_BYTES_ENV}={text!r} is not a size: give bytes (68719476736) or a binary "
            "unit (64GiB, 1.5TiB)"
        ) from None
    if not value > 0:
        raise ValueError(f"{MAX_BYTES_ENV}={text!r} must be positive")
    return int(value)


def max_model_bytes(max_bytes: int | None = None) -> tuple[int, str]:
    """The size limit and where it comes from: ``max_bytes`` when given, else the
    :data:`MAX_BYTES_ENV` environment variable, else the smaller of the machine's RAM and
    :data:`DEFAULT_MAX_MODEL_BYTES`.

    Raises:
        ValueError: ``max_bytes`` is not a positive int, or the variable is not a size.
    """
    if max_bytes is not None:
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 1:
            raise ValueError(f"max_bytes must be a positive int, got {max_bytes!r}")
        return max_bytes, "max_bytes="
    env = os.environ.get(MAX_BYTES_ENV)
    if env:
        return _parse_bytes(env), MAX_BYTES_ENV
    ram = _physical_memory()
    if ram is not None and ram < DEFAULT_MAX_MODEL_BYTES:
        return ram, "the machine's RAM"
    return DEFAULT_MAX_MODEL_BYTES, "the default cap"


def _human(n: int) -> str:
    """Bytes in the largest binary unit that keeps the number >= 1 (up to EiB)."""
    value, unit = float(n), "bytes"
    for next_unit in ("KiB", "MiB", "GiB", "TiB", "PiB", "EiB"):
        if value < 1024:
            break
        value, unit = value / 1024, next_unit
    return f"{value:,.1f} {unit}"


def check_model_size(config: ModelConfig, source: str, max_bytes: int | None = None) -> int:
    """Refuse ``config`` (a whole model's or a tower's) if building its model would take more
    memory than the limit (:func:`max_model_bytes`); returns the estimate in bytes otherwise.

    The estimate is the parameter count times the size of torch's default dtype (models are
    built in it before the weights are copied in), plus the few non-parameter tensors some
    models hold. ``source`` (the config file) starts the message.

    Raises:
        ValueError: naming the parameter count, the bytes, the limit and the knobs that raise
            it.
    """
    params = _COUNTERS[type(config)](config)
    itemsize = torch.empty((), dtype=torch.get_default_dtype()).element_size()
    needed = params * itemsize + _extra_bytes(config)
    limit, origin = max_model_bytes(max_bytes)
    if needed > limit:
        raise ValueError(
            f"{source} describes a model of {params:,} parameters, which needs about "
            f"{_human(needed)} to build, more than the limit of {_human(limit)} ({origin}); if the "
            f"config is right, raise the limit with kineflow.load(..., max_bytes=N) or the "
            f"{MAX_BYTES_ENV} environment variable (e.g. {MAX_BYTES_ENV}=256GiB)"
        )
    return needed
