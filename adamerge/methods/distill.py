"""Distill merging: label-free learned merging for ordinary classifiers (README, "Which method when").

AdaMerging's entropy tracks error only when every task's head already reads the pretrained
features (CLIP's zero-shot heads). Ordinary classifiers train their head with their encoder, and on
them entropy rewards confidence, not correctness (bench/RESULTS.md, "Why AdaMerging is below task
arithmetic"). The experts themselves are the better label-free signal: for a calibration batch of
task k the loss is Expert Merging's

    T²·KL(softmax(z_k/T) ‖ softmax(z_merged/T)) / K  (+ w_h·hidden MSE)  + γ·Σ|c − c₀| / L,

with z_k expert k's own logits on that batch. What differs from Expert Merging
(docs/methods.md#expert_merging) — each chosen by measurement on the benchmark here
(bench/RESULTS.md, "Distill merging"):

- the start is the best closed-form merge the data allow (``start_from: regmean_pp``), expressed
  as W = W0 + D + Σ_k c_k (τ_k − D): c = 0 is that merge, c = e_k is expert k (``start_from_merge``);
- the coefficients are plain values (``transform: clamp``, start 0) rather than σ(w), so c = 0 — the
  start itself — is representable, and they may go negative (away from an expert);
- a weak pull toward the start (γ small), so that the coefficients can move;
- Adam with one cosine decay over the run.
"""

from __future__ import annotations

import torch

from ..coefficients import Coefficients
from ..task_vectors import TaskVectors
from .expert_merging import ExpertMerging


class DistillMerging(ExpertMerging):
    """Layer-wise coefficients from a closed-form start, distilled from each task's own expert."""

    name = "distill_merging"

    def initial_values(self, K: int) -> torch.Tensor:
        t = torch.as_tensor(self.method_cfg.get("init", 0.0), dtype=torch.float32).flatten()
        if t.numel() not in (1, K):
            raise ValueError(f"method.init: {t.numel()} values for {K} tasks")
        return t.expand(K).clone()

    def build_coefficients(self, tv: TaskVectors) -> Coefficients:
        m = self.method_cfg
        clamp = m.get("clamp")
        init = self.initial_values(tv.K)
        if clamp and not ((init >= clamp[0]) & (init <= clamp[1])).all():
            raise ValueError(f"method.init {init.tolist()} lies outside method.clamp {list(clamp)}: "
                             "every coefficient would be clamped from step 0")
        return Coefficients(tv.K, len(tv), granularity=m.get("granularity", "layer"), init=init.tolist(),
                            clamp=tuple(clamp) if clamp else None, transform="clamp")

    def configure_optimizers(self):
        """Adam on the coefficients, one cosine decay from lr to ``eta_min_ratio``·lr over the run."""
        m = self.method_cfg
        lr = float(m.get("lr", 1e-2))
        if lr <= 0:
            raise ValueError(f"method.lr must be > 0, got {lr}")
        opt = torch.optim.Adam([p for p in self.parameters() if p.requires_grad], lr=lr)
        steps = max(1, int(self.trainer.max_steps if self._trainer is not None else m.get("steps", 1)))
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps,
                                                           eta_min=float(m.get("eta_min_ratio", 0.1)) * lr)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step", "frequency": 1}}
