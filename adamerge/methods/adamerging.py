"""AdaMerging and AdaMerging++ (Yang et al., ICLR 2024).

Minimise the summed mean prediction entropy of every task's own head on unlabeled calibration
batches over task-wise ``[K]`` or layer-wise ``[L, K]`` coefficients (init 0.3, optional clamp to
[0, 1], Adam lr 1e-3). AdaMerging++ is the same on TIES-trimmed, sign-elected task vectors
(``ties:`` in the method config). The loss is ``EntropyObjective`` (adamerge/methods/objectives.py), the
per-task backward ``MergeMethod``'s.
"""

from __future__ import annotations

from .base import MergeMethod
from .method_config import EntropyConfig, MethodConfig
from .objectives import EntropyObjective
from .registry import register


@register
class AdaMerging(EntropyObjective, MergeMethod):
    name = "adamerging"
    Config = EntropyConfig

    @classmethod
    def supports_factorized(cls, cfg: MethodConfig) -> bool:
        return cfg.granularity in ("task", "layer")  # a chunk's coefficient scales part of τ's entries

    @classmethod
    def shard_refusal(cls, cfg: MethodConfig) -> str | None:
        if cfg.granularity not in ("task", "layer"):  # chunks would straddle the processes' slices
            return f"method {cfg.label} has granularity {cfg.granularity}: only task or layer can be sharded"
        return None
