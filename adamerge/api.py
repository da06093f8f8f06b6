"""The Python API: ``adamerge.merge(...)`` runs the program ``python train.py`` runs, without the command line.

    import adamerge
    result = adamerge.merge(pool="minilm_lora", method="adamerging_layerwise", out_dir="runs/lw",
                            trainer={"max_steps": 100}, **{"method.lr": 1e-2})
    result["export"], result["eval"], result["selection"]

Keyword arguments are config overrides: a nested dict per group (``trainer={"max_steps": 100}``) or dotted keys
(``**{"method.lr": 1e-2}``), exactly the keys ``train.py`` takes (configs/config.yaml). A user's error raises
an ``adamerge.errors.AdamergeError`` subclass whose message is the line the command line would print.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from omegaconf import DictConfig


def _dotted(prefix: str, value: Any) -> Iterator[tuple[str, Any]]:
    if isinstance(value, Mapping):
        for k, v in value.items():
            yield from _dotted(f"{prefix}.{k}", v)
    else:
        yield prefix, value


def _override(key: str, value: Any) -> str:
    """``key=value`` in Hydra's override grammar (values as YAML: strings quoted, lists and None written out)."""
    import json

    if value is None:
        return f"{key}=null"
    if isinstance(value, bool):
        return f"{key}={str(value).lower()}"
    if isinstance(value, (int, float)):
        return f"{key}={value!r}"
    if isinstance(value, (list, tuple)):
        return f"{key}=[{','.join(json.dumps(v) if isinstance(v, str) else str(v) for v in value)}]"
    return f"{key}={json.dumps(str(value))}"


def compose_config(overrides: list[str], pool: Mapping[str, Any] | None = None,
                   config_dir: str | Path | None = None) -> DictConfig:
    """The config ``train.py`` composes for these Hydra ``overrides``: ``config_dir`` adds the user's config groups
    (as ``--config-dir``), ``pool`` (the pool group itself, a dict) replaces the pool group."""
    from hydra import compose, initialize_config_dir
    from omegaconf import open_dict

    from .run.program import CONFIGS

    search = [f"hydra.searchpath=[file://{Path(config_dir).resolve()}]"] if config_dir is not None else []
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose("config", overrides=[*search, *overrides])
    if pool is not None:
        with open_dict(cfg):
            cfg.pool = dict(pool)
    return cfg


def merge(pool: str | Mapping[str, Any] = "minilm_frozen_head_lora", method: str = "adamerging_layerwise",
          out_dir: str | Path | None = None, config_dir: str | Path | None = None, **overrides: Any) -> dict:
    """Merge ``pool``'s experts with ``method``; returns what the run produced (``out_dir``, ``export``,
    ``selection``, ``eval``).

    ``pool``: a pool config's name (configs/pool/<name>.yaml, or one in ``config_dir``) or the pool group
    itself as a dict (``{"base": ..., "tasks": {...}}``, as a pool yaml holds it). ``config_dir`` adds a
    folder of the user's own config groups, as ``train.py --config-dir`` does. The run logs to the
    terminal and to ``<out_dir>/train.log``, as the command line does.
    """
    from .run.cli import quiet_third_party
    from .run.program import run

    args = [f"method={method}"] + ([f"pool={pool}"] if isinstance(pool, str) else [])
    if out_dir is not None:
        args.append(_override("out_dir", str(out_dir)))
    args += [_override(k, v) for key, value in overrides.items() for k, v in _dotted(key, value)]
    cfg = compose_config(args, None if isinstance(pool, str) else pool, config_dir)
    quiet_third_party(bool(cfg.get("verbose")))
    log_file = Path(str(cfg.out_dir)) / "train.log"
    log_file.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(log_file)
    handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
    logger = logging.getLogger("adamerge")
    logger.addHandler(handler)
    if logger.getEffectiveLevel() > logging.INFO:
        logger.setLevel(logging.INFO)
    try:
        return run(cfg)
    finally:
        logger.removeHandler(handler)
        handler.close()
