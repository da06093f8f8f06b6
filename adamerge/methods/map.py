"""MAP: the trade-off front of task-wise merges (Li et al., ICLR 2025, arXiv 2406.07529; the authors' luli-git/MAP,
plain mode). θ(c) = θ0 + Σ_k c_k τ_k: every task's metric is measured at (K+1)(K+2) sampled c, a quadratic surrogate
is fitted per task (adamerge/core/pareto.py), the surrogates' Pareto front is searched, and ``preference`` picks
the exported point. Surrogates are checked on ``check_points`` further measured points (R² per task).

The metric is each task's accuracy on its labelled ``validation:`` file when every task has one (``metric: auto``),
else a label-free one: agreement with the task's expert, the share of its first ``num_examples`` calibration texts
(tokens, for LMs) on which the merge predicts what the expert predicts. No optimizer steps; every measurement is
one merge and one pass over each task's examples.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from ..core import pareto
from ..core.merged_model import MergedModel
from ..errors import ConfigError
from ..evaluate import load_test_sets, merge_accuracies
from ..pool.model_pool import ModelPool
from ..run.data import batches, read_split
from .method_config import check_range
from .registry import register
from .static import StaticConfig, StaticMerge

log = logging.getLogger("adamerge")
STATE_DIR = "pareto"  # in the export: front.json, samples.json, front.png


@dataclass
class MapConfig(StaticConfig):
    samples: int | None = None          # measured points for the fit (null: (K+1)(K+2), the authors')
    check_points: int = 10              # further measured points, uniform in bounds: the surrogates' R²
    candidates: int = 8192              # surrogate evaluations in the front sweep
    bounds: list[float] = field(default_factory=lambda: [0.0, 1.0])  # the box the front is searched in
    preference: dict | None = None      # {task: weight} (null: uniform): the front point exported
    metric: Literal["auto", "validation", "agreement"] = "auto"
    num_examples: int = 256             # calibration texts per task for the agreement metric
    batch_size: int = 64
    max_length: int = 64
    seed: int = 0

    def check(self, prefix: str) -> None:
        super().check(prefix)
        check_range(self.check_points, f"{prefix}.check_points", 2)
        check_range(self.candidates, f"{prefix}.candidates", 1)
        if len(self.bounds) != 2 or not self.bounds[0] < self.bounds[1]:
            raise ConfigError(f"config key '{prefix}.bounds' must be [low, high] with low < high, got {self.bounds}")


@register
class MapMerge(StaticMerge):
    """Task-wise coefficients chosen on the Pareto front of quadratic surrogates of each task's metric."""

    name = "map"
    Config = MapConfig

    def build_merged(self, pool: ModelPool, tv_cfg: dict) -> MergedModel:
        merged = super().build_merged(pool, tv_cfg)
        m, K = self.cfg, merged.task_vectors.K
        preference = self.preference(pool.task_names)
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
        chosen = measured_chosen = front_c[best]
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
        merged.coefficients.raw.data.copy_(chosen.to(merged.coefficients.raw.dtype))
        return merged

    def preference(self, tasks: list[str]) -> torch.Tensor:
        given = self.cfg.preference or {t: 1.0 for t in tasks}
        unknown = sorted(set(given) - set(tasks))
        if unknown:
            raise ConfigError(f"method.preference names {', '.join(unknown)}, not tasks of the pool ({', '.join(tasks)})")
        weights = torch.tensor([float(given.get(t, 0.0)) for t in tasks], dtype=torch.float64)
        if (weights < 0).any() or weights.sum() <= 0:
            raise ConfigError(f"method.preference must be non-negative weights, not all zero: got {given}")
        return weights

    def metric_fn(self, pool: ModelPool, merged: MergedModel):
        """``f(merged, c) -> [K]`` metrics (higher is better) of θ0 + Σ c_k τ_k, and ``self.metric_name``."""
        m = self.cfg
        with_validation = all(t.validation for t in pool.tasks.values())
        choice = m.metric if m.metric != "auto" else ("validation" if with_validation else "agreement")
        if choice == "validation" and not with_validation:
            missing = [t for t, spec in pool.tasks.items() if not spec.validation]
            raise ConfigError(f"method.metric=validation: tasks {', '.join(missing)} have no validation file; give "
                              "pool.tasks.<task>.validation or use metric=agreement (label-free)")
        self.metric_name = choice
        if choice == "validation":
            sets = load_test_sets(pool, pool.tokenizer(), m.max_length, split="validation")
            return lambda mm, c: self.at(mm, c, lambda params: torch.tensor(
                [merge_accuracies(pool, params, sets, m.batch_size)[t] for t in pool.task_names]))
        examples = {t: batches(self.family.encode(pool, read_split(pool, t, "calibration", needed_by="map")[0][:m.num_examples],
                                                  pool.tokenizer(), m.max_length), m.batch_size)
                    for t in pool.task_names}
        expert = {t: self.predictions(merged, t, dict(pool.iter_expert_state(t)), examples[t]) for t in pool.task_names}
        return lambda mm, c: self.at(mm, c, lambda params: torch.tensor(
            [float((self.predictions(mm, t, params, examples[t]) == expert[t]).float().mean()) for t in pool.task_names]))

    @staticmethod
    def at(merged: MergedModel, c: torch.Tensor, measure) -> torch.Tensor:
        """``measure(params)`` of the merge with task-wise coefficients ``c``."""
        raw = merged.coefficients.raw
        kept = raw.data.clone()
        raw.data.copy_(c.to(raw.dtype))
        try:
            with torch.no_grad():
                return measure(merged.merged_params()).double()
        finally:
            raw.data.copy_(kept)

    @torch.no_grad()
    def predictions(self, merged: MergedModel, task: str, params: dict, examples: list[dict]) -> torch.Tensor:
        """The argmax prediction of every example (every counted token, for LMs) of ``task`` under ``params``."""
        out = []
        for batch in examples:
            logits, mask = self.family.logits(
                merged(task=task, params=params, **self.family.model_inputs(merged.base, batch)), batch)
            pred = logits.argmax(-1)
            out.append(pred[mask.bool()] if mask is not None else pred.reshape(-1))
        return torch.cat(out)

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
