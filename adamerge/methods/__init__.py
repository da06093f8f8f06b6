"""Merge methods by name (the ``name`` key of a ``configs/method/*.yaml``).

Each module files its classes in the registry with ``@register``; importing every module of this
package here fills it, so a new method is one new file.
"""

from __future__ import annotations

import importlib
import pkgutil

from ..errors import CheckpointError
from .algorithm import MergeAlgorithm
from .base import MergeMethod
from .registry import METHODS, get_method

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["METHODS", "CheckpointError", "MergeAlgorithm", "MergeMethod", "get_method"]
