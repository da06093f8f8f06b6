"""The method registry: ``@register`` on a MergeAlgorithm subclass makes it ``method.name=<its name>``."""

from __future__ import annotations

from typing import TypeVar

from ..errors import ConfigError

METHODS: dict[str, type] = {}
T = TypeVar("T", bound=type)


def register(cls: T) -> T:
    """Class decorator: file the class under its ``name`` (one name, one class)."""
    if cls.name in METHODS and METHODS[cls.name] is not cls:
        raise ValueError(f"two methods named '{cls.name}': {METHODS[cls.name].__qualname__} and {cls.__qualname__}")
    METHODS[cls.name] = cls
    return cls


def get_method(name: str) -> type:
    """The class registered as ``name``; a ConfigError naming the nearest names otherwise."""
    if name not in METHODS:
        raise ConfigError(f"unknown method name '{name}' (config key 'method.name'); available: {', '.join(sorted(METHODS))}")
    return METHODS[name]
