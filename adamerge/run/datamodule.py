"""CalibrationDataModule: unlabeled batches from every task, one batch of each task per step, for the Trainer.

Batches are a pure function of (seed, step, task) (adamerge/run/data.py's ``stream``), so a resumed run sees
exactly the batches the uninterrupted run would have seen, and each DDP rank takes its own slice of the
global batch. Labels are dropped before anything reaches training: they are only read for evaluation.
"""

from __future__ import annotations

import pytorch_lightning as pl
from torch.utils.data import DataLoader

from ..errors import DataError
from .data import encode, read_split, split_holdout, stream


class CalibrationDataModule(pl.LightningDataModule):
    """Unlabeled calibration texts of every task, tokenized once, served one global step at a time.

    ``holdout_fraction`` > 0 keeps a seeded share of every task's texts (after ``size``) out of training:
    ``holdout`` holds them, encoded, for the label-free held-out objective (adamerge/run/monitors.py)."""

    def __init__(self, calibration: dict[str, list[str]], tokenizer, batch_size: int = 16,
                 max_length: int = 64, seed: int = 0, size: int | None = None, encoder=None,
                 holdout_fraction: float = 0.0):
        super().__init__()
        if not calibration:
            raise DataError("no calibration data: the pool has no task with a calibration file")
        if batch_size <= 0:
            raise DataError(f"data.batch_size must be > 0, got {batch_size}")
        if max_length <= 1:
            raise DataError(f"data.max_length must be > 1, got {max_length}")
        for task, texts in calibration.items():
            if not texts:
                raise DataError(f"task '{task}' has no calibration examples")
        if not 0 <= holdout_fraction < 1:
            raise DataError(f"data.holdout_fraction must be in [0, 1), got {holdout_fraction}")
        split = {t: split_holdout(v[:size] if size else v, holdout_fraction, seed, i)
                 for i, (t, v) in enumerate(calibration.items())}
        self.texts = {t: train for t, (train, _) in split.items()}
        self.tokenizer, self.batch_size, self.max_length, self.seed = tokenizer, batch_size, max_length, seed
        # ``encoder``: a task's calibration items (texts; image paths) to model inputs (default: the tokenizer)
        self.encoder = encoder or (lambda items: encode(tokenizer, items, max_length))
        self.encoded = {t: self.encoder(v) for t, v in self.texts.items()}
        self.holdout = {t: self.encoder(held) for t, (_, held) in split.items() if held}

    @classmethod
    def from_pool(cls, pool, batch_size: int = 16, max_length: int = 64, seed: int = 0,
                  size: int | None = None, tokenizer=None, holdout_fraction: float = 0.0) -> CalibrationDataModule:
        cal = {name: read_split(pool, name, "calibration")[0] for name in pool.tasks}
        family = pool.family
        tok = tokenizer or pool.tokenizer()
        return cls(cal, tok, batch_size=batch_size, max_length=max_length, seed=seed, size=size,
                   encoder=lambda items: family.encode(pool, items, tok, max_length),
                   holdout_fraction=holdout_fraction)

    def _world(self) -> tuple[int, int, int]:
        trainer = self.trainer
        if trainer is None:
            return 0, 1, 0
        if self.batch_size % trainer.world_size:
            raise DataError(
                f"data.batch_size={self.batch_size} (the global batch per task) must be divisible by the "
                f"number of processes ({trainer.world_size})"
            )
        # micro-step index: resuming at global_step s continues with the batches of step s
        start = trainer.global_step * trainer.accumulate_grad_batches
        return trainer.global_rank, trainer.world_size, start

    def train_dataloader(self) -> DataLoader:
        rank, world, start = self._world()
        ds = stream(self.encoded, self.batch_size, self.seed, "train", start=start, rank=rank, world=world)
        return DataLoader(ds, batch_size=None, num_workers=0)
