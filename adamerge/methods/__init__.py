"""Merge methods by name (the ``name`` key of a ``configs/method/*.yaml``).

Each module files its classes in the registry with ``@register``; importing them here fills it.
"""

from __future__ import annotations

from . import (  # noqa: F401  (imported for their @register)
    adamerging,
    concrete,
    distill,
    expert_merging,
    fisher,
    frank_wolfe,
    pcb,
    projective,
    regmean,
    static,
    tsv,
)
from .base import CheckpointError, MergeMethod
from .registry import METHODS, get_method

__all__ = ["METHODS", "CheckpointError", "MergeMethod", "get_method"]
