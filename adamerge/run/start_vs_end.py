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

import logging
from typing import Any

import torch

from ..evaluate import TestSets, merge_accuracies
from .monitors import HoldoutBatches, calibration_objective, holdout_objective, validation_scores
from .states import in_state, merged_at, snapshot

log = logging.getLogger(__name__)


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
