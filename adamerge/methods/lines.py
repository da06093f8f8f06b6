"""The base of merges that compute the merged update directly (and LiNeS on it, adamerge/lines.py).

LiNeS ("Post-training Layer Scaling Prevents Forgetting and Enhances Model Merging", ICLR 2025):
the merged update of layer l (0-based block index from the tensor name, L blocks) is scaled by

    λ(l) = α + β · l / (L − 1),

so shallow layers stay near the pretrained weights; tensors outside numbered blocks (embeddings,
final norms, pooler) get α, as in the authors' code. In multi-task merging LiNeS *replaces* the
merge's global scale; the authors set α = ‖Σ_k τ_k‖ / (K·‖τ_MTL‖) (``alpha: auto``: shallow layers
move as far as the average of the task vectors) and tune β ∈ [0, 1] on validation data.

``DeltaMerge`` is the shared base of RegMean(++), Fisher, PCB and TSV-M: a subclass returns the
unscaled merged update D (name -> merged − base); the base applies ``scale`` (or LiNeS instead of
it) and expresses the result through the shared MergedModel as K rows (D·s)/K with fixed
coefficients 1, so evaluation, export and ``coefficients.json`` work unchanged.
"""

from __future__ import annotations

from typing import Any

import torch

from ..coefficients import Coefficients
from ..data import DataError, encode, load_tokenizer, read_jsonl, trim
from ..lines import apply_lines, lines_config
from ..merged_model import MergedModel
from ..pool import ModelPool
from ..task_vectors import TaskVectors
from .base import MergeMethod


# ----------------------------------------------------------------------------------------------
# distributed statistics
# ----------------------------------------------------------------------------------------------
def dist_rank_world() -> tuple[int, int]:
    """(rank, world) when torch.distributed is running, else (0, 1)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum a statistic over processes (each process saw its own slice of the calibration data)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


# ----------------------------------------------------------------------------------------------
# the base of closed-form merges
# ----------------------------------------------------------------------------------------------
class DeltaMerge(MergeMethod):
    """A non-iterative merge that computes the merged update directly (no optimizer steps)."""

    name = "delta_merge"
    trainable = False

    def __init__(self, pool: ModelPool, method: dict, task_vectors: dict | None = None):
        # LiNeS applies here to the merged update, not to the task vectors as in prepare_task_vectors
        super().__init__(pool, {k: v for k, v in method.items() if k != "lines"}, task_vectors)
        m = self.method_cfg
        self.lines = lines_config(method.get("lines"))
        self._tokenizer = None
        merged = self.merged
        tv = merged.task_vectors
        device = torch.device(m["device"]) if m.get("device") else None
        if device is not None:
            merged.to(device)  # statistics on an accelerator; moved back below
        with torch.no_grad():
            direction = self.merge_direction(tv if device is None else merged.task_vectors)
        direction = {n: d.detach().float().cpu() for n, d in direction.items()}
        if device is not None:
            merged.to("cpu")
            tv = merged.task_vectors
        if self.lines:
            delta = apply_lines(direction, tv, self.lines)
        else:
            s = float(m.get("scale", 1.0))
            delta = {n: d * s for n, d in direction.items()}
        # K equal rows (D/K) with coefficient 1: merged = base + D, task bookkeeping intact; the
        # rows are views of one tensor (no K copies)
        K = tv.K
        rows = {n: (delta[n] / K).to(tv[n].dtype).unsqueeze(0).expand(K, *delta[n].shape) for n in tv.names}
        self.merged = MergedModel(pool.base_model, TaskVectors(rows, tv.task_names), merged.coefficients,
                                  merged.heads, tv_device=merged.tv_device)

    def build_coefficients(self, tv: TaskVectors) -> Coefficients:
        coefs = Coefficients(tv.K, len(tv), granularity="task", init=1.0)
        coefs.requires_grad_(False)
        return coefs

    def merge_direction(self, tv: TaskVectors) -> dict[str, torch.Tensor]:
        """The unscaled merged update D (name -> merged − base) for every tensor of ``tv``."""
        raise NotImplementedError

    # -- helpers for the data-dependent merges ----------------------------------------------------
    def calibration_batches(self, task: str) -> list[dict[str, torch.Tensor]]:
        """This process's slice of ``num_examples`` calibration texts of ``task``, tokenized, in batches."""
        m = self.method_cfg
        spec = self.pool.tasks[task]
        if not spec.calibration:
            raise DataError(f"task '{task}' has no calibration file in the pool config ({self.method_id} needs one)")
        n = int(m.get("num_examples", 256))
        bs = int(m.get("batch_size", 16))
        max_length = int(m.get("max_length", 64))
        for key, v in (("num_examples", n), ("batch_size", bs)):
            if v <= 0:
                raise ValueError(f"method.{key} must be > 0, got {v}")
        rank, world = dist_rank_world()
        texts = read_jsonl(spec.calibration, task)[0][:n][rank::world]
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.pool.base_path, causal=self.causal)
        if not texts:
            return []
        enc = encode(self._tokenizer, texts, max_length)
        dev = self.merged.device
        return [trim({k: v[i:i + bs].to(dev) for k, v in enc.items()}) for i in range(0, len(texts), bs)]

    def forward_kwargs(self, inputs: dict[str, torch.Tensor]) -> dict[str, Any]:
        return {**inputs, "use_cache": False} if self.causal else dict(inputs)

    def report(self) -> dict[str, Any]:
        rep = super().report()
        rep["note"] = ("closed-form merge: each task row holds (merged − base)/K with coefficient 1"
                       + (f"; LiNeS {self.lines}" if self.lines else ""))
        return rep
