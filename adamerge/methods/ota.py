"""OTA merging with Fast Fisher Grafting (Mahdavinia et al., "Harnessing Optimization Dynamics for Curvature-Informed
Model Merging", arXiv 2509.11167; the authors' mergekit fork pmahdavi/ota-merge, ``merge_methods/ota.py``).

Per expert k a diagonal curvature v_k: its Adam second moments (``exp_avg_sq``) when every task of the pool gives
them as an ``optimizer_state:`` safetensors file, else the diagonal Fisher that fisher_merging computes on its
calibration texts (the paper's stated justification, v ≈ diag F; the authors did not run this substitution). Then:
- Fast Fisher Grafting: expert k keeps the entries whose saliency v_k ⊙ τ_k² is ≥ a threshold: ``threshold`` (the
  authors', absolute, one value or one per task), or the value that keeps the ``density`` share of the expert's
  entries over the whole merged model (fewer where fewer have a nonzero saliency);
- the merge θ0 + Σ_k w_k τ_k / Σ_k w_k with w_k = mask_k ⊙ (v_k^power + ε), an entry that every expert masks
  keeping the base (the authors' ``fallback_to_base``).
Memory as fisher_merging: one expert's curvature and two running sums at a time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from safetensors import safe_open

from ..core.task_vectors import TaskVectors
from ..errors import ConfigError, PoolError
from .fisher import FisherConfig, FisherMerging, inverse_norm
from .method_config import check_range
from .registry import register


@dataclass
class OtaConfig(FisherConfig):
    power: float = 0.5                      # w = v^power (the authors' √v)
    density: float | None = 0.3             # share of each expert's entries its grafting mask keeps (null: threshold)
    threshold: float | dict | None = None   # or the authors' absolute saliency threshold: one value or {task: value}

    def check(self, prefix: str) -> None:
        super().check(prefix)
        check_range(self.power, f"{prefix}.power", 0, strict_lo=True)
        check_range(self.density, f"{prefix}.density", 0, 1, strict_lo=True)
        if self.density is not None and self.threshold is not None:
            raise ConfigError(f"config keys '{prefix}.density' and '{prefix}.threshold' both set: the grafting mask "
                              "takes one; set the other to null")


@register
class OtaMerging(FisherMerging):
    """Curvature-weighted average of the experts' task vectors, each masked by its saliency (backbone only)."""

    name = "ota_merging"
    Config = OtaConfig

    def merge_direction(self, tv: TaskVectors) -> dict[str, torch.Tensor]:
        m = self.cfg
        files = self.optimizer_states(tv)
        missing = [t for t in tv.task_names if isinstance(m.threshold, dict) and t not in m.threshold]
        if missing:
            raise ConfigError(f"ota_merging: method.threshold has no value for task(s) {', '.join(missing)}; give one "
                              f"per task ({', '.join(tv.task_names)}) or one number")
        self.kept: dict[str, float] = {}
        num: dict[str, torch.Tensor] = {}
        den: dict[str, torch.Tensor] = {}
        masked = False
        for k, task in enumerate(tv.task_names):
            v = self.read_state(files[task], tv) if files else self.fisher(task, k, seed=m.seed + k)
            tau = {n: t[k].float() for n, t in tv.items()}
            saliency = {n: v[n] * tau[n].square() for n in tv.names}
            cut = self.cut(task, saliency)
            kept, masked = 0, masked or cut is not None
            c = inverse_norm(v, m.floor) if m.normalize else 1
            for n in tv.names:
                # a zero saliency (τ or v zero: no example reached it) is never kept, whatever the cut
                mask = (saliency[n] >= cut) & (saliency[n] > 0) if cut is not None else torch.ones_like(
                    saliency[n], dtype=torch.bool)
                kept += int(mask.sum())
                w = ((c * v[n]).pow(m.power) + m.floor) * mask
                num[n] = num[n] + w * tau[n] if n in num else w * tau[n]
                den[n] = den[n] + w if n in den else w
            self.kept[task] = kept / sum(s.numel() for s in saliency.values())
            del v, saliency
        self.curvature = "optimizer_state" if files else "fisher"
        if not masked:
            return {n: num[n] / den[n] for n in tv.names}
        fallback = tv.K * m.floor * 1.1  # every expert masked: the base (the authors' tolerance)
        return {n: torch.where(den[n] > fallback, num[n] / den[n], torch.zeros_like(num[n])) for n in tv.names}

    def cut(self, task: str, saliency: dict[str, torch.Tensor]) -> float | None:
        """The saliency an entry of ``task``'s expert needs to be kept (None: no mask)."""
        m = self.cfg
        if m.density is not None:
            flat = torch.cat([s.reshape(-1) for s in saliency.values()])
            return float(flat.kthvalue(max(1, flat.numel() - int(m.density * flat.numel()) + 1)).values)
        if isinstance(m.threshold, dict):  # every task's value was checked before any curvature
            return float(m.threshold[task])
        return None if m.threshold is None else float(m.threshold)

    def optimizer_states(self, tv: TaskVectors) -> dict[str, str]:
        """{task: its optimizer_state file} when every task gives one, {} when none does; checked before any
        curvature is computed."""
        files = {t: self.pool.tasks[t].optimizer_state for t in tv.task_names if self.pool.tasks[t].optimizer_state}
        if files and len(files) < tv.K:
            missing = [t for t in tv.task_names if t not in files]
            raise PoolError(f"ota_merging: tasks {', '.join(files)} give an optimizer_state and {', '.join(missing)} "
                            "do not; give pool.tasks.<task>.optimizer_state for every task (Adam exp_avg_sq) or for "
                            "none (the diagonal Fisher on calibration texts is used)")
        for task, path in files.items():
            with safe_open(path, "pt") as f:
                names = {self.pool.canonical_name(n): n for n in f.keys()}
                for n in tv.names:
                    if n not in names:
                        raise PoolError(f"task '{task}': optimizer_state {path} has no tensor for '{n}'; it must hold "
                                        "the expert's Adam exp_avg_sq for every merged tensor, named as the model's")
                    shape = tuple(f.get_slice(names[n]).get_shape())
                    if shape != tuple(tv[n].shape[1:]):
                        raise PoolError(f"task '{task}': optimizer_state {path} tensor '{names[n]}' has shape "
                                        f"{shape}, the model's '{n}' has {tuple(tv[n].shape[1:])}")
        return files

    def read_state(self, path: str, tv: TaskVectors) -> dict[str, torch.Tensor]:
        """One expert's second moments, per merged tensor, in float32."""
        with safe_open(path, "pt") as f:
            names = {self.pool.canonical_name(n): n for n in f.keys()}
            return {n: f.get_tensor(names[n]).float().to(tv[n].device) for n in tv.names}

    def report(self) -> dict[str, Any]:
        return dict(super().report(), curvature=self.curvature, kept_share=self.kept)
