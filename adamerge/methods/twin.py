"""Twin-Merging (Lu et al., "Twin-Merging: Dynamic Integration of Modular Expertise in Model Merging", NeurIPS 2024,
arXiv 2406.15479; the authors' LZY-the-boys/Twin-Merging, ``discriminative/``): a shared merge, each task's exclusive
knowledge as a low-rank delta from it, and a router that mixes the deltas per input (adamerge/routed.py).

- Shared: task arithmetic θ* = θ0 + λ Σ_k τ_k (``scale``; the authors' 0.29); it is ``export/model``.
- Twin vectors: per Linear weight of the backbone, τ_k − λ Σ_j τ_j truncated by SVD to the ``density`` share of its
  singular values (the authors' ``mask_rate`` 0.9); the Linear's bias delta is kept whole. Norms and embeddings stay
  shared (the authors also route them).
- Router: the authors' MLP on the shared model's mean-pooled last hidden state, trained by cross-entropy on the
  first ``num_examples`` calibration texts of each task labelled only by the task they came from.
- The table gains "routed (no task id)": the router picks the head too, and an example counts only when its task
  and its label are both right. coefficients.json reports the router's task accuracy per task.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.merged_model import MergedModel
from ..errors import ConfigError
from ..pool.model_pool import ModelPool
from ..routed import ROUTED_DIR, RoutedModel, train_router
from ..run.data import batches, read_split
from .method_config import check_range
from .registry import register
from .static import StaticConfig, StaticMerge

log = logging.getLogger("adamerge")


@dataclass
class TwinConfig(StaticConfig):
    scale: float | list[float] | None = 0.3  # λ of the shared task-arithmetic merge (the authors' 0.29)
    density: float = 0.1                # share of each exclusive delta's singular values kept (1 − mask_rate)
    num_examples: int = 1000            # calibration texts per task the router learns from
    router_epochs: int = 50
    router_lr: float = 5e-4
    router_batch_size: int = 1024
    batch_size: int = 64                # texts per forward when computing the router's features
    max_length: int = 64
    seed: int = 0

    def check(self, prefix: str) -> None:
        super().check(prefix)
        check_range(self.density, f"{prefix}.density", 0, 1, strict_lo=True)
        check_range(self.num_examples, f"{prefix}.num_examples", 1)
        check_range(self.router_epochs, f"{prefix}.router_epochs", 1)


@register
class TwinMerging(StaticMerge):
    """The shared task-arithmetic merge, exported as usual, plus a routed model (``self.routed``)."""

    name = "twin_merging"
    Config = TwinConfig

    @classmethod
    def supports_factorized(cls, cfg) -> bool:
        return False  # the twin vectors are SVDs of dense deltas

    def build_merged(self, pool: ModelPool, tv_cfg: dict) -> MergedModel:
        if not pool.family.classifier_heads:
            raise ConfigError(f"twin_merging routes classifier heads; the pool's model_class is {pool.family.name}")
        merged = super().build_merged(pool, tv_cfg)
        m, tv = self.cfg, merged.task_vectors
        lam = torch.tensor(self.scale(m, tv.K), dtype=torch.float32).reshape(-1)
        lam = lam.expand(tv.K) if lam.numel() == 1 else lam
        modules = dict(pool.base_model.named_modules())
        twins: dict[str, dict[str, torch.Tensor]] = {}
        for name, t in tv.items():
            module_name, _, kind = name.rpartition(".")
            if not isinstance(modules.get(module_name), nn.Linear) or kind != "weight":
                continue
            taus = t.float()
            exclusive = taus - (lam.view(-1, 1, 1) * taus).sum(0)
            u, s, vh = torch.linalg.svd(exclusive, full_matrices=False)
            r = max(1, int(m.density * s.shape[1]))
            twins[name] = {"U": (u[..., :r] * s[:, None, :r]).contiguous(), "V": vh[:, :r].contiguous()}
            bias = f"{module_name}.bias"
            if bias in tv.names:
                b = tv[bias].float()
                twins[name]["bias"] = b - (lam.view(-1, 1) * b).sum(0)
        shared = copy.deepcopy(pool.base_model)
        with torch.no_grad():
            params = dict(shared.named_parameters())
            for n, v in merged.merged_params().items():
                params[n].copy_(v)
        features, task_ids = self.router_data(pool, shared)
        router, train_accuracy = train_router(features, task_ids, tv.K, m.router_epochs, m.router_lr,
                                              m.router_batch_size, m.seed)
        heads = {t: {n: v.detach().clone() for n, v in pool.head(t).items()} for t in pool.task_names}
        # not a submodule of the method: its weights are not the method's state
        object.__setattr__(self, "routed", RoutedModel(shared, pool.task_names, heads, twins, router))
        self.twin_summary = {"rank_share": m.density, "routed_tensors": len(twins),
                             "router_train_accuracy": train_accuracy,
                             "twin_floats": int(sum(v.numel() for tw in twins.values() for v in tw.values()))}
        log.info("twin_merging: %d Linear weights routed; router accuracy on its own texts %.3f", len(twins),
                 train_accuracy)
        return merged

    @torch.no_grad()
    def router_data(self, pool: ModelPool, shared: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """Features of the first ``num_examples`` calibration texts of each task, labelled by their task."""
        m = self.cfg
        probe = RoutedModel(shared, pool.task_names, {}, {}, nn.Identity())
        features, ids = [], []
        for k, task in enumerate(pool.task_names):
            texts = read_split(pool, task, "calibration", needed_by=self.method_id)[0][:m.num_examples]
            for batch in batches(self.family.encode(pool, texts, pool.tokenizer(), m.max_length), m.batch_size):
                features.append(probe.features(batch))
                ids.append(torch.full((len(features[-1]),), k))
        return torch.cat(features), torch.cat(ids)

    def write_state(self, export_dir: Path) -> None:
        self.routed.save(export_dir / ROUTED_DIR)

    def report(self) -> dict[str, Any]:
        return dict(super().report(), twin_merging={**self.twin_summary,
                                                     **({"router_test_accuracy": self.routing} if hasattr(self, "routing") else {})})
