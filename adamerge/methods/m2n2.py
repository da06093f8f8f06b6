"""M2N2 (Abrantes, Lange & Tang, "Competition and Attraction Improve Model Fusion", GECCO 2025, arXiv 2508.16204; the
authors' SakanaAI/natural_niches): an archive of merges evolved by crossover, with no gradients.

Here a member of the archive is a coefficient vector of θ0 + Σ_k c_k τ_k (task-wise, or layer-wise flattened in the
tensors' order), seeded with the K experts (c = e_k), so that every child is a merge the usual export writes. Per step,
as the authors' ``natural_niches_fn.py``:
- **resource competition**: each example j is worth 1 / (Σ_i s_ij)^α over the archive, so an example few members get
  right is worth more; a member's fitness is the worth of the examples it gets right (s: adamerge/methods/search.py's
  per-example hits: agreement with each expert on calibration texts, or the validation labels);
- **parents**: the first ∝ fitness; the second by **attraction** (``matchmaker``), ∝ the worth it has where the first
  has none;
- **crossover**: SLERP of the parents with weight w ~ U(0, 1) below a random split point and 1 − w above it (the angle
  of the whole vectors; linear where they are parallel);
- the child replaces the archive's least fit member unless it is itself the least fit.
The member with the most examples right is exported. The archive and the generator are checkpointed every
``checkpoint_every`` children (``resume=last`` goes on, as evolve). The authors evolve flattened parameters; this is
the coefficient-space version, so an archive costs K numbers per member, not a model.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from ..core.coefficients import Coefficients
from ..core.merged_model import MergedModel
from ..core.task_vectors import TaskVectors
from ..pool.model_pool import ModelPool
from .method_config import check_range
from .registry import register
from .search import MetricSearch, SearchConfig
from .static import set_coefficients

log = logging.getLogger("adamerge")
STATE_FILE = "m2n2_state.pkl"


@dataclass
class M2n2Config(SearchConfig):
    granularity: Literal["task", "layer"] = "layer"  # what a split point cuts: tasks, or tensors (layers) × tasks
    evaluations: int = 200              # children measured (the budget; the K seeds come on top)
    archive_size: int = 20              # the authors' pop_size
    alpha: float = 1.0                  # resource competition: an example's worth is 1 / (members right)^alpha
    matchmaker: bool = True             # the second parent by attraction (false: ∝ fitness, as the first)
    split_point: bool = True            # crossover with a split point (false: one SLERP weight for all)
    checkpoint_every: int = 10          # children between checkpoints of the archive
    state_dir: str | None = None
    resume: str | None = None

    def check(self, prefix: str) -> None:
        super().check(prefix)
        check_range(self.evaluations, f"{prefix}.evaluations", 1)
        check_range(self.archive_size, f"{prefix}.archive_size", 2)
        check_range(self.alpha, f"{prefix}.alpha", 0)
        check_range(self.checkpoint_every, f"{prefix}.checkpoint_every", 1)


def shares(scores: torch.Tensor, alpha: float) -> torch.Tensor:
    """[members, examples] hits -> each member's share of each example: s_ij / z_j, z_j = (Σ_i s_ij)^α (0 -> 1)."""
    z = scores.sum(0)
    return scores / torch.where(z > 0, z, torch.ones_like(z)) ** alpha


def worth(scores: torch.Tensor, alpha: float) -> torch.Tensor:
    """[members, examples] hits -> each member's fitness: the sum of its shares."""
    return shares(scores, alpha).sum(1)


def slerp_split(w: float, split: int, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The authors' ``slerp_w_splitpoint``: weight w below index ``split``, 1 − w from it on."""
    val = torch.where(torch.arange(len(x)) < split, torch.tensor(w, dtype=x.dtype), torch.tensor(1 - w, dtype=x.dtype))
    dot = torch.dot(x / x.norm(), y / y.norm()).clamp(-1, 1)
    omega = torch.arccos(dot)
    if torch.sin(omega) > 1e-6:
        return torch.sin((1 - val) * omega) / torch.sin(omega) * x + torch.sin(val * omega) / torch.sin(omega) * y
    return (1 - val) * x + val * y


@register
class M2n2Merge(MetricSearch):
    """The best member of an archive of merges evolved by competition and attraction."""

    name = "m2n2"
    Config = M2n2Config
    keeps_state = True

    def build_coefficients(self, tv: TaskVectors) -> Coefficients:
        coefs = Coefficients(tv.K, len(tv), granularity=self.cfg.granularity, init=0.0)
        coefs.requires_grad_(False)
        return coefs

    def build_merged(self, pool: ModelPool, tv_cfg: dict) -> MergedModel:
        merged = super().build_merged(pool, tv_cfg)
        m, raw = self.cfg, merged.coefficients.raw
        path = Path(m.state_dir) / STATE_FILE if m.state_dir else None
        state = self.load_state(path)
        hits = self.hits_fn(pool, merged)

        def measure(c: torch.Tensor) -> torch.Tensor:
            return torch.cat(list(hits(merged, c).values()))

        if state is None:
            g = torch.Generator().manual_seed(m.seed)
            seeds = [torch.eye(len(pool.task_names), dtype=torch.float64)[k].expand(raw.shape).flatten()
                     for k in range(len(pool.task_names))]
            archive, scores = [], []
            for c in seeds:  # the experts enter as the authors' seed models do: through the replacement rule
                archive, scores = self.admit(archive, scores, c, measure(c))
            state = {"archive": archive, "scores": scores, "evaluations": 0, "history": [], "generator": g.get_state(),
                     "config": self.fingerprint_cfg()}
        g = torch.Generator()
        g.set_state(state["generator"])
        while state["evaluations"] < m.evaluations:
            archive, scores = state["archive"], state["scores"]
            first, second = self.parents(torch.stack(scores).double(), g)
            w = float(torch.rand((), generator=g, dtype=torch.float64))
            split = int(torch.randint(0, len(archive[0]), (), generator=g)) if m.split_point else len(archive[0])
            child = slerp_split(w, split, archive[first], archive[second])
            state["archive"], state["scores"] = self.admit(archive, scores, child, measure(child))
            state["evaluations"] += 1
            best = self.best(state)
            state["history"].append({"evaluations": state["evaluations"], "best_share": best["share"]})
            if state["evaluations"] % m.checkpoint_every == 0 or state["evaluations"] == m.evaluations:
                log.info("m2n2: %d/%d children, best member gets %.4f of the examples right", state["evaluations"],
                         m.evaluations, best["share"])
                state["generator"] = g.get_state()
                self.save_state(path, state)
        best = self.best(state)
        self.search = {"best": best, "history": state["history"], "evaluations": state["evaluations"],
                       "archive": [c.tolist() for c in state["archive"]],
                       "archive_shares": [float(s.float().mean()) for s in state["scores"]]}
        set_coefficients(merged, best["coefficients"])
        return merged

    def parents(self, scores: torch.Tensor, g: torch.Generator) -> tuple[int, int]:
        """Indices of the two parents (the authors' ``sample_parents``)."""
        m = self.cfg
        share = shares(scores, m.alpha)
        fitness = share.sum(1)
        first = int(torch.multinomial(fitness / fitness.sum(), 1, generator=g))
        if not m.matchmaker:
            return first, int(torch.multinomial(fitness / fitness.sum(), 1, generator=g))
        attraction = (share - share[first]).clamp(min=0).sum(1)
        if attraction.sum() <= 0:  # nobody is strong where the first is weak: fall back to fitness
            attraction = fitness
        return first, int(torch.multinomial(attraction / attraction.sum(), 1, generator=g))

    def admit(self, archive: list, scores: list, child: torch.Tensor, hits: torch.Tensor) -> tuple[list, list]:
        """The archive with ``child`` in it: added while there is room, else in place of the least fit member
        unless the child is the least fit itself (the authors' ``update_archive``)."""
        if len(archive) < self.cfg.archive_size:
            return [*archive, child], [*scores, hits]
        fitness = worth(torch.stack([*scores, hits]).double(), self.cfg.alpha)
        worst = int(fitness.argmin())
        if worst == len(archive):
            return archive, scores
        return ([child if i == worst else c for i, c in enumerate(archive)],
                [hits if i == worst else s for i, s in enumerate(scores)])

    def best(self, state: dict) -> dict:
        shares = [float(s.float().mean()) for s in state["scores"]]
        i = max(range(len(shares)), key=shares.__getitem__)
        return {"coefficients": state["archive"][i].tolist(), "share": shares[i]}

    def write_state(self, export_dir: Path) -> None:
        (export_dir / "m2n2.json").write_text(json.dumps(self.search, indent=1))

    def report(self) -> dict[str, Any]:
        return dict(super().report(), m2n2={"metric": self.metric_name, "evaluations": self.search["evaluations"],
                                            "best_share": self.search["best"]["share"]})
