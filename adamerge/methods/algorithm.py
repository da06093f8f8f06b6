"""The interface of every merge method: built from a pool and its config, it holds one MergedModel.

``MergeAlgorithm`` is all a data-free or closed-form merge needs: the task vectors after the config's
transforms (optionally re-expressed against a ``start_from`` merge), how they are weighted, the
MergedModel, ``merged_params()`` and ``report()``. Methods that train subclass ``MergeMethod``
(methods/base.py), which adds the Lightning lifecycle: loss, optimizers, checkpoint metadata.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Any

import torch
from torch import nn

from ..core.coefficients import Coefficients
from ..core.concrete_mask import ConcreteMask
from ..core.lora_factors import check_lora_key
from ..core.merged_model import MergedModel
from ..core.sharded import ShardedTaskVectors
from ..core.task_vectors import TaskVectors, resolve_dtype, select_names
from ..core.transforms import active_transforms, build_stages, run_stages
from ..errors import ConfigError
from ..pool.model_pool import ModelPool
from .method_config import MethodConfig
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
        raise ConfigError(f"method.start_from: '{start_cfg.get('id', start_cfg['name'])}' is a learned method; "
                          "a starting point must be data-free or closed-form")
    start = cls(pool, start_cfg, tv_cfg)
    merged = start.merged.merged_params()
    offset = {n: (merged[n].detach() - pool.base_tensor(n)).float() for n in tv.names}
    del start, merged
    return offset, tv.map(lambda n, t: (t.float() - offset[n]).to(t.dtype))


class MergeAlgorithm(nn.Module):
    """Every merge method: ``self.merged`` is its one MergedModel, built from the pool and the config.

    Data-free and closed-form merges are this and nothing more; methods that train subclass
    ``MergeMethod`` (methods/base.py), where the Lightning training lifecycle lives.
    """

    name = "merge"
    trainable = False  # True: runs optimizer steps in a Trainer loop (a MergeMethod)
    Config: type[MethodConfig] = MethodConfig  # the keys this method reads, with their defaults
    lines_on_update = False  # True: LiNeS scales the merged update, not the task vectors

    def __init__(self, pool: ModelPool, method: dict, task_vectors: dict | None = None,
                 shard_slice: tuple[int, int] | None = None):
        """``shard_slice`` (``task_vectors.shard=true``): the (rank, world) of this process's DDP group, known
        before it starts (``distributed.launch_rank_world``): the task vectors are then read as this process's
        slices only. Without it they are read whole and sliced when training starts (``MergeMethod.setup``)."""
        super().__init__()
        self.shard_slice = shard_slice
        self.stages = []  # the data-free transforms applied (core/transforms.py): their reports join ours
        tv_cfg = dict(task_vectors or {})
        self.cfg = self.parse_config(method)
        self.method_cfg = self.cfg.as_dict()
        self.tv_cfg = tv_cfg
        object.__setattr__(self, "pool", pool)
        self.family = pool.family  # how a batch is fed and which logits the objectives see
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
                           mask=self.build_mask(tv), tv_device=tv_cfg.get("device"), offset=offset,
                           lora_step=tv_cfg.get("lora_step", "auto"))

    def build_task_vectors(self, pool: ModelPool, tv_cfg: dict) -> tuple[TaskVectors, dict | None]:
        """(task vectors after the config's transforms, offset of the ``start_from`` merge or None)."""
        if self.shard_slice is not None and not active_transforms(self.cfg) and self.cfg.start_from is None:
            return ShardedTaskVectors.from_pool(
                pool, *self.shard_slice, include=tv_cfg.get("include") or None,
                exclude=tv_cfg.get("exclude") or None, dtype=tv_cfg.get("dtype", "float32"),
                keep_unchanged=bool(tv_cfg.get("keep_unchanged", False))), None
        # the data-free transforms, in their fixed order (closed-form merges apply LiNeS to their update)
        skip = ("lines",) if self.lines_on_update else ()
        if tv_cfg.get("device") == "disk":
            tv = self.task_vectors_on_disk(pool, tv_cfg, skip)
        else:
            tv = TaskVectors.from_pool(
                pool, include=tv_cfg.get("include") or None, exclude=tv_cfg.get("exclude") or None,
                dtype=tv_cfg.get("dtype", "float32"), pin_memory=bool(tv_cfg.get("pin_memory", False)),
                keep_unchanged=bool(tv_cfg.get("keep_unchanged", False)),
                factorize=self.lora_factorized(pool, tv_cfg.get("lora", "auto")),
            )
            self.stages = build_stages(self.cfg, skip, pool)
            tv = run_stages(tv, self.stages)
        log.info("task vectors: %d experts, %d tensors, %d bytes (%s%s)", tv.K, len(tv), tv.nbytes(),
                 tv_cfg.get("dtype", "float32"), ", LoRA factorized" if tv.factors is not None else
                 ", memory-mapped from disk" if tv_cfg.get("device") == "disk" else "")
        start = self.cfg.start_from
        if start is None:
            return tv, None
        # start from another method's merge (e.g. method.start_from=regmean_pp)
        offset, tv = start_from_merge(pool, start, tv_cfg, tv)
        self.fingerprint["start_from"] = start.get("id", start.get("name"))
        return tv, offset

    def task_vectors_on_disk(self, pool: ModelPool, tv_cfg: dict, skip: tuple[str, ...]) -> TaskVectors:
        """``task_vectors.device=disk``: the task vectors after the config's transforms, written once beside the run
        (``task_vectors.disk_dir``) and memory-mapped back (adamerge/core/tensor_stream.py)."""
        from ..core.tensor_stream import task_vectors_on_disk

        if self.cfg.start_from is not None:
            raise ConfigError("task_vectors.device=disk holds the experts' own task vectors; method.start_from "
                              "re-expresses them in memory (use task_vectors.device=cpu)")
        names = select_names(pool.shared_names(), tv_cfg.get("include") or None, tv_cfg.get("exclude") or None)
        stages = self.stages = build_stages(self.cfg, skip, pool)
        key = {"pool": self.fingerprint, "names": names, "dtype": tv_cfg.get("dtype", "float32"),
               "keep_unchanged": bool(tv_cfg.get("keep_unchanged", False)),
               "transforms": {k: getattr(self.cfg, k) for k in active_transforms(self.cfg) if k not in skip}}
        return task_vectors_on_disk(pool, names, resolve_dtype(tv_cfg.get("dtype", "float32")),
                                    bool(tv_cfg.get("keep_unchanged", False)), stages,
                                    tv_cfg.get("disk_dir") or "task_vectors", key)

    @classmethod
    def parse_config(cls, method: dict, prefix: str = "method") -> MethodConfig:
        """``method`` (a yaml dict) as this method's typed config, every key checked; ``name`` defaults to ours."""
        return cls.Config.parse({"name": cls.name, **method}, prefix)

    @classmethod
    def supports_factorized(cls, cfg: MethodConfig) -> bool:
        """Whether this method, so configured, only scales and sums whole task vectors, so LoRA experts may
        stay factorized (adamerge/core/lora_factors.py). Methods that read τ's entries (masks, statistics,
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
        task vectors combined linearly, without masks, by ``step_loss``'s merge (adamerge/core/sharded.py)."""
        return f"method {cfg.label} is not supported (AdaMerging task-/layer-wise only)"

    @classmethod
    def check_shardable(cls, cfg: MethodConfig) -> None:
        """A one-line ConfigError when ``task_vectors.shard=true`` cannot apply (``shard_refusal``)."""
        why = cls.shard_refusal(cfg)
        if why:
            raise ConfigError(f"task_vectors.shard=true: {why}")

    def lora_factorized(self, pool: ModelPool, mode: str) -> bool:
        """``task_vectors.lora``: whether LoRA experts' task vectors stay factorized — the one place this is
        decided. ``auto``: when the pool has LoRA experts and this method can; ``factorized`` where it
        cannot: dense, with one log line saying why."""
        check_lora_key("lora", mode)
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
        plain = not active_transforms(self.cfg)
        if plain and isinstance(init, (int, float)) and self.merged.mask is None:
            return f"start: task_arithmetic λ={init:g}"
        return f"start: init {init}"

    # -- what subclasses choose ---------------------------------------------------------------
    def build_coefficients(self, tv: TaskVectors) -> Coefficients:
        """How the task vectors are weighted (fixed, or the parameters a MergeMethod trains)."""
        raise NotImplementedError

    def build_mask(self, tv: TaskVectors) -> ConcreteMask | None:
        return None

    def merged_params(self) -> dict[str, torch.Tensor]:
        """The merged weights (name -> tensor) of every merged tensor."""
        return self.merged.merged_params()

    # -- reports ---------------------------------------------------------------------------------
    def write_state(self, export_dir) -> None:
        """Add what this method keeps beside the model (MAP's front) to the export in ``export_dir``."""

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
        for s in self.stages:
            rep.update(s.report())
        return rep
