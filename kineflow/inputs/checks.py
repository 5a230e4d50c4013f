"""Checks of what a user passes to a sampling call, shared by every pipeline.

A bad sampling option must fail at the API boundary with its name in the message, not deep in
a solver (``temperature=nan`` turned into ``index 22 is out of bounds``) or, worse, as a
silently black picture (UniFluid with ``cfg_scale=nan``). Every pipeline method runs its
options through :func:`check_options`, its texts through :func:`check_texts` and its device
through :func:`check_device`; prompts too long for the model are refused by
:func:`too_many_positions` *before* any heavy work, after counting their tokens.

Non-UTF-8 text (on Linux, argv bytes that are not UTF-8 arrive as lone surrogates) is
refused, not repaired: decoding with replacement characters would sample from a prompt the
user did not write.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from typing import Any

import torch

__all__ = [
    "DEVICE_FORMS",
    "check_device",
    "check_options",
    "check_texts",
    "too_many_positions",
]

#: The device strings the pipelines (and the CLI's ``--device``) accept.
DEVICE_FORMS = "cpu, cuda, cuda:N (N = 0, 1, ...) or mps"
_SEED_MAX = 2**64 - 1  # torch.Generator.manual_seed takes unsigned 64-bit seeds


def _integer(name: str, value: Any, lo: int, hi: int | None = None) -> int:
    # bool is an int subclass, but steps=True is a mistake, not 1.
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    value = int(value)
    if value < lo or (hi is not None and value > hi):
        bound = f">= {lo}" if hi is None else f"between {lo} and {hi}"
        raise ValueError(f"{name} must be {bound}, got {value}")
    return value


def _finite(name: str, value: Any, lo: float) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number, got {value!r}")
    value = float(value)
    # nan compares false with everything, so it would slip through a plain range check.
    if not math.isfinite(value) or value < lo:
        raise ValueError(f"{name} must be >= {lo:g} and finite, got {value!r}")
    return value


#: Rule per option name; None is always allowed and means "the pipeline's default".
_RULES: dict[str, Callable[[str, Any], Any]] = {
    "steps": lambda n, v: _integer(n, v, 1),
    "temperature": lambda n, v: _finite(n, v, 0.0),  # 0: greedy (see sample_logits)
    "cfg_scale": lambda n, v: _finite(n, v, 0.0),
    "top_k": lambda n, v: _integer(n, v, 1),
    "seed": lambda n, v: _integer(n, v, 0, _SEED_MAX),
    "answer_tokens": lambda n, v: _integer(n, v, 1),
    "max_tokens": lambda n, v: _integer(n, v, 1),
    "beams": lambda n, v: _integer(n, v, 1),
    "frames": lambda n, v: _integer(n, v, 1),
    "best_of": lambda n, v: _integer(n, v, 1),
}


def check_options(**options: Any) -> dict[str, Any]:
    """Validate sampling options by name; returns them normalised (``int`` / ``float``).

    Rules: ``steps``, ``top_k``, ``answer_tokens``, ``max_tokens``, ``beams``, ``frames``,
    ``best_of``: integers >= 1; ``temperature`` and ``cfg_scale``: finite numbers >= 0
    (temperature 0 is greedy); ``seed``: an integer in ``[0, 2**64 − 1]``. None passes
    through (the default).

    Raises:
        ValueError: naming the option, the rule and the value given.
        KeyError: an option without a rule (a programming error, not a user one).
    """
    return {
        name: None if value is None else _RULES[name](name, value)
        for name, value in options.items()
    }


def check_texts(texts: Any, what: str, special_tokens: Sequence[str] = ()) -> list[str]:
    """One text or a sequence of texts as a list of stripped strings (the official chat
    template strips every message).

    Raises:
        TypeError: ``texts`` (or an item) is not a str (e.g. bytes), naming the item.
        ValueError: no texts, an empty one, one that is not valid UTF-8 (lone surrogates), or
            one containing a special-token string, which would be read as a real image /
            sequence marker.
    """
    if isinstance(texts, str):
        texts = [texts]
    elif isinstance(texts, (bytes, bytearray)) or not isinstance(texts, Sequence):
        raise TypeError(f"{what}s must be a str or a list of str, got {type(texts).__name__}")
    if not texts:
        raise ValueError(f"no {what}s given")
    out = []
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"{what} {i} must be a str, got {type(text).__name__}")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            # A lone surrogate: os.fsdecode's escape of a byte that is not UTF-8.
            code = ord(text[e.start])
            byte = f" (the byte 0x{code - 0xDC00:02x})" if 0xDC80 <= code <= 0xDCFF else ""
            raise ValueError(
                f"{what} {i} is not valid UTF-8{byte} at character {e.start}: "
                "give the text in UTF-8"
            ) from None
        if not text.strip():
            raise ValueError(
                f"{what} {i} is empty (an empty prompt / instruction / question gives the "
                "model nothing to follow)"
            )
        found = [s for s in special_tokens if s in text]
        if found:
            raise ValueError(f"{what} {i} contains the special token(s) {found}")
        out.append(text.strip())
    return out


def too_many_positions(
    what: str,
    i: int,
    tokens: int,
    limit: int,
    reserved: int = 0,
    reserved_for: str = "",
    *,
    including: str = "the chat template",
    knob: str = "",
) -> ValueError | None:
    """The error for a row of ``tokens`` positions (the text with ``including``) when it and
    the ``reserved`` positions the output needs exceed the model's ``limit``
    (``max_position_embeddings``: RoPE past it is extrapolation the model never saw, and the
    attention cost grows with the square of the length); None when it fits.

    The message says what to do: shorten the text to what the output leaves, and/or lower
    ``knob`` (the option that sets ``reserved``, e.g. ``"answer_tokens= (--answer-tokens)"``).
    """
    if tokens + reserved <= limit:
        return None
    fixes = []
    if limit - reserved >= 1:
        fixes.append(f"shorten the {what} to at most {limit - reserved} tokens")
    if knob and limit - tokens >= 1:
        fixes.append(f"lower {knob} to at most {limit - tokens}")
    fix = ", or ".join(fixes) or f"shorten the {what}"
    extra = f", {reserved} of them for {reserved_for}" if reserved else ""
    return ValueError(
        f"{what} {i} has {tokens} tokens with {including}; this model reads at most {limit} "
        f"positions (max_position_embeddings){extra}: {fix}"
    )


def check_device(device: torch.device | str | None) -> torch.device | None:
    """``device`` as a :class:`torch.device` that exists here (None passes through).

    Raises:
        ValueError: a string torch does not parse (naming the accepted forms), CUDA asked for
            without a CUDA device, or a CUDA index beyond the devices present.
    """
    if device is None:
        return None
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"device {device!r} is not a device: use {DEVICE_FORMS}") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} was asked for but torch finds no CUDA device")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise ValueError(
                f"device {device!r}: there are only {torch.cuda.device_count()} CUDA device(s)"
            )
    if parsed.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {device!r} was asked for but torch finds no MPS device")
    return parsed
