"""Data-free merges: weight average, task arithmetic, TIES, DARE, consensus.

Each is a fixed task-wise coefficient on (possibly transformed) task vectors, so it runs through the
same MergedModel, export and evaluation as the learned methods — with no optimization steps.
"""

from __future__ import annotations

from ..coefficients import Coefficients
from ..task_vectors import TaskVectors
from .base import MergeMethod


class StaticMerge(MergeMethod):
    """θ = θ0 + λ Σ_k τ̃_k with τ̃ from ``prepare_task_vectors`` (DARE / TIES / consensus)."""

    name = "static"
    trainable = False

    def build_coefficients(self, tv: TaskVectors) -> Coefficients:
        scale = self.method_cfg.get("scale")
        lam = 1.0 / tv.K if scale is None else float(scale)  # scale null = weight average
        coefs = Coefficients(tv.K, len(tv), granularity="task", init=lam)
        coefs.requires_grad_(False)
        return coefs
