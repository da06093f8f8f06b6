"""Data-free merges: weight average, task arithmetic, TIES, DARE, consensus.

Each is a fixed task-wise coefficient on (possibly transformed) task vectors, so it runs through the
same MergedModel, export and evaluation as the learned methods — with no optimization steps.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from ..core.coefficients import Coefficients
from ..core.task_vectors import TaskVectors
from ..errors import ConfigError
from .algorithm import MergeAlgorithm
from .method_config import PER_TASK_RULES, MethodConfig
from .registry import register


def set_coefficients(merged, c) -> None:
    """``merged``'s coefficients set to ``c`` (the raw tensor's values, in any shape with as many, any dtype)."""
    raw = merged.coefficients.raw
    raw.data.copy_(torch.as_tensor(c).reshape(raw.shape).to(raw.dtype))


@contextlib.contextmanager
def coefficients_at(merged, c: torch.Tensor) -> Iterator[None]:
    """``merged``'s coefficients set to ``c`` inside the block, restored after it."""
    kept = merged.coefficients.raw.data.clone()
    set_coefficients(merged, c)
    try:
        yield
    finally:
        merged.coefficients.raw.data.copy_(kept)


@dataclass
class StaticConfig(MethodConfig):
    scale: float | list[float] | None = 0.3  # λ, or one λ per task (in the pool's order); null: 1/K (weight average)


@register
class StaticMerge(MergeAlgorithm):
    """θ = θ0 + λ Σ_k τ̃_k with τ̃ after the config's transforms (adamerge/core/transforms.py: DARE / TIES / consensus / LiNeS)."""

    name = "static"
    Config = StaticConfig

    @classmethod
    def supports_factorized(cls, cfg: MethodConfig) -> bool:
        return True  # λ Σ_k τ_k (the transforms, which read τ's entries, are checked by the caller)

    @staticmethod
    def scale(cfg: StaticConfig, K: int) -> float | list[float]:
        """λ: the config's ``scale`` (one value, or one per task), or 1/K (weight average)."""
        if isinstance(cfg.scale, (list, tuple)):
            if len(cfg.scale) != K:
                raise ConfigError(f"method.scale gives {len(cfg.scale)} values for {K} tasks; give one λ or one per task")
            return [float(v) for v in cfg.scale]
        return 1.0 / K if cfg.scale is None else float(cfg.scale)

    @property
    def per_task(self) -> bool:
        """Whether each task has its own model, θ0 + row k of the transformed task vectors (``task_masks``, ``rmm``)."""
        return any(getattr(self.cfg, key) is not None for key in PER_TASK_RULES)

    def task_params(self, task: str) -> dict[str, torch.Tensor]:
        """Task ``task``'s own model's merged tensors (``per_task`` methods): the merge with a one-hot coefficient."""
        one_hot = torch.zeros_like(self.merged.coefficients.raw)
        one_hot[self.merged.task_names.index(task)] = 1.0
        with coefficients_at(self.merged, one_hot):
            return {n: v.detach().clone() for n, v in self.merged.merged_params().items()}

    def build_coefficients(self, tv: TaskVectors) -> Coefficients:
        coefs = Coefficients(tv.K, len(tv), granularity="task", init=self.scale(self.cfg, tv.K))
        coefs.requires_grad_(False)
        return coefs
