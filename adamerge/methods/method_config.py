"""Typed method configs: each method declares its keys, their types and defaults in one dataclass.

The yaml in ``configs/method/`` only overrides these defaults. Parsing checks every key before any
work: an unknown key is an error naming the nearest valid one (``+method.scaling_factor=0.5`` is not
silently ignored), a value of the wrong type or outside its choices names its key.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

from ..errors import ConfigError, refuse_unknown_keys


def _fits(value: Any, hint: Any) -> bool:
    """Whether ``value`` (from yaml: None, bool, int, float, str, list, dict) fits the type ``hint``."""
    origin = typing.get_origin(hint)
    if hint is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, h) for h in typing.get_args(hint))
    if origin is Literal:
        return value in typing.get_args(hint)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin is list or hint is list:
        args = typing.get_args(hint)
        return isinstance(value, (list, tuple)) and (not args or all(_fits(v, args[0]) for v in value))
    if origin is dict or hint is dict:
        return isinstance(value, dict)
    if dataclasses.is_dataclass(hint):
        return isinstance(value, dict)
    return True


def _describe(hint: Any) -> str:
    if typing.get_origin(hint) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(hint))
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_describe(h) for h in typing.get_args(hint))
    if dataclasses.is_dataclass(hint):
        return "{" + ", ".join(f.name for f in dataclasses.fields(hint)) + "}"
    if hint is type(None):
        return "null"
    if typing.get_origin(hint) is list or hint is list:
        return "a list"
    words = {float: "a number", int: "an integer", str: "a string", bool: "true or false", dict: "a mapping"}
    return words.get(hint, getattr(hint, "__name__", str(hint)))


def _dataclass_in(hint: Any) -> type | None:
    for h in (hint, *typing.get_args(hint)):
        if dataclasses.is_dataclass(h):
            return h
    return None


@dataclass
class ConfigSection:
    """A block of config keys; ``parse`` builds it from a yaml dict, checking every key."""

    @classmethod
    def parse(cls, values: dict[str, Any], prefix: str = "method") -> ConfigSection:
        hints = typing.get_type_hints(cls)
        names = [f.name for f in dataclasses.fields(cls)]
        refuse_unknown_keys(values, names, prefix, cls.owner(), ConfigError)
        required = [f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING
                    and f.default_factory is dataclasses.MISSING and f.name not in values]
        if required:
            raise ConfigError(f"config key '{prefix}.{required[0]}' is required")
        kwargs = {}
        for key, value in values.items():
            where = f"{prefix}.{key}"
            if not _fits(value, hints[key]):
                raise ConfigError(f"config key '{where}' must be {_describe(hints[key])}, got {value!r}")
            sub = _dataclass_in(hints[key])
            if sub is not None and isinstance(value, dict):
                value = sub.parse(value, where)
            kwargs[key] = value
        section = cls(**kwargs)
        section.check(prefix)
        return section

    @classmethod
    def owner(cls) -> str:
        return f"'{cls.__name__}'"

    def check(self, prefix: str) -> None:
        """Range checks across keys (types were checked by ``parse``); raise ConfigError naming the key."""

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def check_range(value: float | None, key: str, lo: float | None = None, hi: float | None = None,
                strict_lo: bool = False) -> None:
    """ConfigError naming ``key`` when ``value`` (a number or None) lies outside [lo, hi] (or (lo, hi])."""
    if value is None:
        return
    if value != value or value in (float("inf"), float("-inf")):
        raise ConfigError(f"config key '{key}' must be finite, got {value!r}")
    if lo is not None and (value <= lo if strict_lo else value < lo):
        raise ConfigError(f"config key '{key}' must be {'>' if strict_lo else '>='} {lo}, got {value!r}")
    if hi is not None and value > hi:
        raise ConfigError(f"config key '{key}' must be <= {hi}, got {value!r}")


# -- the data-free task-vector transforms every method may apply, in this order -----------------
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
class MethodConfig(ConfigSection):
    """Keys every method has. ``name`` picks the implementation, ``id`` names the config (what a
    checkpoint must match); ``steps`` is ``trainer.max_steps`` (0: the method does not train)."""
    name: str = ""
    id: str = ""
    steps: int = 0
    # a data-free or closed-form merge to start from (train.py inlines configs/method/<id>.yaml)
    start_from: dict | None = None
    dare: DareConfig | None = None
    breadcrumbs: BreadcrumbsConfig | None = None
    ties: TiesConfig | None = None
    consensus: ConsensusConfig | None = None
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
