"""FW-Merging (Chen et al., ICCV 2025): Frank-Wolfe over a pool of candidate models.

    min_{θ ∈ conv{θ_1..θ_N}} ℓ(θ),   ℓ = the pool's tasks' objective through each task's own head
    (prediction entropy on unlabeled calibration batches, or cross-entropy on labelled examples).

One FW iteration per Lightning training step. At θ_t: g = ∇ℓ(θ_t); the linear minimization oracle
scores every vertex i by the true FW linear term ⟨g, θ_i − θ_t⟩ (task-wise: summed over tensors, one
whole candidate wins; layer-wise: per tensor). Vertices are the candidates (plus θ_0 as "initial").
  hard: θ_{t+1} = θ_t + γ_t · MergeFn(s_t − θ_t), γ_t = step_size·2/(t+2), MergeFn = task arithmetic
        (scale 0.3) or TIES trim; θ_0 = task arithmetic of the candidates.
  soft: one LMO per task's gradient (distinct vertices s_j), then layer-wise AdaMerging over
        {s_j − θ_t} with θ_t as the base — ``MergedModel`` + ``MergeMethod.step_loss``; θ_0 = pretrained.

θ_t, the vertices and the weight of each checkpoint in θ_t live in ``FrankWolfeState``
(adamerge/methods/frank_wolfe_state.py): memory is constant in the number of candidates. The weights
are what ``coefficients.json`` reports (exact for task arithmetic and soft, nominal for TIES).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F

from ..core.coefficients import Coefficients
from ..core.merged_model import MergedModel
from ..core.task_vectors import select_names
from ..errors import CheckpointError, ConfigError
from ..pool.candidates import CandidatePool, candidate_paths
from ..pool.model_pool import ModelPool
from ..run.data import StepBatches, batches, encode, read_split, stream
from .base import MergeMethod, StepCounter
from .frank_wolfe_state import FrankWolfeState, Grads, lmo
from .method_config import MethodConfig, check_range
from .objectives import EntropyObjective
from .registry import register

log = logging.getLogger("adamerge")

@dataclass
class FrankWolfeConfig(MethodConfig):
    """FW-Merging's keys (one FW iteration per training step; ``steps`` iterations)."""
    variant: Literal["hard", "soft"] = "hard"
    granularity: Literal["task", "layer"] = "task"   # LMO: one whole candidate, or one per tensor
    candidates: list[str] | dict | None = None       # model paths, or {name: path} (null: the pool's experts)
    candidates_dir: str | None = None                # or every model directory under this one
    check_finite: bool = True
    objective: Literal["entropy", "cross_entropy"] = "entropy"
    diversity: float = 0.0                           # entropy objective: as AdaMerging's key
    labelled_split: str = "calibration"              # cross_entropy: the labelled file of each task
    labelled_size: int = 100
    labelled_batch_size: int = 16
    max_length: int = 64
    start: Literal["task_arithmetic", "pretrained"] | None = None  # θ_0 (null: by variant, as the authors)
    start_scale: float = 0.3
    init_vertex: bool | None = None                  # θ_0 among the vertices (null: hard yes, soft no)
    merge_fn: Literal["task_arithmetic", "ties"] = "task_arithmetic"  # hard: applied to s_t − θ_t
    merge_scale: float = 0.3
    ties_density: float = 0.2
    step_size: float = 0.1
    # soft: the inner layer-wise AdaMerging
    inner_steps: int = 500
    inner_lr: float = 1e-3
    inner_granularity: Literal["task", "layer"] = "layer"
    inner_init_first: float = 0.3
    inner_init: float = 1e-8
    inner_clamp: list[float] | None = None

    def check(self, prefix: str) -> None:
        super().check(prefix)
        check_range(self.step_size, f"{prefix}.step_size", 0, strict_lo=True)
        check_range(self.inner_steps, f"{prefix}.inner_steps", 1)
        check_range(self.inner_lr, f"{prefix}.inner_lr", 0, strict_lo=True)
        check_range(self.ties_density, f"{prefix}.ties_density", 0, 1, strict_lo=True)
        for key in ("labelled_size", "labelled_batch_size", "max_length"):
            check_range(getattr(self, key), f"{prefix}.{key}", 1)


@register
class FrankWolfeMerging(EntropyObjective, MergeMethod):
    name = "fw_merging"
    trainable = True
    selectable = False  # θ_t lives in FrankWolfeState, not in the state dict
    Config = FrankWolfeConfig

    def __init__(self, pool: ModelPool, method: dict, task_vectors: dict | None = None):
        m = self.parse_config(method)
        if m.objective == "cross_entropy" and not pool.family.classifier_heads:
            raise ConfigError(f"method.objective=cross_entropy needs classifier heads; a {pool.family.name} pool has "
                              "none (use objective=entropy)")
        super().__init__(pool, method, task_vectors)
        self.automatic_optimization = False
        self.variant, self.granularity, self.objective = m.variant, m.granularity, m.objective
        self.merge_fn, self.inner_granularity = m.merge_fn, m.inner_granularity
        self.step_size, self.merge_scale, self.inner_steps = m.step_size, m.merge_scale, m.inner_steps
        self.history: list[dict[str, Any]] = []
        self._stream: StepBatches | None = None  # soft inner steps: batches of their own (use_data)
        self._max_length = m.max_length
        self._labelled: dict[str, list[tuple[dict, torch.Tensor]]] = {}

    def build_merged(self, pool: ModelPool, tv_cfg: dict) -> MergedModel:
        """θ_t's MergedModel (FrankWolfeState): not the experts' stacked task vectors — θ_t is the only model held."""
        m = self.cfg
        paths = candidate_paths(m.candidates, m.candidates_dir)
        self.candidates = CandidatePool(pool, paths or None, check_finite=m.check_finite)
        self.names = select_names(pool.shared_names(), tv_cfg.get("include") or None, tv_cfg.get("exclude") or None)
        if not self.names:
            raise ConfigError("no tensors selected for merging (check task_vectors.include/exclude)")
        start = m.start or ("task_arithmetic" if m.variant == "hard" else "pretrained")
        initial = m.init_vertex if m.init_vertex is not None else m.variant == "hard"
        self.state = FrankWolfeState(pool, self.candidates, self.names, start, m.start_scale, initial,
                                     tv_cfg.get("device"))
        self.fingerprint["candidates"] = list(self.candidates.names)
        return self.state.merged

    # -- objective ------------------------------------------------------------------------------
    def use_data(self, dm) -> None:
        """Take max_length and a batch stream (for soft inner steps) from a CalibrationDataModule."""
        self._stream = stream(dm.encoded, dm.batch_size, dm.seed, "fw_inner")  # not the FW steps' nor the monitor's
        self._max_length = dm.max_length

    def setup(self, stage: str) -> None:
        if self.trainer.world_size > 1:
            raise ConfigError("fw_merging runs in one process (it has no trainable parameters for DDP to sync)")
        dm = self.trainer.datamodule
        if dm is not None and hasattr(dm, "encoded"):
            self.use_data(dm)

    def _labelled_set(self, task: str) -> list[tuple[dict, torch.Tensor]]:
        """Micro-batches of the first ``labelled_size`` labelled examples of the task's calibration file."""
        if task not in self._labelled:
            m = self.cfg
            texts, labels = read_split(self.pool, task, m.labelled_split, need_labels=True,
                                       needed_by="method.objective=cross_entropy")
            n = m.labelled_size
            enc, y = encode(self.pool.tokenizer(), texts[:n], self._max_length), torch.tensor(labels[:n])
            bs = m.labelled_batch_size
            self._labelled[task] = list(zip(batches(enc, bs), y.split(bs)))
        return self._labelled[task]

    def _task_losses(self, task: str, batch: dict, params: dict):
        """The task's objective as micro-batch terms that sum to it (one backward each)."""
        if self.objective == "entropy":
            if task in batch:
                yield self.task_loss(task, batch[task], params)
            return
        mbs = self._labelled_set(task)
        total = sum(len(y) for _, y in mbs)
        for inputs, y in mbs:
            logits, _ = self.task_logits(task, {k: v.to(self.device) for k, v in inputs.items()}, params)
            yield F.cross_entropy(logits.float(), y.to(logits.device), reduction="sum") / total

    def objective_grads(self, batch: dict, per_task: bool) -> tuple[torch.Tensor, list[Grads]]:
        """ℓ(θ_t) (summed over tasks) and ∇ℓ(θ_t) w.r.t. the merged tensors: one gradient, or one per task."""
        with torch.no_grad():
            leaves = {n: p.detach().requires_grad_(True) for n, p in self.merged.merged_params().items()}
        total, grads = torch.zeros((), device=self.device), []
        with torch.enable_grad():
            for task in self.pool.task_names:
                for loss in self._task_losses(task, batch, leaves):
                    loss.backward()
                    total = total + loss.detach()
                if per_task:
                    grads.append({n: p.grad if p.grad is not None else torch.zeros_like(p) for n, p in leaves.items()})
                    for p in leaves.values():
                        p.grad = None
        if not per_task:
            grads = [{n: p.grad if p.grad is not None else torch.zeros_like(p) for n, p in leaves.items()}]
        return total, grads

    # -- Frank-Wolfe --------------------------------------------------------------------------
    def iterate(self, batch: dict) -> dict[str, Any]:
        """One FW iteration at θ_t; returns its record (also appended to ``history``)."""
        t = len(self.history)
        value, grads = self.objective_grads(batch, per_task=self.variant == "soft")
        if not torch.isfinite(value):
            raise FloatingPointError(f"non-finite objective {value.item()} at FW iteration {t}")
        state = self.state
        scores = state.linear_terms(grads)
        L = len(self.names)
        rec: dict[str, Any] = {"iteration": t, "objective": float(value)}
        if self.variant == "hard":
            sel = lmo(scores[0], self.granularity)
            best = scores[0].gather(0, sel[None])[0]  # [L] linear term of the chosen vertex
            # no ascent steps: where no vertex has a negative linear term, θ_t is stationary (gap <= 0)
            move = best < 0 if self.granularity == "layer" else (best.sum() < 0).expand(L)
            gamma = self.step_size * 2 / (t + 2)
            state.hard_step(sel, move, gamma * self.merge_scale, self.merge_fn, self.cfg.ties_density)
            rec.update(gamma=gamma, gap=float(-best.sum()), moved=float(move.double().mean()),
                       selected={"all": state.counts(sel[move])})
        else:
            sels, tasks, exclude = [], [], torch.zeros(len(state.vertex_names), L, dtype=torch.bool)
            for k, task in enumerate(self.pool.task_names):
                if len(sels) >= len(state.vertex_names):
                    break  # every vertex already chosen by an earlier task
                sel = lmo(scores[k], self.granularity, exclude)
                exclude[sel, torch.arange(L)] = True  # as the authors' code: each task adds a distinct vertex
                sels.append(sel)
                tasks.append(task)
            gaps = [float(-scores[k].gather(0, s[None]).sum()) for k, s in enumerate(sels)]
            coefs = self._soft_step(sels, t)
            rec.update(gap=sum(gaps), coef_mean=float(coefs[:, 1:].mean()),
                       selected={task: state.counts(s) for task, s in zip(tasks, sels)})
        self.history.append(rec)
        log.info("FW iteration %d: objective %.5f, %s, selected %s", t, rec["objective"],
                 f"γ {rec['gamma']:.4g}" if "gamma" in rec else f"mean coefficient {rec['coef_mean']:.4g}",
                 rec["selected"])
        return rec

    def _soft_step(self, sels: list[torch.Tensor], t: int) -> torch.Tensor:
        """Layer-wise AdaMerging over {s_j − θ_t} with θ_t as the base; returns the coefficients ``[L, 1+m]``.

        The merge is its own ``MergedModel`` over the rows [θ_t − θ_0, s_1 − θ_t, ..., s_m − θ_t] with
        the first coefficient frozen at 1, trained by ``MergeMethod.step_loss`` (entropy) with Adam.
        """
        m, cfg = len(sels), self.cfg
        c0 = cfg.inner_init_first if t == 0 else cfg.inner_init
        clamp = cfg.inner_clamp
        coefs = Coefficients(1 + m, len(self.names), granularity=self.inner_granularity, init=[1.0] + [c0] * m,
                             clamp=tuple(clamp) if clamp else None).to(self.device)
        keep = torch.ones(1 + m, device=coefs.raw.device)
        keep[0] = 0  # θ_t is the base: its coefficient stays 1
        coefs.raw.register_hook(lambda g: g * keep)
        inner = MergedModel(self.pool.base_model, self.state.vertex_rows(sels), coefs, self.merged.heads)
        opt = torch.optim.Adam([coefs.raw], lr=cfg.inner_lr)
        with torch.enable_grad():
            for j in range(self.inner_steps):
                _, surrogate = self.step_loss(self._inner_batch(t, j), merged=inner)
                opt.zero_grad()
                surrogate.backward()
                opt.step()
        with torch.no_grad(), self.state.fp32():
            new = inner.deltas()  # (θ_t − θ_0) + Σ_j c_j (s_j − θ_t) = θ_{t+1} − θ_0, in float32
        table = coefs.table().detach().double()
        self.state.soft_step_to(new, table, sels)
        return table

    def _inner_batch(self, t: int, j: int) -> dict:
        if self._stream is None:
            raise RuntimeError("soft FW needs calibration batches: call use_data(datamodule) (train.py does)")
        b = self._stream.batch(t * self.inner_steps + j)
        return {task: {k: v.to(self.device) for k, v in inputs.items()} for task, inputs in b.items()}

    # -- Lightning ------------------------------------------------------------------------------
    def training_step(self, batch, batch_idx):
        rec = self.iterate(batch)
        self.log("loss", rec["objective"], prog_bar=True, on_step=True)
        metrics = {"fw/gap": rec["gap"]}
        if "gamma" in rec:
            metrics.update({"fw/gamma": rec["gamma"], "fw/moved": rec["moved"]})
        else:
            metrics["fw/coef_mean"] = rec["coef_mean"]
        for key, counts in rec["selected"].items():
            if counts:  # most chosen vertex (index) and the share of tensors that chose it
                top, c = next(iter(counts.items()))
                sfx = "" if key == "all" else f"/{key}"
                metrics[f"fw/selected{sfx}"] = float(self.state.vertex_names.index(top))
                metrics[f"fw/selected_share{sfx}"] = c / len(self.names)
        self.log_dict(metrics, on_step=True)
        self.optimizers().step()  # counts the iteration (StepCounter): θ moved in iterate, not by gradients

    def configure_optimizers(self):
        return StepCounter()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["frank_wolfe"] = {**self.state.state_dict(), "history": list(self.history)}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        fw = checkpoint.get("frank_wolfe")
        if fw is None:
            raise CheckpointError("checkpoint has no Frank-Wolfe state (θ_t)")
        self.state.load_state_dict(fw)
        self.history = list(fw["history"])

    def report(self) -> dict[str, Any]:
        return {
            "method": self.method_id,
            "tasks": ["pretrained"] + list(self.candidates.names),  # columns: weight of each checkpoint in θ_T
            "tensors": self.names,
            "granularity": self.granularity,
            "coefficients": self.state.weights.float().tolist(),
            "num_trainable": 0,
            "frank_wolfe": {
                "variant": self.variant, "objective": self.objective, "merge_fn": self.merge_fn,
                "coefficients_exact": self.variant == "soft" or self.merge_fn == "task_arithmetic",
                "candidates": dict(zip(self.candidates.names, self.candidates.paths())),
                "skipped": self.candidates.skipped, "iterations": len(self.history), "history": self.history,
            },
        }
