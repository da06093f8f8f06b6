"""The config sections of the data-free rules on task vectors (adamerge/core/transforms.py and
adamerge/core/tensor_rules.py): one typed section per method-config key (``method.dare``, ``method.ties``, …)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..errors import ConfigError
from .config_section import ConfigSection, check_range


@dataclass
class DareConfig(ConfigSection):
    """DARE: drop each task-vector entry with probability p, rescale the rest by 1/(1 − p)."""
    p: float = 0.5
    seed: int = 0

    def check(self, prefix: str) -> None:
        check_range(self.p, f"{prefix}.p", 0, 1)
        if self.p >= 1:
            raise ConfigError(f"config key '{prefix}.p' must be < 1 (1 drops everything), got {self.p!r}")


@dataclass
class TiesConfig(ConfigSection):
    """TIES: keep the top ``density`` of each task vector by magnitude, then the sign-elected entries."""
    density: float = 0.2
    merge: Literal["sum", "mean"] = "sum"
    scope: Literal["model", "tensor"] = "model"  # where the top-k is ranked and a tied vote's sign is taken

    def check(self, prefix: str) -> None:
        check_range(self.density, f"{prefix}.density", 0, 1, strict_lo=True)


@dataclass
class BreadcrumbsConfig(ConfigSection):
    """Model Breadcrumbs: per task and tensor, drop the ``gamma`` share of largest |τ| and the smallest, keeping ``density``."""
    density: float = 0.9
    gamma: float = 0.01

    def check(self, prefix: str) -> None:
        check_range(self.density, f"{prefix}.density", 0, 1, strict_lo=True)
        check_range(self.gamma, f"{prefix}.gamma", 0, 1)


@dataclass
class ConsensusConfig(ConfigSection):
    """Consensus (TALL masks): keep entries that at least ``k`` tasks' masks (threshold ``lam``) agree on."""
    k: int = 2
    lam: float = 0.4

    def check(self, prefix: str) -> None:
        check_range(self.k, f"{prefix}.k", 1)
        check_range(self.lam, f"{prefix}.lam", 0)


@dataclass
class DellaConfig(ConfigSection):
    """DELLA's MagPrune: keep each entry with probability density ± epsilon by its magnitude's rank in its row."""
    density: float = 0.5
    epsilon: float = 0.15
    seed: int = 0
    # survivors rescaled: l1 to each task tensor's L1 norm (mergekit) | inverse: by 1/keep probability (the paper) | none
    rescale: Literal["l1", "inverse", "none"] = "l1"

    def check(self, prefix: str) -> None:
        check_range(self.epsilon, f"{prefix}.epsilon", 0)
        if not (0 < self.density - self.epsilon and self.density + self.epsilon < 1):
            raise ConfigError(f"config keys '{prefix}.density' ± '{prefix}.epsilon' must lie in (0, 1), got "
                              f"{self.density} ± {self.epsilon}")


@dataclass
class SceConfig(ConfigSection):
    """SCE: select entries by variance across experts, weight experts by their energy, erase minority signs."""
    select_topk: float = 1.0
    mask_deltas: bool = True  # mergekit: the selection masks the merged deltas too; false: only the weights (authors)

    def check(self, prefix: str) -> None:
        check_range(self.select_topk, f"{prefix}.select_topk", 0, 1, strict_lo=True)


@dataclass
class ModelStockConfig(ConfigSection):
    """Model Stock: interpolate from the base toward the experts' average by a ratio from their angle."""
    filter_wise: bool = False  # one ratio per row of each matrix instead of per tensor


@dataclass
class SlerpConfig(ConfigSection):
    """SLERP: spherical interpolation of two experts' weights, per leading row."""
    t: float = 0.5  # 0: the first expert, 1: the second

    def check(self, prefix: str) -> None:
        check_range(self.t, f"{prefix}.t", 0, 1)


@dataclass
class MultiSlerpConfig(ConfigSection):
    """Multi-SLERP: barycentric interpolation of the task vectors on the sphere."""
    weights: list[float] | None = None  # one per expert, normalized; null: equal


@dataclass
class KarcherConfig(ConfigSection):
    """Karcher mean of the experts' weights on the sphere."""
    max_iter: int = 10
    tol: float = 1e-5

    def check(self, prefix: str) -> None:
        check_range(self.max_iter, f"{prefix}.max_iter", 1)
        check_range(self.tol, f"{prefix}.tol", 0, strict_lo=True)


@dataclass
class IsoConfig(ConfigSection):
    """Isotropic merging: Iso-C (``common_space_fraction: null``) or Iso-CTS (the common subspace's share)."""
    common_space_fraction: float | None = None

    def check(self, prefix: str) -> None:
        check_range(self.common_space_fraction, f"{prefix}.common_space_fraction", 0, 1)


@dataclass
class NuSlerpConfig(ConfigSection):
    """NuSLERP: spherical interpolation of two experts' task vectors."""
    t: float = 0.5  # the second expert's share
    flatten: bool = True  # over the whole tensor; false: per row (row_wise: per column)
    row_wise: bool = False

    def check(self, prefix: str) -> None:
        check_range(self.t, f"{prefix}.t", 0, 1)


@dataclass
class OpcmConfig(ConfigSection):
    """OPCM: continual merging by orthogonal projection, experts taken one at a time."""
    alpha: float = 0.5  # share of the running merge's spectrum whose leading block a new task vector is cleaned of
    shuffle: bool = True  # the experts' order: seeded shuffle (FusionBench's default); false: the pool's order
    seed: int = 0
    continue_from: str | None = None  # an earlier opcm export: merge this pool's experts into it

    def check(self, prefix: str) -> None:
        check_range(self.alpha, f"{prefix}.alpha", 0, 1)


@dataclass
class WudiConfig(ConfigSection):
    """WUDI: per matrix, Adam steps on the merged update's interference with each task vector's input directions."""
    iterations: int = 400  # FusionBench's iter_num
    lr: float = 1e-5

    def check(self, prefix: str) -> None:
        check_range(self.iterations, f"{prefix}.iterations", 0)
        check_range(self.lr, f"{prefix}.lr", 0, strict_lo=True)


@dataclass
class WidenConfig(ConfigSection):
    """WIDEN: per-column weights from how far each expert's magnitudes and directions moved from the base."""
    above_average_value_ratio: float = 1.0  # a score is calibrated where its rank share > ratio × the expert's mean
    score_calibration_value: float = 1.0  # the calibrated score (others: softmax over the experts)

    def check(self, prefix: str) -> None:
        check_range(self.above_average_value_ratio, f"{prefix}.above_average_value_ratio", 0)


@dataclass
class RmmConfig(ConfigSection):
    """RMM: each task's update rebuilt from a rank-``rank`` basis over the experts, per tensor."""
    rank: int = 2  # model-equivalents kept (below the number of experts)

    def check(self, prefix: str) -> None:
        check_range(self.rank, f"{prefix}.rank", 1)


@dataclass
class TaskMasksConfig(ConfigSection):
    """One model per task: a shared vector and a binary mask per task (EMR merging, TALL masks)."""
    rule: Literal["emr", "tall"] = "emr"
    lam: float = 0.4  # TALL masks: keep entries where |τ_t| ≥ lam · |Σ τ − τ_t|

    def check(self, prefix: str) -> None:
        check_range(self.lam, f"{prefix}.lam", 0)
