"""Concrete subspace learning (Tang et al. 2023): Concrete TA and Concrete AdaMerging.

One binary-Concrete mask per merged tensor, shared by every task vector, is learned by entropy
minimisation; merging happens inside the masked subspace, ``W = W0 + m̂/mean(m̂) ⊙ Σ_k λ_k τ_k``
(the mask lives in ``MergedModel``: one logit per merged weight, not one per expert).

* ``ConcreteTaskArithmetic``: λ fixed (task-wise, 0.3); only the mask logits train (Adam).
* ``ConcreteAdaMerging`` (task-wise or layer-wise λ): first-order bi-level phase, then plain
  AdaMerging on λ with the mask fixed. See the class docstring.

Final mask (evaluation, export, and phase 2): ``continuous`` is one binary-Concrete sample drawn
with its own fixed seed (so every call — evaluation, export, each phase-2 step, a resumed run —
sees the same mask); ``hard`` is the T → 0 limit of that same sample thresholded at 0.5 (the
authors' binary mask at T = 0.001), i.e. entry kept iff logit(u) + x > 0. Both are rescaled by their mean.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from ..core.coefficients import Coefficients
from ..core.concrete_mask import ConcreteMask, mask_flags
from ..core.task_vectors import TaskVectors
from ..errors import ConfigError
from ..run.data import trim
from ..run.distributed import all_reduce_mean
from .base import MergeMethod
from .method_config import EntropyConfig, check_range
from .objectives import EntropyObjective
from .registry import register


@dataclass
class ConcreteMaskConfig(EntropyConfig):
    """The binary-Concrete mask's keys (``lr`` is the mask logits' Adam lr)."""
    temperature: float = 0.5      # RelaxedBernoulli temperature while training
    init_logit: float = 0.0       # 0: keep probability 0.5
    eval_mode: Literal["continuous", "hard"] = "continuous"
    mask_seed: int = 0
    mask_exclude: list[str] = field(default_factory=list)  # regexes of merged tensors without a mask (mask 1)
    mask_structure: Literal["element", "row", "column"] = "element"  # one logit per weight | per row | per column
    scale: float = 0.3            # Concrete TA: the fixed task-wise λ

    def check(self, prefix: str) -> None:
        super().check(prefix)
        check_range(self.temperature, f"{prefix}.temperature", 0, strict_lo=True)


@dataclass
class ConcreteAdaMergingConfig(ConcreteMaskConfig):
    inner_lr: float = 1.0         # Adam lr of the inner λ step
    adamerging_lr: float = 1e-3   # Adam lr of λ in phase 2
    mask_steps: int = 2000        # phase 1 length

    def check(self, prefix: str) -> None:
        super().check(prefix)
        check_range(self.inner_lr, f"{prefix}.inner_lr", 0, strict_lo=True)
        check_range(self.adamerging_lr, f"{prefix}.adamerging_lr", 0, strict_lo=True)
        check_range(self.mask_steps, f"{prefix}.mask_steps", 0)


def build_subspace_mask(tv: TaskVectors, cfg: ConcreteMaskConfig) -> ConcreteMask:
    return ConcreteMask([t.shape[1:] for _, t in tv.items()], temperature=cfg.temperature,
                        init_logit=cfg.init_logit, eval_mode=cfg.eval_mode, seed=cfg.mask_seed,
                        masked=mask_flags(list(tv.names), cfg.mask_exclude), structure=cfg.mask_structure)


def _fingerprint_mask(method: MergeMethod) -> None:
    """Which tensors carry mask logits, and their shape, are part of what a checkpoint's state means
    (method.mask_exclude, method.mask_structure)."""
    m = method.merged.mask
    if method.cfg.mask_structure != "element":
        method.fingerprint["mask_structure"] = method.cfg.mask_structure
    if not all(m.masked):
        names = [n for n, k in zip(method.merged.names, m.masked) if k]
        method.fingerprint["masked_names"] = hashlib.sha256("\n".join(names).encode()).hexdigest()[:16]


def _mask_start_label(lam: float) -> str:
    return f"start: λ={lam:g} under the initial mask (keep probability σ(init_logit))"


def _mask_report(method: MergeMethod, rep: dict[str, Any]) -> dict[str, Any]:
    m = method.merged.mask
    rep["mask"] = {"eval_mode": m.eval_mode, "temperature": m.temperature,
                   "mean_sparsity": sum(rep["mask_sparsity"].values()) / max(1, len(rep["mask_sparsity"]))}
    return rep


@register
class ConcreteTaskArithmetic(EntropyObjective, MergeMethod):
    """θ = θ0 + λ Σ_k m̂ ⊙ τ_k with λ fixed (``scale``, task-wise); only the mask logits train.

    The loss is the base's summed per-task entropy; the optimizer (Adam, ``lr``) sees only the mask
    logits because the coefficients do not require gradients.
    """

    name = "concrete_task_arithmetic"
    Config = ConcreteMaskConfig

    def __init__(self, pool, method: dict, task_vectors: dict | None = None):
        super().__init__(pool, method, task_vectors)
        _fingerprint_mask(self)

    def build_coefficients(self, tv: TaskVectors) -> Coefficients:
        coefs = Coefficients(tv.K, len(tv), granularity="task", init=self.cfg.scale)
        coefs.requires_grad_(False)
        return coefs

    def build_mask(self, tv: TaskVectors) -> ConcreteMask:
        return build_subspace_mask(tv, self.cfg)

    def start_label(self) -> str:
        return _mask_start_label(self.cfg.scale)

    def report(self) -> dict[str, Any]:
        return _mask_report(self, super().report())


def split_halves(batch: dict[str, dict[str, torch.Tensor]]):
    """Each task's batch cut in two: (first halves, second halves), padding re-trimmed."""
    first, second = {}, {}
    for task, inputs in batch.items():
        n = next(iter(inputs.values())).shape[0]
        if n < 2:
            raise ConfigError(f"concrete AdaMerging splits each task's batch in two halves but task '{task}' has "
                              f"{n} example(s) per process; raise data.batch_size")
        h = n // 2
        first[task] = trim({k: v[:h] for k, v in inputs.items()})
        second[task] = trim({k: v[h:] for k, v in inputs.items()})
    return first, second


@register
class ConcreteAdaMerging(EntropyObjective, MergeMethod):
    """Concrete AdaMerging: first-order bi-level mask learning, then AdaMerging under the fixed mask.

    Phase 1 (``global_step < mask_steps``), per step:
      1. remember the mask generator's state (one mask sample serves both sub-steps);
      2. reset λ to its init; inner step: entropy on the *first half* of every task's batch,
         gradient w.r.t. λ only, one Adam step with ``inner_lr`` (1). Like FusionBench, this Adam keeps
         its moments across outer steps; only λ is reset;
      3. restore the generator (same sample), re-merge with the updated λ; mask step: entropy on the
         *second half* of every task's batch ("a fresh batch"), gradient w.r.t. the mask logits
         only (λ detached), Adam ``lr`` (1e-3). No backpropagation through the inner step.
    Halving keeps one data batch per step, so resumed runs see the same data (``data.batch_size``
    is the two halves together: 32 reproduces the paper's 16 + 16).

    Phase 2 (``mask_steps <= global_step < trainer.max_steps``): the mask is the final mask
    (``eval_mode``); λ is reset to its init at the first phase-2 step, then plain AdaMerging with
    its own Adam (``adamerging_lr``). A run that stops in phase 1 exports λ at its init.

    Optimization is manual. Exactly one optimizer step per training step goes through Lightning (the
    mask step, or the phase-2 λ step); the inner step uses the bare torch optimizer, so
    ``global_step`` counts training steps, which the data module (batch index on resume), max_steps
    and checkpoint names rely on. Gradients are taken with ``torch.autograd.grad`` w.r.t. the
    parameters of the sub-step and averaged over processes by hand: two backward passes per step
    over different parameter sets would break DDP's reducer.
    """

    name = "concrete_adamerging"
    Config = ConcreteAdaMergingConfig

    def __init__(self, pool, method: dict, task_vectors: dict | None = None):
        super().__init__(pool, method, task_vectors)
        _fingerprint_mask(self)
        self.automatic_optimization = False
        self.mask_steps = self.cfg.mask_steps
        self.inner_lr = self.cfg.inner_lr
        self.adamerging_lr = self.cfg.adamerging_lr
        # λ's init (raw parameter space), restored before every inner step and at phase 2
        self.register_buffer("coef_init", self.merged.coefficients.raw.detach().clone(), persistent=False)

    def build_mask(self, tv: TaskVectors) -> ConcreteMask:
        return build_subspace_mask(tv, self.cfg)

    def configure_optimizers(self):
        """Inner λ, mask and phase-2 λ optimizers; ``lr_schedule: cosine`` decays the phase-2 lr once over
        phase 2 (the mask's lr stays constant: its CPU schedule was measured so, bench/RESULTS.md)."""
        betas = tuple(self.cfg.betas)
        lam = [self.merged.coefficients.raw]
        opts = [torch.optim.Adam(lam, lr=self.inner_lr, betas=betas),
                torch.optim.Adam(self.merged.mask.parameters(), lr=self.cfg.lr, betas=betas),
                torch.optim.Adam(lam, lr=self.adamerging_lr, betas=betas)]
        if self.cfg.lr_schedule == "constant":
            return opts
        total = int(self.trainer.max_steps if self._trainer is not None else self.cfg.steps)
        phase2 = max(1, total - self.mask_steps)
        cosine = torch.optim.lr_scheduler.CosineAnnealingLR(
            opts[2], T_max=phase2, eta_min=self.cfg.eta_min_ratio * self.adamerging_lr)
        return opts, [cosine]

    def on_fit_start(self) -> None:
        if getattr(self.trainer.precision_plugin, "scaler", None) is not None:
            raise ConfigError("concrete AdaMerging computes its gradients itself and does not support a gradient "
                              "scaler (precision=16-mixed); use 32-true or bf16-mixed")
        if (self.trainer.max_steps or 0) <= self.mask_steps:
            self.print(f"note: trainer.max_steps={self.trainer.max_steps} <= method.mask_steps={self.mask_steps}: "
                       "no AdaMerging phase; λ stays at its init")

    # -- one sub-step ------------------------------------------------------------------------------
    def _grads_into(self, batch, params: list[torch.nn.Parameter]) -> torch.Tensor:
        """Entropy over ``batch``; its gradient w.r.t. ``params`` (mean over processes) set as ``.grad``."""
        value, surrogate = self.step_loss(batch)
        if not torch.isfinite(value):
            raise FloatingPointError(f"non-finite loss {value.item()} at step {self.global_step}")
        grads = torch.autograd.grad(surrogate, params, allow_unused=True)
        for p, g in zip(params, grads):
            p.grad = all_reduce_mean(torch.zeros_like(p) if g is None else g)
        return value

    @torch.no_grad()
    def _reset_coefficients(self) -> None:
        self.merged.coefficients.raw.copy_(self.coef_init)

    in_mask_step = False  # set while the phase-1 mask step computes its loss (dam adds a term there)

    def before_mask_step(self, batch, rng) -> None:
        """A sub-step between the inner step and the mask step of phase 1 (dam's adversary), on the mask step's
        ``batch``; it leaves the mask generator at ``rng``, so the mask step sees the same sample. None here."""

    def training_step(self, batch, batch_idx):
        inner_opt, mask_opt, lam_opt = self.optimizers()[:3]  # (dam adds its adversary's last)
        mask = self.merged.mask
        lam = self.merged.coefficients.raw
        phase = 1 if self.global_step < self.mask_steps else 2
        mask.frozen = phase == 2
        if phase == 1:
            first, second = split_halves(batch)
            rng = mask.get_rng_state()
            self._reset_coefficients()
            inner = self._grads_into(first, [lam])
            inner_opt.optimizer.step()  # bare torch step: not counted in global_step
            inner_opt.optimizer.zero_grad(set_to_none=True)
            mask.set_rng_state(rng)
            self.before_mask_step(second, rng)
            self.in_mask_step = True
            try:
                value = self._grads_into(second, list(mask.parameters()))
            finally:
                self.in_mask_step = False
            mask_opt.step()
            mask_opt.zero_grad(set_to_none=True)
            self.log("loss_inner", inner, on_step=True)
        else:
            if self.global_step == self.mask_steps:
                self._reset_coefficients()
            value = self._grads_into(batch, [lam])
            lam_opt.step()
            lam_opt.zero_grad(set_to_none=True)
            if self.cfg.lr_schedule != "constant":  # manual optimization: the schedule is stepped here
                self.lr_schedulers().step()
        self.log("loss", value, prog_bar=True, on_step=True)
        t = self.merged.coefficients.values().detach()
        self.log_dict({"phase": float(phase), "coef/mean": t.mean(), "coef/min": t.min(), "coef/max": t.max()},
                      on_step=True)

    def on_fit_end(self) -> None:
        # λ after a phase-1 step is the throwaway inner-step value; without phase 2 keep the init. On fit
        # end, not train end: a run resumed from a checkpoint already at max_steps skips the train loop
        if self.global_step <= self.mask_steps:
            self._reset_coefficients()
        self.merged.mask.frozen = False

    def start_label(self) -> str:
        return _mask_start_label(self.cfg.init) if isinstance(self.cfg.init, (int, float)) else super().start_label()

    def report(self) -> dict[str, Any]:
        rep = _mask_report(self, super().report())
        rep["mask"]["mask_steps"] = self.mask_steps
        return rep
