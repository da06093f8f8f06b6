"""The base of the merge methods that train: the Lightning lifecycle over a MergeAlgorithm.

A subclass chooses how coefficients are parametrized and its objective (``task_loss``: a mixin of
adamerge/methods/objectives.py, or its own); the training step merges once,
runs every task's forward/backward and hands ∂L/∂W to the merge. Devices, loops, precision, DDP and
checkpoint files belong to the Lightning Trainer.
"""

from __future__ import annotations

import logging
from typing import Any

import pytorch_lightning as pl
import torch

from ..core.coefficients import Coefficients
from ..core.combine import InjectGrad
from ..core.merged_model import MergedModel
from ..core.task_vectors import TaskVectors
from ..pool.model_pool import ModelPool
from ..run.checkpointing import check_checkpoint_meta, checkpoint_meta
from ..run.distributed import dist_rank_world
from .algorithm import MergeAlgorithm
from .method_config import LearnedConfig, MethodConfig

log = logging.getLogger(__name__)


class StepCounter(torch.optim.Optimizer):
    """The optimizer of a method that moves its own state without gradients (Frank-Wolfe): it changes nothing.

    Lightning counts steps (``global_step``: ``max_steps``, checkpoints, log rows) in optimizer steps, so such a
    method steps this once per iteration; its one parameter is a placeholder no model reads.
    """

    def __init__(self) -> None:
        super().__init__([torch.zeros(1, requires_grad=True)], {})

    @torch.no_grad()
    def step(self, closure=None):
        return closure() if closure is not None else None


def step_tokens(batch: dict[str, dict[str, torch.Tensor]]) -> int | None:
    """Token positions in one step's batches (every task's), or None when the inputs are not token ids."""
    if not all("input_ids" in inputs for inputs in batch.values()):
        return None
    return sum(inputs["input_ids"].numel() for inputs in batch.values())


class MergeMethod(MergeAlgorithm, pl.LightningModule):
    """A merge that trains: only coefficients (and masks) are parameters; ``self.merged`` is built once."""

    trainable = True
    # the state dict (coefficients, masks) is the whole merge, so start, best checkpoint and end can be
    # compared by loading it (checkpoint.monitor, adamerge/run/start_vs_end.py)
    selectable = True
    Config: type[MethodConfig] = LearnedConfig

    def __init__(self, pool: ModelPool, method: dict, task_vectors: dict | None = None,
                 shard_slice: tuple[int, int] | None = None):
        super().__init__(pool, method, task_vectors, shard_slice)
        self.save_hyperparameters({"method": self.method_cfg, "task_vectors": self.tv_cfg})

    def setup(self, stage: str) -> None:
        """Lightning hook, after the process group starts and before the model moves to its device:
        ``task_vectors.shard=true`` keeps only this process's slice of every task vector (or checks that the
        slices read at start-up are this process's)."""
        if not self.shard:
            return
        rank, world = dist_rank_world()
        tv = self.merged.task_vectors
        if not self.merged.sharded:
            self.merged.shard(rank, world)
        elif (tv.rank, tv.world) != (rank, world):
            raise RuntimeError(f"task_vectors.shard=true: the task vectors were read for process {tv.rank} of "
                               f"{tv.world} (from the launch environment: RANK/WORLD_SIZE, or LOCAL_RANK/NODE_RANK) but "
                               f"the process group says {rank} of {world}; set RANK and WORLD_SIZE for each process")

    def build_coefficients(self, tv: TaskVectors) -> Coefficients:
        m = self.cfg
        return Coefficients(tv.K, len(tv), granularity=m.granularity, init=m.init,
                            clamp=tuple(m.clamp) if m.clamp else None, transform=m.transform)

    # -- model outputs ------------------------------------------------------------------------
    def task_logits(self, task: str, inputs: dict[str, torch.Tensor],
                    params: dict | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(logits, mask) the objectives see, as the pool's family defines them: per-example logits,
        next-token logits with padding masked (causal LMs), the first decoder step's (seq2seq LMs)."""
        out = self.merged(task=task, params=params, **self.family.model_inputs(self.merged.base, inputs))
        return self.family.logits(out, inputs)

    def task_loss(self, task: str, inputs: dict[str, torch.Tensor], params: dict | None = None) -> torch.Tensor:
        """One task's objective on one micro-batch (without regularizer): the method's choice — an objective
        mixed in from adamerge/methods/objectives.py (EntropyObjective) or its own (Expert Merging)."""
        raise NotImplementedError(f"{type(self).__name__} chooses no objective: mix in one of "
                                  "adamerge/methods/objectives.py or define task_loss")

    def step_loss(self, batch: dict[str, dict[str, torch.Tensor]],
                  merged: MergedModel | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(objective value, tensor to backward) for one global step over every task's batch.

        Merge once, then one task's micro-batch forward+backward at a time into ∂L/∂W (activations
        of one task alive at once); the returned tensor hands ∂L/∂W to the merge on backward, so the
        coefficients (and masks) get the same gradient as from the summed loss. ``merged``: another
        merge over the same base and heads (Frank-Wolfe's inner step), default ``self.merged``.
        """
        merged = merged or self.merged
        rows = merged.lookup_rows(list(batch.values()))
        # factorized LoRA weights run as adapters (their coefficients a leaf of their own, read by the
        # low-rank forward) or are merged from their factors below, whichever costs less for this step
        adapters = merged.via_adapters(step_tokens(batch))
        if merged.sharded:  # this process's slices merged, then all-gathered for the forward
            targets, params = merged.sharded_params()
        else:
            params = targets = merged.merged_params(reuse_buffers=True, rows=rows, adapters=adapters)
        leaves = {n: p.detach().requires_grad_(True) for n, p in params.items()}
        coefs = merged.factor_coefficients(adapters)
        coef_leaf = coefs.detach().requires_grad_(True) if coefs is not None else None
        total = torch.zeros((), device=self.device)
        with merged.sparse_lookup_grad(rows), merged.low_rank(coef_leaf, adapters):
            for task, inputs in batch.items():
                loss = self.task_loss(task, inputs, leaves)
                loss.backward()
                total = total + loss.detach()
        grads = {n: leaves[n].grad for n in params if leaves[n].grad is not None}
        if merged.sharded:  # ∂L/∂W summed over processes, each keeping its slices' part
            grads = merged.task_vectors.scatter_grads(grads, targets)
        grads, targets = list(grads.values()), [targets[n] for n in grads]
        if coef_leaf is not None and coef_leaf.grad is not None:  # ∂L/∂c of the factorized weights
            grads.append(coef_leaf.grad)
            targets.append(coefs)
        injected = InjectGrad.apply(tuple(grads), *targets)
        return total, injected + self.regularizer()

    def regularizer(self) -> torch.Tensor:
        return torch.zeros((), device=self.device)

    # -- Lightning -------------------------------------------------------------------------------
    def training_step(self, batch, batch_idx):
        value, to_backward = self.step_loss(batch)
        if not torch.isfinite(value):
            if self.cfg.nonfinite == "skip":
                log.warning("non-finite loss %s at step %d: step skipped", value.item(), self.global_step)
                return None  # Lightning skips backward and the optimizer step
            raise FloatingPointError(f"non-finite loss {value.item()} at step {self.global_step}; "
                                     "nothing was exported (method.nonfinite=skip skips such steps)")
        self.log("loss", value, prog_bar=True, on_step=True, sync_dist=False)
        t = self.merged.coefficients.values().detach()
        self.log_dict({"coef/mean": t.mean(), "coef/min": t.min(), "coef/max": t.max()}, on_step=True)
        return to_backward

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        for n, p in self.named_parameters():
            if p.requires_grad and not torch.isfinite(p).all():
                raise FloatingPointError(f"parameter '{n}' became non-finite at step {self.global_step}; "
                                         "nothing was exported")

    def configure_optimizers(self):
        """Adam on what trains; ``lr_schedule: cosine`` decays lr once over the run to ``eta_min_ratio``·lr."""
        m = self.cfg
        opt = torch.optim.Adam([p for p in self.parameters() if p.requires_grad], lr=m.lr,
                               betas=tuple(m.betas), weight_decay=m.weight_decay)
        if m.lr_schedule == "constant":
            return opt
        steps = max(1, int(self.trainer.max_steps if self._trainer is not None else m.steps))
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps, eta_min=m.eta_min_ratio * m.lr)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step", "frequency": 1}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        mask = self.merged.mask
        checkpoint["adamerge"] = checkpoint_meta(self.method_id, self.fingerprint,
                                                 mask.get_rng_state() if mask is not None else None)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        meta = check_checkpoint_meta(checkpoint, self.method_id, self.fingerprint)
        torch.set_rng_state(meta["torch_rng"])
        if "mask_rng" in meta and self.merged.mask is not None:
            self.merged.mask.set_rng_state(meta["mask_rng"])

