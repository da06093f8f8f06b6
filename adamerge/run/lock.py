"""One run at a time per out_dir: a lock file holding the owner's pid and host.

Two train.py processes writing one out_dir would interleave checkpoints (Lightning versions the clash as
``step000050-v1.ckpt``) and race for the export. The lock is taken before anything is written and released
when the run ends; a lock left by a process that died (same host, pid gone) is taken over, so that
``resume=last`` after a crash needs nothing removed by hand.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
from collections.abc import Iterator
from pathlib import Path

from ..errors import CheckpointError

log = logging.getLogger(__name__)

LOCK_NAME = ".adamerge.run.lock"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def _holder(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}  # being written, or garbage: treated as held by an unknown process


@contextlib.contextmanager
def out_dir_lock(out_dir: str | Path) -> Iterator[Path]:
    """Hold ``out_dir``'s lock inside the block; a CheckpointError naming the holder if another live run has it."""
    path = Path(out_dir) / LOCK_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    me = {"pid": os.getpid(), "host": socket.gethostname()}
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            break
        except FileExistsError:
            held = _holder(path)
            if held.get("host") == me["host"] and isinstance(held.get("pid"), int) and not _alive(held["pid"]):
                log.warning("out_dir %s was locked by process %d on this host, which is gone: lock taken over",
                            out_dir, held["pid"])
                path.unlink(missing_ok=True)
                continue
            who = f"process {held.get('pid', '?')} on host {held.get('host', '?')}"
            raise CheckpointError(f"out_dir {out_dir} is in use by another run ({who}); wait for it or give another "
                                  f"out_dir (if that run is gone, remove {path})") from None
    else:
        raise CheckpointError(f"out_dir {out_dir}: could not take the lock {path}")
    with os.fdopen(fd, "w") as f:
        json.dump(me, f)
    try:
        yield path
    finally:
        if _holder(path).get("pid") == me["pid"]:
            path.unlink(missing_ok=True)
