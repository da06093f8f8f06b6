"""Spherical merges from mergekit, as stages on the stacked task vectors ``[K, ...]`` (adamerge/core/tensor_rules.py
says how a stage yields a whole merge): SLERP and the Karcher mean of the experts' weights (they read the base,
``needs_pool``), NuSLERP and Multi-SLERP of their task vectors. Each follows mergekit 0.1.5's arithmetic, so that
the outputs can be compared on identical inputs (tests/test_streaming.py).
"""

from __future__ import annotations

import torch

from ..errors import ConfigError
from .stage import Stage, one_update


def _two_experts(name: str, K: int) -> None:
    if K != 2:
        raise ConfigError(f"{name} interpolates exactly 2 experts, the pool has {K}")


class Slerp(Stage):
    """SLERP of two experts' weights (mergekit's ``slerp``, the first expert as its ``base_model``): per tensor,
    θ = [sin((1 − t)Ω) θ₁ + sin(tΩ) θ₂] / sin Ω with Ω the angle of the flattened tensors, linear where
    |cos Ω| > ``dot_threshold`` (mergekit batches each tensor as one row of its kernel)."""

    needs_pool = True  # the base's tensors: the experts' weights are θ₀ + τ_k
    _CHUNK = 1024 * 1024  # mergekit's chunk of fp32 scratch: the norms are summed chunk by chunk, as there

    def __init__(self, t: float, dot_threshold: float = 0.9995):
        self.t, self.dot_threshold = float(t), dot_threshold

    def fit(self, stream, K: int) -> None:
        _two_experts("slerp", K)

    def __call__(self, name: str, t: torch.Tensor) -> torch.Tensor:
        w0 = self.pool.base_tensor(name).to(t.device)
        v0, v1 = (w0 + t[0]).to(t.dtype), (w0 + t[1]).to(t.dtype)
        dtype = torch.float64 if v0.dtype == torch.float64 else torch.float32
        a, b = v0.reshape(1, -1), v1.reshape(1, -1)
        tt = torch.tensor(self.t).reshape(-1, 1).to(dtype)
        if not a.shape[1]:
            return one_update(t, ((1 - tt) * a + tt * b).reshape(v0.shape) - w0)
        step = max(1, self._CHUNK // a.shape[0])
        chunks = range(0, a.shape[1], step)
        norm_a = torch.linalg.vector_norm(torch.stack(
            [torch.linalg.vector_norm(a[:, i:i + step].to(dtype), dim=1, keepdim=True) for i in chunks]), dim=0)
        norm_b = torch.linalg.vector_norm(torch.stack(
            [torch.linalg.vector_norm(b[:, i:i + step].to(dtype), dim=1, keepdim=True) for i in chunks]), dim=0)
        norm_a, norm_b = torch.where(norm_a > 1e-8, norm_a, 1), torch.where(norm_b > 1e-8, norm_b, 1)
        dot = torch.stack([((a[:, i:i + step].to(dtype) / norm_a) * (b[:, i:i + step].to(dtype) / norm_b)).sum(
            dim=1, keepdim=True) for i in chunks]).sum(dim=0).clamp(-1, 1)
        linear = dot.abs() > self.dot_threshold
        theta = torch.acos(torch.where(linear, 0, dot))
        coef_a = torch.where(linear, 1 - tt, torch.sin((1 - tt) * theta) / torch.sin(theta))
        coef_b = torch.where(linear, tt, torch.sin(tt * theta) / torch.sin(theta))
        result = torch.empty_like(a)
        for i in chunks:
            result[:, i:i + step] = coef_a * a[:, i:i + step].to(dtype) + coef_b * b[:, i:i + step].to(dtype)
        return one_update(t, result.reshape(v0.shape) - w0)


class NuSlerp(Stage):
    """NuSLERP with a base (mergekit's ``nuslerp``): spherical interpolation of the two experts' task vectors,
    τ = slerp(τ_1, τ_2; t) with t the second expert's share: over the whole tensor (``flatten``, mergekit's default),
    else along the last dimension (per row of a matrix), or with ``row_wise`` along the first (per column)."""

    def __init__(self, t: float, flatten: bool = True, row_wise: bool = False):
        self.t, self.flatten, self.row_wise = float(t), flatten, row_wise

    def fit(self, stream, K: int) -> None:
        _two_experts("nuslerp", K)

    def __call__(self, name: str, t: torch.Tensor) -> torch.Tensor:
        v0, v1 = t[0], t[1]
        if self.flatten:
            v0, v1 = v0.reshape(-1), v1.reshape(-1)
        elif self.row_wise:
            v0, v1 = v0.transpose(0, -1), v1.transpose(0, -1)
        u0 = v0 / torch.norm(v0, dim=-1, keepdim=True).clamp(min=1e-7)
        u1 = v1 / torch.norm(v1, dim=-1, keepdim=True).clamp(min=1e-7)
        cos_theta = torch.sum(u0 * u1, dim=-1, keepdim=True).clamp(-1, 1)
        colinear = (1 - cos_theta.square()) <= 1e-8 ** 2
        theta = torch.acos(torch.where(colinear, 0, cos_theta))
        result = (torch.sin((1 - self.t) * theta) * v0 + torch.sin(self.t * theta) * v1) / torch.sin(theta)
        result = torch.where(colinear, (1 - self.t) * v0 + self.t * v1, result)
        if self.row_wise and not self.flatten:
            result = result.transpose(0, -1)
        return one_update(t, result.reshape(t.shape[1:]))



class MultiSlerp(Stage):
    """Multi-SLERP with a base (mergekit's ``multislerp``): the task vectors projected on the unit sphere, their
    weighted mean direction, the weighted tangent vectors there mapped back by the exponential map, scaled to the
    weighted mean norm. ``weights``: one per expert (null: equal), normalized to sum 1."""

    def __init__(self, weights: list[float] | None = None, eps: float = 1e-8):
        self.weights, self.eps = weights, eps

    def fit(self, stream, K: int) -> None:
        if self.weights is not None and len(self.weights) != K:
            raise ConfigError(f"multislerp.weights has {len(self.weights)} values for {K} experts")

    def __call__(self, name: str, t: torch.Tensor) -> torch.Tensor:
        K, eps = t.shape[0], self.eps
        if K == 1:
            return t
        flat = t.reshape(K, -1)
        w = torch.tensor(self.weights or [1.0] * K, dtype=t.dtype)
        w = w / w.sum()
        norms = torch.norm(flat, dim=-1, keepdim=True)
        units = flat / (norms + eps)
        mean = (units * w.view(-1, 1)).sum(0)
        mean_norm = torch.norm(mean)
        if mean_norm < eps:
            if K == 2:
                return one_update(t, (t[0] * w[0] + t[1] * w[1]))
            raise ConfigError(f"multislerp: the weighted mean direction of tensor {name} is zero (antipodal task "
                              "vectors); choose other method.multislerp.weights")
        mean = mean / mean_norm
        tangents = units - (units * mean).sum(-1, keepdim=True) * mean
        tangent = (tangents * w.view(-1, 1)).sum(0)
        tangent_norm = torch.norm(tangent) + eps
        result = mean * torch.cos(tangent_norm) + tangent * (torch.sin(tangent_norm) / tangent_norm)
        return one_update(t, (result * (norms.squeeze(-1) * w).sum()).view(t.shape[1:]))


class Karcher(Stage):
    """The Karcher mean of the experts' weights on the hypersphere (mergekit's ``karcher``, no base model): the
    Riemannian mean of their directions, by up to ``max_iter`` tangent steps, scaled to their mean norm."""

    needs_pool = True  # the base's tensors: the experts' weights are θ₀ + τ_k

    def __init__(self, max_iter: int = 10, tol: float = 1e-5):
        self.max_iter, self.tol = max_iter, tol

    def __call__(self, name: str, t: torch.Tensor) -> torch.Tensor:
        w0 = self.pool.base_tensor(name).to(t.device)
        tensors = [(w0 + t[k]).to(t.dtype) for k in range(t.shape[0])]
        if len(tensors) == 1:
            return t
        return one_update(t, self.mean(tensors, [1.0 / len(tensors)] * len(tensors)) - w0)

    def mean(self, tensors: list[torch.Tensor], alphas: list[float]) -> torch.Tensor:
        tol = self.tol
        dtype = torch.float64 if tensors[0].dtype == torch.float64 else torch.float32
        norms = [torch.linalg.vector_norm(x.to(dtype)) for x in tensors]
        units = [torch.zeros_like(x) if n.item() == 0.0 else (x / n).to(x.dtype) for x, n in zip(tensors, norms)]
        valid = [i for i, n in enumerate(norms) if n.item() > tol]
        if not valid:
            return sum(x * 0 for x in tensors)
        total = sum(alphas[i] for i in valid)
        a = [alphas[i] / total for i in valid]
        u = [units[i] for i in valid]
        mean = torch.zeros_like(u[0])
        for ai, ui in zip(a, u):
            mean += ai * ui
        mean_norm = torch.linalg.vector_norm(mean.to(dtype))
        mean = u[0].clone() if mean_norm.item() < tol else (mean / mean_norm).to(mean.dtype)
        for _ in range(self.max_iter):
            tangent = torch.zeros_like(mean)
            for ai, ui in zip(a, u):
                dot = torch.clamp(torch.dot(mean.flatten(), ui.flatten()), -1.0, 1.0)
                theta = torch.arccos(dot)
                if theta.item() < tol:
                    continue
                tangent += ai * (theta / torch.sin(theta)) * (ui - dot * mean)
            tangent_norm = torch.linalg.vector_norm(tangent.to(dtype))
            if tangent_norm.item() < tol:
                break
            mean = (torch.cos(tangent_norm) * mean + torch.sin(tangent_norm) * (tangent / tangent_norm)).to(mean.dtype)
            unit_norm = torch.linalg.vector_norm(mean.to(dtype))
            if unit_norm.item() > tol:
                mean = (mean / unit_norm).to(mean.dtype)
        return sum(ai * n for ai, n in zip(alphas, norms)) * mean
