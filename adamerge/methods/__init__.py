"""Merge methods by name (the ``name`` key of a ``configs/method/*.yaml``).

Each module files its classes in the registry with ``@register``; ``get_method`` imports the module a name
lives in (``registry.MODULES``), so a new method is one new file and one line there.
"""

from __future__ import annotations

from ..errors import CheckpointError
from .algorithm import MergeAlgorithm
from .registry import all_methods, get_method

__all__ = ["CheckpointError", "MergeAlgorithm", "all_methods", "get_method"]
