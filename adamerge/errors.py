"""Every error class of adamerge; which exceptions are the user's to fix (printed as one line) rather
than bugs (traceback); the unknown-key check."""

from __future__ import annotations

import difflib
import errno
import signal
from collections.abc import Iterable

from omegaconf.errors import OmegaConfBaseException


class AdamergeError(Exception):
    """The base of the errors a user fixes (a config key, a data file, a model, a checkpoint, the export
    target): printed as one line. Anything else — a plain ValueError included — is a bug and shows its
    traceback."""


# besides adamerge's own: missing or unreadable files the user named, Hydra/OmegaConf config errors, and a
# loss that became non-finite (the learning rate, or method.nonfinite=skip)
USER_ERRORS: tuple[type[BaseException], ...] = (AdamergeError, FileNotFoundError, PermissionError,
                                                FloatingPointError, OmegaConfBaseException)


# OS errors about the user's disk, not a bug: a full disk, a quota, a read-only file system
USER_OS_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES)


class Interrupted(Exception):
    """Training stopped by SIGTERM or SIGINT at a step boundary, ``last.ckpt`` written."""

    def __init__(self, signum: int):
        super().__init__(f"interrupted by {signal.Signals(signum).name}")
        self.signum = signum


class ConfigError(AdamergeError, ValueError):
    """A config value of the wrong type or out of range, or an unknown key; names the key."""


class CheckpointError(AdamergeError, ValueError):
    """A checkpoint that cannot be resumed here: foreign, from another pool/method, or corrupt."""


class DataError(AdamergeError, ValueError):
    """A problem with calibration or test data: names the task and file at fault."""


class ExportError(AdamergeError, ValueError):
    """The export target cannot be written (exists and not overwritable, not writable, ...)."""


class PoolError(AdamergeError, ValueError):
    """A problem with the models of a pool: always names the expert/file and tensor at fault."""


def is_user_error(e: BaseException) -> bool:
    return isinstance(e, USER_ERRORS) or (isinstance(e, OSError) and e.errno in USER_OS_ERRNOS)


def refuse_unknown_keys(keys: Iterable[str], valid: list[str], prefix: str, owner: str,
                        error: type[Exception] = ValueError) -> None:
    """``error`` naming the first key not in ``valid`` (and the nearest valid one) under ``prefix``."""
    for key in keys:
        if key not in valid:
            near = difflib.get_close_matches(str(key), valid, n=1, cutoff=0.6)
            near = near or [v for v in valid if len(v) >= 4 and str(key)[:4] == v[:4]][:1]  # scaling_factor: scale
            hint = f"did you mean '{prefix}.{near[0]}'? " if near else ""
            raise error(f"unknown config key '{prefix}.{key}' for {owner}; {hint}valid keys: {', '.join(valid)}")
