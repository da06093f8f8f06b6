"""The method registry: ``@register`` on a MergeAlgorithm subclass makes it ``method.name=<its name>``.

``MODULES`` says which module of this package defines each name, so that ``get_method`` imports that module
alone: a learned method's module imports Lightning, which a data-free merge never needs (a streamed merge
starts seconds sooner without it). tests/test_method_configs.py checks that it names every registered class.
"""

from __future__ import annotations

import importlib
from typing import TypeVar

from ..errors import ConfigError

METHODS: dict[str, type] = {}  # filled as modules are imported
MODULES = {
    "adamerging": "adamerging", "concrete_adamerging": "concrete", "concrete_task_arithmetic": "concrete", "dam": "dam",
    "distill_merging": "distill", "expert_merging": "expert_merging", "expert_merging_pp": "expert_merging_pp",
    "fisher_merging": "fisher", "ota_merging": "ota", "fw_merging": "frank_wolfe", "map": "map", "evolve": "evolve", "m2n2": "m2n2", "twin_merging": "twin", "pcb_merging": "pcb", "projective": "projective",
    "regmean": "regmean", "regmean_pp": "regmean", "static": "static", "tsv_merging": "tsv",
}
T = TypeVar("T", bound=type)


def register(cls: T) -> T:
    """Class decorator: file the class under its ``name`` (one name, one class)."""
    if cls.name in METHODS and METHODS[cls.name] is not cls:
        raise ValueError(f"two methods named '{cls.name}': {METHODS[cls.name].__qualname__} and {cls.__qualname__}")
    METHODS[cls.name] = cls
    return cls


def get_method(name: str) -> type:
    """The class registered as ``name`` (its module imported now); a ConfigError listing the names otherwise."""
    if name not in MODULES:
        raise ConfigError(f"unknown method name '{name}' (config key 'method.name'); available: {', '.join(sorted(MODULES))}")
    if name not in METHODS:
        importlib.import_module(f"{__package__}.{MODULES[name]}")
    return METHODS[name]


def all_methods() -> dict[str, type]:
    """Every method, by name (imports every method module)."""
    return {name: get_method(name) for name in sorted(MODULES)}
