"""MAP: the trade-off front of task-wise merges (Li et al., ICLR 2025, arXiv 2406.07529; the authors' luli-git/MAP,
plain mode). θ(c) = θ0 + Σ_k c_k τ_k: every task's metric is measured at (K+1)(K+2) sampled c, a quadratic surrogate
is fitted per task (adamerge/core/pareto.py), the surrogates' Pareto front is searched, and ``preference`` picks
the exported point. Surrogates are checked on ``check_points`` further measured points (R² per task).

The metric (adamerge/methods/search.py): validation accuracy, or the label-free agreement with each task's expert.
No optimizer steps; every measurement is one merge and one pass over each task's examples.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..core import pareto
from ..core.merged_model import MergedModel
from ..pool.model_pool import ModelPool
from .method_config import check_range
from .registry import register
from .search import MetricSearch, SearchConfig, check_bounds
from .static import set_coefficients

log = logging.getLogger("adamerge")
STATE_DIR = "pareto"  # in the export: front.json, samples.json, front.png


@dataclass
class MapConfig(SearchConfig):
    samples: int | None = None          # measured points for the fit (null: (K+1)(K+2), the authors')
    check_points: int = 10              # further measured points, uniform in bounds: the surrogates' R²
    candidates: int = 8192              # surrogate evaluations in the front sweep
    bounds: list[float] = field(default_factory=lambda: [0.0, 1.0])  # the box the front is searched in

    def check(self, prefix: str) -> None:
        super().check(prefix)
        check_range(self.check_points, f"{prefix}.check_points", 2)
        check_range(self.candidates, f"{prefix}.candidates", 1)
        check_bounds(self.bounds, f"{prefix}.bounds")


@register
class MapMerge(MetricSearch):
    """Task-wise coefficients chosen on the Pareto front of quadratic surrogates of each task's metric."""

    name = "map"
    Config = MapConfig

    def build_merged(self, pool: ModelPool, tv_cfg: dict) -> MergedModel:
        preference = self.preference(pool.task_names)  # a bad one refused before the task vectors are read
        merged = super().build_merged(pool, tv_cfg)
        m, K = self.cfg, merged.task_vectors.K
        metric = self.metric_fn(pool, merged)
        g = torch.Generator().manual_seed(m.seed)
        fit_c = pareto.map_samples(K, m.samples or (K + 1) * (K + 2), g)
        lo, hi = m.bounds
        check_c = lo + (hi - lo) * torch.rand(m.check_points, K, generator=g, dtype=torch.float64)
        measured = []
        points = torch.cat([fit_c, check_c])
        for i, c in enumerate(points):
            measured.append(metric(merged, c))
            log.info("MAP: point %d/%d c=%s -> %s", i + 1, len(points), [round(v, 3) for v in c.tolist()],
                     [round(v, 4) for v in measured[-1].tolist()])
        measured = torch.stack(measured)
        fit_y, check_y = measured[:len(fit_c)], measured[len(fit_c):]
        surrogates = [pareto.Surrogate(fit_c, fit_y[:, k]) for k in range(K)]
        r2 = {t: pareto.r_squared(check_y[:, k], surrogates[k](check_c)) for k, t in enumerate(pool.task_names)}
        front_c, front_y = pareto.surrogate_front(surrogates, (lo, hi), m.candidates, g)
        best = pareto.choose(front_y, preference)
        chosen = front_c[best]
        measured_chosen = metric(merged, chosen)
        self.front = {"metric": self.metric_name, "tasks": pool.task_names, "preference": preference.tolist(),
                      "chosen": {"coefficients": chosen.tolist(), "predicted": front_y[best].tolist(),
                                 "measured": measured_chosen.tolist()},
                      "r2_on_check_points": r2,
                      "front": {"coefficients": front_c.tolist(), "predicted": front_y.tolist()},
                      "samples": {"coefficients": points.tolist(), "measured": measured.tolist(),
                                  "fitted_on": len(fit_c)}}
        log.info("MAP: %d front points; chosen c=%s, predicted %s, measured %s; R² on %d check points %s",
                 len(front_c), [round(v, 3) for v in chosen.tolist()], [round(v, 4) for v in front_y[best].tolist()],
                 [round(v, 4) for v in measured_chosen.tolist()], len(check_c), {t: round(v, 3) for t, v in r2.items()})
        set_coefficients(merged, chosen)
        return merged

    def write_state(self, export_dir: Path) -> None:
        (export_dir / STATE_DIR).mkdir(parents=True, exist_ok=True)
        (export_dir / STATE_DIR / "front.json").write_text(json.dumps(self.front, indent=1))
        f = self.front
        pareto.plot_front(export_dir / STATE_DIR / "front.png", f["tasks"], torch.tensor(f["front"]["predicted"]),
                          torch.tensor(f["samples"]["measured"]), torch.tensor(f["chosen"]["predicted"]),
                          torch.tensor(f["chosen"]["measured"]))

    def report(self) -> dict[str, Any]:
        f = self.front
        return dict(super().report(), map={"metric": f["metric"], "chosen": f["chosen"], "preference": f["preference"],
                                           "r2_on_check_points": f["r2_on_check_points"],
                                           "front_points": len(f["front"]["coefficients"])})
