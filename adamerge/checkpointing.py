"""Checkpoint files: atomic writes (temp file, fsync, rename) and resolving ``resume=``.

The Trainer decides when to save and restores loops/optimizers; this only makes the file write
atomic, so a job killed at any moment leaves every existing checkpoint readable.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO

from .methods.base import CheckpointError


class AtomicCheckpointIO(TorchCheckpointIO):
    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, p)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise

    def load_checkpoint(self, path, map_location=None, weights_only=None) -> dict[str, Any]:
        try:
            return torch.load(path, map_location=map_location or "cpu", weights_only=False)
        except Exception as e:  # truncated zip, garbage bytes, wrong pickle ...
            raise CheckpointError(f"checkpoint {path} is unreadable or truncated ({type(e).__name__}: {e})") from e


def resolve_resume(resume: str | None, ckpt_dir: str | Path) -> str | None:
    """``None`` -> fresh run; ``last`` -> ``ckpt_dir/last.ckpt`` (or the newest step checkpoint); a path."""
    if not resume:
        return None
    d = Path(ckpt_dir)
    if resume == "last":
        if (d / "last.ckpt").exists():
            return str(d / "last.ckpt")
        steps = sorted(d.glob("step*.ckpt"))
        if not steps:
            raise CheckpointError(f"resume=last: no checkpoint in {d} (give out_dir=<the run's directory>)")
        return str(steps[-1])
    p = Path(resume)
    if not p.exists():
        raise CheckpointError(f"resume={resume}: checkpoint file does not exist")
    return str(p)
