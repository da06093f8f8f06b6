"""Merge methods by name (the ``name`` key of a ``configs/method/*.yaml``)."""

from __future__ import annotations

from .adamerging import AdaMerging
from .base import CheckpointError, MergeMethod
from .concrete import ConcreteAdaMerging, ConcreteTaskArithmetic
from .distill import DistillMerging
from .expert_merging import ExpertMerging, ExpertMergingPP
from .fisher import FisherMerging
from .frank_wolfe import FrankWolfeMerging
from .pcb import PCBMerging
from .projective import ProjectiveMerge
from .regmean import RegMean, RegMeanPP
from .static import StaticMerge
from .tsv import TSVMerging

METHODS: dict[str, type[MergeMethod]] = {
    "static": StaticMerge,
    "adamerging": AdaMerging,
    "fw_merging": FrankWolfeMerging,
    "concrete_task_arithmetic": ConcreteTaskArithmetic, "concrete_adamerging": ConcreteAdaMerging,
    "projective": ProjectiveMerge,
    "expert_merging": ExpertMerging, "expert_merging_pp": ExpertMergingPP, "distill_merging": DistillMerging,
    "regmean": RegMean, "regmean_pp": RegMeanPP, "fisher_merging": FisherMerging, "pcb_merging": PCBMerging, "tsv_merging": TSVMerging,
}


def get_method(name: str) -> type[MergeMethod]:
    if name not in METHODS:
        raise ValueError(f"unknown method '{name}'; available: {sorted(METHODS)}")
    return METHODS[name]


__all__ = ["METHODS", "CheckpointError", "MergeMethod", "get_method"]
