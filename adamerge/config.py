"""Checks on the composed config: every bad value is reported with its key, before any work starts."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from .task_vectors import DTYPES


class ConfigError(ValueError):
    """A config value of the wrong type or out of range; names the key."""


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


def check_config(c: dict) -> None:
    """Raise ConfigError naming the first bad key of a resolved config (a plain dict)."""
    if not c.get("pool"):  # ~pool (or pool=null, which train.py turns into ~pool)
        raise ConfigError("no pool chosen (pool=<name>; see configs/pool/)")
    m = c.get("method") or {}
    if not m.get("name"):
        raise ConfigError("config key 'method.name' is required (choose a method with method=<name>)")
    check_number(c, "method.lr", 0, strict_lo=True)
    check_number(c, "method.steps", 0, integer=True)
    check_number(c, "method.scale")
    start = m.get("start_from")
    if start is not None and not (isinstance(start, dict) and start.get("name")):
        raise ConfigError(f"config key 'method.start_from' must name a method config (e.g. regmean_pp), got {start!r}")
    init = m.get("init")
    if isinstance(init, dict):
        if not init.get("name"):
            raise ConfigError("config key 'method.init' names a starting merge whose config has no 'name'")
    elif isinstance(init, list):
        if not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in init):
            raise ConfigError(f"config key 'method.init' must be a number or a list of numbers, got {init!r}")
    else:
        check_number(c, "method.init")
    clamp = m.get("clamp")
    if clamp is not None:
        if not (isinstance(clamp, list) and len(clamp) == 2
                and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in clamp)):
            raise ConfigError(f"config key 'method.clamp' must be null or [low, high], got {clamp!r}")
        if not clamp[0] < clamp[1]:
            raise ConfigError(f"config key 'method.clamp' bounds are reversed or empty: {clamp!r}")
        inits = init if isinstance(init, list) else [init] if isinstance(init, (int, float)) else []
        if any(not clamp[0] <= x <= clamp[1] for x in inits):
            # clamped there, the coefficient gets no gradient and never moves
            raise ConfigError(f"config key 'method.init' = {init!r} lies outside 'method.clamp' {clamp!r}: "
                              "nothing would train; choose an init within the bounds")
    if m.get("granularity") is not None and m["granularity"] not in ("task", "layer", "chunk"):
        raise ConfigError(f"config key 'method.granularity' must be task, layer or chunk, got {m['granularity']!r}")
    check_number(c, "data.batch_size", 1, integer=True)
    check_number(c, "data.max_length", 2, integer=True)
    check_number(c, "data.calibration_size", 1, integer=True)
    check_number(c, "seed", 0, integer=True)
    check_number(c, "checkpoint.every_n_steps", 1, integer=True)
    check_number(c, "progress.every_n_steps", 1, integer=True)
    check_number(c, "progress.every_s", 0)
    check_number(c, "evaluate.batch_size", 1, integer=True)
    check_number(c, "evaluate.monitor_batches", 0, integer=True)
    check_number(c, "evaluate.max_examples", 1, integer=True)
    check_number(c, "trainer.max_steps", -1, integer=True)
    dtype = _get(c, "task_vectors.dtype")
    if dtype is not None and dtype not in DTYPES:
        raise ConfigError(f"config key 'task_vectors.dtype' must be one of {sorted(DTYPES)}, got {dtype!r}")
    for key in ("task_vectors.include", "task_vectors.exclude"):
        v = _get(c, key)
        if v is not None and not (isinstance(v, list) and all(isinstance(x, str) for x in v)):
            raise ConfigError(f"config key '{key}' must be a list of regexes, got {v!r}")
    for key in ("resume", "out_dir"):
        v = _get(c, key)
        if v is not None and not isinstance(v, str):
            raise ConfigError(f"config key '{key}' must be a string, got {v!r}")
