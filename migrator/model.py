"""Value types that flow between the rooms: manifest -> plan -> runner -> ledger.

All are frozen: a stage never changes what an earlier stage produced; it makes a
new value. Times are POSIX seconds (UTC) as floats everywhere inside the
program; they become ISO-8601 only at the edges (exports, logs, the CLI).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

KIB = 1024
MIB = 1024 * KIB
GIB = 1024 * MIB
HOUR = 3600.0

BASE64_LIMIT = 10 * MIB
"""The docs: base64 is not for files above 10 MB (it adds a third in size)."""
URL_LIMIT = 100 * MIB
"""The docs: URL uploads are recommended up to 100 MB (the service fetches in 30 s)."""

EMBEDDED = "embedded"
"""The `target.base_url` that means: start the emulator in-process."""


class Method(StrEnum):
    AUTO = "auto"
    BASE64 = "base64"
    STREAM = "stream"
    URL = "url"


class SourceKind(StrEnum):
    FILE = "file"
    URL = "url"


class ItemState(StrEnum):
    PENDING = "pending"  # known, not uploaded yet
    DONE = "done"  # uploaded; download_url and expires_at are set
    FAILED = "failed"  # a permanent error, or retries exhausted
    INTERRUPTED = "interrupted"  # in flight when the run was stopped
    LOST = "lost"  # expired on the service with no source left to upload again


# -- the manifest ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Settings:
    concurrency: int = 8
    base64_max: int = 1 * MIB
    url_max: int = 100 * MIB
    retries: int = 5
    ttl: float = 72 * HOUR
    refresh_within: float = 12 * HOUR


@dataclass(frozen=True, slots=True)
class Target:
    base_url: str  # an http(s) URL, or EMBEDDED
    api_key_env: str = "KIE_API_KEY"
    api_key_file: Path | None = None  # absolute; wins over the environment when set
    upload_path: str = ""  # prefix of every uploadPath, no leading/trailing '/'

    @property
    def is_embedded(self) -> bool:
        return self.base_url == EMBEDDED


@dataclass(frozen=True, slots=True)
class Outputs:
    """Files rewritten atomically after every run, refresh and download."""

    jsonl: Path | None = None
    csv: Path | None = None
    json: Path | None = None
    metrics: Path | None = None


@dataclass(frozen=True, slots=True)
class SourceOptions:
    """What any source may override."""

    file_name: str | None = None
    upload_path: str | None = None  # appended to target.upload_path
    method: Method = Method.AUTO


@dataclass(frozen=True, slots=True)
class PathSource:
    path: Path  # absolute
    options: SourceOptions = field(default_factory=SourceOptions)
    line: int | None = None  # where the source starts in the manifest


@dataclass(frozen=True, slots=True)
class GlobSource:
    pattern: str  # as written, relative to the manifest's folder unless absolute
    root: Path  # absolute: the pattern's longest prefix without wildcards
    relative_pattern: str  # the rest of the pattern, matched against paths below root
    exclude: tuple[str, ...] = ()  # patterns matched against paths below root
    options: SourceOptions = field(default_factory=SourceOptions)
    line: int | None = None


@dataclass(frozen=True, slots=True)
class UrlSource:
    url: str
    options: SourceOptions = field(default_factory=SourceOptions)
    line: int | None = None


@dataclass(frozen=True, slots=True)
class UrlListSource:
    path: Path  # absolute
    options: SourceOptions = field(default_factory=SourceOptions)
    line: int | None = None


Source = PathSource | GlobSource | UrlSource | UrlListSource


@dataclass(frozen=True, slots=True)
class Manifest:
    path: Path  # absolute path of the manifest file
    name: str
    target: Target
    ledger: Path  # absolute
    settings: Settings
    sources: tuple[Source, ...]
    outputs: Outputs = field(default_factory=Outputs)
    version: int = 1

    @property
    def base_dir(self) -> Path:
        return self.path.parent


# -- the plan -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PlanItem:
    """One file to put at one place on the service."""

    source: str  # absolute local path, or the URL
    kind: SourceKind
    upload_path: str  # full uploadPath sent to the service
    file_name: str
    size: int | None  # None: a remote file whose size the origin did not tell
    method: Method  # resolved, never AUTO
    method_forced: bool = False  # the manifest named the method: no fallback
    mtime_ns: int | None = None  # local files
    etag: str | None = None  # remote files, when the origin gives them
    last_modified: str | None = None

    @property
    def key(self) -> tuple[str, str]:
        return (self.upload_path, self.file_name)


# -- the service's answers ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class UploadReceipt:
    """What the service said about a successful upload, in either documented shape."""

    download_url: str
    file_name: str | None = None
    upload_path: str | None = None
    file_id: str | None = None
    file_size: int | None = None
    mime_type: str | None = None
    uploaded_at: float | None = None
    expires_at: float | None = None  # None: the response had no expiresAt


# -- the ledger -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LedgerItem:
    """One row of the ledger's items table."""

    id: int
    target: str  # manifest's target.base_url as written ("embedded" included)
    upload_path: str
    file_name: str
    source: str
    kind: SourceKind
    size: int | None
    mtime_ns: int | None
    etag: str | None
    last_modified: str | None
    sha256: str | None
    method: Method | None
    state: ItemState
    download_url: str | None
    file_id: str | None
    uploaded_at: float | None
    expires_at: float | None
    attempts: int
    last_error: str | None
    downloaded_path: str | None = None
    downloaded_at: float | None = None
    updated_at: float | None = None

    @property
    def key(self) -> tuple[str, str]:
        return (self.upload_path, self.file_name)


@dataclass(frozen=True, slots=True)
class AttemptRecord:
    """One request (or one streamed transfer) made for one item."""

    run_id: int
    target: str
    upload_path: str
    file_name: str
    method: Method
    attempt: int  # 1-based number of this attempt for the item within the run
    started_at: float
    duration: float
    outcome: str  # "ok", "retry", "failed", "auth", "interrupted"
    http_status: int | None = None
    bytes_sent: int = 0
    error: str | None = None


@dataclass(frozen=True, slots=True)
class ItemUpdate:
    """A change to one item, written by the runner or the lifecycle commands.

    Fields left None keep what the ledger holds (download_url, file_id, uploaded_at,
    expires_at, sha256, downloaded_*), so a failed refresh never forgets a link
    that is still alive. `state`, `last_error` and the source identity are always
    written as given.
    """

    target: str
    upload_path: str
    file_name: str
    source: str
    kind: SourceKind
    state: ItemState
    size: int | None = None
    mtime_ns: int | None = None
    etag: str | None = None
    last_modified: str | None = None
    sha256: str | None = None
    method: Method | None = None
    download_url: str | None = None
    file_id: str | None = None
    uploaded_at: float | None = None
    expires_at: float | None = None
    last_error: str | None = None
    attempts_added: int = 0
    downloaded_path: str | None = None
    downloaded_at: float | None = None
