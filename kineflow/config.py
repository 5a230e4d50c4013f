"""Config dataclasses from plain dicts (JSON / YAML): the one check every ``from_dict`` makes."""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, TypeVar, Union

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


def check_types(data: Mapping[str, Any], cls: type, prefix: str = "") -> None:
    """Raise ``ValueError("{prefix}{key} must be an integer, got '32'")`` for the first value of
    ``data`` that does not fit the annotation of the field ``key`` of the dataclass ``cls``.

    Why: a YAML value of the wrong type (``hidden_size: "32"``, or ``lr: 1e-3``, which YAML
    reads as a string) otherwise fails deep inside the model with a message that names
    neither the key nor the file. Nested dataclass fields given as mappings are checked
    recursively (``model.language.hidden_size``); an int is accepted where a float is
    expected, a list where a tuple is; keys that are not fields, and annotations this check
    does not know (``Any``, callables, ...), are left to the dataclass itself.
    """
    try:
        hints = typing.get_type_hints(cls)
    except (NameError, TypeError):  # an annotation that does not resolve: nothing to check
        return
    for key, value in data.items():
        if key in hints:
            _check_value(value, hints[key], f"{prefix}{key}")


def _describe(hint: Any) -> str | None:
    """``"an integer"`` for ``int`` etc.; None for a hint :func:`_fits` does not check."""
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        words = [_describe(a) for a in typing.get_args(hint) if a is not type(None)]
        if None in words:
            return None
        nullable = type(None) in typing.get_args(hint)
        return " or ".join(words + (["null"] if nullable else []))
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(hint))
    simple = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    if hint in simple:
        return simple[hint]
    if origin in (list, tuple) or hint in (list, tuple):
        return "a list"
    if origin is dict or hint is dict or dataclasses.is_dataclass(hint):
        return "a mapping"
    return None


def _fits(value: Any, hint: Any) -> bool:
    """Whether ``value`` (a plain YAML / JSON value) fits ``hint`` at the top level."""
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        return any(_fits(value, a) for a in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if origin is typing.Literal:
        return value in typing.get_args(hint)
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin in (list, tuple) or hint in (list, tuple):
        return isinstance(value, (list, tuple))
    if origin is dict or hint is dict:
        return isinstance(value, Mapping)
    if dataclasses.is_dataclass(hint):
        return isinstance(value, (Mapping, hint))
    return True  # Any, callables, classes: the dataclass checks them itself


def _check_value(value: Any, hint: Any, name: str) -> None:
    if not _fits(value, hint):
        got = repr(value)
        if isinstance(value, str) and _is_number(value) and "e" in value.lower():
            # YAML 1.1 (PyYAML) reads 1e-3, without a dot, as a string: not a typo to spot.
            got += " (YAML reads 1e-3 as a string: write 1.0e-3)"
        raise ValueError(f"{name} must be {_describe(hint)}, got {got}")
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):
        # Check inside the first member the value fits (e.g. the dataclass of ``X | None``).
        fitting = [a for a in args if _fits(value, a)]
        _check_value(value, fitting[0], name)
    elif dataclasses.is_dataclass(hint) and isinstance(value, Mapping):
        check_types(value, hint, f"{name}.")
    elif origin in (list, tuple) and args and isinstance(value, (list, tuple)):
        if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
            if len(value) != len(args):
                raise ValueError(f"{name} must be a list of {len(args)} items, got {value!r}")
            for i, (v, a) in enumerate(zip(value, args, strict=True)):
                _check_value(v, a, f"{name}[{i}]")
        else:
            for i, v in enumerate(value):
                _check_value(v, args[0], f"{name}[{i}]")
    elif origin is dict and len(args) == 2 and isinstance(value, Mapping):
        for k, v in value.items():
            _check_value(v, args[1], f"{name}.{k}")


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def build_run_config(
    cls: type[T],
    raw: Mapping[str, Any],
    sections: Mapping[str, type],
    required: tuple[str, ...],
) -> T:
    """A training-run config ``cls(**raw)`` whose ``sections`` (e.g. ``{"optim": Optim}``)
    become their dataclasses; every unknown key, at the top or in a section, is named, and
    every value of the wrong type (:func:`check_types`)."""
    if not isinstance(raw, Mapping):
        raise ValueError(f"a run config must be a mapping, got {raw!r}")
    raw = dict(raw)
    check_config_keys(raw, cls, "config")
    defaults = {f.name: f.default for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    for key in sections:  # an optional section (e.g. lora) written as null: not there
        if key in raw and raw[key] is None and defaults.get(key) is None:
            del raw[key]
    for key, sub in sections.items():
        if key in raw:
            if not isinstance(raw[key], Mapping):
                raise ValueError(f"{key} must be a mapping, got {raw[key]!r}")
            check_config_keys(raw[key], sub, "config", prefix=f"{key}.")
    check_types(raw, cls)  # sections too: their annotations are their dataclasses
    for key, sub in sections.items():
        if key in raw:
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
