"""PCB merging ("Parameter Competition Balancing for Model Merging", Du et al., NeurIPS 2024). Data-free.

Following the authors' ``pcb-merging.py`` on the whole model (every merged tensor, flattened and
concatenated per task):

1. clip |τ_i| to its own [clamp_ratio, 1 − clamp_ratio] quantiles (outliers): a_i, τ̃_i = sign(τ_i)·a_i;
2. intra-balancing: exp(K · norm(a_i)²), norm = min-max over task i's entries;
3. inter-balancing: tanh(τ_i ⊙ Σ_j τ_j) (agreement of each entry with the others);
4. score s_i = intra ⊙ inter; drop: keep only the top ``pcb_ratio`` fraction of s_i (entries at or
   below task i's (1 − pcb_ratio) quantile get weight 0), rescale the rest by min-max to (0, 1];
5. merged = Σ_i w_i τ̃_i / Σ_i w_i, then θ = θ0 + λ·merged (``scale``).

The authors search λ per task with an evolutionary strategy on validation data (``pcb_ES.py``,
initialised at 1.0 in [0.8, 1.3]); here λ is one fixed ``scale``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..core.task_vectors import TaskVectors
from ..errors import ConfigError
from .closed_form import DeltaConfig, DeltaMerge
from .method_config import check_range
from .registry import register


def _sorted_at(flat: torch.Tensor, idx: int) -> torch.Tensor:
    """``sorted(flat)[idx]`` (0-based) without sorting everything."""
    return flat.kthvalue(min(max(idx, 0), flat.numel() - 1) + 1).values


def _per_task_flat(tensors: dict[str, torch.Tensor], k: int) -> torch.Tensor:
    return torch.cat([t[k].flatten() for t in tensors.values()])


def pcb_direction(tv: TaskVectors, pcb_ratio: float = 0.1, clamp_ratio: float = 1e-4) -> dict[str, torch.Tensor]:
    """The PCB merged task vector (before λ), tensor by tensor."""
    if not 0 < pcb_ratio <= 1:
        raise ConfigError(f"method.pcb_ratio (fraction kept per task) must be in (0, 1], got {pcb_ratio}")
    if not 0 <= clamp_ratio < 0.5:
        raise ConfigError(f"method.clamp_ratio must be in [0, 0.5), got {clamp_ratio}")
    K = tv.K
    taus = {n: t.float() for n, t in tv.items()}
    d = sum(t[0].numel() for t in taus.values())
    lo, hi = torch.empty(K), torch.empty(K)
    for k in range(K):
        flat = _per_task_flat(taus, k).abs()
        lo[k] = _sorted_at(flat, int(d * clamp_ratio))
        hi[k] = _sorted_at(flat, int(d * (1 - clamp_ratio) - 1))
        del flat

    def view(v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return v.view(-1, *([1] * (t.dim() - 1))).to(t.device)

    clipped, scores = {}, {}
    for n, t in taus.items():
        a = torch.maximum(torch.minimum(t.abs(), view(hi, t)), view(lo, t))
        clipped[n] = torch.sign(t) * a
        intra = torch.exp(K * ((a - view(lo, t)) / view((hi - lo).clamp(min=1e-12), t)) ** 2)
        inter = torch.tanh(t * t.sum(0, keepdim=True))
        scores[n] = intra * inter
    q, top = torch.empty(K), torch.empty(K)
    for k in range(K):
        flat = _per_task_flat(scores, k)
        q[k] = _sorted_at(flat, int(d * (1 - pcb_ratio)))
        top[k] = flat.max()
        del flat
    out = {}
    for n, s in scores.items():
        w = (s.clamp(min=view(q, s)) - view(q, s)) / view((top - q).clamp(min=1e-12), s)
        out[n] = (clipped[n] * w).sum(0) / w.sum(0).clamp(min=1e-12)
    return out


@dataclass
class PCBConfig(DeltaConfig):
    pcb_ratio: float = 0.1      # fraction of entries kept per task by balanced importance
    clamp_ratio: float = 1e-4   # lower clip of the importance scores, relative to the largest

    def check(self, prefix: str) -> None:
        super().check(prefix)
        check_range(self.pcb_ratio, f"{prefix}.pcb_ratio", 0, 1, strict_lo=True)
        check_range(self.clamp_ratio, f"{prefix}.clamp_ratio", 0)


@register
class PCBMerging(DeltaMerge):
    """θ = θ0 + λ·PCB(τ_1..τ_K)."""

    name = "pcb_merging"
    Config = PCBConfig

    def merge_direction(self, tv: TaskVectors) -> dict[str, torch.Tensor]:
        return pcb_direction(tv, self.cfg.pcb_ratio, self.cfg.clamp_ratio)
