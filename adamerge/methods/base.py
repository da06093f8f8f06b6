"""The base every merge method stands on: builds the MergedModel, owns checkpoint metadata and reports.

Subclasses choose how task vectors are prepared, how coefficients are parametrized, and the loss.
Devices, loops, precision, DDP and checkpoint files belong to the Lightning Trainer.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Any

import pytorch_lightning as pl
import torch

from ..checkpointing import check_checkpoint_meta, checkpoint_meta
from ..coefficients import Coefficients
from ..combine import InjectGrad
from ..concrete_mask import ConcreteMask
from ..distributed import dist_rank_world
from ..errors import ConfigError
from ..lora_factors import check_lora_mode
from ..merged_model import MergedModel
from ..objectives import entropy, marginal_entropy
from ..pool import ModelPool
from ..seq2seq import first_step_inputs
from ..task_vectors import TaskVectors
from ..transforms import active_transforms, apply_transforms
from .method_config import LearnedConfig, MethodConfig
from .registry import get_method

log = logging.getLogger(__name__)


def start_from_merge(pool: ModelPool, start_cfg: dict, tv_cfg: dict | None,
                     tv: TaskVectors) -> tuple[dict[str, torch.Tensor], TaskVectors]:
    """Build the (data-free or closed-form) merge ``start_cfg`` and re-express the task vectors from it.

    Returns ``D`` (start merge − base, per merged tensor) and τ'_k = τ_k − D, so that
    W = W0 + D + Σ_k c_k τ'_k is the start merge at c = 0 and expert k at c = e_k.
    """
    cls = get_method(start_cfg["name"])
    if cls.trains(cls.parse_config(start_cfg, "method.start_from")):
        raise ValueError(f"method.start_from: '{start_cfg.get('id', start_cfg['name'])}' is a learned method; "
                         "a starting point must be data-free or closed-form")
    start = cls(pool, start_cfg, tv_cfg)
    merged = start.merged.merged_params()
    offset = {n: (merged[n].detach() - pool.base_tensor(n)).float() for n in tv.names}
    del start, merged
    return offset, tv.map(lambda n, t: (t.float() - offset[n]).to(t.dtype))


class MergeMethod(pl.LightningModule):
    """Shared base: ``self.merged`` is the one MergedModel; only coefficients/masks are parameters."""

    name = "merge"
    trainable = True
    Config: type[MethodConfig] = LearnedConfig  # the keys this method reads, with their defaults
    lines_on_update = False  # True: LiNeS scales the merged update, not the task vectors

    def __init__(self, pool: ModelPool, method: dict, task_vectors: dict | None = None):
        super().__init__()
        tv_cfg = dict(task_vectors or {})
        self.cfg = self.parse_config(method)
        self.method_cfg = self.cfg.as_dict()
        self.save_hyperparameters({"method": self.method_cfg, "task_vectors": tv_cfg})
        object.__setattr__(self, "pool", pool)
        self.causal = pool.model_class == "causal_lm"
        self.seq2seq = pool.model_class == "seq2seq_lm"  # one decoder step (adamerge/seq2seq.py)
        self.fingerprint = pool.fingerprint()
        self.shard = bool(tv_cfg.get("shard", False))
        if self.shard:
            self.check_shardable(self.cfg)
        self.merged = self.build_merged(pool, tv_cfg)
        # which tensors are merged is part of what a checkpoint's coefficients mean
        self.fingerprint["merged_tensors"] = len(self.merged.names)
        self.fingerprint["merged_names"] = hashlib.sha256("\n".join(self.merged.names).encode()).hexdigest()[:16]

    def build_merged(self, pool: ModelPool, tv_cfg: dict) -> MergedModel:
        """The one MergedModel of this method: task vectors, coefficients, heads (and mask, offset)."""
        tv, offset = self.build_task_vectors(pool, tv_cfg)
        heads = {t: pool.head(t) for t in pool.task_names}
        return MergedModel(pool.base_model, tv, self.build_coefficients(tv), heads,
                           mask=self.build_mask(tv), tv_device=tv_cfg.get("device"), offset=offset)

    def build_task_vectors(self, pool: ModelPool, tv_cfg: dict) -> tuple[TaskVectors, dict | None]:
        """(task vectors after the config's transforms, offset of the ``start_from`` merge or None)."""
        tv = TaskVectors.from_pool(
            pool, include=tv_cfg.get("include") or None, exclude=tv_cfg.get("exclude") or None,
            dtype=tv_cfg.get("dtype", "float32"), pin_memory=bool(tv_cfg.get("pin_memory", False)),
            keep_unchanged=bool(tv_cfg.get("keep_unchanged", False)),
            factorize=self.lora_factorized(pool, tv_cfg.get("lora", "auto")),
        )
        # the data-free transforms, in their fixed order (closed-form merges apply LiNeS to their update)
        tv = apply_transforms(tv, self.cfg, skip=("lines",) if self.lines_on_update else ())
        start = self.cfg.start_from
        if start is None:
            return tv, None
        # start from another method's merge (e.g. method.start_from=regmean_pp)
        offset, tv = start_from_merge(pool, start, tv_cfg, tv)
        self.fingerprint["start_from"] = start.get("id", start.get("name"))
        return tv, offset

    @classmethod
    def parse_config(cls, method: dict, prefix: str = "method") -> MethodConfig:
        """``method`` (a yaml dict) as this method's typed config, every key checked; ``name`` defaults to ours."""
        return cls.Config.parse({"name": cls.name, **method}, prefix)

    @classmethod
    def supports_factorized(cls, cfg: MethodConfig) -> bool:
        """Whether this method, so configured, only scales and sums whole task vectors, so LoRA experts may
        stay factorized (adamerge/lora_factors.py). Methods that read τ's entries (masks, statistics,
        projections, teachers) keep the default: dense."""
        return False

    @classmethod
    def dense_reason(cls, cfg: MethodConfig) -> str | None:
        """Why this method, so configured, needs LoRA experts' task vectors dense (None: they may stay factorized)."""
        transforms = active_transforms(cfg)
        if transforms:
            return f"{transforms[0]} needs τ's entries"
        if cfg.start_from is not None:
            return "start_from re-expresses τ against a dense merge"
        return None if cls.supports_factorized(cfg) else f"{cls.name} needs dense task vectors"

    @classmethod
    def shard_refusal(cls, cfg: MethodConfig) -> str | None:
        """Why ``task_vectors.shard=true`` cannot apply to this method so configured (None: it can): it needs
        task vectors combined linearly, without masks, by ``step_loss``'s merge (adamerge/sharded.py)."""
        return f"method {cfg.label} is not supported (AdaMerging task-/layer-wise only)"

    @classmethod
    def check_shardable(cls, cfg: MethodConfig) -> None:
        """A one-line ConfigError when ``task_vectors.shard=true`` cannot apply (``shard_refusal``)."""
        why = cls.shard_refusal(cfg)
        if why:
            raise ConfigError(f"task_vectors.shard=true: {why}")

    def setup(self, stage: str) -> None:
        """Lightning hook, after the process group starts and before the model moves to its device:
        ``task_vectors.shard=true`` keeps only this process's slice of every task vector."""
        if self.shard and not self.merged.sharded:
            self.merged.shard(*dist_rank_world())

    def lora_factorized(self, pool: ModelPool, mode: str) -> bool:
        """``task_vectors.lora``: whether LoRA experts' task vectors stay factorized — the one place this is
        decided. ``auto``: when the pool has LoRA experts and this method can; ``factorized`` where it
        cannot: dense, with one log line saying why."""
        check_lora_mode(mode)
        if mode == "dense" or self.shard or not any(e.is_lora for e in pool.experts.values()):
            return False
        why = self.dense_reason(self.cfg)
        if why is not None and mode == "factorized":
            log.warning("task_vectors.lora=factorized: method %s uses dense task vectors (%s)", self.cfg.label, why)
        return why is None

    @classmethod
    def trains(cls, cfg: MethodConfig) -> bool:
        """Whether this method, so configured, runs optimizer steps (a Trainer loop)."""
        return cls.trainable

    @property
    def method_id(self) -> str:
        """The config's ``id`` (e.g. ``adamerging_layerwise``): what a checkpoint must match."""
        return self.cfg.label

    def start_label(self) -> str:
        """The starting merge in words, for the evaluation table's start row."""
        start = self.fingerprint.get("start_from")
        if start:
            return f"start: {start}"
        init = getattr(self.cfg, "init", None)
        plain = not any((self.cfg.dare, self.cfg.ties, self.cfg.consensus, self.cfg.lines))
        if plain and isinstance(init, (int, float)) and self.merged.mask is None:
            return f"start: task_arithmetic λ={init:g}"
        return f"start: init {init}"

    # -- what subclasses choose ---------------------------------------------------------------
    def build_coefficients(self, tv: TaskVectors) -> Coefficients:
        m = self.cfg
        return Coefficients(tv.K, len(tv), granularity=m.granularity, init=m.init,
                            clamp=tuple(m.clamp) if m.clamp else None, transform=m.transform)

    def build_mask(self, tv: TaskVectors) -> ConcreteMask | None:
        return None

    # -- model outputs ------------------------------------------------------------------------
    def task_logits(self, task: str, inputs: dict[str, torch.Tensor], params: dict | None = None):
        """(logits, mask): per-example logits, next-token logits with padding masked for causal LMs, or the
        first decoder step's logits ``[batch, vocab]`` for seq2seq LMs."""
        if self.seq2seq:
            out = self.merged(task=task, params=params, **first_step_inputs(self.merged.base, inputs))
            return out.logits[:, 0], None
        out = self.merged(task=task, params=params, **inputs)
        if self.causal:
            return out.logits, inputs.get("attention_mask")
        return out.logits, None

    def task_loss(self, task: str, inputs: dict[str, torch.Tensor], params: dict | None = None) -> torch.Tensor:
        """Default objective: mean prediction entropy of the task's own head (AdaMerging).

        ``method.diversity`` = w > 0 subtracts w × the entropy of the batch's mean prediction
        (information maximisation, as in SHOT): confident predictions that do not all fall in one
        class. 0 (default) is the authors' objective.
        """
        logits, mask = self.task_logits(task, inputs, params)
        loss = entropy(logits, mask)
        w = self.cfg.diversity
        return loss - w * marginal_entropy(logits, mask) if w else loss

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
        if merged.sharded:  # this process's slices merged, then all-gathered for the forward
            targets, params = merged.sharded_params()
        else:
            params = targets = merged.merged_params(reuse_buffers=True, rows=rows)
        leaves = {n: p.detach().requires_grad_(True) for n, p in params.items()}
        # factorized LoRA weights: their coefficients are a leaf of their own, read by the low-rank forward
        coefs = merged.factor_coefficients()
        coef_leaf = coefs.detach().requires_grad_(True) if coefs is not None else None
        total = torch.zeros((), device=self.device)
        with merged.sparse_lookup_grad(rows), merged.low_rank(coef_leaf):
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

    # -- reports ---------------------------------------------------------------------------------
    def report(self) -> dict[str, Any]:
        """What ``coefficients.json`` holds: the learned (or fixed) combination, by task and tensor."""
        c = self.merged.coefficients
        rep = {
            "method": self.method_id,
            "tasks": self.merged.task_names,
            "tensors": self.merged.names,
            "granularity": c.granularity,
            "coefficients": c.table().tolist(),
            "num_trainable": int(sum(p.numel() for p in self.parameters() if p.requires_grad)),
        }
        if c.granularity == "chunk":
            rep["chunks"] = dict(zip(self.merged.names, c.chunk_counts))
        if self.merged.mask is not None:
            rep["mask_sparsity"] = dict(zip(self.merged.names, self.merged.mask.sparsity()))
        return rep
