"""TSV-M ("Task Singular Vectors: Reducing Task Interference in Model Merging", Gargiulo et al., CVPR 2025).

Data-free. For every 2-D merged tensor (one matrix per task):

1. truncated SVD of each τ_i = U_i Σ_i V_iᵀ, keeping r = ⌊min(m, n)/K⌋ (at least 1) singular triplets;
2. concatenate U = [U_1..U_K] ``[m, K·r]``, Σ = diag(Σ_1..Σ_K), V = [V_1..V_K];
3. decorrelate: replace U and V by their nearest orthogonal matrices (Procrustes / polar factor
   U⊥ = P Qᵀ from U = P S Qᵀ, same for V), which removes the interference between the tasks'
   singular directions;
4. merged = U⊥ Σ V⊥ᵀ.

Other tensors (biases, norms, 1-D embeddings) are averaged; θ = θ0 + α·merged with α = ``scale``
(the authors' default 1.0). ``exclude`` lists regexes of 2-D tensors to average instead (e.g. large
vocabulary embeddings). Follows the authors' ``compute_and_sum_svd_mem_reduction``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from ..core.task_vectors import TaskVectors
from .closed_form import DeltaConfig, DeltaMerge
from .registry import register


def _polar(a: torch.Tensor) -> torch.Tensor:
    """Nearest matrix with orthonormal columns (or rows): P Qᵀ from the thin SVD a = P S Qᵀ."""
    p, _, qh = torch.linalg.svd(a, full_matrices=False)
    return p @ qh


def tsv_matrix(taus: torch.Tensor) -> torch.Tensor:
    """TSV-M of K stacked matrices ``[K, m, n]`` (float32)."""
    K, m, n = taus.shape
    r = max(1, min(m, n) // K)
    us, ss, vs = [], [], []
    for k in range(K):
        u, s, vh = torch.linalg.svd(taus[k], full_matrices=False)
        us.append(u[:, :r])
        ss.append(s[:r])
        vs.append(vh[:r])
    u_orth = _polar(torch.cat(us, 1))
    vh_orth = _polar(torch.cat(vs, 0))
    return (u_orth * torch.cat(ss)) @ vh_orth


def tsv_direction(tv: TaskVectors, exclude: list[str] | None = None) -> dict[str, torch.Tensor]:
    out = {}
    for n, t in tv.items():
        if t.dim() == 3 and not any(re.search(p, n) for p in exclude or []):
            out[n] = tsv_matrix(t.float())
        else:
            out[n] = t.float().mean(0)
    return out


@dataclass
class TSVConfig(DeltaConfig):
    exclude: list[str] = field(default_factory=list)  # regexes of 2-D tensors averaged instead of TSV-merged


@register
class TSVMerging(DeltaMerge):
    """θ = θ0 + α·TSV-M(τ_1..τ_K)."""

    name = "tsv_merging"
    Config = TSVConfig

    def merge_direction(self, tv: TaskVectors) -> dict[str, torch.Tensor]:
        return tsv_direction(tv, self.cfg.exclude)
