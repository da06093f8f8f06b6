"""Checks on the composed config: every bad value is reported with its key, before any work starts.

Every group has one typed schema (the dataclass parser the method configs use: unknown keys refused with the
nearest valid one, types and ranges checked); the values themselves are written once, in configs/."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from ..core.task_vectors import DTYPES
from ..errors import ConfigError
from ..methods.method_config import ConfigSection, check_range
from .distributed import several_processes


def _get(c: dict, key: str) -> Any:
    cur: Any = c
    for part in key.split("."):
        if not isinstance(cur, dict) or part not in cur:
            return None
        cur = cur[part]
    return cur


def check_number(c: dict, key: str, lo: float | None = None, strict_lo: bool = False, integer: bool = False,
            optional: bool = True) -> None:
    v = _get(c, key)
    if v is None:
        if optional:
            return
        raise ConfigError(f"config key '{key}' is required")
    kind = "an integer" if integer else "a number"
    ok_type = isinstance(v, int) if integer else isinstance(v, (int, float))
    if isinstance(v, bool) or not ok_type:
        raise ConfigError(f"config key '{key}' must be {kind}, got {v!r} ({type(v).__name__})")
    if v != v or v in (float("inf"), float("-inf")):
        raise ConfigError(f"config key '{key}' must be finite, got {v!r}")
    if lo is not None and (v <= lo if strict_lo else v < lo):
        raise ConfigError(f"config key '{key}' must be {'>' if strict_lo else '>='} {lo}, got {v!r}")


def missing_keys(node, prefix: str = "") -> list[str]:
    """The dotted keys of an OmegaConf tree whose value is ``???`` (mandatory, not given), without
    resolving interpolations (one that points at such a key would raise instead of naming it)."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if isinstance(node, DictConfig):
        keys = list(node.keys())
    elif isinstance(node, ListConfig):
        keys = list(range(len(node)))
    else:
        return []
    out = []
    for key in keys:
        full = f"{prefix}.{key}" if prefix else str(key)
        if OmegaConf.is_missing(node, key):
            out.append(full)
        elif not OmegaConf.is_interpolation(node, key):
            out += missing_keys(node[key], full)
    return out


def check_no_missing(cfg, choices: dict | None = None) -> None:
    """A ConfigError naming the first ``???`` key of the composed config (e.g. a pool's ``data_dir``) and how
    to give it, before the config is resolved. ``choices``: Hydra's group choices, to name the yaml."""
    missing = missing_keys(cfg)
    if not missing:
        return
    key = missing[0]
    group = key.split(".", 1)[0]
    where = f"the {group}={choices[group]} config" if group in (choices or {}) else "the config"
    more = f" ({len(missing) - 1} more: {', '.join(missing[1:])})" if len(missing) > 1 else ""
    raise ConfigError(f"config key '{key}' is not set ('???' in {where}); give it on the command line: "
                      f"{key}=<value>{more}")


def check_writable_dir(d: str | Path, key: str) -> None:
    """Create directory ``d`` and write (and remove) a probe file there, so that a directory that cannot
    be written is named before any work, not at the first checkpoint or the export."""
    d = Path(d)
    try:
        d.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=d):
            pass
    except OSError as e:
        raise ConfigError(f"config key '{key}': cannot write to {d}: {e.strerror or e}") from e


def check_shard(c: dict) -> None:
    """``task_vectors.shard``: a bool; true needs a multi-process DDP trainer and dense task vectors."""
    shard = _get(c, "task_vectors.shard")
    if shard is not None and not isinstance(shard, bool):
        raise ConfigError(f"config key 'task_vectors.shard' must be true or false, got {shard!r}")
    if not shard:
        return
    t = c.get("trainer") or {}
    strategy = str(t.get("strategy"))
    if any(w in strategy for w in ("spawn", "fork", "notebook")) or not several_processes(t):
        raise ConfigError(f"task_vectors.shard=true needs a multi-process DDP trainer (trainer=ddp with "
                          f"trainer.devices > 1 or num_nodes > 1), got strategy={strategy} devices={t.get('devices', 1)}")
    if _get(c, "task_vectors.lora") == "factorized":
        raise ConfigError("task_vectors.shard=true shards dense task vectors: task_vectors.lora=factorized refused")


@dataclass
class DataConfig(ConfigSection):
    """``data``: the calibration batches (values in configs/data/default.yaml)."""
    batch_size: int
    max_length: int
    calibration_size: int | None
    holdout_fraction: float

    def check(self, prefix: str) -> None:
        check_range(self.batch_size, f"{prefix}.batch_size", 1)
        check_range(self.max_length, f"{prefix}.max_length", 2)
        check_range(self.calibration_size, f"{prefix}.calibration_size", 1)
        check_range(self.holdout_fraction, f"{prefix}.holdout_fraction", 0)
        if self.holdout_fraction >= 1:
            raise ConfigError(f"config key '{prefix}.holdout_fraction' must be < 1 (a share of each task's "
                              f"calibration texts), got {self.holdout_fraction!r}")


@dataclass
class TaskVectorsConfig(ConfigSection):
    """``task_vectors``: which tensors are merged and how the task vectors are held (configs/config.yaml)."""
    include: list[str]
    exclude: list[str]
    dtype: str
    device: str | None
    keep_unchanged: bool
    lora: Literal["auto", "dense", "factorized"]
    lora_step: Literal["auto", "adapters", "merge"]
    shard: bool
    stream: Literal["auto"] | bool
    disk_dir: str

    def check(self, prefix: str) -> None:
        if self.dtype not in DTYPES:
            raise ConfigError(f"config key '{prefix}.dtype' must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.device == "disk" and self.shard:
            raise ConfigError(f"config keys '{prefix}.device=disk' and '{prefix}.shard=true' exclude each other: "
                              "a process maps the whole task vectors from disk")


@dataclass
class CheckpointConfig(ConfigSection):
    """``checkpoint``: how often, and which merge is kept as the best (adamerge/run/start_vs_end.py)."""
    every_n_steps: int
    monitor: Literal["auto", "val_acc", "val_norm", "holdout_objective"] | None

    def check(self, prefix: str) -> None:
        check_range(self.every_n_steps, f"{prefix}.every_n_steps", 1)


@dataclass
class ProgressConfig(ConfigSection):
    """``progress``: the progress lines of learned methods (terminal and train.log)."""
    every_n_steps: int
    every_s: float

    def check(self, prefix: str) -> None:
        check_range(self.every_n_steps, f"{prefix}.every_n_steps", 1)
        check_range(self.every_s, f"{prefix}.every_s", 0)


@dataclass
class EvaluateConfig(ConfigSection):
    """``evaluate``: the evaluation table (adamerge/evaluate.py)."""
    enabled: bool
    reference_rows: bool
    start_row: bool
    monitor_batches: int
    batch_size: int
    max_examples: int | None
    max_new_tokens: int
    lm_eval_tasks: list[str] | None = None  # lm-evaluation-harness tasks run on the export (causal LMs)
    lm_eval_batch_size: int = 8
    lm_eval_limit: int | None = None  # examples per lm-eval task (null: all)

    def check(self, prefix: str) -> None:
        check_range(self.batch_size, f"{prefix}.batch_size", 1)
        check_range(self.lm_eval_batch_size, f"{prefix}.lm_eval_batch_size", 1)
        check_range(self.lm_eval_limit, f"{prefix}.lm_eval_limit", 1)
        check_range(self.monitor_batches, f"{prefix}.monitor_batches", 0)
        check_range(self.max_examples, f"{prefix}.max_examples", 1)
        check_range(self.max_new_tokens, f"{prefix}.max_new_tokens", 1)


@dataclass
class ExportConfig(ConfigSection):
    """``export``: where and what the export writes (adamerge/export.py)."""
    dir: str
    overwrite: bool
    task_models: bool
    dtype: Literal["float32", "bfloat16", "float16"] | None
    max_shard_size: str | None
    push_to_hub: str | None


# every config group but method (its method's own dataclass), pool (adamerge/pool/config.py) and trainer (the
# Lightning Trainer's keyword arguments, checked by the Trainer)
GROUPS: dict[str, type[ConfigSection]] = {"data": DataConfig, "task_vectors": TaskVectorsConfig,
                                          "checkpoint": CheckpointConfig, "progress": ProgressConfig,
                                          "evaluate": EvaluateConfig, "export": ExportConfig}


def check_config(c: dict) -> None:
    """Raise ConfigError naming the first bad key of a resolved config (a plain dict): every group's keys typed
    and known (an unknown key is refused with the nearest valid one), values in range.

    The ``method`` block is checked by its method's typed config (adamerge/methods/method_config.py)."""
    if not c.get("pool"):  # ~pool (or pool=null, which train.py turns into ~pool)
        raise ConfigError("no pool chosen (pool=<name>; see configs/pool/)")
    if not (c.get("method") or {}).get("name"):
        raise ConfigError("config key 'method.name' is required (choose a method with method=<name>)")
    for group, schema in GROUPS.items():
        if not isinstance(c.get(group), dict):
            raise ConfigError(f"config group '{group}' is missing or not a mapping")
        schema.parse(c[group], prefix=group)
    check_number(c, "seed", 0, integer=True, optional=False)
    check_number(c, "threads", 1, integer=True)
    check_number(c, "trainer.max_steps", -1, integer=True)
    check_shard(c)
    from ..lm_eval_hook import check_lm_eval

    check_lm_eval(c)
    for key in ("resume", "out_dir"):
        v = _get(c, key)
        if v is not None and not isinstance(v, str):
            raise ConfigError(f"config key '{key}' must be a string, got {v!r}")
