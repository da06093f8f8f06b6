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

from dataclasses import dataclass, field
from typing import Literal

import torch

from ..core.coefficients import Coefficients
from ..core.task_vectors import TaskVectors
from ..errors import ConfigError
from .expert_merging import ExpertMerging, ExpertMergingConfig
from .registry import register


@dataclass
class DistillMergingConfig(ExpertMergingConfig):
    """Expert Merging's loss with the defaults chosen by measurement (docstring above)."""
    init: float | list[float] = 0.0
    clamp: list[float] | None = field(default_factory=lambda: [-1.0, 1.0])
    reg_weight: float = 0.0
    lr: float = 1e-2
    weight_decay: float = 0.0
    lr_schedule: Literal["constant", "cosine"] = "cosine"


@register
class DistillMerging(ExpertMerging):
    """Layer-wise coefficients from a closed-form start, distilled from each task's own expert."""

    name = "distill_merging"
    Config = DistillMergingConfig

    def initial_values(self, K: int) -> torch.Tensor:
        t = torch.as_tensor(self.cfg.init, dtype=torch.float32).flatten()
        if t.numel() not in (1, K):
            raise ConfigError(f"method.init: {t.numel()} values for {K} tasks")
        return t.expand(K).clone()

    def build_coefficients(self, tv: TaskVectors) -> Coefficients:
        m = self.cfg
        return Coefficients(tv.K, len(tv), granularity=m.granularity, init=self.initial_values(tv.K).tolist(),
                            clamp=tuple(m.clamp) if m.clamp else None, transform="clamp")
