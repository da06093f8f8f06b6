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

Memory is constant in the number of candidates: θ_t is one state dict (its delta from the base, held
as the single row of ``self.merged``'s task vectors with coefficient 1, so evaluation and export see
θ_t unchanged); candidates are read from disk one tensor at a time when scored and when stepped to.
Per tensor and candidate, the weight of each checkpoint in θ_t is tracked ([L, 1+N]: pretrained, then
candidates); it is what ``coefficients.json`` reports (exact for task arithmetic and soft, nominal for TIES).
"""

from __future__ import annotations

import hashlib
import logging
import math
import warnings
from collections import Counter
from dataclasses import dataclass
from typing import Any, Literal

import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from ..candidates import CandidatePool, candidate_paths
from ..coefficients import Coefficients
from ..data import StepBatches, batches, encode, load_tokenizer, read_jsonl
from ..merged_model import MergedModel
from ..pool import ModelPool
from ..task_vectors import TaskVectors, select_names
from .base import CheckpointError, MergeMethod
from .method_config import MethodConfig, check_range
from .registry import register

log = logging.getLogger("adamerge")
# Checkpoints hold θ_{t+1}, the state after an iteration, which is what resuming needs; Lightning warns
# about exactly that for every manual-optimization module.
warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization")

Grads = dict[str, torch.Tensor]


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


def lmo(scores: torch.Tensor, granularity: str, exclude: torch.Tensor | None = None) -> torch.Tensor:
    """Vertex index per tensor ``[L]`` minimizing the linear term; ``scores[i, l] = ⟨∇_l ℓ, v_{i,l} − θ_l⟩``.

    task: one vertex for every tensor (smallest sum over tensors); layer: the smallest per tensor.
    ``exclude`` ``[V, L]`` marks (vertex, tensor) pairs that may not be chosen.
    """
    s = scores if exclude is None else scores.masked_fill(exclude, math.inf)
    if granularity == "task":
        return s.sum(1).argmin().expand(s.shape[1]).clone()
    return s.argmin(0)


@register
class FrankWolfeMerging(MergeMethod):
    name = "fw_merging"
    trainable = True
    Config = FrankWolfeConfig

    def __init__(self, pool: ModelPool, method: dict, task_vectors: dict | None = None):
        # Not MergeMethod.__init__: it stacks every expert's task vector; here θ_t is the only model held.
        pl.LightningModule.__init__(self)
        tv_cfg = dict(task_vectors or {})
        m = self.cfg = self.parse_config(method)
        self.method_cfg = m.as_dict()
        self.save_hyperparameters({"method": self.method_cfg, "task_vectors": tv_cfg})
        object.__setattr__(self, "pool", pool)
        self.causal = pool.model_class == "causal_lm"
        self.automatic_optimization = False
        self.variant, self.granularity, self.objective = m.variant, m.granularity, m.objective
        self.merge_fn, self.inner_granularity = m.merge_fn, m.inner_granularity
        if self.objective == "cross_entropy" and pool.model_class != "sequence_classification":
            raise ValueError("method.objective=cross_entropy needs a sequence_classification pool")
        self.step_size, self.merge_scale, self.inner_steps = m.step_size, m.merge_scale, m.inner_steps

        paths = candidate_paths(m.candidates, m.candidates_dir)
        self.candidates = CandidatePool(pool, paths or None, check_finite=m.check_finite)
        self.names = select_names(pool.shared_names(), tv_cfg.get("include") or None, tv_cfg.get("exclude") or None)
        if not self.names:
            raise ValueError("no tensors selected for merging (check task_vectors.include/exclude)")
        N, L = len(self.candidates), len(self.names)

        # θ_0 and the weight of each checkpoint in it, per tensor: columns [pretrained, candidates...]
        start = m.start or ("task_arithmetic" if self.variant == "hard" else "pretrained")
        self.weights = torch.zeros(L, 1 + N, dtype=torch.float64)
        if start == "task_arithmetic":
            scale = m.start_scale
            delta0 = self._task_arithmetic(scale)
            self.weights[:, 0], self.weights[:, 1:] = 1 - scale * N, scale
        else:
            delta0 = {n: torch.zeros_like(pool.base_tensor(n), dtype=torch.float32) for n in self.names}
            self.weights[:, 0] = 1
        # the authors' code adds θ_0 to the vertex set ("initial"): one more model in memory, whatever N
        self.vertex_names = list(self.candidates.names)
        self._initial: Grads | None = None
        if m.init_vertex if m.init_vertex is not None else self.variant == "hard":
            self._initial = {n: d.clone() for n, d in delta0.items()}
            self._initial_weights = self.weights.clone()
            self.vertex_names.append("initial")

        coefs = Coefficients(1, L, granularity="task", init=1.0).requires_grad_(False)
        theta = TaskVectors({n: d.unsqueeze(0) for n, d in delta0.items()}, ["frank_wolfe"])
        heads = {t: pool.head(t) for t in pool.task_names}
        self.merged = MergedModel(pool.base_model, theta, coefs, heads, tv_device=tv_cfg.get("device"))
        self.fingerprint = {**pool.fingerprint(), "merged_tensors": L, "candidates": list(self.candidates.names),
                            "merged_names": hashlib.sha256("\n".join(self.names).encode()).hexdigest()[:16]}
        self.history: list[dict[str, Any]] = []
        self._stream: StepBatches | None = None  # soft inner steps: batches of their own (use_data)
        self._tokenizer, self._max_length = None, m.max_length
        self._labelled: dict[str, list[tuple[dict, torch.Tensor]]] = {}

    def delta(self, name: str) -> torch.Tensor:
        """θ_t − θ_pretrained for one merged tensor (a view: updated in place)."""
        return self.merged.task_vectors[name][0]

    def theta(self, name: str) -> torch.Tensor:
        d = self.delta(name)
        return self.pool.base_tensor(name).to(d.device, torch.float32) + d.float()

    def vertex_tensor(self, i: int, name: str) -> torch.Tensor:
        """Vertex ``i``'s value of one tensor: a candidate read from disk now, or θ_0 ("initial")."""
        if i < len(self.candidates):
            return self.candidates.tensor(i, name)
        return self.pool.base_tensor(name).float() + self._initial[name].to(self.pool.base_tensor(name).device)

    def _vertex_weights(self, i: int, li: int) -> torch.Tensor:
        if i < len(self.candidates):
            w = torch.zeros(self.weights.shape[1], dtype=torch.float64)
            w[i + 1] = 1
            return w
        return self._initial_weights[li]

    @torch.no_grad()
    def _task_arithmetic(self, scale: float) -> Grads:
        """scale · Σ_i (θ_i − θ_pretrained), streamed: one tensor of one candidate in memory at a time."""
        out = {}
        for n in self.names:
            base = self.pool.base_tensor(n).float()
            acc = torch.zeros_like(base)
            for i in range(len(self.candidates)):
                acc += self.candidates.tensor(i, n).float() - base
            out[n] = acc.mul_(scale)
        return out

    # -- objective ------------------------------------------------------------------------------
    def use_data(self, dm) -> None:
        """Take the tokenizer, max_length and a batch stream (for soft inner steps) from a CalibrationDataModule."""
        self._stream = StepBatches(dm.encoded, dm.batch_size, dm.seed + 1)  # its own stream, not the FW batches
        self._tokenizer, self._max_length = dm.tokenizer, dm.max_length

    def setup(self, stage: str) -> None:
        if self.trainer.world_size > 1:
            raise ValueError("fw_merging runs in one process (it has no trainable parameters for DDP to sync)")
        dm = self.trainer.datamodule
        if dm is not None and hasattr(dm, "encoded"):
            self.use_data(dm)

    def _labelled_set(self, task: str) -> list[tuple[dict, torch.Tensor]]:
        """Micro-batches of the first ``labelled_size`` labelled examples of the task's calibration file."""
        if task not in self._labelled:
            m = self.cfg
            split = m.labelled_split
            path = getattr(self.pool.tasks[task], split, None)
            if not path:
                raise ValueError(f"objective=cross_entropy: task '{task}' has no {split} file in the pool config")
            texts, labels = read_jsonl(path, task, need_labels=True)
            n = m.labelled_size
            if self._tokenizer is None:
                self._tokenizer = load_tokenizer(self.pool.base_path)
            enc, y = encode(self._tokenizer, texts[:n], self._max_length), torch.tensor(labels[:n])
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
    def _fp32(self):
        """Scores and θ updates stay in float32 under bf16/fp16 autocast (they accumulate over iterations)."""
        return torch.autocast(self.delta(self.names[0]).device.type, enabled=False)

    @torch.no_grad()
    def linear_terms(self, grads: list[Grads]) -> torch.Tensor:
        """``[G, V, L]``: ⟨g_n, v_{i,n} − θ_{t,n}⟩ per gradient, vertex and tensor — each vertex read one tensor at a time."""
        with self._fp32():
            return self._linear_terms(grads)

    def _linear_terms(self, grads: list[Grads]) -> torch.Tensor:
        per_tensor = []
        for n in self.names:
            th = self.theta(n).flatten()
            gs = torch.stack([g[n].flatten().to(th.device, torch.float32) for g in grads])
            per_tensor.append(torch.stack([gs @ (self.vertex_tensor(i, n).to(th.device, torch.float32).flatten() - th)
                                           for i in range(len(self.vertex_names))], 1))
        return torch.stack(per_tensor, -1).double().cpu()

    def iterate(self, batch: dict) -> dict[str, Any]:
        """One FW iteration at θ_t; returns its record (also appended to ``history``)."""
        t = len(self.history)
        value, grads = self.objective_grads(batch, per_task=self.variant == "soft")
        if not torch.isfinite(value):
            raise FloatingPointError(f"non-finite objective {value.item()} at FW iteration {t}")
        scores = self.linear_terms(grads)
        L = len(self.names)
        rec: dict[str, Any] = {"iteration": t, "objective": float(value)}
        if self.variant == "hard":
            sel = lmo(scores[0], self.granularity)
            best = scores[0].gather(0, sel[None])[0]  # [L] linear term of the chosen vertex
            # no ascent steps: where no vertex has a negative linear term, θ_t is stationary (gap <= 0)
            move = best < 0 if self.granularity == "layer" else (best.sum() < 0).expand(L)
            gamma = self.step_size * 2 / (t + 2)
            with self._fp32():
                self._hard_step(sel, move, gamma)
            rec.update(gamma=gamma, gap=float(-best.sum()), moved=float(move.double().mean()),
                       selected={"all": self._counts(sel[move])})
        else:
            sels, tasks, exclude = [], [], torch.zeros(len(self.vertex_names), L, dtype=torch.bool)
            for k, task in enumerate(self.pool.task_names):
                if len(sels) >= len(self.vertex_names):
                    break  # every vertex already chosen by an earlier task
                sel = lmo(scores[k], self.granularity, exclude)
                exclude[sel, torch.arange(L)] = True  # as the authors' code: each task adds a distinct vertex
                sels.append(sel)
                tasks.append(task)
            gaps = [float(-scores[k].gather(0, s[None]).sum()) for k, s in enumerate(sels)]
            coefs = self._soft_step(sels, t)
            rec.update(gap=sum(gaps), coef_mean=float(coefs[:, 1:].mean()),
                       selected={task: self._counts(s) for task, s in zip(tasks, sels)})
        self.history.append(rec)
        log.info("FW iteration %d: objective %.5f, %s, selected %s", t, rec["objective"],
                 f"γ {rec['gamma']:.4g}" if "gamma" in rec else f"mean coefficient {rec['coef_mean']:.4g}",
                 rec["selected"])
        return rec

    def _counts(self, sel: torch.Tensor) -> dict[str, int]:
        return {self.vertex_names[i]: c for i, c in Counter(sel.tolist()).most_common()}

    @torch.no_grad()
    def _hard_step(self, sel: torch.Tensor, move: torch.Tensor, gamma: float) -> None:
        """θ ← θ + γ·scale·MergeFn(s − θ), streamed per tensor (TIES needs the whole step: one model)."""
        a = gamma * self.merge_scale
        steps = {}
        for li, n in enumerate(self.names):
            d = self.delta(n)
            if not move[li]:
                steps[n] = torch.zeros_like(d)
                continue
            step = self.vertex_tensor(int(sel[li]), n).to(d.device, torch.float32) - self.theta(n)
            if self.merge_fn == "task_arithmetic":
                d.add_(step.to(d.dtype), alpha=a)
            else:
                steps[n] = step
            self.weights[li] = (1 - a) * self.weights[li] + a * self._vertex_weights(int(sel[li]), li)
        if self.merge_fn == "ties" and move.any():
            # TIES of one vector: keep its top-density entries by magnitude (sign election is trivial)
            trimmed = TaskVectors({n: s.unsqueeze(0) for n, s in steps.items()}, ["step"]).ties_trim(
                self.cfg.ties_density).ties_elect()
            for n in self.names:
                self.delta(n).add_(trimmed[n][0], alpha=a)

    def _soft_step(self, sels: list[torch.Tensor], t: int) -> torch.Tensor:
        """Layer-wise AdaMerging over {s_j − θ_t} with θ_t as the base; returns the coefficients ``[L, 1+m]``.

        The merge is ``MergedModel`` over rows [θ_t − θ_0, s_1 − θ_t, ..., s_m − θ_t] with the first
        coefficient frozen at 1, trained by ``MergeMethod.step_loss`` (entropy) with Adam.
        """
        m, dev = len(sels), self.delta(self.names[0]).device
        with torch.no_grad():
            rows = {}
            for li, n in enumerate(self.names):
                th = self.theta(n)
                rows[n] = torch.stack([self.delta(n).float()] + [
                    self.vertex_tensor(int(s[li]), n).to(dev, torch.float32) - th for s in sels])
            tv = TaskVectors(rows, ["theta_t"] + [f"vertex{j}" for j in range(m)])
        cfg = self.cfg
        c0 = cfg.inner_init_first if t == 0 else cfg.inner_init
        clamp = cfg.inner_clamp
        coefs = Coefficients(1 + m, len(self.names), granularity=self.inner_granularity, init=[1.0] + [c0] * m,
                             clamp=tuple(clamp) if clamp else None).to(self.device)
        keep = torch.ones(1 + m, device=coefs.raw.device)
        keep[0] = 0  # θ_t is the base: its coefficient stays 1
        coefs.raw.register_hook(lambda g: g * keep)
        inner = MergedModel(self.pool.base_model, tv, coefs, self.merged.heads)
        opt = torch.optim.Adam([coefs.raw], lr=cfg.inner_lr)
        outer = self.merged
        try:
            self.merged = inner  # step_loss and task_loss act on self.merged
            with torch.enable_grad():
                for j in range(self.inner_steps):
                    _, surrogate = self.step_loss(self._inner_batch(t, j))
                    opt.zero_grad()
                    surrogate.backward()
                    opt.step()
        finally:
            self.merged = outer
        with torch.no_grad(), self._fp32():
            new = inner.deltas()  # (θ_t − θ_0) + Σ_j c_j (s_j − θ_t) = θ_{t+1} − θ_0, in float32
            table = coefs.table().double()
            for li, n in enumerate(self.names):
                self.delta(n).copy_(new[n])
                c = table[li, 1:]
                self.weights[li] = (1 - c.sum()) * self.weights[li] + sum(
                    c[j] * self._vertex_weights(int(s[li]), li) for j, s in enumerate(sels))
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
                metrics[f"fw/selected{sfx}"] = float(self.vertex_names.index(top))
                metrics[f"fw/selected_share{sfx}"] = c / len(self.names)
        self.log_dict(metrics, on_step=True)
        # manual optimization counts optimizer steps: this no-op step advances global_step (and checkpoints)
        self.optimizers().step()

    def configure_optimizers(self):
        return torch.optim.SGD([self.merged.coefficients.raw], lr=0.0)  # no parameter trains; see training_step

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["frank_wolfe"] = {"theta_delta": {n: self.delta(n).detach().cpu().clone() for n in self.names},
                                     "weights": self.weights.clone(), "history": list(self.history)}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        fw = checkpoint.get("frank_wolfe")
        if fw is None:
            raise CheckpointError("checkpoint has no Frank-Wolfe state (θ_t)")
        with torch.no_grad():
            for n in self.names:
                self.delta(n).copy_(fw["theta_delta"][n])
        self.weights, self.history = fw["weights"].clone(), list(fw["history"])

    def report(self) -> dict[str, Any]:
        return {
            "method": self.method_id,
            "tasks": ["pretrained"] + list(self.candidates.names),  # columns: weight of each checkpoint in θ_T
            "tensors": self.names,
            "granularity": self.granularity,
            "coefficients": self.weights.float().tolist(),
            "num_trainable": 0,
            "frank_wolfe": {
                "variant": self.variant, "objective": self.objective, "merge_fn": self.merge_fn,
                "coefficients_exact": self.variant == "soft" or self.merge_fn == "task_arithmetic",
                "candidates": dict(zip(self.candidates.names, self.candidates.paths())),
                "skipped": self.candidates.skipped, "iterations": len(self.history), "history": self.history,
            },
        }
