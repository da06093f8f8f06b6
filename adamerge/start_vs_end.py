"""A learned merge is never silently worse than where it started.

Before training, the starting state (coefficients/masks) is kept; after training both are compared:

- always: the method's own objective (without regularizer) on fixed calibration batches that training
  does not step through in that order (``monitor_batches`` of another seed), start and end;
- when a task has a labelled ``validation:`` file: mean validation accuracy of the start and the end
  merge; the better one is exported (ties go to the end) and the choice is written down.

The result is ``selection.json`` in the export and a few lines on the terminal.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import pytorch_lightning as pl
import torch

from .data import StepBatches
from .evaluate import TestSets, evaluate_params

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


def merged_at(method: Any, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The merged weights the method would export in ``state``; the method's own state is left as it was."""
    with in_state(method, state), torch.no_grad():
        return {n: v.detach() for n, v in method.eval().merged_params().items()}


def gather_merges(method: Any, states: list[dict[str, torch.Tensor]], keep: bool) -> None:
    """Sharded task vectors (adamerge/sharded.py), on every process after training: all-gather the merges at
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
    ds = StepBatches(encoded, batch_size, seed + 1)
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


def choose(method: Any, start: dict[str, torch.Tensor], start_loss: float,
           batches: list[dict[str, dict[str, torch.Tensor]]], validation: TestSets | None,
           batch_size: int) -> dict[str, Any]:
    """Compare start and end; leave the method in the state to export; return what was compared."""
    end_loss = calibration_objective(method, batches)
    out: dict[str, Any] = {"calibration_objective": {"start": start_loss, "end": end_loss}, "exported": "end"}
    log.info("calibration objective: start %.4f, end %.4f", start_loss, end_loss)
    if validation:
        base = method.pool.base_model
        heads = method.pool.head
        accs = {}
        for which, state in (("start", start), ("end", snapshot(method))):
            params = merged_at(method, state)
            rows = evaluate_params(base, lambda t, p=params: {**p, **heads(t)}, validation, batch_size)
            accs[which] = {"per_task": rows, "avg": sum(rows.values()) / len(rows)}
        out["validation"] = accs
        if accs["start"]["avg"] > accs["end"]["avg"]:
            method.load_state_dict(start)
            out["exported"] = "start"
            out["why"] = (f"validation accuracy of the start {100 * accs['start']['avg']:.2f} > end "
                          f"{100 * accs['end']['avg']:.2f}: the starting merge is exported")
        else:
            out["why"] = (f"validation accuracy of the end {100 * accs['end']['avg']:.2f} >= start "
                          f"{100 * accs['start']['avg']:.2f}")
        log.info("%s", out["why"])
    elif end_loss > start_loss:
        out["why"] = ("the calibration objective rose during training and no task has a validation file "
                      "to choose by: the end is exported")
        log.warning("%s", out["why"])
    return out
