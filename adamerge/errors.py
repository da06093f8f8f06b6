"""Which exceptions are the user's to fix (printed as one line) rather than bugs (traceback)."""

from __future__ import annotations

from omegaconf.errors import OmegaConfBaseException

USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, PermissionError,
                                                FloatingPointError, OmegaConfBaseException)


def is_user_error(e: BaseException) -> bool:
    return isinstance(e, USER_ERRORS)
