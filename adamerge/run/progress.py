"""Training progress as log lines, for runs whose output goes to a file (the progress bar draws only
on a terminal): Hydra's logging sends them to the terminal and to ``<out_dir>/train.log``."""

from __future__ import annotations

import logging
import time
from collections import deque

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Callback, TQDMProgressBar

log = logging.getLogger(__name__)


def _duration(seconds: float) -> str:
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"


class ProgressLog(Callback):
    """One line at every ``every_n_steps``-th step, whenever ``every_s`` seconds passed since the last line
    (slow steps still show progress), and at the last step:
    ``step s/total  loss x  s/step y  ETA z  coef mean/min/max a/b/c``. Needs ``trainer.max_steps`` > 0.

    s/step and the ETA follow the last ``window`` steps, so a pause (a suspended job, a busy machine) stops
    counting once it is that many steps behind."""

    def __init__(self, every_n_steps: int = 10, every_s: float = 30.0, window: int = 20):
        self.every_n_steps, self.every_s = every_n_steps, every_s
        self.step0, self.last_t, self.last_step = 0, 0.0, -1
        self.recent: deque[tuple[float, int]] = deque(maxlen=window + 1)  # (time, step) at the latest steps

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # a resumed run starts at its checkpoint's step: s/step counts only this run's steps
        self.step0, self.last_t = trainer.global_step, time.monotonic()
        self.recent.clear()
        self.recent.append((self.last_t, self.step0))

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        step, total, now = trainer.global_step, trainer.max_steps, time.monotonic()
        # step == last_step: another micro-batch of an accumulated step already logged
        if not trainer.is_global_zero or step == self.last_step or step == self.step0:
            return
        if step != self.recent[-1][1]:
            self.recent.append((now, step))
        if step < total and step % self.every_n_steps and now - self.last_t < self.every_s:
            return
        self.last_t, self.last_step = now, step
        t_then, step_then = self.recent[0]
        per_step = (now - t_then) / (step - step_then)
        loss = trainer.callback_metrics.get("loss")
        parts = [f"step {step}/{total}", f"loss {float(loss):.4f}" if loss is not None else "loss -",
                 f"s/step {per_step:.3f}", f"ETA {_duration(per_step * (total - step))}"]
        coefficients = getattr(getattr(pl_module, "merged", None), "coefficients", None)
        if coefficients is not None:
            v = coefficients.values().detach().float()
            parts.append(f"coef mean/min/max {v.mean():.3f}/{v.min():.3f}/{v.max():.3f}")
        log.info("  ".join(parts))


class StepProgressBar(TQDMProgressBar):
    """Lightning's bar counting optimizer steps of ``max_steps``: the calibration stream is endless, so
    its epoch counter and per-epoch batch count ("Epoch 0/-2", "10/?") mean nothing here."""

    @property
    def train_description(self) -> str:
        return "step"

    def on_train_epoch_start(self, trainer: pl.Trainer, *_) -> None:
        # not the parent's: it would draw an "Epoch 0" line first, which stays visible in a log file
        bar = self.train_progress_bar
        bar.reset(total=trainer.max_steps)
        bar.n = bar.initial = trainer.global_step  # after a resume the bar starts at the checkpoint's step
        bar.refresh()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        bar, step = self.train_progress_bar, trainer.global_step
        if bar is None or bar.disable or (step % self.refresh_rate and step != trainer.max_steps):
            return
        bar.n = step
        bar.set_postfix(self.get_metrics(trainer, pl_module))  # refreshes the bar
