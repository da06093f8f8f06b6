"""Reversible model merging (RMM; Alipour & Amiri, "Towards Reversible Model Merging For Low-rank Weights", arXiv
2510.14163): instead of one merged model, a basis of ``rank`` = p model-equivalents and K × p coefficients per tensor,
from which each task's own update is rebuilt.

Per tensor, the K experts' updates (flattened: x_k) are replaced by their best rank-p approximation in the least
squares sense (Eckart–Young): the top-p eigenvectors V [K, p] of the K × K Gram matrix x_k · x_l give the
coefficients, the basis is M = Vᵀ X [p, D], and task k's update is Σ_j V_kj M_j. For a LoRA-adapted weight that every
expert factors with the same rank, this is done on the factors, the A's and the s·B's separately (a row of A or a
column of B is what the paper calls a task-vector position), and task k's update is B̂_k Â_k: the basis then costs
p adapters, not p dense matrices. No reference code was found; the per-tensor (not per-position) coefficients are this
implementation's reading of the paper's closed form (docs/methods.md#rmm).

A stage (adamerge/core/stage.py) with one model per task, like task_masks.py's: row k becomes task k's rebuilt update,
the export keeps the basis and coefficients (``export/rmm/``; ``read_rmm_update`` rebuilds a task's update) and
coefficients.json reports the storage against the K experts'.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import ConfigError
from .stage import Stage

STATE_DIR = "rmm"  # in the export: basis.safetensors and coefficients.safetensors, keyed by tensor (and factor)


def rank_p(rows: torch.Tensor, p: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The best rank-``p`` approximation of ``rows`` [K, D] as (coefficients [K, p], basis [p, D]), in float64."""
    x = rows.double()
    values, vectors = torch.linalg.eigh(x @ x.T)  # ascending
    coefficients = vectors[:, values.argsort(descending=True)[:p]]
    return coefficients, coefficients.T @ x


class Rmm(Stage):
    """Each task's update rebuilt from a rank-``rank`` basis over the K experts, per tensor (on the LoRA factors where
    every expert factors the tensor)."""

    needs_pool = True  # the experts' LoRA factors

    def __init__(self, rank: int):
        self.rank = rank
        self.basis: dict[str, torch.Tensor] = {}
        self.coefficients: dict[str, torch.Tensor] = {}
        self.stored = self.experts = 0  # floats kept by the basis and coefficients; by the K experts' updates

    def fit(self, stream, K: int) -> None:
        if self.rank >= K:
            raise ConfigError(f"rmm: method.rmm.rank must be below the number of experts ({K}) to compress them, "
                              f"got {self.rank}")

    def begin(self) -> None:
        self.basis.clear()
        self.coefficients.clear()
        self.stored = self.experts = 0

    def factors(self, name: str) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
        """Every expert's (A, s·B) of tensor ``name``, or None unless all factor it with one rank."""
        found = [self.pool.lora_factors(task, name) for task in self.pool.task_names]
        if any(f is None for f in found) or len({f[0].shape for f in found}) != 1:
            return None
        return [(a, b * scale) for a, b, scale in found]

    def keep(self, key: str, rows: torch.Tensor) -> torch.Tensor:
        """The rank-p rebuild of ``rows`` [K, D], its basis and coefficients kept under ``key``."""
        coefficients, basis = rank_p(rows, self.rank)
        self.coefficients[key], self.basis[key] = coefficients.float(), basis.float()
        self.stored += basis.numel() + coefficients.numel()
        self.experts += rows.numel()
        return (coefficients @ basis).float()

    def __call__(self, name: str, t: torch.Tensor) -> torch.Tensor:
        K = t.shape[0]
        factors = self.factors(name)
        if factors is None:
            t.copy_(self.keep(name, t.reshape(K, -1)).view(t.shape))
            return t
        a = self.keep(f"{name}:A", torch.stack([f[0] for f in factors]).flatten(1)).view(K, *factors[0][0].shape)
        b = self.keep(f"{name}:B", torch.stack([f[1] for f in factors]).flatten(1)).view(K, *factors[0][1].shape)
        t.copy_(b @ a)
        return t

    def write_state(self, export_dir: Path) -> None:
        from safetensors.torch import save_file

        (export_dir / STATE_DIR).mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.basis.items()}, str(export_dir / STATE_DIR / "basis.safetensors"))
        save_file(self.coefficients, str(export_dir / STATE_DIR / "coefficients.safetensors"))

    def report(self) -> dict:
        return {"rmm": {"rank": self.rank, "stored_floats": self.stored, "experts_floats": self.experts,
                        "storage_share": self.stored / max(1, self.experts)}}


def read_rmm_update(export_dir: str | Path, task_index: int, shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """Task ``task_index``'s rebuilt update, every tensor (``shapes``: the model's shape of each), from an export's
    ``rmm/``: Σ_j c_kj M_j, or B̂ Â for a tensor kept as factors."""
    from safetensors.torch import load_file

    d = Path(export_dir) / STATE_DIR
    basis, coefficients = load_file(str(d / "basis.safetensors")), load_file(str(d / "coefficients.safetensors"))
    rebuilt = {key: coefficients[key][task_index] @ basis[key] for key in basis}
    out = {}
    for name, shape in shapes.items():
        if name in rebuilt:
            out[name] = rebuilt[name].view(shape)
        elif f"{name}:A" in rebuilt:
            a, b = rebuilt[f"{name}:A"], rebuilt[f"{name}:B"]
            out[name] = b.view(shape[0], -1) @ a.view(-1, shape[1])
    return out
