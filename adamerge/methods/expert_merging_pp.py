"""Expert Merging++ (Zhang et al., arXiv 2509.25712): Expert Merging with importance-guided chunks.

A second run: ``first_pass`` names the ``coefficients.json`` (or the export directory holding it) of an
Expert Merging run on the same pool. Layer importance I_ℓ = normalize(Σ_k |α_k^ℓ|·mean|τ_k^ℓ|·n_ℓ) and
the allocation m_ℓ = ⌊B·I_ℓ^κ / Σ_j I_j^κ⌋ (≥ 1 each, Σ m_ℓ ≤ B) are a pure function of that file and
the pool, recomputed identically on resume (the checkpoint records the allocation and refuses a
different one); chunk coefficients start at α̅ and are trained with Expert Merging's loss.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from ..core.coefficients import Coefficients
from ..core.task_vectors import TaskVectors
from ..errors import CheckpointError
from .expert_merging import ExpertMerging, ExpertMergingConfig, initial_alphas
from .method_config import ConfigError, check_range
from .registry import register


@dataclass
class ExpertMergingPPConfig(ExpertMergingConfig):
    """Expert Merging's keys plus the first run's coefficients and the chunk budget."""
    granularity: Literal["task", "layer", "chunk"] = "chunk"
    first_pass: str | None = None          # export dir or coefficients.json of an expert_merging run
    budget: int | None = None              # total chunks (null: budget_per_tensor × merged tensors)
    budget_per_tensor: float = 4.0
    kappa: float = 1.0                     # importance exponent of the allocation

    def check(self, prefix: str) -> None:
        super().check(prefix)
        check_range(self.budget, f"{prefix}.budget", 1)
        check_range(self.budget_per_tensor, f"{prefix}.budget_per_tensor", 0, strict_lo=True)


def layer_importance(alphas: torch.Tensor, mean_abs_tau: torch.Tensor, numels: Sequence[int]) -> torch.Tensor:
    """I_ℓ = Σ_k |α_k^ℓ|·mean|τ_k^ℓ|·n_ℓ, ℓ1-normalised. ``alphas``, ``mean_abs_tau``: ``[L, K]``."""
    n = torch.as_tensor(list(numels), dtype=torch.float64)
    raw = (alphas.double().abs() * mean_abs_tau.double()).sum(1) * n
    total = raw.sum()
    return raw / total if total > 0 else torch.full_like(raw, 1.0 / len(raw))


def allocate_chunks(importance: Sequence[float] | torch.Tensor, budget: int, kappa: float = 1.0,
                    numels: Sequence[int] | None = None) -> list[int]:
    """m_ℓ = ⌊B·I_ℓ^κ / Σ_j I_j^κ⌋ chunks per tensor, at least 1 and at most n_ℓ each, Σ m_ℓ ≤ B.

    Tensors whose share is under one chunk get exactly one, and the formula is applied again to the
    others with what is left of the budget (until no share falls under one): the floor of one chunk
    never costs the important tensors more than it must, and the split among them stays proportional.
    """
    imp = torch.as_tensor(importance, dtype=torch.float64).flatten()
    L = imp.numel()
    if not torch.isfinite(imp).all() or (imp < 0).any():
        raise ValueError("chunk allocation: importances must be finite and non-negative")
    if kappa <= 0:
        raise ConfigError(f"method.kappa must be > 0, got {kappa}")
    if budget < L:
        raise ConfigError(f"method.budget={budget} chunks cannot give each of the {L} merged tensors one chunk")
    w = imp.pow(kappa)
    if w.sum() <= 0:
        w = torch.ones_like(w)
    m = torch.ones(L, dtype=torch.long)
    rest = w > 0
    while True:
        left = budget - (L - int(rest.sum()))  # one chunk for each tensor outside ``rest``
        share = torch.floor(left * w / w[rest].sum() + 1e-9).long()
        small = rest & (share < 1)
        if not small.any():
            break
        rest &= ~small
    m[rest] = share[rest]
    if numels is not None:
        m = torch.minimum(m, torch.as_tensor(list(numels), dtype=torch.long))
    return m.tolist()


def read_first_pass(path: str | Path, task_names: list[str], tensor_names: list[str]) -> torch.Tensor:
    """The ``[L, K]`` coefficients of a first Expert Merging run, checked against this pool."""
    p = Path(path)
    if p.is_dir():
        p = p / "coefficients.json"
    if not p.exists():
        raise ConfigError(f"method.first_pass: {p} does not exist (give the export/coefficients.json "
                          "of an expert_merging run on this pool)")
    try:
        rep = json.loads(p.read_text())
        tasks, tensors, table = rep["tasks"], rep["tensors"], rep["coefficients"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ConfigError(f"method.first_pass: {p} is not a coefficients.json ({e})") from e
    if list(tasks) != list(task_names):
        raise ConfigError(f"method.first_pass: {p} was made for tasks {tasks}, this pool has {task_names}")
    if list(tensors) != list(tensor_names):
        diff = sorted(set(tensors) ^ set(tensor_names))[:3]
        raise ConfigError(f"method.first_pass: {p} merged other tensors than this run (e.g. {diff}); use the same "
                          "task_vectors.include/exclude")
    t = torch.tensor(table, dtype=torch.float64)
    if t.shape != (len(tensor_names), len(task_names)):
        raise ConfigError(f"method.first_pass: {p} has a coefficient table of shape {tuple(t.shape)}")
    return t


@register
class ExpertMergingPP(ExpertMerging):
    """Expert Merging with importance-guided chunk counts taken from a first Expert Merging run."""

    name = "expert_merging_pp"
    Config = ExpertMergingPPConfig

    def build_coefficients(self, tv: TaskVectors) -> Coefficients:
        m = self.cfg
        if not m.first_pass:
            raise ConfigError(f"{m.label} needs method.first_pass=<export dir or coefficients.json "
                              "of an expert_merging run on this pool>")
        alphas = read_first_pass(m.first_pass, tv.task_names, tv.names)
        numels = [tv[n][0].numel() for n in tv.names]
        mean_abs = torch.stack([tv[n].abs().float().flatten(1).mean(1) for n in tv.names])
        self.importance = layer_importance(alphas, mean_abs, numels)
        self.budget = m.budget if m.budget is not None else int(math.floor(m.budget_per_tensor * len(tv)))
        self.kappa = m.kappa
        chunks = allocate_chunks(self.importance, self.budget, self.kappa, numels)
        return Coefficients(tv.K, len(tv), granularity="chunk", chunks=chunks, tensor_numels=numels,
                            init=initial_alphas(m.init, tv.K).tolist(), transform="sigmoid")

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["adamerge"]["chunks"] = list(self.merged.coefficients.chunk_counts)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        saved = checkpoint["adamerge"].get("chunks")
        if saved != list(self.merged.coefficients.chunk_counts):
            raise CheckpointError("checkpoint has another chunk allocation than this run: method.first_pass, "
                                  "budget or kappa changed since it was written")

    def report(self) -> dict[str, Any]:
        rep = super().report()
        c = self.merged.coefficients
        rep["allocation"] = {
            "first_pass": str(self.cfg.first_pass), "budget": self.budget, "kappa": self.kappa,
            "total_chunks": int(sum(c.chunk_counts)),
            "importance": dict(zip(self.merged.names, self.importance.tolist())),
        }
        rep["chunk_coefficients"] = {n: v.detach().cpu().tolist() for n, v in zip(self.merged.names, c())}  # [K][m]
        return rep
