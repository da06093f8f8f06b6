"""A learned merge is never silently worse than where it started.

Before training, the starting state (coefficients/masks) is kept; after training both are compared:

- always: the method's own objective (without regularizer) on fixed calibration batches that training
  does not step through in that order (``monitor_batches`` of another seed), start and end;
- when a task has a labelled ``validation:`` file: mean validation accuracy of the start and the end
  merge; the better one is exported (ties go to the end) and the choice is written down;
- with ``checkpoint.monitor`` (``val_acc`` | ``val_norm``): the merge is also evaluated on the validation
  files every ``checkpoint.every_n_steps`` steps (``ValidationMonitor``), Lightning's ModelCheckpoint
  (which keeps every checkpoint) records the best, and that checkpoint is a third candidate, compared by the
  monitored metric;
- with ``checkpoint.monitor=holdout_objective`` (``auto``'s choice when some task has no validation file
  and ``data.holdout_fraction`` > 0): no labels at all. The method's own objective on the calibration texts
  held out of training (``HoldoutMonitor``), every ``checkpoint.every_n_steps`` steps; the lowest is kept
  and start, best and end are compared by it.

The result is ``selection.json`` in the export and a few lines on the terminal.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from typing import Any

import pytorch_lightning as pl
import torch

from ..errors import ConfigError
from ..evaluate import TestSets, expert_row, merge_accuracies
from .data import batches, stream
from .distributed import all_reduce_sum, dist_rank_world

log = logging.getLogger(__name__)


def snapshot(method: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A copy of what trains (the method's state dict: coefficients, masks)."""
    return {k: v.detach().clone() for k, v in method.state_dict().items()}


@contextlib.contextmanager
def in_state(method: torch.nn.Module, state: dict[str, torch.Tensor]) -> Iterator[None]:
    """``method`` holds ``state`` inside the block; its own state is put back afterwards."""
    current = snapshot(method)
    method.load_state_dict(state)
    try:
        yield
    finally:
        method.load_state_dict(current)


def merged_now(method: Any) -> dict[str, torch.Tensor]:
    """The merged weights the method would export in its current state (eval mode: a Concrete mask's final
    sample); its training mode is left as it was."""
    was = method.training
    with torch.no_grad():
        merged = {n: v.detach() for n, v in method.eval().merged_params().items()}
    method.train(was)
    return merged


def merged_at(method: Any, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The merged weights the method would export in ``state``; the method's own state is left as it was."""
    with in_state(method, state):
        return merged_now(method)


def gather_merges(method: Any, states: list[dict[str, torch.Tensor]], keep: bool) -> None:
    """Sharded task vectors (adamerge/core/sharded.py), on every process after training: all-gather the merges at
    ``states`` (start, end) one tensor at a time; ``keep`` (rank 0) holds them for evaluation and export,
    the only merges asked for once the other processes have left."""
    current = snapshot(method)
    try:
        for state in states:
            method.load_state_dict(state)
            method.merged.gathered_merge(keep=keep)
    finally:
        method.load_state_dict(current)
    method.merged.kept_only = True


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


def choose(method: Any, start: dict[str, torch.Tensor], start_loss: float,
           batches: list[dict[str, dict[str, torch.Tensor]]], validation: TestSets | None,
           batch_size: int, best: dict[str, torch.Tensor] | None = None, metric: str = "val_acc",
           expert: dict[str, float] | None = None, holdout: HoldoutBatches | None = None) -> dict[str, Any]:
    """Compare start, the monitored best checkpoint (``best``, if any) and end — on the validation files when
    there are any, by ``metric``, or by the held-out objective when ``metric`` is ``holdout_objective``
    (ties go to the later: end over best over start); leave the method in the state to export; return what
    was compared."""
    end_loss = calibration_objective(method, batches)
    out: dict[str, Any] = {"calibration_objective": {"start": start_loss, "end": end_loss}, "exported": "end"}
    log.info("calibration objective: start %.4f, end %.4f", start_loss, end_loss)
    states = {"start": start, **({"best": best} if best is not None else {}), "end": snapshot(method)}
    scores: dict[str, float] = {}
    if holdout:
        for which, state in states.items():
            with in_state(method, state):
                scores[which] = -holdout_objective(method, holdout)  # higher is better, as accuracies
        out["holdout_objective"] = {w: -v for w, v in scores.items()}
        log.info("held-out objective: %s", ", ".join(f"{w} {-v:.5f}" for w, v in scores.items()))
    if validation:
        accs = {}
        for which, state in states.items():
            rows = merge_accuracies(method.pool, merged_at(method, state), validation, batch_size)
            accs[which] = {"per_task": rows, **validation_scores(rows, expert)}
        out["validation"] = accs
        if metric != "holdout_objective":
            scores = {w: accs[w][metric] for w in states}
    if metric == "holdout_objective" and holdout or validation and metric != "holdout_objective":
        winner = max(reversed(list(states)), key=lambda w: scores[w])  # max keeps the first of equals
        method.load_state_dict(states[winner])
        out["exported"] = winner
        if metric == "holdout_objective":
            others = ", ".join(f"{w} {-scores[w]:.5f}" for w in states if w != winner)
            out["why"] = (f"held-out objective (lower is better; no labels) of the {winner} {-scores[winner]:.5f}"
                          f" <= {others}")
        else:
            others = ", ".join(f"{w} {100 * scores[w]:.2f}" for w in states if w != winner)
            out["why"] = f"validation {metric} of the {winner} {100 * scores[winner]:.2f} >= {others}"
        log.info("%s", out["why"])
    elif end_loss > start_loss:
        out["why"] = ("the calibration objective rose during training and no task has a validation file "
                      "to choose by: the end is exported")
        log.warning("%s", out["why"])
    else:  # a lower objective need not be a better merge (entropy can reward confidence): say so
        out["why"] = ("no task has a validation file to choose by: the end is exported (its calibration "
                      "objective is not above the start's; add pool.tasks.<task>.validation to choose by accuracy)")
    return out


def exported_note(selection: dict[str, Any] | None) -> str:
    """What the table says after the method's name when the export is not the end of training."""
    which = (selection or {}).get("exported")
    if which == "start":
        return " (exported: the start)"
    if which == "best":
        return f" (exported: best checkpoint, step {selection['best_checkpoint']['step']})"
    return ""
