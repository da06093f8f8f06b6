"""Checks on the composed config: every bad value is reported with its key, before any work starts."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from ..core.lora_factors import LORA_CHOICES, check_lora_key
from ..core.task_vectors import DTYPES
from ..errors import ConfigError

MONITORS = ("auto", "val_acc", "val_norm", "holdout_objective")  # checkpoint.monitor: adamerge/run/start_vs_end.py


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
    strategy, devices, nodes = str(t.get("strategy")), t.get("devices", 1), t.get("num_nodes", 1) or 1
    one = devices in (1, "1") or (isinstance(devices, list) and len(devices) == 1)
    if not strategy.startswith("ddp") or any(w in strategy for w in ("spawn", "fork", "notebook")) or (
            one and nodes in (1, "1")):
        raise ConfigError(f"task_vectors.shard=true needs a multi-process DDP trainer (trainer=ddp with "
                          f"trainer.devices > 1 or num_nodes > 1), got strategy={strategy} devices={devices}")
    if _get(c, "task_vectors.lora") == "factorized":
        raise ConfigError("task_vectors.shard=true shards dense task vectors: task_vectors.lora=factorized refused")


def check_config(c: dict) -> None:
    """Raise ConfigError naming the first bad key of a resolved config (a plain dict).

    The ``method`` block is checked by its method's typed config (adamerge/methods/method_config.py)."""
    if not c.get("pool"):  # ~pool (or pool=null, which train.py turns into ~pool)
        raise ConfigError("no pool chosen (pool=<name>; see configs/pool/)")
    if not (c.get("method") or {}).get("name"):
        raise ConfigError("config key 'method.name' is required (choose a method with method=<name>)")
    # keys whose null means "all"/"from the method" are optional; the others are read as numbers
    check_number(c, "data.batch_size", 1, integer=True, optional=False)
    check_number(c, "data.max_length", 2, integer=True, optional=False)
    check_number(c, "data.calibration_size", 1, integer=True)
    check_number(c, "data.holdout_fraction", 0)
    if (_get(c, "data.holdout_fraction") or 0) >= 1:
        raise ConfigError(f"config key 'data.holdout_fraction' must be < 1 (a share of each task's calibration "
                          f"texts), got {_get(c, 'data.holdout_fraction')!r}")
    check_number(c, "seed", 0, integer=True, optional=False)
    check_number(c, "checkpoint.every_n_steps", 1, integer=True, optional=False)
    monitor = _get(c, "checkpoint.monitor")
    if monitor is not None and monitor not in MONITORS:
        raise ConfigError(f"config key 'checkpoint.monitor' must be null or one of {list(MONITORS)}, got {monitor!r}")
    check_number(c, "progress.every_n_steps", 1, integer=True, optional=False)
    check_number(c, "progress.every_s", 0, optional=False)
    check_number(c, "evaluate.batch_size", 1, integer=True, optional=False)
    check_number(c, "evaluate.monitor_batches", 0, integer=True, optional=False)
    check_number(c, "evaluate.max_examples", 1, integer=True)
    check_number(c, "evaluate.max_new_tokens", 1, integer=True, optional=False)
    check_number(c, "trainer.max_steps", -1, integer=True)
    dtype = _get(c, "task_vectors.dtype")
    if dtype is not None and (not isinstance(dtype, str) or dtype not in DTYPES):
        raise ConfigError(f"config key 'task_vectors.dtype' must be one of {sorted(DTYPES)}, got {dtype!r}")
    for key in LORA_CHOICES:
        if _get(c, f"task_vectors.{key}") is not None:
            check_lora_key(key, _get(c, f"task_vectors.{key}"))
    check_shard(c)
    for key in ("task_vectors.include", "task_vectors.exclude"):
        v = _get(c, key)
        if v is not None and not (isinstance(v, list) and all(isinstance(x, str) for x in v)):
            raise ConfigError(f"config key '{key}' must be a list of regexes, got {v!r}")
    for key in ("resume", "out_dir"):
        v = _get(c, key)
        if v is not None and not isinstance(v, str):
            raise ConfigError(f"config key '{key}' must be a string, got {v!r}")
