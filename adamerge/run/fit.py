"""Training a learned method with the Lightning Trainer: the calibration data module, the callbacks
(checkpoints, held-out or validation monitor, interrupts, progress), resuming, then start vs end."""

from __future__ import annotations

import csv
import logging
import math
import sys
from pathlib import Path

log = logging.getLogger("adamerge")

FITTING = {"now": False}  # the Trainer is fitting: SIGTERM is handled by Lightning and SaveOnInterrupt


def read_losses(log_dir: Path) -> list[tuple[int, float]]:
    """(step, loss) from every CSV log of this run (a resumed run adds a version), later runs win."""
    by_step: dict[int, float] = {}
    for f in sorted(log_dir.glob("*/metrics.csv"), key=lambda p: p.stat().st_mtime):
        with f.open() as fh:
            for row in csv.DictReader(fh):
                if row.get("loss"):
                    by_step[int(row["step"])] = float(row["loss"])
    return sorted(by_step.items())


def fit(method, pool, c: dict, out_dir: Path, ckpt_path: str | None):
    """Train with the Lightning Trainer (checkpoints, resume, interrupts, progress, loggers), then
    compare the end with the start (adamerge/run/start_vs_end.py). Returns ``(start_state, selection)``,
    or None on a DDP rank other than 0."""
    import pytorch_lightning as pl
    from pytorch_lightning.callbacks import ModelCheckpoint
    from pytorch_lightning.utilities.exceptions import SIGTERMException

    from ..errors import ConfigError, Interrupted
    from ..evaluate import load_test_sets
    from .checkpointing import AtomicCheckpointIO, SaveOnInterrupt
    from .datamodule import CalibrationDataModule
    from .loggers import build_loggers
    from .monitors import HoldoutMonitor, StartObjective, ValidationMonitor, holdout_batches, monitor_batches
    from .progress import ProgressLog, StepProgressBar
    from .start_vs_end import choose
    from .states import gather_merges, snapshot

    ckpt_dir = out_dir / "checkpoints"
    dm = CalibrationDataModule.from_pool(pool, batch_size=c["data"]["batch_size"], max_length=c["data"]["max_length"],
                                         seed=c["seed"], size=c["data"]["calibration_size"],
                                         holdout_fraction=c["data"]["holdout_fraction"])
    holdout = holdout_batches(dm.holdout, c["evaluate"]["batch_size"])
    if getattr(method.cfg, "passes", None):  # steps from the data: passes over the largest task's training texts, at most steps
        n = max(next(iter(enc.values())).shape[0] for enc in dm.encoded.values())
        c["trainer"]["max_steps"] = min(int(c["trainer"]["max_steps"]), math.ceil(method.cfg.passes * n / dm.batch_size))
        log.info("method.passes=%g over %d texts: %d steps", method.cfg.passes, n, c["trainer"]["max_steps"])
    start_state = snapshot(method)  # the starting merge, kept to compare with the end
    monitor = monitor_batches(dm.encoded, dm.batch_size, c["seed"], int(c["evaluate"]["monitor_batches"]))
    start_objective = StartObjective(start_state, monitor)
    interrupt = SaveOnInterrupt(ckpt_dir / "last.ckpt")
    every_n, watched = int(c["checkpoint"]["every_n_steps"]), c["checkpoint"].get("monitor")
    by_holdout = watched == "holdout_objective"
    # Every checkpoint is kept (none is ever deleted), so the best path recorded in any checkpoint still
    # exists after a kill at any moment; a separate top-1 "best" folder would delete the file an older
    # checkpoint's record names.
    checkpoints = ModelCheckpoint(dirpath=ckpt_dir, filename="step{step:06d}", auto_insert_metric_name=False,
                                  every_n_train_steps=every_n, save_top_k=-1, save_last=False,
                                  monitor=watched or None, mode="min" if by_holdout else "max")
    callbacks = [interrupt, ProgressLog(c["progress"]["every_n_steps"], c["progress"]["every_s"]), start_objective]

    def validation_sets() -> dict:
        return (load_test_sets(pool, dm.tokenizer, c["data"]["max_length"], split="validation",
                               max_new_tokens=c["evaluate"]["max_new_tokens"]) if pool.family.evaluated else {})

    if watched:  # the merge scored on the validation files or the held-out texts every every_n steps
        val_monitor = (HoldoutMonitor(holdout, every_n) if by_holdout
                       else ValidationMonitor(validation_sets(), every_n, c["evaluate"]["batch_size"]))
        callbacks.append(val_monitor)
    callbacks.append(checkpoints)  # after the monitor: it reads the value the monitor logged at this step
    bar = c["trainer"].get("enable_progress_bar")
    bar = sys.stdout.isatty() if bar is None else bool(bar)  # redrawn lines only make sense on a terminal
    if bar:
        callbacks.append(StepProgressBar())
    try:
        trainer = pl.Trainer(**{**c["trainer"], "enable_progress_bar": bar}, callbacks=callbacks, plugins=[AtomicCheckpointIO()],
                             logger=build_loggers(c["logger"], out_dir, out_dir.name),
                             enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0)
    except (TypeError, ValueError) as e:  # unknown key or bad value under trainer.*
        raise ConfigError(f"config group 'trainer': {e}") from e
    FITTING["now"] = True  # SIGTERM is the Trainer's now (cli's handler stands aside: see ``terminated``)
    try:
        trainer.fit(method, datamodule=dm, ckpt_path=ckpt_path)
    except SIGTERMException as e:  # SaveOnInterrupt wrote last.ckpt
        raise Interrupted(interrupt.signum) from e
    finally:
        FITTING["now"] = False
    trainer.save_checkpoint(ckpt_dir / "last.ckpt")
    best_path = checkpoints.best_model_path if watched else ""
    best_ckpt = trainer.strategy.load_checkpoint(best_path) if best_path else None
    best_state = best_ckpt["state_dict"] if best_ckpt else None
    if method.merged.sharded:  # every process takes part in gathering the merges rank 0 evaluates and exports
        states = [start_state, snapshot(method)] + ([best_state] if best_state is not None else [])
        gather_merges(method, states)
    if trainer.global_rank != 0:
        return None
    method.cpu()
    # validation files are read by rank 0 only when the monitor did not read them
    validation = val_monitor.validation if watched and not by_holdout else validation_sets()
    selection = choose(method, start_state, start_objective.value, monitor, validation, c["evaluate"]["batch_size"],
                       best=best_state, metric=watched or "val_acc",
                       expert=val_monitor.expert if watched and not by_holdout else None, holdout=holdout)
    if best_ckpt:
        selection["best_checkpoint"] = {"path": best_path, "step": best_ckpt["global_step"],
                                        watched: float(checkpoints.best_model_score)}
    return start_state, selection
