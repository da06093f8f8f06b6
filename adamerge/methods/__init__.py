"""Merge methods by name (the ``name`` key of a ``configs/method/*.yaml``)."""

from __future__ import annotations

from .adamerging import AdaMerging
from .base import CheckpointError, MergeMethod
from .concrete import ConcreteAdaMerging, ConcreteTaskArithmetic
from .expert_merging import ExpertMerging, ExpertMergingPP
from .frank_wolfe import FrankWolfeMerging
from .projective import ProjectiveMerge
from .static import StaticMerge

METHODS: dict[str, type[MergeMethod]] = {
    "static": StaticMerge,
    "adamerging": AdaMerging,
    "fw_merging": FrankWolfeMerging,
    "concrete_task_arithmetic": ConcreteTaskArithmetic, "concrete_adamerging": ConcreteAdaMerging,
    "projective": ProjectiveMerge,
    "expert_merging": ExpertMerging, "expert_merging_pp": ExpertMergingPP,
}


def get_method(name: str) -> type[MergeMethod]:
    if name not in METHODS:
        raise ValueError(f"unknown method '{name}'; available: {sorted(METHODS)}")
    return METHODS[name]


__all__ = ["METHODS", "CheckpointError", "MergeMethod", "get_method"]
