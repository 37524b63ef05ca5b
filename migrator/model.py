"""Value types that flow between the rooms: manifest -> plan -> runner -> ledger.

All are frozen: a stage never changes what an earlier stage produced; it makes a
new value. Times are POSIX seconds (UTC) as floats everywhere inside the
program; they become ISO-8601 only at the edges (exports, logs, the CLI).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from enum import Enum, StrEnum
from pathlib import Path
from typing import Any, overload

from migrator.filters import Filters
from migrator.shard import Shard

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
    COPY = "copy"  # recorded, never planned: the service copied an identical file's link


PLANNABLE_METHODS = (Method.AUTO, Method.BASE64, Method.STREAM, Method.URL)
"""The methods a manifest may name (COPY is what dedup records, not a choice)."""


class SourceKind(StrEnum):
    FILE = "file"
    URL = "url"


class ItemState(StrEnum):
    PENDING = "pending"  # known, not uploaded yet
    DONE = "done"  # uploaded; download_url and expires_at are set
    FAILED = "failed"  # a permanent error, or retries exhausted
    INTERRUPTED = "interrupted"  # in flight when the run was stopped
    DEAD = "dead"  # its link answered 404/410: the service no longer has the file
    MISMATCH = "mismatch"  # its link serves another size than was uploaded
    LOST = "lost"  # gone from the service with no source left to upload again


LINKED_STATES = frozenset({ItemState.DONE, ItemState.DEAD, ItemState.MISMATCH})
"""States whose row records a link (which may or may not still work)."""


class Outcome(StrEnum):
    """What became of one item in one command."""

    UPLOADED = "uploaded"
    REFRESHED = "refreshed"
    DOWNLOADED = "downloaded"
    ALIVE = "alive"  # verify: the link answers with the recorded size
    SKIPPED = "skipped"
    FAILED = "failed"
    LOST = "lost"  # expired (or dead) with no source left
    DEAD = "dead"  # the link answers 404/410
    MISMATCH = "mismatch"  # the link serves another size
    INTERRUPTED = "interrupted"

    @property
    def is_bad(self) -> bool:
        """Outcomes that make the command exit 1."""
        return self in _BAD_OUTCOMES


_BAD_OUTCOMES = frozenset({Outcome.FAILED, Outcome.LOST, Outcome.DEAD, Outcome.MISMATCH})


# -- the manifest ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Settings:
    concurrency: int = 8
    base64_max: int = 1 * MIB
    url_max: int = 100 * MIB
    retries: int = 5
    ttl: float = 72 * HOUR
    refresh_within: float = 12 * HOUR
    tps_limit: float | None = None  # requests per second to the service
    bwlimit: int | None = None  # bytes per second through this machine
    timeout: float = 120.0  # seconds a read may wait for the next bytes of an answer
    connect_timeout: float = 15.0  # seconds to open a connection
    min_rate: int = 16 * KIB  # bytes/s below which a whole transfer is given up on
    max_size: int = 10 * GIB  # the most bytes read from a body whose size nobody told
    outage_limit: float = 600.0  # seconds the service may fail every request before a stop
    settle: float = 15.0  # seconds an upload whose answer never came gets to land
    allow_private_origins: bool = False  # a stream-through may be redirected to private nets
    dedup: bool = True  # a file identical to one the service holds is copied there, not sent
    checksum: bool = False  # local files are compared by sha256 (as --checksum)


@dataclass(frozen=True, slots=True)
class Target:
    base_url: str  # an http(s) URL, or EMBEDDED
    api_key_env: str = "KIE_API_KEY"
    api_key_file: Path | None = None  # absolute; used when api_key_env's variable is unset
    upload_path: str = ""  # prefix of every uploadPath, no leading/trailing '/'
    ca_bundle: Path | None = None  # PEM certificates trusted besides the system's

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
    metrics_push: str | None = None  # a Prometheus Pushgateway's URL, not a file


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
    follow_symlinks: bool = False  # links to files that stay inside root are taken
    require_match: bool = False  # matching nothing is an error, not a warning


@dataclass(frozen=True, slots=True)
class UrlSource:
    url: str
    options: SourceOptions = field(default_factory=SourceOptions)
    line: int | None = None
    immutable: bool = False  # the file at the URL never changes: what the ledger knows holds


@dataclass(frozen=True, slots=True)
class UrlListSource:
    path: Path  # absolute
    options: SourceOptions = field(default_factory=SourceOptions)
    line: int | None = None
    immutable: bool = False  # as UrlSource.immutable, for every URL of the list


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
    shard: Shard | None = None  # --shard K/N: this process's share of the items
    ledger_url: str | None = None  # a PostgreSQL ledger that many processes share
    filters: Filters = field(default_factory=Filters)  # the command line's selection

    @property
    def base_dir(self) -> Path:
        return self.path.parent

    def holds(self, upload_path: str, file_name: str) -> bool:
        """Whether the item landing at upload_path/file_name is this process's to handle."""
        return self.shard is None or self.shard.holds(upload_path, file_name)


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


class LocalItems(Sequence[PlanItem]):
    """Plan items of local files of one folder, all of one source, held as columns: what
    the plan of a big tree is mostly made of. A `PlanItem` is made only when one is
    asked for (a run takes them one by one); `plan` prints from the columns."""

    __slots__ = ("folder", "forced", "methods", "mtimes", "names", "sizes", "upload_path")

    def __init__(
        self,
        folder: str,
        upload_path: str,
        names: Sequence[str],
        sizes: Sequence[int],
        mtimes: Sequence[int],
        methods: Sequence[Method],
        *,
        forced: bool,
    ) -> None:
        self.folder = folder  # each item's source is folder/name
        self.upload_path = upload_path
        self.names = names
        self.sizes = sizes
        self.mtimes = mtimes
        self.methods = methods
        self.forced = forced

    def __len__(self) -> int:
        return len(self.names)

    @overload
    def __getitem__(self, index: int) -> PlanItem: ...
    @overload
    def __getitem__(self, index: slice) -> Sequence[PlanItem]: ...
    def __getitem__(self, index: int | slice) -> PlanItem | Sequence[PlanItem]:
        if isinstance(index, slice):
            return [self._item(i) for i in range(*index.indices(len(self.names)))]
        return self._item(range(len(self.names))[index])

    def __iter__(self) -> Iterator[PlanItem]:
        return map(self._item, range(len(self.names)))

    def keys(self) -> list[tuple[str, str]]:
        """Each item's `key`, in order."""
        upload_path = self.upload_path
        return [(upload_path, name) for name in self.names]

    def _item(self, index: int) -> PlanItem:
        name = self.names[index]
        return PlanItem(
            f"{self.folder}/{name}",
            SourceKind.FILE,
            self.upload_path,
            name,
            self.sizes[index],
            self.methods[index],
            self.forced,
            self.mtimes[index],
        )


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
    checked_at: float | None = None  # when a check last found its link serving its bytes
    dead_at: float | None = None  # when its link was found dead (or serving other bytes)
    uncertain_at: float | None = None  # an upload whose answer never came may land later

    @property
    def key(self) -> tuple[str, str]:
        return (self.upload_path, self.file_name)

    @property
    def has_link(self) -> bool:
        """The row records a link that may be checked (alive, or found dead)."""
        return bool(self.download_url) and self.state in LINKED_STATES


@dataclass(frozen=True, slots=True)
class AttemptRecord:
    """One request (or one streamed transfer) made for one item."""

    run_id: int
    target: str
    upload_path: str
    file_name: str
    method: str  # the Method of an upload, or "download", "probe"
    attempt: int  # 1-based number of this attempt for the item within the run
    started_at: float
    duration: float
    outcome: str  # ok, retry, next, failed, auth, endpoint, interrupted
    http_status: int | None = None
    bytes_sent: int = 0
    error: str | None = None


class Keep(Enum):
    """The ledger keeps what it holds for this field (an ItemUpdate's default)."""

    KEEP = "keep"


KEEP = Keep.KEEP


@dataclass(frozen=True, slots=True)
class Uploaded:
    """What one successful upload put on the service, as far as it is proven."""

    method: Method
    download_url: str
    file_id: str | None
    uploaded_at: float
    expires_at: float
    size: int | None  # bytes the service holds (sent, or its own fileSize)
    sha256: str | None  # of the bytes sent; None when they did not pass through here


@dataclass(frozen=True, slots=True)
class ItemUpdate:
    """A change to one item, written by the operations (run, refresh, download).

    Every field after `state` is KEEP (the ledger keeps what it holds), None (the
    field is cleared) or a value. Build one with the named constructors, which say
    which facts each event proves: a failed refresh never forgets a link that is
    still alive, and new bytes never keep the download of the old ones.
    """

    target: str
    upload_path: str
    file_name: str
    state: ItemState | Keep
    source: str | Keep = KEEP
    kind: SourceKind | Keep = KEEP
    size: int | Keep | None = KEEP
    mtime_ns: int | Keep | None = KEEP
    etag: str | Keep | None = KEEP
    last_modified: str | Keep | None = KEEP
    sha256: str | Keep | None = KEEP
    method: Method | Keep | None = KEEP
    download_url: str | Keep | None = KEEP
    file_id: str | Keep | None = KEEP
    uploaded_at: float | Keep | None = KEEP
    expires_at: float | Keep | None = KEEP
    last_error: str | Keep | None = KEEP
    downloaded_path: str | Keep | None = KEEP
    downloaded_at: float | Keep | None = KEEP
    checked_at: float | Keep | None = KEEP
    dead_at: float | Keep | None = KEEP
    uncertain_at: float | Keep | None = KEEP
    attempts_added: int = 0

    @classmethod
    def pending(cls, target: str, item: PlanItem, error: str | None = None) -> ItemUpdate:
        """A planned item the ledger learns of, before its first attempt (or a new item
        that a stopped run never reached): the source it describes, nothing sent."""
        return cls.tried(target, item, ItemState.PENDING, error, attempts=0)

    @classmethod
    def done(
        cls,
        target: str,
        item: PlanItem,
        upload: Uploaded,
        *,
        mtime_ns: int | None,
        same_bytes: bool,
        attempts: int,
    ) -> ItemUpdate:
        """`item` was uploaded: the row describes the bytes that were sent (their size,
        hash and mtime when read), not the ones planned. `same_bytes`: the row's old
        bytes were sent again, so a download of them is still a copy."""
        stale_download: dict[str, Any] = (
            {} if same_bytes else {"downloaded_path": None, "downloaded_at": None}
        )
        return cls(
            target,
            item.upload_path,
            item.file_name,
            ItemState.DONE,
            **{
                **_described_source(item),
                "size": upload.size,
                "mtime_ns": mtime_ns if mtime_ns is not None else item.mtime_ns,
                "method": upload.method,
            },
            sha256=upload.sha256,
            download_url=upload.download_url,
            file_id=upload.file_id,
            uploaded_at=upload.uploaded_at,
            expires_at=upload.expires_at,
            last_error=None,
            attempts_added=attempts,
            checked_at=None,
            dead_at=None,
            **stale_download,
        )

    @classmethod
    def refreshed(
        cls, row: LedgerItem, upload: Uploaded, *, attempts: int, same_bytes: bool = True
    ) -> ItemUpdate:
        """The same bytes were uploaded again to the same name: a new link and expiry;
        the source, its hash (when this copy did not prove one) and the download stay.
        `same_bytes` False: other bytes went (a source changed unseen); the row says
        which, and a download of the old ones is no longer a copy."""
        if not same_bytes:
            return replace(
                cls.refreshed(row, upload, attempts=attempts),
                size=upload.size,
                sha256=upload.sha256,
                downloaded_path=None,
                downloaded_at=None,
            )
        return cls(
            row.target,
            row.upload_path,
            row.file_name,
            ItemState.DONE,
            sha256=upload.sha256 if upload.sha256 is not None else KEEP,
            method=upload.method,
            download_url=upload.download_url,
            file_id=upload.file_id,
            uploaded_at=upload.uploaded_at,
            expires_at=upload.expires_at,
            last_error=None,
            attempts_added=attempts,
            checked_at=None,
            dead_at=None,
        )

    @classmethod
    def noted(
        cls, row: LedgerItem, state: ItemState, error: str | None, *, attempts: int = 0
    ) -> ItemUpdate:
        """A known item's state and last error change; everything it records stays."""
        return cls(
            row.target,
            row.upload_path,
            row.file_name,
            state,
            last_error=error,
            attempts_added=attempts,
        )

    @classmethod
    def touched(cls, row: LedgerItem, mtime_ns: int | None) -> ItemUpdate:
        """--checksum found the row's bytes under a new mtime: the row takes it, so the
        next run judges by size and mtime again instead of hashing the file."""
        return cls(row.target, row.upload_path, row.file_name, KEEP, mtime_ns=mtime_ns)

    @classmethod
    def tried(
        cls, target: str, item: PlanItem, state: ItemState, error: str | None, *, attempts: int
    ) -> ItemUpdate:
        """An item that is not done was tried and is not done yet (failed, interrupted):
        the row describes the source that was tried."""
        return cls(
            target,
            item.upload_path,
            item.file_name,
            state,
            last_error=error,
            attempts_added=attempts,
            **_described_source(item),
        )

    @classmethod
    def link_alive(cls, row: LedgerItem, at: float) -> ItemUpdate:
        """A check found the row's link serving its bytes (a dead one came back); any
        doubt about a late upload is settled."""
        return cls(
            row.target,
            row.upload_path,
            row.file_name,
            ItemState.DONE,
            checked_at=at,
            dead_at=None,
            uncertain_at=None,
            last_error=None if row.state is not ItemState.DONE else KEEP,
        )

    @classmethod
    def uncertain(cls, target: str, upload_path: str, file_name: str, at: float) -> ItemUpdate:
        """An upload of this item may land later than its answer (none came, or a kill cut
        it): its link is to be checked once that had time to happen."""
        return cls(target, upload_path, file_name, KEEP, uncertain_at=at)

    @classmethod
    def link_dead(
        cls, row: LedgerItem, state: ItemState, reason: str, at: float, *, attempts: int = 0
    ) -> ItemUpdate:
        """Evidence that the row's link no longer serves its bytes (DEAD or MISMATCH):
        the link is kept, for the record; the state says it does not work."""
        return cls(
            row.target,
            row.upload_path,
            row.file_name,
            state,
            last_error=reason,
            dead_at=row.dead_at if row.dead_at is not None else at,
            uncertain_at=None,
            attempts_added=attempts,
        )

    @classmethod
    def downloaded(cls, row: LedgerItem, path: str, at: float, sha256: str | None) -> ItemUpdate:
        """The item's bytes are at `path` since `at`; a hash the row lacked is learnt."""
        return cls(
            row.target,
            row.upload_path,
            row.file_name,
            row.state,
            sha256=sha256 if row.sha256 is None and sha256 is not None else KEEP,
            downloaded_path=path,
            downloaded_at=at,
        )


def _described_source(item: PlanItem) -> dict[str, Any]:
    """The fields of a row that say which source (and which version of it) it describes."""
    return {
        "source": item.source,
        "kind": item.kind,
        "size": item.size,
        "mtime_ns": item.mtime_ns,
        "etag": item.etag,
        "last_modified": item.last_modified,
        "method": item.method,
    }


ITEM_UPDATE_FIELDS: tuple[str, ...] = (
    "state",
    "source",
    "kind",
    "size",
    "mtime_ns",
    "etag",
    "last_modified",
    "sha256",
    "method",
    "download_url",
    "file_id",
    "uploaded_at",
    "expires_at",
    "last_error",
    "downloaded_path",
    "downloaded_at",
    "checked_at",
    "dead_at",
    "uncertain_at",
)
"""The fields of an ItemUpdate that may be kept, cleared or set."""
