"""The base of closed-form merges: a subclass computes the merged update directly (no optimizer steps).

``DeltaMerge`` is the shared base of RegMean(++), Fisher, PCB and TSV-M: a subclass returns the
unscaled merged update D (name -> merged − base); the base applies ``scale`` — or LiNeS layer
scaling instead of it (adamerge/core/lines.py: λ(l) = α + β·l/(L − 1) per block, which in multi-task
merging replaces the global scale) — and holds the result as the offset of a MergedModel without a
learned part: W = W0 + D·s. ``coefficients.json`` then has no coefficient table.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..core.coefficients import Coefficients
from ..core.lines import apply_lines, lines_config
from ..core.merged_model import MergedModel
from ..core.task_vectors import TaskVectors
from ..pool.model_pool import ModelPool
from ..run.data import batches, read_split
from ..run.distributed import dist_rank_world
from .algorithm import MergeAlgorithm
from .method_config import MethodConfig, check_range


# ----------------------------------------------------------------------------------------------
# the base of closed-form merges
# ----------------------------------------------------------------------------------------------
@dataclass
class DeltaConfig(MethodConfig):
    """Keys of every closed-form merge."""
    scale: float = 1.0            # the merged update is scaled by this (LiNeS replaces it when on)
    device: str | None = None     # where the merged update is computed (null: cpu)


@dataclass
class StatisticsConfig(DeltaConfig):
    """Keys of the closed-form merges that read calibration statistics (RegMean's Grams, Fisher's diagonals)."""
    num_examples: int = 256       # calibration examples per task
    batch_size: int = 16
    max_length: int = 64

    def check(self, prefix: str) -> None:
        super().check(prefix)
        for key in ("num_examples", "batch_size", "max_length"):
            check_range(getattr(self, key), f"{prefix}.{key}", 1)


class DeltaMerge(MergeAlgorithm):
    """A non-iterative merge that computes the merged update directly (no optimizer steps)."""

    name = "delta_merge"
    Config = DeltaConfig
    lines_on_update = True

    def __init__(self, pool: ModelPool, method: dict, task_vectors: dict | None = None):
        super().__init__(pool, method, task_vectors)

    def build_merged(self, pool: ModelPool, tv_cfg: dict) -> MergedModel:
        """W = W0 + D: the merged update as the offset of a MergedModel without a learned part."""
        m = self.cfg
        self.lines = lines_config(m.lines)
        # the plain merge over the prepared task vectors: the statistics run the base through it
        self.merged = plain = super().build_merged(pool, tv_cfg)
        device = torch.device(m.device) if m.device else None
        if device is not None:
            plain.to(device)  # statistics on an accelerator; moved back below
        with torch.no_grad():
            direction = self.merge_direction(plain.task_vectors)
        direction = {n: d.detach().float().cpu() for n, d in direction.items()}
        if device is not None:
            plain.to("cpu")
        tv = plain.task_vectors
        delta = apply_lines(direction, tv, self.lines) if self.lines else {n: d * m.scale for n, d in direction.items()}
        offset = {n: delta[n].to(tv[n].dtype) for n in tv.names}  # in the task vectors' storage dtype
        return MergedModel(pool.base_model, None, None, plain.heads, tv_device=plain.tv_device, offset=offset)

    def build_coefficients(self, tv: TaskVectors) -> Coefficients:
        coefs = Coefficients(tv.K, len(tv), granularity="task", init=1.0)
        coefs.requires_grad_(False)
        return coefs

    def merge_direction(self, tv: TaskVectors) -> dict[str, torch.Tensor]:
        """The unscaled merged update D (name -> merged − base) for every tensor of ``tv``."""
        raise NotImplementedError

    def report(self) -> dict[str, Any]:
        return {"method": self.method_id, "tasks": self.pool.task_names, "tensors": self.merged.names,
                "granularity": None, "coefficients": None, "num_trainable": 0,
                "note": "closed-form merge: W = W0 + D, no per-task coefficients"
                        + (f"; LiNeS {self.lines}" if self.lines else "")}


class StatisticsMerge(DeltaMerge):
    """A closed-form merge computed from calibration statistics of the experts (RegMean, Fisher)."""

    name = "statistics_merge"
    Config = StatisticsConfig

    def calibration_batches(self, task: str) -> list[dict[str, torch.Tensor]]:
        """This process's slice of ``num_examples`` calibration texts of ``task``, tokenized, in batches."""
        m = self.cfg
        n, bs, max_length = m.num_examples, m.batch_size, m.max_length
        rank, world = dist_rank_world()
        texts = read_split(self.pool, task, "calibration", needed_by=self.method_id)[0][:n][rank::world]
        if not texts:
            return []
        return batches(self.family.encode(self.pool, texts, self.pool.tokenizer(), max_length), bs, self.merged.device)

    def forward_kwargs(self, inputs: dict[str, torch.Tensor]) -> dict[str, Any]:
        """The statistics' forward, as the learned objectives' (seq2seq LMs: the first decoder step)."""
        return self.family.model_inputs(self.merged.base, inputs)
