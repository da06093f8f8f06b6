"""Isotropic merging (Marczak et al., "No Task Left Behind: Isotropic Model Merging with Common and Task-Specific
Subspaces", ICML 2025): the spectrum of each matrix's summed task vectors flattened to its mean. Stages on the
stacked task vectors ``[K, ...]`` (adamerge/core/tensor_rules.py says how a stage yields a whole merge), following
FusionBench 0.2.33's ``iso_c`` / ``iso_cts`` arithmetic so that the outputs can be compared (tests/test_streaming.py).
Tensors that are not matrices take the experts' mean.
"""

from __future__ import annotations

import torch

from .stage import Stage, one_update


def _svd_dtype(t: torch.Tensor) -> torch.Tensor:
    """``t`` in a dtype ``torch.linalg.svd`` takes (half precision goes to float32)."""
    return t.float() if t.dtype in (torch.bfloat16, torch.float16) else t


def _isotropic(u: torch.Tensor, s: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """U · mean(S) I · Vᵀ: every direction of the subspace weighted alike."""
    return torch.linalg.multi_dot((u, torch.diag(torch.ones_like(s) * s.mean()), v))


class IsoC(Stage):
    """Iso-C: M = Σ_k τ_k, and the update U · mean(σ) · Vᵀ of its SVD (as FusionBench: the mean, then times K)."""

    def __call__(self, name: str, stack: torch.Tensor) -> torch.Tensor:
        t, K = _svd_dtype(stack), stack.shape[0]
        update = sum(t[k] for k in range(K)) / K
        if t.dim() == 3:
            update *= K
            update = _isotropic(*torch.linalg.svd(update, full_matrices=False))
        return one_update(stack, update)


class IsoCts(Stage):
    """Iso-CTS: the top ``common_space_fraction`` of Σ_k τ_k's singular directions (the common subspace), plus each
    task's leading directions of its task vector outside it (an equal share of the rest), orthogonalised, with
    one isotropic spectrum."""

    def __init__(self, common_space_fraction: float):
        self.common_space_fraction = common_space_fraction

    def __call__(self, name: str, stack: torch.Tensor) -> torch.Tensor:
        t, K = _svd_dtype(stack), stack.shape[0]
        if t.dim() != 3:  # FusionBench's running mean
            mean = t[0].clone()
            for i in range(1, K):
                mean += (t[i] - mean) / (i + 1)
            return one_update(stack, mean)
        rank = min(t.shape[1:])
        common = int(rank * self.common_space_fraction)
        common = rank - round((rank - common) / K) * K
        u, s, v = torch.linalg.svd(sum(t[k] for k in range(K)), full_matrices=False)
        cu, cs, cv = u[:, :common], s[:common], v[:common, :]
        per_task = int((rank - common) / K)
        all_u, all_s, all_v = torch.zeros_like(u), torch.zeros_like(s), torch.zeros_like(v)
        for i in range(K):
            u_ts, s_ts, v_ts = torch.linalg.svd(t[i] - cu @ cu.T @ t[i], full_matrices=False)
            all_u[:, i * per_task:(i + 1) * per_task] = u_ts[:, :per_task]
            all_s[i * per_task:(i + 1) * per_task] = s_ts[:per_task]
            all_v[i * per_task:(i + 1) * per_task, :] = v_ts[:per_task, :]
        all_u[:, K * per_task:K * per_task + common] = cu
        all_s[K * per_task:K * per_task + common] = cs
        all_v[K * per_task:K * per_task + common, :] = cv
        uu, _, uv = torch.linalg.svd(all_u, full_matrices=False)  # the nearest orthonormal bases
        vu, _, vv = torch.linalg.svd(all_v, full_matrices=False)
        return one_update(stack, _isotropic(uu @ uv, all_s, vu @ vv))
