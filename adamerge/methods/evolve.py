"""Evolutionary merging (as mergekit-evolve does for LLMs; Akiba et al., "Evolutionary Optimization of Model Merging
Recipes", 2024): CMA-ES (the ``cma`` package) over task- or layer-wise coefficients of θ0 + Σ_k c_k τ_k. The fitness of
a candidate is the preference-weighted mean of its tasks' metrics (adamerge/methods/search.py: validation accuracy, or
the label-free agreement with each expert); no gradients.

Budgeted in ``evaluations`` (merges measured). After every generation the search state (the strategy with its
generator, the best so far) is written atomically to ``state_dir``; a run started again with ``resume=last`` goes on
from it and ends where one uninterrupted run ends. A larger budget given on resume extends a finished search.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from ..core.coefficients import Coefficients
from ..core.merged_model import MergedModel
from ..core.task_vectors import TaskVectors
from ..errors import ConfigError
from ..pool.model_pool import ModelPool
from .method_config import check_range
from .registry import register
from .search import MetricSearch, SearchConfig, check_bounds
from .static import set_coefficients

log = logging.getLogger("adamerge")
STATE_FILE = "evolve_state.pkl"


@dataclass
class EvolveConfig(SearchConfig):
    granularity: Literal["task", "layer"] = "task"  # one coefficient per task, or per task and tensor
    evaluations: int = 200              # merges measured in all (the budget)
    popsize: int | None = None          # candidates per generation (null: CMA-ES's 4 + 3 ln n)
    sigma0: float = 0.1                 # initial step size
    init: float = 0.3                   # the search's start: every coefficient at this value
    bounds: list[float] = field(default_factory=lambda: [0.0, 1.0])
    state_dir: str | None = None        # where the search state is checkpointed each generation
    resume: str | None = None           # last: go on from state_dir's state (the run's resume key)

    def check(self, prefix: str) -> None:
        super().check(prefix)
        check_range(self.evaluations, f"{prefix}.evaluations", 1)
        check_range(self.sigma0, f"{prefix}.sigma0", 0, strict_lo=True)
        check_bounds(self.bounds, f"{prefix}.bounds")


@register
class EvolveMerge(MetricSearch):
    """Coefficients found by CMA-ES on the measured metrics."""

    name = "evolve"
    Config = EvolveConfig
    keeps_state = True  # resumes without training: ``resume=last`` reads ``state_dir``

    def build_coefficients(self, tv: TaskVectors) -> Coefficients:
        coefs = Coefficients(tv.K, len(tv), granularity=self.cfg.granularity, init=self.cfg.init)
        coefs.requires_grad_(False)
        return coefs

    def build_merged(self, pool: ModelPool, tv_cfg: dict) -> MergedModel:
        try:
            import cma
        except ImportError as e:
            raise ConfigError("method=evolve needs the cma package: pip install 'adamerge[search]' (or pip install "
                              "cma)") from e
        weights = self.preference(pool.task_names)  # a bad one refused before the task vectors are read
        merged = super().build_merged(pool, tv_cfg)
        m = self.cfg
        weights = weights / weights.sum()
        path = Path(m.state_dir) / STATE_FILE if m.state_dir else None
        state = self.load_state(path)
        metric = self.metric_fn(pool, merged)
        if state is None:
            start = merged.coefficients.raw.detach().double().flatten().numpy()
            options = {"bounds": list(m.bounds), "seed": m.seed + 1, "verbose": -9,  # cma: seed 0 means "time"
                       **({"popsize": m.popsize} if m.popsize else {})}
            es = cma.CMAEvolutionStrategy(start, m.sigma0, options)
            state = {"es": es, "evaluations": 0, "best": None, "history": [], "config": self.fingerprint_cfg()}
        es = state["es"]  # its pickle carries its own generator: a resumed search draws what the whole one draws
        while state["evaluations"] + es.popsize <= m.evaluations:
            candidates = es.ask()
            scores = [metric(merged, torch.from_numpy(np.asarray(c))) for c in candidates]
            fitness = [float(s @ weights) for s in scores]
            es.tell(candidates, [-f for f in fitness])  # CMA-ES minimises
            state["evaluations"] += len(candidates)
            best = int(np.argmax(fitness))
            if state["best"] is None or fitness[best] > state["best"]["fitness"]:
                state["best"] = {"fitness": fitness[best], "coefficients": np.asarray(candidates[best]).tolist(),
                                 "metrics": scores[best].tolist()}
            state["history"].append({"evaluations": state["evaluations"], "best_fitness": state["best"]["fitness"],
                                     "generation_best": fitness[best]})
            log.info("evolve: %d/%d evaluations, generation best %.4f, best %.4f", state["evaluations"],
                     m.evaluations, fitness[best], state["best"]["fitness"])
            self.save_state(path, state)
        if state["best"] is None:
            raise ConfigError(f"method.evaluations={m.evaluations} is below one generation ({es.popsize} candidates)")
        self.search = {k: state[k] for k in ("best", "history", "evaluations")}
        set_coefficients(merged, state["best"]["coefficients"])
        return merged

    def write_state(self, export_dir: Path) -> None:
        (export_dir / "evolve.json").write_text(json.dumps(self.search, indent=1))

    def report(self) -> dict[str, Any]:
        return dict(super().report(), evolve={"metric": self.metric_name, "evaluations": self.search["evaluations"],
                                              "best": self.search["best"]})
