"""Atomic writes, the one home for them: a file (temp file, fsync, rename) and a directory (temp sibling,
renamed into place), so a job killed at any moment leaves the previous file or directory whole.

Used by the export (a whole directory), checkpoints, eval.json and the benchmark's cached files.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from .errors import ExportError

log = logging.getLogger(__name__)


def _umask() -> int:
    """The process umask (reading it means setting it, so it is set straight back)."""
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes it 0600; a plain open() honours the umask
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def check_export_target(export_dir: str | Path, overwrite: bool) -> None:
    """Refuse early (before any training) to clobber a non-empty export directory."""
    d = Path(export_dir)
    if d.exists() and not d.is_dir():
        raise ExportError(f"export directory {d} exists and is not a directory")
    if d.exists() and any(d.iterdir()) and not overwrite:
        raise ExportError(f"export directory {d} exists and is not empty; set export.overwrite=true to replace it")


def remove_stale_temporaries(export_dir: str | Path) -> list[Path]:
    """Remove the temporary siblings (``.<name>.tmp-*``, ``.<name>.old-*``) that an export killed by
    SIGKILL leaves behind (nothing else ever removes them); returns what was removed.

    An ``.old-`` directory while the export directory is missing is the previous export, killed
    between the two renames of ``atomic_directory``: it is put back instead.
    """
    d = Path(export_dir)
    if not d.parent.is_dir():
        return []
    olds = sorted(d.parent.glob(f".{d.name}.old-*"), key=lambda p: p.stat().st_mtime)
    if olds and not d.exists():
        os.replace(olds.pop(), d)
        log.warning("restored the previous export %s from %s (an export was interrupted)", d, d.parent)
    stale = [p for p in [*d.parent.glob(f".{d.name}.tmp-*"), *olds] if p.is_dir()]
    for p in stale:
        shutil.rmtree(p, ignore_errors=True)
    if stale:
        log.warning("removed %d temporary director%s left by an interrupted export: %s", len(stale),
                    "y" if len(stale) == 1 else "ies", ", ".join(p.name for p in stale))
    return stale


def atomic_directory(export_dir: str | Path, overwrite: bool, write: Callable[[Path], None]) -> Path:
    """Run ``write(tmp_dir)`` then rename ``tmp_dir`` to ``export_dir`` (replacing it if allowed)."""
    d = Path(export_dir)
    check_export_target(d, overwrite)
    d.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=d.parent, prefix=f".{d.name}.tmp-"))
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it 0700; a plain mkdir honours the umask
        write(tmp)
        if d.exists():
            old = Path(tempfile.mkdtemp(dir=d.parent, prefix=f".{d.name}.old-"))
            os.rmdir(old)
            os.replace(d, old)
            os.replace(tmp, d)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, d)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return d
