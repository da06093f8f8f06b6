"""What MAP and evolve share: measuring every task's metric of a merge with given coefficients.

The metric is each task's accuracy on its labelled ``validation:`` file when every task has one (``metric: auto``),
else a label-free one: agreement with the task's expert, the share of its first ``num_examples`` calibration texts
(tokens, for LMs) on which the merge predicts what the expert predicts. ``preference`` weighs the tasks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from ..core.merged_model import MergedModel
from ..errors import ConfigError
from ..evaluate import load_test_sets, merge_accuracies
from ..pool.model_pool import ModelPool
from ..run.data import batches, read_split
from .static import StaticConfig, StaticMerge


@dataclass
class SearchConfig(StaticConfig):
    preference: dict | None = None      # {task: weight} (null: uniform)
    metric: Literal["auto", "validation", "agreement"] = "auto"
    num_examples: int = 256             # calibration texts per task for the agreement metric
    batch_size: int = 64
    max_length: int = 64
    seed: int = 0


class MetricSearch(StaticMerge):
    """A merge whose coefficients are chosen by measuring merges (``metric_fn``), with no optimizer steps."""

    name = "metric_search"
    Config = SearchConfig

    def preference(self, tasks: list[str]) -> torch.Tensor:
        """The tasks' weights, in the pool's order (``method.preference``; uniform when not given)."""
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
        examples = {t: batches(self.family.encode(pool, read_split(pool, t, "calibration", needed_by=self.method_id)[0][:m.num_examples],
                                                  pool.tokenizer(), m.max_length), m.batch_size)
                    for t in pool.task_names}
        expert = {t: self.predictions(merged, t, dict(pool.iter_expert_state(t)), examples[t]) for t in pool.task_names}
        return lambda mm, c: self.at(mm, c, lambda params: torch.tensor(
            [float((self.predictions(mm, t, params, examples[t]) == expert[t]).float().mean()) for t in pool.task_names]))

    @staticmethod
    def at(merged: MergedModel, c: torch.Tensor, measure) -> torch.Tensor:
        """``measure(params)`` of the merge with coefficients ``c`` (task-wise [K], or flattened layer-wise [L·K])."""
        raw = merged.coefficients.raw
        kept = raw.data.clone()
        raw.data.copy_(c.reshape(raw.shape).to(raw.dtype))
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

