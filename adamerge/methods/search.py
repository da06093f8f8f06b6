"""What map, evolve and m2n2 share: measuring a merge with given coefficients, and a checkpointed search state.

The metric is each task's accuracy on its labelled ``validation:`` file when every task has one (``metric: auto``),
else a label-free one: agreement with the task's expert, the share of its first ``num_examples`` calibration texts
(tokens, for LMs) on which the merge predicts what the expert predicts. ``preference`` weighs the tasks.
"""

from __future__ import annotations

import logging
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from ..atomic import atomic_write_bytes
from ..core.merged_model import MergedModel
from ..errors import CheckpointError, ConfigError
from ..evaluate import load_test_sets, merge_accuracies
from ..pool.model_pool import ModelPool
from ..run.data import batches, read_split
from ..run.distributed import dist_rank_world
from .static import StaticConfig, StaticMerge, coefficients_at

log = logging.getLogger("adamerge")
STATE_KEYS = ("evaluations", "resume", "state_dir")  # may differ between a search and its resumption


def check_bounds(bounds: list[float], key: str) -> None:
    """A search box ``[low, high]``: one ConfigError line naming ``key`` otherwise."""
    if len(bounds) != 2 or not bounds[0] < bounds[1]:
        raise ConfigError(f"config key '{key}' must be [low, high] with low < high, got {bounds}")


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

    def metric_choice(self, pool: ModelPool) -> str:
        """``validation`` or ``agreement`` (``method.metric``; auto: validation when every task has a file)."""
        m = self.cfg
        with_validation = all(t.validation for t in pool.tasks.values())
        choice = m.metric if m.metric != "auto" else ("validation" if with_validation else "agreement")
        if choice == "validation" and not with_validation:
            missing = [t for t, spec in pool.tasks.items() if not spec.validation]
            raise ConfigError(f"method.metric=validation: tasks {', '.join(missing)} have no validation file; give "
                              "pool.tasks.<task>.validation or use metric=agreement (label-free)")
        self.metric_name = choice
        return choice

    def metric_fn(self, pool: ModelPool, merged: MergedModel):
        """``f(merged, c) -> [K]`` metrics (higher is better) of θ0 + Σ c_k τ_k; ``self.metric_name`` says which."""
        if self.metric_choice(pool) == "validation":
            m = self.cfg
            sets = load_test_sets(pool, pool.tokenizer(), m.max_length, split="validation")
            return lambda mm, c: self.at(mm, c, lambda params: torch.tensor(
                [merge_accuracies(pool, params, sets, m.batch_size)[t] for t in pool.task_names]))
        hits = self.hits_fn(pool, merged)
        return lambda mm, c: torch.tensor([float(h.float().mean()) for h in hits(mm, c).values()], dtype=torch.float64)

    def hits_fn(self, pool: ModelPool, merged: MergedModel):
        """``f(merged, c) -> {task: [examples] bool}``: which examples the merge gets right, against the expert's
        predictions on calibration texts (agreement) or the validation labels (classifiers). Under ``trainer=ddp``
        each process measures its share of every task's examples and the hits are gathered (in rank order), so
        every process holds them all."""
        m = self.cfg
        rank, world = dist_rank_world()
        if self.metric_choice(pool) == "validation":
            sets = load_test_sets(pool, pool.tokenizer(), m.max_length, split="validation")
            if not all(hasattr(ts, "labels") and hasattr(ts, "encoded") for ts in sets.values()):
                raise ConfigError(f"{self.method_id}: per-example scores on validation files are implemented for "
                                  "classifier pools; use method.metric=agreement")
            examples = {t: batches({k: v[rank::world] for k, v in ts.encoded.items()}, m.batch_size)
                        for t, ts in sets.items()}
            wanted = {t: ts.labels[rank::world] for t, ts in sets.items()}
        else:
            texts = {t: read_split(pool, t, "calibration", needed_by=self.method_id)[0][:m.num_examples][rank::world]
                     for t in pool.task_names}
            examples = {t: batches(self.family.encode(pool, texts[t], pool.tokenizer(), m.max_length), m.batch_size)
                        for t in pool.task_names}
            wanted = {t: self.predictions(merged, t, dict(pool.iter_expert_state(t)), examples[t]) for t in pool.task_names}

        def hits(mm: MergedModel, c: torch.Tensor) -> dict[str, torch.Tensor]:
            mine = self.at(mm, c, lambda params: {t: self.predictions(mm, t, params, examples[t]) == wanted[t]
                                                  for t in pool.task_names}, tensors=False)
            if world == 1:
                return mine
            import torch.distributed as dist

            gathered: list = [None] * world
            dist.all_gather_object(gathered, mine)
            return {t: torch.cat([g[t] for g in gathered]) for t in pool.task_names}

        return hits

    @staticmethod
    def at(merged: MergedModel, c: torch.Tensor, measure, tensors: bool = True):
        """``measure(params)`` of the merge with coefficients ``c`` (task-wise [K], or flattened layer-wise [L·K]);
        in float64 unless ``tensors`` is false."""
        with coefficients_at(merged, c), torch.no_grad():
            out = measure(merged.merged_params())
        return out.double() if tensors else out

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

    # -- a search checkpointed every generation (evolve, m2n2) -------------------------------------------------------
    def fingerprint_cfg(self) -> dict:
        """The keys a resumed search must share with the one it continues (the budget may grow)."""
        return {k: v for k, v in self.cfg.as_dict().items() if k not in STATE_KEYS}

    def load_state(self, path: Path | None) -> dict | None:
        """The checkpointed search to go on from (``resume=last``), None for a fresh one; a state left by another
        run is never taken over silently, nor resumed with other settings."""
        if path is None or not path.exists():
            if getattr(self.cfg, "resume", None):
                log.info("%s: no search state at %s to resume: starting afresh", self.method_id, path)
            return None
        if not self.cfg.resume:
            raise CheckpointError(f"{self.method_id}: a search state exists at {path}; pass resume=last to go on from "
                                  "it or choose another out_dir")
        state = pickle.loads(path.read_bytes())  # written by this run's own save_state
        if state["config"] != self.fingerprint_cfg():
            changed = sorted(k for k in state["config"] if state["config"][k] != self.fingerprint_cfg().get(k))
            raise CheckpointError(f"{self.method_id}: the search state at {path} was made with other settings "
                                  f"({', '.join(changed)}); resume it with the same method keys (only "
                                  "method.evaluations may change)")
        log.info("%s: resuming from %s after %d evaluations", self.method_id, path, state["evaluations"])
        return state

    @staticmethod
    def save_state(path: Path | None, state: dict) -> None:
        """The search state, atomically (by the first process only, under ``trainer=ddp``)."""
        if path is not None and dist_rank_world()[0] == 0:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(path, pickle.dumps(state))
