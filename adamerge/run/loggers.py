"""Lightning loggers by name: ``logger=tensorboard`` (or a list, ``logger=[tensorboard,mlflow]``).

Every run keeps the CSV log (``<out_dir>/logs``): the export's loss curve and model card read it. The
others are optional packages (``pip install tensorboard``, ``wandb``, ``mlflow``); a missing one is
named before any work. Nothing here needs a network: TensorBoard and MLflow write under ``out_dir``
(MLflow: ``MLFLOW_TRACKING_URI`` overrides), W&B honours ``WANDB_MODE=offline``.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from ..errors import ConfigError, refuse_unknown_keys

# logger name -> the packages that provide it (any one)
PACKAGES: dict[str, tuple[str, ...]] = {"csv": (), "tensorboard": ("tensorboard", "tensorboardX"),
                                        "wandb": ("wandb",), "mlflow": ("mlflow",)}


def logger_names(value: str | list[str] | None) -> list[str]:
    """``csv`` plus the requested loggers, checked: unknown names and missing packages are ConfigErrors."""
    names = [value] if isinstance(value, str) else list(value or [])
    if not all(isinstance(n, str) for n in names):
        raise ConfigError(f"config key 'logger' must be a logger name or a list of them ({', '.join(PACKAGES)}), "
                          f"got {value!r}")
    refuse_unknown_keys(names, list(PACKAGES), "logger", "the loggers", ConfigError)
    for n in names:
        if PACKAGES[n] and not any(importlib.util.find_spec(p) for p in PACKAGES[n]):
            raise ConfigError(f"logger={n} needs the package {' or '.join(PACKAGES[n])} (pip install {PACKAGES[n][0]})")
    return ["csv"] + [n for n in dict.fromkeys(names) if n != "csv"]


def build_loggers(names: list[str], out_dir: Path, run_name: str) -> list:
    """The Lightning loggers for ``names`` (from ``logger_names``), all writing under ``out_dir``."""
    from pytorch_lightning.loggers import CSVLogger, MLFlowLogger, TensorBoardLogger, WandbLogger

    out = []
    for n in names:
        if n == "csv":
            out.append(CSVLogger(str(out_dir), name="logs"))
        elif n == "tensorboard":
            out.append(TensorBoardLogger(str(out_dir), name="tensorboard", default_hp_metric=False))
        elif n == "wandb":
            out.append(WandbLogger(name=run_name, save_dir=str(out_dir), project="adamerge"))
        elif n == "mlflow":
            uri = os.environ.get("MLFLOW_TRACKING_URI") or (out_dir / "mlruns").resolve().as_uri()
            out.append(MLFlowLogger(experiment_name="adamerge", run_name=run_name, tracking_uri=uri))
    return out
