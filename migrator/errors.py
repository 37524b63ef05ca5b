"""Every error migrator raises on purpose, and the exit status each one maps to.

    MigratorError                 base; carries a one-line message for the user
    ├── UsageError                bad command line (exit 2)
    ├── ManifestError             bad manifest: one or more ManifestProblem (exit 2)
    ├── ConfigError               missing API key, unwritable path, ... (exit 2)
    ├── LedgerError               ledger unreadable, unwritable or from the future (exit 2)
    │   └── LedgerDiskError       the ledger's disk failed: full, read-only (exit 74)
    ├── LockHeldError             another run holds the ledger's lock (exit 75)
    ├── DiskError                 the local disk failed: full, read-only, gone (exit 74)
    ├── DestinationError          one download's destination is in the way (that item fails)
    │   └── DestinationDiskError  the destination's disk failed: the download stops (exit 74)
    └── UploadError               one request (to the service or an origin) did not succeed
        ├── RetryableError        connection error, timeout, 408, 429, 5xx, error code in a 200
        │   ├── SourceChangedError  the source changed while it was sent: read it again
        │   └── NoServiceError      nothing at the base URL answers (exit 69)
        │       ├── NotTheApiError  something answers, not like the API (exit 2)
        │       └── UntrustedCertificateError  its TLS certificate is not trusted (exit 69)
        ├── PermanentError        400 and other 4xx: this item fails for good
        │   ├── LinkGoneError     one of our links answers 404/410: the file is gone
        │   └── SourceGoneError   the source no longer has the bytes (deleted, changed)
        └── RunStoppingError      no item can succeed: the whole run stops
            ├── AuthRejectedError 401/403: the key is wrong (exit 3)
            ├── EndpointError     404/405 on an API endpoint: the base URL is wrong (exit 2)
            └── ServiceUnavailableError  every request failed past the outage limit (exit 69)

    Interrupted                   not an error of the user's: a stop was requested while
                                  an item waited to retry

`StopReason` names why a command stopped before its work was done, and
`stop_reason_for` is the one place that decides which errors stop a command.

Messages never contain the API key: the client builds them from the status
and the service's `msg`, never from request headers.
"""

from __future__ import annotations

import errno
import sys
from dataclasses import dataclass
from enum import IntEnum, StrEnum


class ExitCode(IntEnum):
    OK = 0
    ITEMS_FAILED = 1
    USAGE = 2
    AUTH = 3
    UNAVAILABLE = 69  # the service or the network is unavailable: try again later
    INTERNAL = 70  # a bug of ours: the traceback is in the log file, not on the screen
    IO = 74  # the local disk failed us (full, read-only, gone)
    LOCKED = 75
    INTERRUPTED_INT = 130
    INTERRUPTED_TERM = 143


DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO})
"""The errnos that mean the disk failed us, not that a path was wrong."""


class MigratorError(Exception):
    """Base of every error meant for the user; `str(err)` is one line."""

    exit_code: ExitCode = ExitCode.USAGE


class UsageError(MigratorError):
    exit_code = ExitCode.USAGE


class ConfigError(MigratorError):
    exit_code = ExitCode.USAGE


class LedgerError(MigratorError):
    exit_code = ExitCode.USAGE


class LedgerDiskError(LedgerError):
    """The ledger's disk failed (full, read-only, I/O error): exit 74, not a usage error."""

    exit_code = ExitCode.IO


MOVE_HINT = "use --ledger PATH or MIGRATOR_LEDGER_DIR to put it elsewhere"
"""What every message about a ledger (or its lock) that cannot be written ends with."""


def ledger_os_error(message: str, err: OSError) -> LedgerError:
    """`message` as the LedgerError an OSError calls for: a failing disk is exit 74."""
    kind = LedgerDiskError if err.errno in DISK_ERRNOS else LedgerError
    return kind(f"{message}: {err.strerror or err}; {MOVE_HINT}")


class LockHeldError(MigratorError):
    exit_code = ExitCode.LOCKED


class DiskError(MigratorError):
    """Writing to the local disk failed: full, read-only, gone. Not the user's input."""

    exit_code = ExitCode.IO


class DestinationError(MigratorError):
    """A download's destination is in the way (a file where a folder must go, no
    permission, a name too long): that item fails, the others go on."""

    exit_code = ExitCode.ITEMS_FAILED


class DestinationDiskError(DestinationError):
    """The destination's disk failed (full, read-only): no other item would fare better."""

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
    """A request to the File Upload API (or an origin) did not succeed.

    `uncertain`: the request may have reached the service and been acted on though no
    good answer came (a read timeout, a connection cut after sending, a gateway's 502):
    the upload may still land later, and replace what a retry put there.
    """

    def __init__(self, message: str, *, status: int | None = None, uncertain: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.uncertain = uncertain


class RetryableError(UploadError):
    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        retry_after: float | None = None,
        uncertain: bool = False,
    ) -> None:
        super().__init__(message, status=status, uncertain=uncertain)
        self.retry_after = retry_after


class SourceChangedError(RetryableError):
    """The source changed while it was sent: another attempt reads it again, whole."""


class NoServiceError(RetryableError):
    """Nothing at the base URL answers: the connection is refused, the host is unknown,
    TLS or the connect fails. Retried like any RetryableError; a command in which nothing
    has succeeded yet stops on it (exit 69: try again later)."""


class NotTheApiError(NoServiceError):
    """Something at the base URL answers, but not like the API (a 2xx that is not JSON):
    a command in which nothing has succeeded yet stops on it (exit 2: check the URL)."""


class UntrustedCertificateError(NoServiceError):
    """The server's TLS certificate does not verify (self-signed, a private CA that is
    not trusted, a name mismatch): verification stays on; the message says how to
    trust the CA. Exit 69 like any unreachable service."""


class PermanentError(UploadError):
    exit_code = ExitCode.ITEMS_FAILED


class LinkGoneError(PermanentError):
    """A link of ours answered 404 or 410: the service no longer has the file."""


class SourceGoneError(PermanentError):
    """The source no longer has the bytes that were planned or uploaded: the local file
    is gone, the origin answers 404/410, or it now serves another size."""


class RunStoppingError(UploadError):
    """No other item would fare better: the command stops (rclone's "fatal" errors)."""

    outcome = "stopped"  # what the attempt record says


class AuthRejectedError(RunStoppingError):
    exit_code = ExitCode.AUTH
    outcome = "auth"


class EndpointError(RunStoppingError):
    exit_code = ExitCode.USAGE
    outcome = "endpoint"


class ServiceUnavailableError(RunStoppingError):
    """The service failed every request for longer than the outage limit: the command
    stops, items not done stay as they were, and the next run goes on (exit 69)."""

    exit_code = ExitCode.UNAVAILABLE
    outcome = "unavailable"


class Interrupted(Exception):
    """A stop was requested while an item waited to retry."""


class StopReason(StrEnum):
    """Why a command stopped before its work was done."""

    AUTH = "auth"  # the service rejected the key
    ENDPOINT = "endpoint"  # the base URL does not serve the API
    NO_SERVICE = "no_service"  # something answered, but not like the API, before anything worked
    UNAVAILABLE = "unavailable"  # the service or network did not answer: try again later
    DISK = "disk"  # a local disk failed (a download's destination)
    SIGINT = "sigint"
    SIGTERM = "sigterm"

    @property
    def exit_code(self) -> ExitCode:
        return _STOP_EXIT_CODES[self]


_STOP_EXIT_CODES = {
    StopReason.AUTH: ExitCode.AUTH,
    StopReason.ENDPOINT: ExitCode.USAGE,
    StopReason.NO_SERVICE: ExitCode.USAGE,
    StopReason.UNAVAILABLE: ExitCode.UNAVAILABLE,
    StopReason.DISK: ExitCode.IO,
    StopReason.SIGINT: ExitCode.INTERRUPTED_INT,
    StopReason.SIGTERM: ExitCode.INTERRUPTED_TERM,
}


def stop_reason_for(error: BaseException, *, anything_worked: bool) -> StopReason | None:
    """Whether `error`, met by one item, stops the whole command, and why (pure).

    A rejected key or a wrong endpoint always does; a service that cannot be reached
    does only before anything worked (later it is an outage that items wait out or
    fail on); a failing destination disk does. Anything else is the item's own failure.
    """
    if isinstance(error, AuthRejectedError):
        return StopReason.AUTH
    if isinstance(error, EndpointError):
        return StopReason.ENDPOINT
    if isinstance(error, ServiceUnavailableError):
        return StopReason.UNAVAILABLE
    if isinstance(error, NotTheApiError) and not anything_worked:
        return StopReason.NO_SERVICE
    if isinstance(error, NoServiceError) and not anything_worked:
        return StopReason.UNAVAILABLE
    if isinstance(error, DestinationDiskError):
        return StopReason.DISK
    return None


def stop_message(reason: StopReason, error: BaseException) -> str:
    """The one line a command prints when `error` stopped it."""
    if reason is StopReason.NO_SERVICE:
        return f"{error}; is target.base_url right? Nothing was marked failed: run again"
    if isinstance(error, UntrustedCertificateError):
        return f"{error}; nothing was marked failed"
    if reason is StopReason.UNAVAILABLE:
        return (
            f"{error}; the service is unavailable (or target.base_url is wrong): "
            "nothing was marked failed, run again later"
        )
    return str(error)


def exit_code_of(error: BaseException) -> ExitCode:
    """The exit status a command that ended in `error` reports (pure)."""
    if isinstance(error, MigratorError):
        return error.exit_code
    if isinstance(error, KeyboardInterrupt) or _is_cancellation(error):
        return ExitCode.INTERRUPTED_INT
    return ExitCode.INTERNAL


def _is_cancellation(error: BaseException) -> bool:
    # Without asyncio loaded nothing can have been cancelled, and importing it costs the
    # command line a tenth of a second at every start.
    asyncio = sys.modules.get("asyncio")
    return asyncio is not None and isinstance(error, asyncio.CancelledError)
