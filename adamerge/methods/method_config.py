"""Typed method configs: each method declares its keys, their types and defaults in one dataclass.

The yaml in ``configs/method/`` only overrides these defaults. Parsing checks every key before any
work: an unknown key is an error naming the nearest valid one (``+method.scaling_factor=0.5`` is not
silently ignored), a value of the wrong type or outside its choices names its key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from ..errors import ConfigError
from .config_section import ConfigSection, check_range
from .transform_config import (
    BreadcrumbsConfig,
    ConsensusConfig,
    DareConfig,
    DellaConfig,
    IsoConfig,
    KarcherConfig,
    ModelStockConfig,
    MultiSlerpConfig,
    NuSlerpConfig,
    OpcmConfig,
    RmmConfig,
    SceConfig,
    SlerpConfig,
    TaskMasksConfig,
    TiesConfig,
    WidenConfig,
    WudiConfig,
)

# keys whose rule (adamerge/core/tensor_rules.py) is a whole merge: only the data-free ``static`` method takes them
MERGE_RULES = ("sce", "model_stock", "slerp", "nuslerp", "multislerp", "karcher", "iso", "opcm", "wudi", "task_masks", "magmax",
               "widen", "rmm")
PER_TASK_RULES = ("task_masks", "rmm")  # rules that give each task its own model (export/tasks/<task>)


@dataclass
class MethodConfig(ConfigSection):
    """Keys every method has. ``name`` picks the implementation, ``id`` names the config (what a
    checkpoint must match); ``steps`` is ``trainer.max_steps`` (0: the method does not train)."""
    name: str = ""
    id: str = ""
    steps: int = 0
    # a data-free or closed-form merge to start from (train.py inlines configs/method/<id>.yaml)
    start_from: dict | None = None
    dare: DareConfig | None = None
    della: DellaConfig | None = None
    breadcrumbs: BreadcrumbsConfig | None = None
    ties: TiesConfig | None = None
    consensus: ConsensusConfig | None = None
    sce: SceConfig | None = None
    model_stock: ModelStockConfig | None = None
    slerp: SlerpConfig | None = None
    nuslerp: NuSlerpConfig | None = None
    multislerp: MultiSlerpConfig | None = None
    karcher: KarcherConfig | None = None
    iso: IsoConfig | None = None
    opcm: OpcmConfig | None = None
    wudi: WudiConfig | None = None
    widen: WidenConfig | None = None
    rmm: RmmConfig | None = None  # one model per task from a rank-p basis (adamerge/core/reversible.py)
    task_masks: TaskMasksConfig | None = None  # one model per task (adamerge/core/task_masks.py)
    knots: bool | None = None  # KnOTS: the transforms run in the experts' shared SVD basis (adamerge/core/knots.py)
    magmax: bool | None = None  # MagMax: per entry, the task vector of largest magnitude
    lines: bool | dict | None = None  # LiNeS layer scaling: false | true | {alpha, beta, pattern}

    @classmethod
    def owner(cls) -> str:
        return "this method"

    @classmethod
    def parse(cls, values: dict[str, Any], prefix: str = "method") -> MethodConfig:
        values = dict(values)
        init = values.get("init")
        if isinstance(init, dict) and values.get("start_from") is None:  # older spelling: method.init=<id>
            values["start_from"] = values.pop("init")
            values["init"] = values.pop("init_coef", 0.0)  # c = 0: the start merge itself
        section = super().parse(values, prefix)
        if not section.name:
            raise ConfigError(f"config key '{prefix}.name' is required (choose a method with method=<name>)")
        return section

    def check(self, prefix: str) -> None:
        check_range(self.steps, f"{prefix}.steps", 0)
        rule = next((k for k in MERGE_RULES if getattr(self, k) not in (None, False)), None)
        if rule and self.name != "static":
            raise ConfigError(f"config key '{prefix}.{rule}' is a whole merge of its own (one update per tensor), not a "
                              f"transform for method {self.label}: run it as a data-free method, or start from it "
                              f"with method.start_from=<its config>")
        if self.start_from is not None and not self.start_from.get("name"):
            raise ConfigError(f"config key '{prefix}.start_from' must name a method config (e.g. regmean_pp), "
                              f"got {self.start_from!r}")
        if self.lines not in (None, False):
            from ..core.lines import lines_config

            try:
                lines_config(self.lines)
            except ValueError as e:
                raise ConfigError(str(e)) from e

    @property
    def label(self) -> str:
        return self.id or self.name


@dataclass
class LearnedConfig(MethodConfig):
    """Coefficients learned by gradient steps (AdaMerging's defaults: init 0.3, clamp [0, 1], Adam 1e-3)."""
    granularity: Literal["task", "layer", "chunk"] = "layer"
    init: float | list[float] = 0.3
    clamp: list[float] | None = None
    transform: Literal["clamp", "sigmoid"] = "clamp"
    lr: float = 1e-3
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 0.0
    lr_schedule: Literal["constant", "cosine"] = "constant"  # cosine: one decay over the run to eta_min_ratio·lr
    eta_min_ratio: float = 0.1
    nonfinite: Literal["stop", "skip"] = "stop"  # a non-finite loss stops the run, or skips the step
    # passes over the calibration data instead of fixed steps: the run takes ceil(passes · n / batch_size)
    # steps, n the most training texts of any task, at most ``steps`` (null: ``steps``)
    passes: float | None = None
    # read by configs/trainer/default.yaml
    accumulate_grad_batches: int = 1
    gradient_clip_val: float | None = None

    def check(self, prefix: str) -> None:
        super().check(prefix)
        check_range(self.lr, f"{prefix}.lr", 0, strict_lo=True)
        check_range(self.weight_decay, f"{prefix}.weight_decay", 0)
        check_range(self.eta_min_ratio, f"{prefix}.eta_min_ratio", 0, 1)
        check_range(self.accumulate_grad_batches, f"{prefix}.accumulate_grad_batches", 1)
        if self.passes is not None:
            check_range(self.passes, f"{prefix}.passes", 0, strict_lo=True)
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"config key '{prefix}.betas' must be two numbers in [0, 1), got {self.betas!r}")
        inits = self.init if isinstance(self.init, list) else [self.init]
        if not inits:
            raise ConfigError(f"config key '{prefix}.init' must be a number or one number per task, got []")
        for x in inits:
            check_range(x, f"{prefix}.init")
        if self.clamp is not None:
            if len(self.clamp) != 2:
                raise ConfigError(f"config key '{prefix}.clamp' must be null or [low, high], got {self.clamp!r}")
            if not self.clamp[0] < self.clamp[1]:
                raise ConfigError(f"config key '{prefix}.clamp' bounds are reversed or empty: {self.clamp!r}")
            if any(not self.clamp[0] <= x <= self.clamp[1] for x in inits):
                # clamped there, the coefficient gets no gradient and never moves
                raise ConfigError(f"config key '{prefix}.init' = {self.init!r} lies outside '{prefix}.clamp' "
                                  f"{self.clamp!r}: nothing would train; choose an init within the bounds")



@dataclass
class EntropyConfig(LearnedConfig):
    """Learned by the entropy objective (adamerge/methods/objectives.py: AdaMerging, Concrete, DOGE-AM)."""
    # minus w × entropy of each batch's mean prediction (information maximisation; 0: the authors')
    diversity: float = 0.0

    def check(self, prefix: str) -> None:
        super().check(prefix)
        check_range(self.diversity, f"{prefix}.diversity", 0)
