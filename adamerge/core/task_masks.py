"""One model per task from one shared vector and a binary mask per task: EMR merging and TALL masks.

Each rule turns the stacked task vectors ``[K, ...]`` into the per-task updates u_k = s_k · m_k ⊙ v (a stage: row k
is task k's update), so the merge ``θ0 + λ Σ_k u_k`` with λ = 1/K is their average (``export/model``) and task k's
own model is ``θ0 + u_k`` (evaluated per task; ``export/tasks/<task>``). What the rule stores is compact:
v in float32 and the K masks as packed bits (``export/task_masks/``, ``read_task_update``), plus the scales s_k
in coefficients.json.

- EMR (Huang et al., "EMR-Merging: Tuning-Free High-Performance Model Merging", NeurIPS 2024; FusionBench's
  ``emr_merge``): v = the elected sign of Σ_k τ_k (a zero sum counts as −) times, per entry, the largest |τ_k| that
  agrees with it; m_k = τ_k agrees with that sign; s_k = Σ_tensors mean|τ_k| / Σ_tensors mean|m_k ⊙ v|.
- TALL masks (Wang et al., "Localizing Task Information for Improved Model Merging and Compression", ICML 2024;
  the authors' nik-dim/tall_masks): v = Σ_k τ_k; m_k = |τ_k| ≥ λ_t · |v − τ_k| (``tall_masks``, as consensus
  merging's); s_k = 1.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .stage import Stage

STATE_DIR = "task_masks"  # in the export: unified.safetensors (v), masks.safetensors (packed bits per tensor)


def tall_masks(t: torch.Tensor, lam: float, total: torch.Tensor) -> torch.Tensor:
    """The TALL masks of a stack ``[K, ...]`` (float): |τ_k| ≥ λ · |Σ τ − τ_k| (``total``: Σ_k τ_k), the entries where
    a task's own vector dominates what the others add. Consensus merging (adamerge/core/transforms.py) counts them."""
    return t.abs() >= lam * (total - t).abs()


class TaskMasks(Stage):
    """The per-task updates of ``rule`` (``emr`` | ``tall``, with ``lam`` the TALL threshold); keeps v and the masks
    (packed) for the export."""

    def __init__(self, rule: str, lam: float = 0.4):
        self.rule, self.lam = rule, lam
        self.unified: dict[str, torch.Tensor] = {}
        self.masks: dict[str, torch.Tensor] = {}

    def vector_and_masks(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tf = t.float()
        if self.rule == "emr":
            flag = (tf.sum(0) > 0).float() * 2 - 1
            masks = tf * flag > 0
            return (tf.abs() * masks).amax(0) * flag, masks
        unified = tf.sum(0)
        return unified, tall_masks(tf, self.lam, unified)

    def fit(self, stream, K: int) -> None:
        self.scales = torch.ones(K, dtype=torch.float64)
        if self.rule != "emr":
            return
        before, after = torch.zeros(K, dtype=torch.float64), torch.zeros(K, dtype=torch.float64)
        for _, t in stream():
            v, masks = self.vector_and_masks(t)
            before += t.float().abs().flatten(1).mean(1).double()
            after += (v * masks).abs().flatten(1).mean(1).double()
        self.scales = before / after

    def __call__(self, name: str, t: torch.Tensor) -> torch.Tensor:
        v, masks = self.vector_and_masks(t)
        self.unified[name] = v
        self.masks[name] = torch.from_numpy(np.packbits(masks.flatten(1).numpy(), axis=1))
        scales = self.scales.float().view(-1, *([1] * (t.dim() - 1)))
        t.copy_(scales * masks * v)
        return t

    def write_state(self, export_dir: Path) -> None:
        from safetensors.torch import save_file

        (export_dir / STATE_DIR).mkdir(parents=True, exist_ok=True)
        save_file({n: v.contiguous() for n, v in self.unified.items()}, str(export_dir / STATE_DIR / "unified.safetensors"))
        save_file(self.masks, str(export_dir / STATE_DIR / "masks.safetensors"))

    def report(self) -> dict:
        return {"task_masks": {"rule": self.rule, "scales": self.scales.tolist(),
                               "bits_per_entry": len(self.scales)}} if hasattr(self, "scales") else {}


def read_task_update(export_dir: str | Path, task_index: int, scale: float) -> dict[str, torch.Tensor]:
    """Task ``task_index``'s update s_k · m_k ⊙ v, every tensor, from an export's ``task_masks/`` (what the per-task
    model adds to the base)."""
    from safetensors.torch import load_file

    d = Path(export_dir) / STATE_DIR
    unified, masks = load_file(str(d / "unified.safetensors")), load_file(str(d / "masks.safetensors"))
    out = {}
    for name, v in unified.items():
        bits = np.unpackbits(masks[name][task_index].numpy(), count=v.numel())
        out[name] = scale * torch.from_numpy(bits.astype(bool)).view(v.shape) * v
    return out
