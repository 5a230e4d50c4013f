"""Config dataclasses from plain dicts (JSON / YAML): the one check every ``from_dict`` makes."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any


def check_config_keys(data: Mapping[str, Any], cls: type, what: str, prefix: str = "") -> None:
    """Raise ``ValueError("unknown {what} key(s) [...]; known keys are [...]")`` when ``data``
    has keys that are not fields of the dataclass ``cls`` (``prefix`` is put before every
    name, e.g. ``"optim."`` for a nested section), so a typo is named instead of ignored."""
    if not isinstance(data, Mapping):
        raise TypeError(f"a {what} must be a mapping, got {type(data).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(
            f"unknown {what} key(s) {[prefix + k for k in unknown]}; "
            f"known keys are {sorted(prefix + k for k in known)}"
        )
