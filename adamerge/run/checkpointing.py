"""Checkpoints: adamerge's metadata in them, atomic writes (temp file, fsync, rename), resolving ``resume=``.

The Trainer decides when to save and restores loops/optimizers; this makes the file write atomic, so
a job killed at any moment leaves every existing checkpoint readable, and refuses a checkpoint made
by another method, from another pool or by a newer format.
"""

from __future__ import annotations

import io
import logging
import os
import signal
import threading
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.utilities.exceptions import SIGTERMException

from ..atomic import atomic_write_bytes
from ..errors import CheckpointError

log = logging.getLogger(__name__)

# bump when what a checkpoint holds changes meaning, so that old checkpoints are refused, not misread
CHECKPOINT_FORMAT = 1


def checkpoint_meta(method_id: str, fingerprint: dict, mask_rng: torch.Tensor | None = None) -> dict[str, Any]:
    """``checkpoint["adamerge"]``: format, method id, pool fingerprint and the RNG states a resume restores."""
    meta = {"format_version": CHECKPOINT_FORMAT, "method": method_id, "fingerprint": fingerprint,
            "torch_rng": torch.get_rng_state()}
    if mask_rng is not None:
        meta["mask_rng"] = mask_rng
    return meta


def check_checkpoint_meta(checkpoint: dict[str, Any], method_id: str, fingerprint: dict) -> dict[str, Any]:
    """The checkpoint's adamerge metadata, or a CheckpointError saying why this run cannot resume from it."""
    meta = checkpoint.get("adamerge")
    if meta is None:
        raise CheckpointError("not an adamerge checkpoint (no 'adamerge' metadata)")
    if meta.get("format_version", 0) > CHECKPOINT_FORMAT:
        raise CheckpointError(f"checkpoint format {meta.get('format_version')} is newer than this adamerge "
                              f"({CHECKPOINT_FORMAT})")
    if meta.get("method") != method_id:
        raise CheckpointError(f"checkpoint was made by method '{meta.get('method')}', this run is '{method_id}'")
    saved = meta.get("fingerprint") or {}
    if saved != fingerprint:
        keys = sorted(set(saved) | set(fingerprint))
        raise CheckpointError("checkpoint was made from a different pool: " + "; ".join(
            f"{k}: checkpoint {saved.get(k)!r} vs now {fingerprint.get(k)!r}" for k in keys
            if saved.get(k) != fingerprint.get(k)))
    return meta


class AtomicCheckpointIO(TorchCheckpointIO):
    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        buf = io.BytesIO()
        torch.save(checkpoint, buf)
        atomic_write_bytes(path, buf.getvalue())

    def load_checkpoint(self, path, map_location=None, weights_only=None) -> dict[str, Any]:
        try:
            ckpt = torch.load(path, map_location=map_location or "cpu", weights_only=False)
        except Exception as e:  # truncated zip, garbage bytes, wrong pickle ...
            raise CheckpointError(f"checkpoint {path} is unreadable or truncated ({type(e).__name__}: {e})") from e
        if not isinstance(ckpt, dict) or "adamerge" not in ckpt:
            raise CheckpointError(f"checkpoint {path} is not an adamerge checkpoint (no 'adamerge' metadata)")
        return ckpt


def _readable(path: Path) -> bool:
    try:
        torch.load(path, map_location="cpu", weights_only=False, mmap=True)
        return True
    except Exception:
        return False


def resolve_resume(resume: str | None, ckpt_dir: str | Path) -> str | None:
    """``None`` -> fresh run; ``last`` -> the newest readable checkpoint in ``ckpt_dir``; or a path.

    A truncated or corrupt newest checkpoint is skipped (and named) in favour of the previous one.
    """
    if not resume:
        return None
    d = Path(ckpt_dir)
    if resume == "last":
        found = sorted(d.glob("*.ckpt"), key=lambda p: p.stat().st_mtime, reverse=True)
        if not found:
            raise CheckpointError(f"resume=last: no checkpoint in {d} (give out_dir=<the run's directory>)")
        for p in found:
            if _readable(p):
                return str(p)
            log.warning("checkpoint %s is unreadable or truncated; trying the previous one", p)
        raise CheckpointError(f"resume=last: every checkpoint in {d} is unreadable: {[p.name for p in found]}")
    p = Path(resume)
    if not p.exists():
        raise CheckpointError(f"resume={resume}: checkpoint file does not exist")
    if not _readable(p):
        raise CheckpointError(f"resume={resume}: checkpoint is unreadable or truncated")
    return str(p)


def check_fresh_run(resume: str | None, ckpt_dir: str | Path) -> None:
    """Without ``resume=``, refuse a run directory that already has checkpoints: training would
    overwrite its ``last.ckpt`` (the only way back to that run)."""
    d = Path(ckpt_dir)
    if not resume and any(d.glob("*.ckpt")):
        raise CheckpointError(f"{d} already holds checkpoints of a run; continue it with resume=last "
                              "or give a new out_dir")


class SaveOnInterrupt(Callback):
    """On SIGTERM or Ctrl-C (SIGINT), stop at the next step boundary and write ``last.ckpt``.

    Lightning stops cleanly only on SIGTERM (a KeyboardInterrupt may land mid-step), so during
    training SIGINT is turned into SIGTERM; ``signum`` records which one arrived. A second Ctrl-C
    interrupts at once and saves nothing: a state from mid-step would not resume exactly (Lightning
    restores the original handler at teardown).
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.saved: Path | None = None
        self.signum = signal.SIGTERM

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if threading.current_thread() is threading.main_thread():  # only there can handlers be set
            signal.signal(signal.SIGINT, self._on_sigint)

    def _on_sigint(self, signum: int, frame) -> None:
        self.signum = signal.SIGINT
        signal.signal(signal.SIGINT, signal.default_int_handler)
        os.kill(os.getpid(), signal.SIGTERM)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if isinstance(exception, SIGTERMException):
            trainer.save_checkpoint(self.path)
            self.saved = self.path
            if trainer.is_global_zero:
                log.info("interrupted at step %d: checkpoint written to %s", trainer.global_step, self.path)
