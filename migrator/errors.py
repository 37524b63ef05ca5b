"""Every error migrator raises on purpose, and the exit status each one maps to.

    MigratorError                 base; carries a one-line message for the user
    ├── UsageError                bad command line (exit 2)
    ├── ManifestError             bad manifest: one or more ManifestProblem (exit 2)
    ├── LedgerError               ledger unreadable, unwritable or from the future (exit 2)
    ├── LockHeldError             another run holds the ledger's lock (exit 75)
    ├── ConfigError               missing API key, unwritable path, ... (exit 2)
    ├── DiskError                 the local disk failed: full, read-only, gone (exit 74)
    └── UploadError               raised by the client for one request
        ├── RetryableError        connection error, timeout, 408, 429, 5xx, error code in a 200
        ├── PermanentError        400 and other 4xx: this item fails for good
        ├── AuthRejectedError     401/403: the key is wrong; the whole run stops (exit 3)
        └── EndpointError         404/405 on an API endpoint: the base URL is wrong (exit 2)

Messages never contain the API key: the client builds them from the status
and the service's `msg`, never from request headers.
"""

from __future__ import annotations

import asyncio
import errno
from dataclasses import dataclass
from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0
    ITEMS_FAILED = 1
    USAGE = 2
    AUTH = 3
    INTERNAL = 70  # a bug of ours: the traceback is in the log file, not on the screen
    IO = 74  # the local disk failed us (full, read-only, gone)
    LOCKED = 75
    INTERRUPTED_INT = 130
    INTERRUPTED_TERM = 143


class MigratorError(Exception):
    """Base of every error meant for the user; `str(err)` is one line."""

    exit_code: ExitCode = ExitCode.USAGE


class UsageError(MigratorError):
    exit_code = ExitCode.USAGE


class ConfigError(MigratorError):
    exit_code = ExitCode.USAGE


class LedgerError(MigratorError):
    exit_code = ExitCode.USAGE


class LockHeldError(MigratorError):
    exit_code = ExitCode.LOCKED


DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO})
"""The errnos that mean the disk failed us, not that a path was wrong."""


class DiskError(MigratorError):
    """Writing to the local disk failed: full, read-only, gone. Not the user's input."""

    exit_code = ExitCode.IO


@dataclass(frozen=True, slots=True)
class ManifestProblem:
    """One thing wrong with a manifest, located as precisely as we can."""

    file: str
    line: int | None
    field: str | None
    message: str

    def __str__(self) -> str:
        where = self.file if self.line is None else f"{self.file}:{self.line}"
        what = f"{self.field}: " if self.field else ""
        return f"{where}: {what}{self.message}"


class ManifestError(MigratorError):
    exit_code = ExitCode.USAGE

    def __init__(self, problems: list[ManifestProblem]) -> None:
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


class UploadError(MigratorError):
    """A request to the File Upload API did not succeed."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class RetryableError(UploadError):
    def __init__(
        self, message: str, *, status: int | None = None, retry_after: float | None = None
    ) -> None:
        super().__init__(message, status=status)
        self.retry_after = retry_after


class PermanentError(UploadError):
    exit_code = ExitCode.ITEMS_FAILED


class AuthRejectedError(UploadError):
    exit_code = ExitCode.AUTH


class EndpointError(UploadError):
    exit_code = ExitCode.USAGE


def exit_code_of(error: BaseException) -> ExitCode:
    """The exit status a command that ended in `error` reports (pure)."""
    if isinstance(error, MigratorError):
        return error.exit_code
    if isinstance(error, KeyboardInterrupt | asyncio.CancelledError):
        return ExitCode.INTERRUPTED_INT
    return ExitCode.INTERNAL
