"""The training objectives a learned method chooses, as mixins beside MergeMethod (adamerge/methods/base.py).

MergeMethod owns the step (merge once, each task's forward and backward into ∂L/∂W) and asks
``task_loss(task, inputs, params)`` for one task's micro-batch; a method picks that loss by mixing in one
objective here, or defines its own (Expert Merging's distillation to each expert, beside its method in
adamerge/methods/expert_merging.py). The loss functions themselves are pure functions in
adamerge/core/objectives.py.
"""

from __future__ import annotations

import torch

from ..core.objectives import entropy, marginal_entropy


class EntropyObjective:
    """Mean prediction entropy of each task's own head (AdaMerging): label-free, and a proxy for error when the
    heads read the pretrained features (zero-shot heads, frozen probes). The config's ``diversity`` = w > 0
    subtracts w × the entropy of the batch's mean prediction (information maximisation, as in SHOT):
    confident predictions that do not all fall in one class. 0 (default) is the authors' objective.
    Needs ``task_logits`` (MergeMethod) and a config with ``diversity`` (EntropyConfig)."""

    def task_loss(self, task: str, inputs: dict[str, torch.Tensor], params: dict | None = None) -> torch.Tensor:
        logits, mask = self.task_logits(task, inputs, params)
        loss = entropy(logits, mask)
        w = self.cfg.diversity
        return loss - w * marginal_entropy(logits, mask) if w else loss
