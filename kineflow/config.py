"""Config dataclasses from plain dicts (JSON / YAML): the one check every ``from_dict`` makes."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, TypeVar

T = TypeVar("T")


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


def build_run_config(
    cls: type[T],
    raw: Mapping[str, Any],
    sections: Mapping[str, type],
    required: tuple[str, ...],
) -> T:
    """A training-run config ``cls(**raw)`` whose ``sections`` (e.g. ``{"optim": Optim}``)
    become their dataclasses; every unknown key, at the top or in a section, is named."""
    if not isinstance(raw, Mapping):
        raise ValueError(f"a run config must be a mapping, got {raw!r}")
    raw = dict(raw)
    check_config_keys(raw, cls, "config")
    for key, sub in sections.items():
        if key in raw:
            if not isinstance(raw[key], Mapping):
                raise ValueError(f"{key} must be a mapping, got {raw[key]!r}")
            check_config_keys(raw[key], sub, "config", prefix=f"{key}.")
            raw[key] = sub(**raw[key])
    missing = [k for k in required if k not in raw]
    if missing:
        raise ValueError(f"the config needs {missing}")
    return cls(**raw)


def load_yaml_config(cls: type[T], path: str | os.PathLike[str]) -> T:
    """``cls.from_dict`` of a YAML file; every error names the file."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such config file")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ValueError(f"{path}: not valid YAML ({err})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a mapping at the top level")
    try:
        return cls.from_dict(raw)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{path}: {err}") from None


class RunConfig:
    """Base of the run-config dataclasses (training runs, the reproduction): ``from_dict`` /
    ``from_yaml`` with every unknown or missing key named, ``to_dict`` for YAML / JSON.

    Subclasses set ``SECTIONS`` (nested keys and their dataclasses, e.g. ``{"optim": Optim}``)
    and ``REQUIRED`` (keys without a default), and may override :meth:`check` for checks that
    need the whole config."""

    SECTIONS: ClassVar[Mapping[str, type]] = {}
    REQUIRED: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def from_dict(cls: type[T], raw: Mapping[str, Any]) -> T:
        config = build_run_config(cls, raw, cls.SECTIONS, cls.REQUIRED)
        config.check()
        return config

    @classmethod
    def from_yaml(cls: type[T], path: str | os.PathLike[str]) -> T:
        return load_yaml_config(cls, path)

    def check(self) -> None:
        """Raise ValueError for a config that cannot run (nothing beyond the keys here)."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
