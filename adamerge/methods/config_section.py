"""The typed-config machinery: a ``ConfigSection`` dataclass parses a yaml dict, checking every key's name, type
and range before any work (adamerge/methods/method_config.py builds the method configs from it)."""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal

from ..errors import ConfigError, refuse_unknown_keys


def _fits(value: Any, hint: Any) -> bool:
    """Whether ``value`` (from yaml: None, bool, int, float, str, list, dict) fits the type ``hint``."""
    origin = typing.get_origin(hint)
    if hint is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, h) for h in typing.get_args(hint))
    if origin is Literal:
        return value in typing.get_args(hint)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin is list or hint is list:
        args = typing.get_args(hint)
        return isinstance(value, (list, tuple)) and (not args or all(_fits(v, args[0]) for v in value))
    if origin is dict or hint is dict:
        return isinstance(value, dict)
    if dataclasses.is_dataclass(hint):
        return isinstance(value, dict)
    return True


def _describe(hint: Any) -> str:
    if typing.get_origin(hint) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(hint))
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_describe(h) for h in typing.get_args(hint))
    if dataclasses.is_dataclass(hint):
        return "{" + ", ".join(f.name for f in dataclasses.fields(hint)) + "}"
    if hint is type(None):
        return "null"
    if typing.get_origin(hint) is list or hint is list:
        return "a list"
    words = {float: "a number", int: "an integer", str: "a string", bool: "true or false", dict: "a mapping"}
    return words.get(hint, getattr(hint, "__name__", str(hint)))


def _dataclass_in(hint: Any) -> type | None:
    for h in (hint, *typing.get_args(hint)):
        if dataclasses.is_dataclass(h):
            return h
    return None


@dataclass
class ConfigSection:
    """A block of config keys; ``parse`` builds it from a yaml dict, checking every key."""

    @classmethod
    def parse(cls, values: dict[str, Any], prefix: str = "method") -> ConfigSection:
        hints = typing.get_type_hints(cls)
        names = [f.name for f in dataclasses.fields(cls)]
        refuse_unknown_keys(values, names, prefix, cls.owner(), ConfigError)
        required = [f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING
                    and f.default_factory is dataclasses.MISSING and f.name not in values]
        if required:
            raise ConfigError(f"config key '{prefix}.{required[0]}' is required")
        kwargs = {}
        for key, value in values.items():
            where = f"{prefix}.{key}"
            if not _fits(value, hints[key]):
                raise ConfigError(f"config key '{where}' must be {_describe(hints[key])}, got {value!r}")
            sub = _dataclass_in(hints[key])
            if sub is not None and isinstance(value, dict):
                value = sub.parse(value, where)
            kwargs[key] = value
        section = cls(**kwargs)
        section.check(prefix)
        return section

    @classmethod
    def owner(cls) -> str:
        return f"'{cls.__name__}'"

    def check(self, prefix: str) -> None:
        """Range checks across keys (types were checked by ``parse``); raise ConfigError naming the key."""

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def check_range(value: float | None, key: str, lo: float | None = None, hi: float | None = None,
                strict_lo: bool = False) -> None:
    """ConfigError naming ``key`` when ``value`` (a number or None) lies outside [lo, hi] (or (lo, hi])."""
    if value is None:
        return
    if value != value or value in (float("inf"), float("-inf")):
        raise ConfigError(f"config key '{key}' must be finite, got {value!r}")
    if lo is not None and (value <= lo if strict_lo else value < lo):
        raise ConfigError(f"config key '{key}' must be {'>' if strict_lo else '>='} {lo}, got {value!r}")
    if hi is not None and value > hi:
        raise ConfigError(f"config key '{key}' must be <= {hi}, got {value!r}")
