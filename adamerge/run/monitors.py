"""What is measured on a merge while it trains and at its ends (adamerge/run/start_vs_end.py chooses by it): the
method's own objective on fixed calibration batches (``StartObjective``), on the held-out texts
(``HoldoutMonitor``, no labels) or accuracy on the validation files (``ValidationMonitor``), and which of them
``checkpoint.monitor`` watches.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import pytorch_lightning as pl
import torch

from ..errors import ConfigError
from ..evaluate import TestSets, expert_row, merge_accuracies
from .data import batches, stream
from .distributed import all_reduce_sum, dist_rank_world
from .states import in_state, merged_now

log = logging.getLogger(__name__)


def monitor_batches(encoded: dict[str, dict[str, torch.Tensor]], batch_size: int, seed: int,
                    n: int) -> list[dict[str, dict[str, torch.Tensor]]]:
    """``n`` fixed calibration batches of every task (another seed than training's order)."""
    ds = stream(encoded, batch_size, seed, "monitor")
    return [ds.batch(i) for i in range(n)]


@torch.no_grad()
def calibration_objective(method: Any, batches: list[dict[str, dict[str, torch.Tensor]]]) -> float:
    """Mean over ``batches`` of the summed task losses (the training objective without regularizer)."""
    if not batches:
        return float("nan")
    was = method.training
    method.eval()
    params = method.merged_params()
    total = sum(float(method.task_loss(t, x, params)) for b in batches for t, x in b.items())
    method.train(was)
    return total / len(batches)


HoldoutBatches = dict[str, list[dict[str, torch.Tensor]]]  # task -> its held-out texts in batches


def holdout_batches(holdout: dict[str, dict[str, torch.Tensor]], batch_size: int) -> HoldoutBatches:
    """Every held-out example of every task (``CalibrationDataModule.holdout``), in batches of ``batch_size``."""
    return {t: batches(enc, batch_size) for t, enc in holdout.items()}


@torch.no_grad()
def holdout_objective(method: Any, holdout: HoldoutBatches) -> float:
    """The training objective without regularizer on the held-out texts: per task, the mean over its held-out
    examples (each batch's loss weighted by its rows), summed over tasks as training sums them."""
    was = method.training
    method.eval()
    params = method.merged_params()
    device = method.device
    total = 0.0
    for task, task_batches in holdout.items():
        rows = [next(iter(b.values())).shape[0] for b in task_batches]
        losses = [float(method.task_loss(task, {k: v.to(device) for k, v in b.items()}, params))
                  for b in task_batches]
        total += sum(loss * r for loss, r in zip(losses, rows)) / sum(rows)
    method.train(was)
    return total


class HoldoutMonitor(pl.Callback):
    """Every ``every_n`` steps (and at the start), the held-out objective of the current merge as
    ``holdout_objective``: written to the loggers and handed to the ModelCheckpoint that keeps the lowest.
    Every process computes it on all held-out texts (sharded task vectors merge with a collective)."""

    def __init__(self, holdout: HoldoutBatches, every_n: int):
        self.holdout, self.every_n = holdout, every_n

    def _record(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> float:
        value = holdout_objective(pl_module, self.holdout)
        for logger in trainer.loggers:  # one row at this step (rank zero), named like the checkpoints
            logger.log_metrics({"holdout_objective": value}, step=trainer.global_step)
        if trainer.is_global_zero:
            log.info("held-out objective at step %d: %.5f", trainer.global_step, value)
        return value

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.global_step == 0:
            self._record(trainer, pl_module)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        if trainer.global_step % self.every_n:
            return
        value = self._record(trainer, pl_module)
        # for the ModelCheckpoint only: Lightning would write a callback's value into every later log row
        pl_module.log("holdout_objective", value, on_step=True, on_epoch=False, logger=False)


class StartObjective(pl.Callback):
    """The starting state's calibration objective, taken when fitting starts: after the process group is up
    (sharded task vectors merge with a collective) and on the training device; a resumed run's checkpoint
    is already loaded then, so the starting state is put in for the measurement and taken out again."""

    def __init__(self, start: dict[str, torch.Tensor], batches: list[dict[str, dict[str, torch.Tensor]]]):
        self.start, self.batches, self.value = start, batches, float("nan")

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        device = pl_module.device
        with in_state(pl_module, self.start):
            self.value = calibration_objective(pl_module, [{t: {k: v.to(device) for k, v in x.items()}
                                                            for t, x in b.items()} for b in self.batches])


def validation_scores(per_task: dict[str, float], expert: dict[str, float] | None) -> dict[str, float]:
    """``val_acc``: mean validation accuracy over tasks; ``val_norm`` (with the experts' accuracies): the mean
    of each task's accuracy over its expert's."""
    out = {"val_acc": sum(per_task.values()) / len(per_task)}
    if expert:
        out["val_norm"] = sum(a / max(expert[t], 1e-12) for t, a in per_task.items()) / len(per_task)
    return out


def resolve_monitor(pool: Any, monitor: str | None, holdout_fraction: float, selectable: bool) -> str | None:
    """``checkpoint.monitor=auto``: none when every task has a validation file (start and end are then compared
    by validation accuracy), else ``holdout_objective`` when texts are held out and the method's state is its
    merge (a start, best and end to compare); any other value as given, checked."""
    if monitor == "auto":
        if all(spec.validation for spec in pool.tasks.values()) or not holdout_fraction or not selectable:
            return None
        return "holdout_objective"
    check_monitor(pool, monitor, holdout_fraction, selectable)
    return monitor


def check_monitor(pool: Any, monitor: str | None, holdout_fraction: float = 0.0, selectable: bool = True) -> None:
    """``checkpoint.monitor``: validation metrics need a labelled validation file for every task of an evaluated
    family; ``holdout_objective`` held-out texts and a method whose state is its merge."""
    if monitor is None:
        return
    if monitor == "holdout_objective":
        if not selectable:
            raise ConfigError("checkpoint.monitor=holdout_objective: this method's merge is not its state dict "
                              "(nothing to compare); use checkpoint.monitor=null")
        if not holdout_fraction:
            raise ConfigError("checkpoint.monitor=holdout_objective needs held-out calibration texts: set "
                              "data.holdout_fraction > 0 (e.g. 0.2)")
        return
    if not pool.family.evaluated:
        raise ConfigError(f"checkpoint.monitor={monitor}: model_class {pool.family.name} has no accuracy to monitor")
    missing = [t for t, spec in pool.tasks.items() if not spec.validation]
    if missing:
        raise ConfigError(f"checkpoint.monitor={monitor} needs a labelled validation file for every task: add "
                          f"pool.tasks.{missing[0]}.validation (missing for {', '.join(missing)})")


class ValidationMonitor(pl.Callback):
    """Every ``every_n`` steps, the validation accuracy of the current merge (the one an export would hold),
    as ``val_acc`` and ``val_norm``: written to the loggers at that step, and handed to the ModelCheckpoint
    that keeps the best. Under DDP each process scores its share of every validation file (examples rank,
    rank + N, …) with the same merge and the counts are summed, so every process logs the same value."""

    def __init__(self, validation: TestSets, every_n: int, batch_size: int):
        self.validation, self.every_n, self.batch_size = validation, every_n, batch_size
        self.share = validation  # this process's share of every file (all of it without DDP)
        self.expert: dict[str, float] = {}

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        rank, world = dist_rank_world()
        if world > 1:  # the whole files stay in self.validation: start vs end is scored on them after training
            self.share = {t: ts.shard(rank, world) for t, ts in self.validation.items()}
        log.info("validation monitor: rank %d scores %s", rank,
                 ", ".join(f"{t} {len(ts)}" for t, ts in self.share.items()))
        self.expert = self._pooled(pl_module, lambda sets: expert_row(pl_module.pool, sets, self.batch_size,
                                                                      base=pl_module.merged.base))

    def _pooled(self, pl_module: pl.LightningModule, score: Callable[[TestSets], dict[str, float]]) -> dict[str, float]:
        """Per-task accuracy over every process's share: ``score`` on this process's (non-empty) sets, then
        the correct counts and sizes summed over processes."""
        mine = {t: ts for t, ts in self.share.items() if len(ts)}
        accs = score(mine) if mine else {}
        counts = torch.tensor([[accs.get(t, 0.0) * len(ts), len(ts)] for t, ts in self.share.items()],
                              dtype=torch.float64, device=pl_module.device)
        counts = all_reduce_sum(counts)
        return {t: float(c / n) for t, (c, n) in zip(self.share, counts.tolist())}

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        if trainer.global_step % self.every_n:
            return
        merged = merged_now(pl_module)  # every process: sharded task vectors gather the merge together
        per_task = self._pooled(pl_module, lambda sets: merge_accuracies(pl_module.pool, merged, sets, self.batch_size,
                                                                         base=pl_module.merged.base))
        scores = validation_scores(per_task, self.expert)
        # for the ModelCheckpoint only: Lightning would write a callback's value into every later log row
        pl_module.log_dict(scores, on_step=True, on_epoch=False, logger=False)
        for logger in trainer.loggers:  # one row at this step (rank zero), named like the checkpoints
            logger.log_metrics(scores, step=trainer.global_step)
        if trainer.is_global_zero:
            log.info("validation at step %d: %s", trainer.global_step,
                     ", ".join(f"{k} {100 * v:.2f}" for k, v in scores.items()))


