"""DOGE: adaptive projective gradient descent (Wei et al., ICML 2025).

Data-free step, run once when the method is built (no Trainer loop): for every merged 2-D weight,
learn a modification Δ (zero init, Adam) that minimises

    L(Δ) = Σ_j Σ_rows ⟨τ_j, τ_j − τ_m⟩²,   τ_m = Σ_i λ_i (τ_i + Δ_i),   λ_i = η / ‖τ_i‖_F,

with every gradient projected out of the subspace the tasks share, g ← (I − UUᵀ) g. Then the task
vectors become (τ_i + Δ_i) ⊙ M_i, M_i the top ``density`` entries of τ_i by magnitude. They go into
the one ``MergedModel`` like any other method's:

- ``coefficients: eta`` (DOGE-TA): fixed layer-wise λ_i^l = η/‖τ_i^l‖, one Δ shared by all tasks;
- ``coefficients: learned`` (DOGE-AM): per-task Δ_i, then layer-wise AdaMerging (the base class's
  entropy loss and training path) on the modified vectors.

Layers are independent and Adam is element-wise, so all layers of one shape are stacked and
optimised as one batched Δ: the same result as layer after layer with 3 instead of 36 optimizer
loops for a BERT encoder (fewer, larger kernels on an accelerator; on CPU the work is the same).
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from ..core.coefficients import Coefficients
from ..core.task_vectors import TaskVectors, select_names
from ..core.transforms import TiesTrim
from ..errors import ConfigError
from ..pool.model_pool import ModelPool, PoolError
from .base import MergeMethod
from .method_config import EntropyConfig, check_range
from .objectives import EntropyObjective
from .registry import register

log = logging.getLogger("adamerge")

DEFAULT_INCLUDE = [r"encoder\."]  # as FusionBench: encoder 2-D weights only; norms, biases, embeddings stay pretrained


def doge_names(pool: ModelPool, tv_cfg: dict, include: list[str] | None) -> list[str]:
    """The 2-D weights DOGE modifies: global task-vector selection ∩ ``include`` regexes ∩ dim 2."""
    names = select_names(pool.shared_names(), tv_cfg.get("include") or None, tv_cfg.get("exclude") or None)
    return [n for n in select_names(names, include or None, None) if pool.base_tensor(n).dim() == 2]


def layer_lambdas(tv: TaskVectors, eta: float) -> torch.Tensor:
    """``[L, K]`` task-aware coefficients η/‖τ_i^l‖_F (0 where a task leaves a tensor unchanged)."""
    norms = torch.stack([t.float().flatten(1).norm(dim=1) for t in tv.tensors.values()])
    return torch.where(norms > 0, eta / norms.clamp(min=1e-30), torch.zeros_like(norms))


def shared_subspace(tau: torch.Tensor, subspace: float) -> torch.Tensor:
    """Orthonormal ``[G, R, r]`` basis of the directions the tasks share, per layer.

    ``tau``: ``[G, K, R, C]``. Each τ_i contributes its top min(R, C)/K left singular vectors; the
    SVD of their concatenation keeps the top min(R, C)/``subspace`` directions (FusionBench).
    """
    G, K, R, C = tau.shape
    m = min(R, C)
    per_task = max(1, m // K)
    u = torch.linalg.svd(tau, full_matrices=False)[0][..., :per_task]          # [G, K, R, p]
    stacked = u.permute(0, 2, 1, 3).reshape(G, R, K * per_task)
    basis = torch.linalg.svd(stacked, full_matrices=False)[0]
    return basis[..., : max(1, min(int(m / subspace), basis.shape[-1]))].contiguous()


def project_out(grad: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """(I − UUᵀ) g for ``[G, R, C]`` or per-task ``[G, K, R, C]`` gradients; U is ``[G, R, r]``."""
    if grad.dim() == 4:
        return grad - basis.unsqueeze(1) @ (basis.transpose(-1, -2).unsqueeze(1) @ grad)
    return torch.baddbmm(grad, basis, basis.transpose(-1, -2) @ grad, alpha=-1)


def delta_loss(tau: torch.Tensor, lam: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """Reference L(Δ) = Σ_j Σ_rows ⟨τ_j, τ_j − τ_m⟩², summed over stacked layers (FusionBench's form).

    ``tau`` ``[G, K, R, C]``, ``lam`` ``[G, K]``, ``delta`` ``[G, R, C]`` (shared) or ``[G, K, R, C]``.
    """
    shifted = tau + (delta.unsqueeze(1) if delta.dim() == 3 else delta)
    tm = torch.einsum("gk,gkrc->grc", lam, shifted).unsqueeze(1)
    return (tau * (tau - tm)).sum(-1).pow(2).sum()


class DeltaProblem:
    """L(Δ) and its projected gradient for a stack of same-shape layers, regrouped to be cheap.

    ⟨τ_j, τ_j − Σ_i λ_i τ_i⟩ per row is a constant; only ⟨τ_j, D⟩ with D = Σ_i λ_i Δ_i moves. A step
    is then two batched mat-vecs over the rows, one projection of ∂L/∂D, and the optimizer update.
    """

    def __init__(self, tau: torch.Tensor, lam: torch.Tensor, per_task: bool = False):
        G, K, R, C = tau.shape
        self.shape = (G, K, R, C) if per_task else (G, R, C)
        self.lam, self.per_task = lam, per_task
        self.rows = tau.transpose(1, 2).contiguous()                          # [G, R, K, C]
        base = (lam.unsqueeze(1) @ tau.flatten(2)).view(G, R, 1, C)           # Σ_i λ_i τ_i
        self.target = (self.rows * (self.rows - base)).sum(-1, keepdim=True)  # [G, R, K, 1]

    def combined(self, delta: torch.Tensor) -> torch.Tensor:
        """D = Σ_i λ_i Δ_i, ``[G, R, C]``."""
        if self.per_task:
            G, K, R, C = delta.shape
            return (self.lam.unsqueeze(1) @ delta.flatten(2)).view(G, R, C)
        return self.lam.sum(1).view(-1, 1, 1) * delta

    def residual(self, delta: torch.Tensor) -> torch.Tensor:
        """⟨τ_j, τ_j − τ_m⟩ per row, ``[G, R, K, 1]``."""
        return self.target - self.rows @ self.combined(delta).unsqueeze(-1)

    def loss(self, delta: torch.Tensor) -> torch.Tensor:
        return self.residual(delta).pow(2).sum()

    def loss_and_grad(self, delta: torch.Tensor, basis: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """L(Δ) and ∂L/∂Δ, projected by (I − UUᵀ) when ``basis`` U is given (before the λ_i: they commute)."""
        res = self.residual(delta)
        g = (res.transpose(-1, -2) @ self.rows).squeeze(2)  # −½ ∂L/∂D, [G, R, C]
        if basis is not None:
            g = project_out(g, basis)
        if self.per_task:
            return res.pow(2).sum(), (-2 * self.lam)[:, :, None, None] * g.unsqueeze(1)
        return res.pow(2).sum(), (-2 * self.lam.sum(1)).view(-1, 1, 1) * g


@torch.no_grad()
def optimize_delta(tau: torch.Tensor, lam: torch.Tensor, basis: torch.Tensor, steps: int = 400, lr: float = 1e-4,
                   per_task: bool = False) -> tuple[torch.Tensor, list[float]]:
    """Adam on Δ (zero init) for a stack of same-shape layers: (Δ, loss before each step and at the end).

    ``tau`` ``[G, K, R, C]``, ``lam`` ``[G, K]``, ``basis`` ``[G, R, r]``; Δ is ``[G, R, C]`` (one shared by
    the tasks) or ``[G, K, R, C]`` (per task). Adam is element-wise and the layers' losses are
    independent, so this equals optimizing each layer on its own.
    """
    problem = DeltaProblem(tau, lam, per_task)
    delta = torch.zeros(problem.shape, device=tau.device)
    opt = torch.optim.Adam([delta], lr=lr, fused=True)  # one kernel per step instead of ~8 passes
    losses = []
    for _ in range(int(steps)):
        loss, delta.grad = problem.loss_and_grad(delta, basis)
        losses.append(loss)
        opt.step()
    losses.append(problem.loss(delta))
    return delta, torch.stack(losses).tolist()


def doge_transform(tv: TaskVectors, eta: float = 0.07, subspace: float | None = 6, steps: int = 400,
                   lr: float = 1e-4, per_task: bool = False, density: float = 0.3,
                   device: str | torch.device | None = None, batch: int | None = None
                   ) -> tuple[TaskVectors, dict[str, Any]]:
    """(τ_i + Δ_i) ⊙ M_i for every tensor of ``tv`` (all 2-D), and a summary for the report.

    Layers of one shape are optimized together, at most ``batch`` at a time (None: all of them).
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    subspace = float(subspace) if subspace else float(tv.K)  # null: K directions, as FusionBench's DOGE-AM
    if subspace <= 0:
        raise ConfigError(f"method.subspace must be > 0, got {subspace}")
    start = time.perf_counter()
    lam_all = layer_lambdas(tv, eta)
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, (n, t) in enumerate(tv.items()):
        if t.dim() != 3:
            raise ConfigError(f"DOGE modifies 2-D weights only; '{n}' has shape {tuple(t.shape[1:])}")
        groups.setdefault(tuple(t.shape[1:]), []).append(i)
    batches = []
    for idx in groups.values():
        size = int(batch) if batch else len(idx)
        batches += [idx[i:i + size] for i in range(0, len(idx), size)]
    names, deltas, stats = tv.names, {}, []
    for idx in batches:
        tau = torch.stack([tv[names[i]].to(device=device, dtype=torch.float32) for i in idx])
        basis = shared_subspace(tau, subspace)
        delta, losses = optimize_delta(tau, lam_all[idx].to(device), basis, steps, lr, per_task)
        rank = basis.shape[-1]
        del tau, basis
        for j, i in enumerate(idx):
            deltas[names[i]] = delta[j].cpu()
        stats.append({"shape": list(tv[names[idx[0]]].shape[1:]), "layers": len(idx), "rank": rank,
                      "loss_start": losses[0], "loss_end": losses[-1]})
    trim = TiesTrim(density, "method.density")  # per task, as FusionBench
    trim.fit(lambda: tv.items(), tv.K)

    def apply(n: str, t: torch.Tensor) -> torch.Tensor:
        d = deltas[n].to(t.device)
        return torch.where(trim.mask(t), t.float() + d, torch.zeros_like(d)).to(t.dtype)

    out = tv.map(apply)
    seconds = time.perf_counter() - start
    log.info("DOGE: Δ for %d tensors in %d batches, %d Adam steps each, %.1f s on %s",
             len(tv), len(batches), steps, seconds, device)
    summary = {"eta": eta, "subspace": subspace, "delta_steps": int(steps), "delta_lr": lr, "per_task_delta": per_task,
               "density": density, "device": str(device), "seconds": round(seconds, 3), "groups": stats}
    return out, summary


@dataclass
class ProjectiveConfig(EntropyConfig):
    """DOGE's keys; with ``coefficients: learned`` also AdaMerging's (granularity, init, clamp, lr)."""
    coefficients: Literal["eta", "learned"] = "eta"
    eta: float = 0.07                   # λ_i = η/‖τ_i‖ (eta) and the scale inside the Δ objective
    subspace: float | None = 6          # shared subspace keeps min(R, C)/subspace directions (null: none)
    delta_steps: int = 400
    delta_lr: float = 1e-4
    per_task_delta: bool = False        # one Δ per task (DOGE-AM) or one shared Δ (DOGE-TA)
    density: float = 0.3                # top fraction of each modified task vector kept
    merge_include: list[str] = field(default_factory=lambda: list(DEFAULT_INCLUDE))
    delta_device: str | None = None     # where Δ is optimised (null: with the task vectors)
    delta_batch: int | None = None      # at most this many same-shape layers per batched Δ (null: all)

    def check(self, prefix: str) -> None:
        super().check(prefix)
        for key in ("eta", "delta_lr", "density", "subspace"):
            check_range(getattr(self, key), f"{prefix}.{key}", 0, strict_lo=True)
        check_range(self.density, f"{prefix}.density", 0, 1, strict_lo=True)
        check_range(self.delta_steps, f"{prefix}.delta_steps", 0)
        check_range(self.delta_batch, f"{prefix}.delta_batch", 1)


@register
class ProjectiveMerge(EntropyObjective, MergeMethod):
    """DOGE-TA (``coefficients: eta``, data-free) or DOGE-AM (``coefficients: learned``)."""

    name = "projective"
    Config = ProjectiveConfig

    def __init__(self, pool: ModelPool, method: dict, task_vectors: dict | None = None):
        m, tv_cfg = self.parse_config(method), dict(task_vectors or {})
        names = doge_names(pool, tv_cfg, m.merge_include)
        if not names:
            raise PoolError("DOGE: no 2-D weight matches task_vectors.include/exclude and method.merge_include")
        # the base reads exactly these tensors; every other one stays at its pretrained value
        tv_cfg.update(include=[f"^{re.escape(n)}$" for n in names], exclude=[])
        super().__init__(pool, method, tv_cfg)

    def build_task_vectors(self, pool: ModelPool, tv_cfg: dict) -> tuple[TaskVectors, dict | None]:
        """The task vectors after DOGE's transform (τ_i + Δ_i) ⊙ M_i."""
        tv, offset = super().build_task_vectors(pool, tv_cfg)
        m = self.cfg
        # DOGE-TA's λ = η/‖τ‖ is taken from the vectors before the transform, as the authors
        self._eta_lambdas = layer_lambdas(tv, m.eta)
        tv, self.doge = doge_transform(
            tv, eta=m.eta, subspace=m.subspace, steps=m.delta_steps, lr=m.delta_lr,
            per_task=m.per_task_delta, density=m.density, device=m.delta_device, batch=m.delta_batch,
        )
        # the vectors the coefficients act on depend on these: a resumed run must use the same
        self.fingerprint["doge"] = {k: self.doge[k] for k in ("eta", "subspace", "delta_steps", "delta_lr",
                                                              "per_task_delta", "density")}
        return tv, offset

    @classmethod
    def trains(cls, cfg: ProjectiveConfig) -> bool:
        return cfg.coefficients == "learned"  # DOGE-TA is data-free

    def build_coefficients(self, tv: TaskVectors) -> Coefficients:
        if self.cfg.coefficients == "learned":
            return super().build_coefficients(tv)  # AdaMerging's: granularity, init, clamp from the config
        coefs = Coefficients(tv.K, len(tv), granularity="layer", init=0.0)
        with torch.no_grad():
            coefs.raw.copy_(self._eta_lambdas)
        coefs.requires_grad_(False)
        return coefs

    def report(self) -> dict[str, Any]:
        rep = super().report()
        rep["doge"] = self.doge
        return rep
