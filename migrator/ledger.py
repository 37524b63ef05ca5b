"""The SQLite ledger: what was uploaded where, with what result, run after run.

One process writes (the run lock sees to that); `status`, `export` and `plan`
open it read-only. Item updates and attempt records are buffered in memory and
written by a background task in batches, each batch one transaction, so a run
of a million small files does not pay a transaction per file. The price: a
process killed with SIGKILL loses at most what was buffered, i.e. less than one
batch plus `flush_interval` seconds of updates. Those items are simply uploaded
again on the next run, which is harmless because names are deterministic.

A ledger that cannot be read is reported with its path and never replaced or
modified; a ledger written by a newer migrator is refused.

`put_item` and `put_attempt` are synchronous and never block: they append to the
buffer and wake the flusher once a batch is full. The buffer stays small because
its producers (the workers) await between updates, which lets the flusher run;
if a flush fails (disk full), the batch is kept, the flusher keeps retrying, and
every put, flush and close raises LedgerError until a write succeeds.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import json
import os
import sqlite3
import time
from collections.abc import AsyncIterator, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, NamedTuple, Self, cast
from urllib.parse import quote

import aiosqlite

from migrator.errors import MOVE_HINT, LedgerDiskError, LedgerError, ledger_os_error
from migrator.lock import RunLock, lock_path_for
from migrator.model import (
    ITEM_UPDATE_FIELDS,
    KEEP,
    AttemptRecord,
    ItemState,
    ItemUpdate,
    LedgerItem,
    Manifest,
    Method,
    SourceKind,
)

if TYPE_CHECKING:
    from migrator.ledger_pg import PgLedger

BAD_STATES = (ItemState.FAILED, ItemState.DEAD, ItemState.MISMATCH, ItemState.LOST)
BUSY_TIMEOUT_MS = 10_000
WAL_SIZE_LIMIT = 1024 * 1024  # bytes the WAL may keep after a checkpoint
WAL_CHECKPOINT_PAGES = 100  # the WAL is folded into the file every ~400 KiB
LOOKUP_CHUNK = 500
PAGE_SIZE = 1000

# -- schema ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Migration:
    """One step of the schema, applied once, in order, inside one transaction."""

    version: int
    description: str
    statements: tuple[str, ...]


MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        version=1,
        description="runs, items and attempts",
        statements=(
            """CREATE TABLE runs (
                id INTEGER PRIMARY KEY,
                command TEXT,
                manifest TEXT,
                started_at REAL,
                finished_at REAL,
                status TEXT,
                pid INTEGER,
                summary TEXT
            )""",
            """CREATE TABLE items (
                id INTEGER PRIMARY KEY,
                target TEXT NOT NULL,
                upload_path TEXT NOT NULL,
                file_name TEXT NOT NULL,
                source TEXT NOT NULL,
                kind TEXT NOT NULL,
                size INTEGER,
                mtime_ns INTEGER,
                etag TEXT,
                last_modified TEXT,
                sha256 TEXT,
                method TEXT,
                state TEXT NOT NULL,
                download_url TEXT,
                file_id TEXT,
                uploaded_at REAL,
                expires_at REAL,
                attempts INTEGER NOT NULL DEFAULT 0,
                last_error TEXT,
                downloaded_path TEXT,
                downloaded_at REAL,
                updated_at REAL,
                UNIQUE (target, upload_path, file_name)
            )""",
            "CREATE INDEX items_target_state ON items (target, state)",
            "CREATE INDEX items_target_expires ON items (target, expires_at)",
            """CREATE TABLE attempts (
                id INTEGER PRIMARY KEY,
                run_id INTEGER,
                item_id INTEGER REFERENCES items (id) ON DELETE CASCADE,
                method TEXT,
                attempt INTEGER,
                started_at REAL,
                duration REAL,
                http_status INTEGER,
                outcome TEXT,
                bytes_sent INTEGER,
                error TEXT
            )""",
            "CREATE INDEX attempts_item ON attempts (item_id)",
        ),
    ),
    Migration(
        version=2,
        description="link checks, and facts about the service (its clock)",
        statements=(
            "ALTER TABLE items ADD COLUMN checked_at REAL",
            "ALTER TABLE items ADD COLUMN dead_at REAL",
            """CREATE TABLE facts (
                name TEXT PRIMARY KEY,
                value TEXT NOT NULL,
                updated_at REAL NOT NULL
            )""",
        ),
    ),
    Migration(
        version=3,
        description="uploads whose answer was uncertain, to be checked",
        statements=(
            "ALTER TABLE items ADD COLUMN uncertain_at REAL",
            "CREATE INDEX items_uncertain ON items (target, uncertain_at) "
            "WHERE uncertain_at IS NOT NULL",
        ),
    ),
    Migration(
        version=4,
        description="items found by their content (dedup)",
        statements=(
            "CREATE INDEX items_content ON items (target, sha256) WHERE sha256 IS NOT NULL",
        ),
    ),
    Migration(
        version=5,
        description="status read from indexes alone (a million items: a second less)",
        statements=(
            # counts and bytes by state, the expiry buckets and the next expiry: covered
            "DROP INDEX items_target_state",
            "CREATE INDEX items_target_state ON items (target, state, expires_at, size)",
            "CREATE INDEX items_downloaded ON items (target, downloaded_at) "
            "WHERE downloaded_at IS NOT NULL",
        ),
    ),
)
SCHEMA_VERSION = MIGRATIONS[-1].version

_CREATE_MIGRATIONS_TABLE = """CREATE TABLE IF NOT EXISTS schema_migrations (
    version INTEGER PRIMARY KEY,
    description TEXT NOT NULL,
    applied_at REAL NOT NULL
)"""

_ITEM_COLUMNS = (
    "id, target, upload_path, file_name, source, kind, size, mtime_ns, etag, last_modified, "
    "sha256, method, state, download_url, file_id, uploaded_at, expires_at, attempts, "
    "last_error, downloaded_path, downloaded_at, updated_at, checked_at, dead_at, uncertain_at"
)
_QUALIFIED_ITEM_COLUMNS = ", ".join(f"items.{c.strip()}" for c in _ITEM_COLUMNS.split(","))

# Each field of an ItemUpdate may be KEEP (:keep_<field> is 1: the row keeps its value),
# None (cleared) or a value; state and the attempt count are always written.
_REQUIRED = ("source", "kind", "state")  # NOT NULL: checked before ON CONFLICT, so an update that
# keeps them passes the row's own values (an item the ledger does not know then fails)


def _insert_value(name: str) -> str:
    if name not in _REQUIRED:
        return f":{name}"
    own = (
        f"SELECT {name} FROM items WHERE target = :target "
        "AND upload_path = :upload_path AND file_name = :file_name"
    )
    return f"COALESCE(:{name}, ({own}))"


_UPSERT_ITEM = f"""
INSERT INTO items (
    target, upload_path, file_name, attempts, updated_at, {", ".join(ITEM_UPDATE_FIELDS)}
) VALUES (
    :target, :upload_path, :file_name, :attempts_added, :updated_at,
    {", ".join(_insert_value(name) for name in ITEM_UPDATE_FIELDS)}
)
ON CONFLICT (target, upload_path, file_name) DO UPDATE SET
    attempts = items.attempts + excluded.attempts,
    updated_at = excluded.updated_at,
    {
    ", ".join(
        f"{name} = CASE WHEN :keep_{name} THEN items.{name} ELSE excluded.{name} END"
        for name in ITEM_UPDATE_FIELDS
    )
}
"""

_INSERT_ATTEMPT = """
INSERT INTO attempts (
    run_id, item_id, method, attempt, started_at, duration, http_status, outcome,
    bytes_sent, error
)
SELECT :run_id, id, :method, :attempt, :started_at, :duration, :http_status, :outcome,
    :bytes_sent, :error
FROM items WHERE target = :target AND upload_path = :upload_path AND file_name = :file_name
"""


@dataclass(frozen=True, slots=True)
class RunRow:
    """One row of the runs table."""

    id: int
    command: str
    manifest: str
    started_at: float
    finished_at: float | None
    status: str
    pid: int | None
    summary: dict[str, object] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class AttemptRow:
    """One row of the attempts table, with the command of the run that made it."""

    id: int
    run_id: int | None
    command: str | None
    method: str | None
    attempt: int | None
    started_at: float | None
    duration: float | None
    http_status: int | None
    outcome: str | None
    bytes_sent: int | None
    error: str | None


_ATTEMPT_COLUMNS = (
    "attempts.id, attempts.run_id, runs.command, attempts.method, attempts.attempt, "
    "attempts.started_at, attempts.duration, attempts.http_status, attempts.outcome, "
    "attempts.bytes_sent, attempts.error"
)


# -- pure helpers ---------------------------------------------------------------------------


def _item_params(update: ItemUpdate, now: float) -> dict[str, object]:
    params: dict[str, object] = {
        "target": update.target,
        "upload_path": update.upload_path,
        "file_name": update.file_name,
        "attempts_added": update.attempts_added,
        "updated_at": now,
    }
    for name, keep in _KEEP_KEYS:  # two puts an item: the loop is kept plain
        value = getattr(update, name)
        if value is KEEP:
            params[name], params[keep] = None, 1
        else:
            params[name] = value if type(value) in _PLAIN else _sql_value(value)
            params[keep] = 0
    return params


_KEEP_KEYS = tuple((name, f"keep_{name}") for name in ITEM_UPDATE_FIELDS)
_PLAIN = frozenset({str, int, float, type(None)})


def _fold(earlier: dict[str, object], later: dict[str, object]) -> None:
    """Make `earlier` (params of `_item_params`) what writing it, then `later`, of the
    same item would leave (pure but for `earlier`): a new item's pending row and its
    done row are one statement, not two."""
    earlier["attempts_added"] = cast(int, earlier["attempts_added"]) + cast(
        int, later["attempts_added"]
    )
    earlier["updated_at"] = later["updated_at"]
    for name, keep in _KEEP_KEYS:
        if not later[keep]:
            earlier[name], earlier[keep] = later[name], 0


def _sql_value(value: object) -> object:
    return value.value if isinstance(value, Enum) else value


def _attempt_params(record: AttemptRecord) -> dict[str, object]:
    return {
        "run_id": record.run_id,
        "target": record.target,
        "upload_path": record.upload_path,
        "file_name": record.file_name,
        "method": record.method,
        "attempt": record.attempt,
        "started_at": record.started_at,
        "duration": record.duration,
        "http_status": record.http_status,
        "outcome": record.outcome,
        "bytes_sent": record.bytes_sent,
        "error": record.error,
    }


# Enum(value) costs a microsecond a call, three a row, and a no-op re-run reads every row;
# a value not in these maps still goes through the Enum, for its ValueError.
_KINDS = {kind.value: kind for kind in SourceKind}
_METHODS = {method.value: method for method in Method}
_STATES = {state.value: state for state in ItemState}


def _row_to_item(row: Sequence[Any]) -> LedgerItem:
    method = row[11]
    return LedgerItem(
        id=row[0],
        target=row[1],
        upload_path=row[2],
        file_name=row[3],
        source=row[4],
        kind=_KINDS.get(row[5]) or SourceKind(row[5]),
        size=row[6],
        mtime_ns=row[7],
        etag=row[8],
        last_modified=row[9],
        sha256=row[10],
        method=None if method is None else _METHODS.get(method) or Method(method),
        state=_STATES.get(row[12]) or ItemState(row[12]),
        download_url=row[13],
        file_id=row[14],
        uploaded_at=row[15],
        expires_at=row[16],
        attempts=row[17],
        last_error=row[18],
        downloaded_path=row[19],
        downloaded_at=row[20],
        updated_at=row[21],
        checked_at=row[22],
        dead_at=row[23],
        uncertain_at=row[24],
    )


class Found(NamedTuple):
    """What `decide` reads of a ledger row (see `resume.Recorded`)."""

    state: ItemState
    source: str
    kind: SourceKind
    size: int | None
    mtime_ns: int | None
    etag: str | None
    last_modified: str | None
    sha256: str | None
    expires_at: float | None


_FOUND_COLUMNS = ", ".join(f"items.{name}" for name in ("upload_path", "file_name", *Found._fields))


def _row_to_found(row: Sequence[Any]) -> Found:
    state, kind = row[2], row[4]
    return Found(
        _STATES.get(state) or ItemState(state),
        row[3],
        _KINDS.get(kind) or SourceKind(kind),
        *row[5:],
    )


def _row_to_run(row: Sequence[Any]) -> RunRow:
    summary: dict[str, object] = {}
    if row[7]:
        with contextlib.suppress(ValueError):
            loaded = json.loads(row[7])
            if isinstance(loaded, dict):
                summary = loaded
    return RunRow(
        id=row[0],
        command=row[1] or "",
        manifest=row[2] or "",
        started_at=row[3],
        finished_at=row[4],
        status=row[5] or "",
        pid=row[6],
        summary=summary,
    )


def _where(target: str | None, *conditions: str) -> tuple[str, list[object]]:
    """A WHERE clause restricted to `target` when given, plus fixed conditions."""
    parts = list(conditions)
    params: list[object] = []
    if target is not None:
        parts.insert(0, "target = ?")
        params.append(target)
    return (" WHERE " + " AND ".join(parts)) if parts else "", params


def _item_filter(
    states: Collection[ItemState] | None,
    expiring_before: float | None,
    alive_at: float | None = None,
    kind: SourceKind | None = None,
    uncertain: bool = False,
) -> tuple[list[str], list[object]]:
    """Conditions (and their parameters) selecting items by state, expiry and kind."""
    conditions: list[str] = ["uncertain_at IS NOT NULL"] if uncertain else []
    params: list[object] = []
    if alive_at is not None:
        conditions.append("expires_at IS NOT NULL AND expires_at > ?")
        params.append(alive_at)
    if kind is not None:
        conditions.append("kind = ?")
        params.append(kind.value)
    if states is not None:
        chosen = sorted(ItemState(s).value for s in states)
        conditions.append(f"state IN ({', '.join('?' for _ in chosen)})")
        params += chosen
    if expiring_before is not None:
        conditions.append("expires_at IS NOT NULL AND expires_at < ?")
        params.append(expiring_before)
    return conditions, params


def describe_sqlite_error(path: Path, err: BaseException) -> str:
    """One line for the user about what went wrong with the ledger file at `path`."""
    text = str(err)
    lowered = text.lower()
    if "not a database" in lowered or "malformed" in lowered or "corrupt" in lowered:
        return (
            f"ledger {path} is not a readable migrator ledger ({text}); it was left "
            f"untouched: move it away, or {MOVE_HINT}"
        )
    if "disk is full" in lowered or "disk i/o" in lowered:
        return f"cannot write the ledger {path}: {text}; free some space, or {MOVE_HINT}"
    if "readonly" in lowered or "read-only" in lowered or "unable to open" in lowered:
        return f"cannot write the ledger {path}: {text}; {MOVE_HINT}"
    if "locked" in lowered or "busy" in lowered:
        return f"ledger {path} is busy ({text}); is another process using it?"
    return f"ledger {path}: {text}"


def _is_disk_failure(err: sqlite3.Error) -> bool:
    code = getattr(err, "sqlite_errorcode", None)
    if code is not None:
        # SQLITE_FULL, SQLITE_IOERR, SQLITE_READONLY (low byte: the primary code)
        return code & 0xFF in (13, 10, 8)
    lowered = str(err).lower()
    return "disk is full" in lowered or "disk i/o" in lowered or "readonly" in lowered


def ledger_error(path: Path, err: sqlite3.Error) -> LedgerError:
    """The LedgerError for a SQLite failure; a failing disk gets exit 74."""
    kind = LedgerDiskError if _is_disk_failure(err) else LedgerError
    return kind(describe_sqlite_error(path, err))


@contextlib.contextmanager
def _as_ledger_error(path: Path) -> Iterator[None]:
    try:
        yield
    except sqlite3.Error as err:
        raise ledger_error(path, err) from err
    except ValueError as err:  # an enum value this migrator does not know
        raise LedgerError(f"ledger {path} holds a value this migrator cannot read: {err}") from err


async def _wait_through_cancellation(task: asyncio.Future[None]) -> bool:
    """Wait until `task` is done even if we are cancelled meanwhile; True if we were.

    A flush that was sent must finish (commit or roll back) before anyone else uses
    the connection, or the next statement would land inside its transaction.
    """
    cancelled = False
    while not task.done():
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            cancelled = cancelled or not task.done()
        except Exception:
            break  # the task's own failure: read it from the task
    return cancelled


# -- opening --------------------------------------------------------------------------------


def _refuse_directory(path: Path) -> None:
    if path.is_dir():
        raise LedgerError(f"ledger {path} is a directory, not a ledger file; {MOVE_HINT}")


def _prepare_file(path: Path) -> None:
    """Create the parent (0700) and the file (0600) before SQLite does, with our modes."""
    _refuse_directory(path)
    try:
        if not path.parent.is_dir():
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        existed = path.exists()
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            if not existed:
                os.fchmod(fd, 0o600)
        finally:
            os.close(fd)
    except OSError as err:
        raise ledger_os_error(f"cannot create the ledger {path}", err) from err
    if not os.access(path, os.W_OK):
        raise LedgerError(f"cannot write the ledger {path}: permission denied; {MOVE_HINT}")


def _exists(path: Path) -> bool:
    return path.exists()


def _restrict_sidecars(path: Path) -> None:
    for suffix in ("-wal", "-shm"):
        with contextlib.suppress(OSError):
            Path(f"{path}{suffix}").chmod(0o600)


async def _table_names(conn: aiosqlite.Connection) -> set[str]:
    cursor = await conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
    return {str(row[0]) for row in await cursor.fetchall()}


async def _schema_version(conn: aiosqlite.Connection, path: Path) -> int:
    """0 for a fresh file; refuses a foreign database and one from a newer migrator."""
    tables = await _table_names(conn)
    if "schema_migrations" not in tables:
        if tables:
            raise LedgerError(
                f"{path} is a SQLite database but not a migrator ledger; it was left "
                f"untouched: {MOVE_HINT}"
            )
        return 0
    cursor = await conn.execute("SELECT MAX(version) FROM schema_migrations")
    row = await cursor.fetchone()
    version = int(row[0]) if row and row[0] is not None else 0
    if version > SCHEMA_VERSION:
        raise LedgerError(
            f"ledger {path} was written by a newer migrator (schema {version}); "
            f"this one knows schema {SCHEMA_VERSION}: upgrade migrator"
        )
    return version


async def _check_integrity(conn: aiosqlite.Connection, path: Path) -> None:
    """Refuse a damaged file before the first write. A damaged page may sit where only
    a later query would reach it, after this run had already written to the file.
    quick_check reads every page once: about 0.4 s for a million items."""
    cursor = await conn.execute("PRAGMA quick_check(1)")
    row = await cursor.fetchone()
    if row is not None and row[0] != "ok":
        damage = " ".join(str(row[0]).split())
        raise LedgerError(
            f"ledger {path} is not a readable migrator ledger (damaged: {damage}); it was "
            f"left untouched: move it away, or {MOVE_HINT}"
        )


async def _migrate(conn: aiosqlite.Connection, path: Path) -> None:
    await conn.execute("BEGIN IMMEDIATE")
    try:
        await conn.execute(_CREATE_MIGRATIONS_TABLE)
        current = await _schema_version(conn, path)
        for migration in MIGRATIONS:
            if migration.version <= current:
                continue
            for statement in migration.statements:
                await conn.execute(statement)
            await conn.execute(
                "INSERT INTO schema_migrations (version, description, applied_at) VALUES (?, ?, ?)",
                (migration.version, migration.description, time.time()),
            )
        await conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            await conn.execute("ROLLBACK")
        raise


async def _apply_schema_in_memory(conn: aiosqlite.Connection) -> None:
    await conn.execute(_CREATE_MIGRATIONS_TABLE)
    for migration in MIGRATIONS:
        for statement in migration.statements:
            await conn.execute(statement)


async def _connect(target: str, path: Path, *, uri: bool = False) -> aiosqlite.Connection:
    with _as_ledger_error(path):
        conn = await aiosqlite.connect(target, uri=uri, isolation_level=None)
    return conn


async def _open_writable(path: Path) -> aiosqlite.Connection:
    _prepare_file(path)
    conn = await _connect(str(path), path)
    try:
        with _as_ledger_error(path):
            await conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            # Read before any write, so a file that is not a ledger is never touched.
            await _schema_version(conn, path)
            await _check_integrity(conn, path)
            await conn.execute("PRAGMA journal_mode = WAL")
            # A WAL left at its high-water mark would hold megabytes a small disk needs:
            # fold it into the file every few hundred KiB, and shrink it when folded.
            await conn.execute(f"PRAGMA journal_size_limit = {WAL_SIZE_LIMIT}")
            await conn.execute(f"PRAGMA wal_autocheckpoint = {WAL_CHECKPOINT_PAGES}")
            await conn.execute("PRAGMA synchronous = NORMAL")
            await conn.execute("PRAGMA foreign_keys = ON")
            await _migrate(conn, path)
    except BaseException:
        await conn.close()
        raise
    _restrict_sidecars(path)
    return conn


async def _open_readonly(path: Path) -> tuple[aiosqlite.Connection, bool]:
    """The ledger at `path` read-only, and whether it is blank: no ledger there yet."""
    _refuse_directory(path)
    if _exists(path):
        conn = await _connect(f"file:{quote(str(path))}?mode=ro", path, uri=True)
        try:
            with _as_ledger_error(path):
                await conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
                version = await _schema_version(conn, path)
        except BaseException:
            await conn.close()
            raise
        if version == SCHEMA_VERSION:
            return conn, False
        await conn.close()
        if version != 0:
            raise LedgerError(
                f"ledger {path} has the older schema {version}: run `migrator run` once "
                "to upgrade it"
            )
    # No ledger yet: an empty view, so that plan and status never create one.
    conn = await _connect(":memory:", path)
    await _apply_schema_in_memory(conn)
    return conn, True


@contextlib.contextmanager
def locked(path: Path) -> Iterator[RunLock]:
    """Hold the run lock of the ledger at `path`; a lock file that cannot be written
    (disk full, read-only) is a LedgerError naming it, not a bare OSError."""
    lock = RunLock(path)
    try:
        lock.acquire()
    except OSError as err:
        where = lock_path_for(path)
        raise ledger_os_error(f"cannot write the lock file {where}", err) from None
    try:
        yield lock
    finally:
        lock.release()


# -- the ledger -----------------------------------------------------------------------------


class BaseLedger(abc.ABC):
    """What every ledger back end shares: buffered item updates and attempt records written
    by a background flusher in batches, and every query the commands read through.

    A back end gives the transactions (`_write_batch`, `_fetch`, runs and facts) and
    `where`, the place it names in messages (never a credential)."""

    shared = False  # True: many processes write it at once (leases, not the run lock)
    blank = False  # True: no ledger yet, read-only: no item to look up (a first plan)
    folds_updates = False  # True: an update of an item already buffered goes into that one
    # The items table, read whole or in id order a page at a time (every item of a target):
    # a back end whose planner would rather search an index on the target (and sort all
    # the target's items for each page) says so here.
    ITEMS_BY_ID = "items"

    def __init__(
        self, where: str, *, readonly: bool, batch_size: int, flush_interval: float
    ) -> None:
        self.where = where
        self.readonly = readonly
        self.batch_size = batch_size
        self.flush_interval = flush_interval
        self.flushes = 0  # committed batch transactions, for tests and stats
        self._db_lock = asyncio.Lock()
        self._items: list[dict[str, object]] = []
        self._buffered: dict[tuple[object, object, object], dict[str, object]] = {}
        self._attempts: list[dict[str, object]] = []
        self._wake = asyncio.Event()
        self._closing = False
        self._closed = False
        self._failure: LedgerError | None = None
        self._flusher: asyncio.Task[None] | None = None

    def _start_flusher(self) -> None:
        if not self.readonly:
            self._flusher = asyncio.create_task(self._flush_loop(), name="ledger-flusher")

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Write what is buffered, stop the background flusher and close."""
        if self._closed:
            return
        self._closing = True
        self._wake.set()
        try:
            if self._flusher is not None:
                await self._flusher
            if not self.readonly:
                await self.flush()
                await self._checkpoint()
        finally:
            self._closed = True
            await self._disconnect()

    @abc.abstractmethod
    async def _disconnect(self) -> None:
        """Close the connection (the last step of `close`)."""

    async def _checkpoint(self) -> None:  # noqa: B027 (most back ends have nothing to do)
        """After a failed flush, and on close: give back what the back end can (SQLite:
        its WAL)."""

    # -- writing ----------------------------------------------------------------------------

    @property
    def pending(self) -> int:
        """Updates and attempt records buffered and not yet written."""
        return len(self._items) + len(self._attempts)

    def put_item(self, update: ItemUpdate) -> None:
        """Buffer a change to one item; written with the next batch, in order."""
        self._check_writable()
        params = _item_params(update, time.time())
        if self.folds_updates:
            key = (update.target, update.upload_path, update.file_name)
            if (earlier := self._buffered.get(key)) is not None:
                _fold(earlier, params)
                return
            self._buffered[key] = params
        self._items.append(params)
        self._nudge()

    def put_attempt(self, record: AttemptRecord) -> None:
        """Buffer one attempt record; written after the item updates of its batch."""
        self._check_writable()
        self._attempts.append(_attempt_params(record))
        self._nudge()

    async def flush(self) -> None:
        """Write everything buffered in one transaction. Raises LedgerError on failure."""
        if self.readonly:
            return
        async with self._db_lock:
            if not self._items and not self._attempts:
                return
            items, self._items, self._buffered = self._items, [], {}
            attempts, self._attempts = self._attempts, []
            write = asyncio.ensure_future(self._write_batch(items, attempts))
            cancelled = await _wait_through_cancellation(write)
            failure = write.exception()
            if isinstance(failure, LedgerError):
                # Keep the batch (in front, to preserve order) for a later retry, and
                # give back what the WAL holds: on a full disk that may be the room.
                self._items[:0] = items
                self._attempts[:0] = attempts
                self._failure = failure
                await self._checkpoint()
                raise failure
            if failure is not None:
                raise failure
            self._failure = None
            self.flushes += 1
            if cancelled:
                raise asyncio.CancelledError

    @abc.abstractmethod
    async def start_run(self, command: str, manifest: str) -> int:
        """Record the start of a run (written at once) and return its id."""

    @abc.abstractmethod
    async def finish_run(self, run_id: int, status: str, summary: Mapping[str, object]) -> None:
        """Write what is buffered, then record the end of the run."""

    @abc.abstractmethod
    async def set_fact(self, name: str, value: object) -> None:
        """Remember one fact about the job or the service (JSON), written at once."""

    # -- reading ----------------------------------------------------------------------------

    async def fact(self, name: str) -> object:
        """A fact `set_fact` remembered, or None."""
        rows = await self._fetch("SELECT value FROM facts WHERE name = ?", [name])
        if not rows:
            return None
        try:
            return json.loads(rows[0][0])
        except ValueError:
            return None

    async def lookup(
        self, target: str, keys: Sequence[tuple[str, str]]
    ) -> dict[tuple[str, str], LedgerItem]:
        """The items among `keys` ((upload_path, file_name) pairs) the ledger knows."""
        rows = await self._lookup_rows(target, keys, _QUALIFIED_ITEM_COLUMNS)
        with self._errors():
            return {(row[2], row[3]): _row_to_item(row) for row in rows}

    async def lookup_found(
        self, target: str, keys: Sequence[tuple[str, str]]
    ) -> dict[tuple[str, str], Found]:
        """`lookup`, reading of each row only what deciding needs (a no-op re-run decides
        every item, and needs no item whole)."""
        rows = await self._lookup_rows(target, keys, _FOUND_COLUMNS)
        with self._errors():
            return {(row[0], row[1]): _row_to_found(row) for row in rows}

    async def _lookup_rows(
        self, target: str, keys: Sequence[tuple[str, str]], columns: str
    ) -> list[Sequence[Any]]:
        """These `columns` (of `items.`) of the items among `keys` the ledger knows."""
        found: list[Sequence[Any]] = []
        if self.blank:
            return found
        for start in range(0, len(keys), LOOKUP_CHUNK):
            chunk = keys[start : start + LOOKUP_CHUNK]
            params: list[object] = [part for key in chunk for part in key]
            params.append(target)
            # CROSS JOIN keeps the keys as the outer loop: one index search per key,
            # where `(a, b) IN (VALUES ...)` would scan every item of the target.
            sql = (
                f"WITH keys (upload_path, file_name) AS "
                f"(VALUES {', '.join('(?, ?)' for _ in chunk)}) "
                f"SELECT {columns} FROM keys CROSS JOIN items "
                "ON items.target = ? AND items.upload_path = keys.upload_path "
                "AND items.file_name = keys.file_name"
            )
            found += await self._fetch(sql, params)
        return found

    async def find_content(
        self,
        target: str,
        size: int,
        sha256: str,
        *,
        alive_at: float,
        other_than: tuple[str, str],
    ) -> LedgerItem | None:
        """A done item, not `other_than` ((upload_path, file_name)), holding bytes of this
        size and sha256, whose link lives past `alive_at`; the one that lives longest."""
        sql = (
            f"SELECT {_ITEM_COLUMNS} FROM items WHERE target = ? AND sha256 = ? AND size = ? "
            "AND state = ? AND download_url IS NOT NULL AND expires_at > ? "
            "AND NOT (upload_path = ? AND file_name = ?) ORDER BY expires_at DESC LIMIT 1"
        )
        params = [target, sha256, size, ItemState.DONE.value, alive_at, *other_than]
        rows = await self._fetch_items(sql, params)
        return rows[0] if rows else None

    async def get(self, target: str, upload_path: str, file_name: str) -> LedgerItem | None:
        """One item, or None."""
        found = await self.lookup(target, [(upload_path, file_name)])
        return found.get((upload_path, file_name))

    async def iter_items(
        self,
        target: str | None = None,
        *,
        states: Collection[ItemState] | None = None,
        expiring_before: float | None = None,
        alive_at: float | None = None,
        kind: SourceKind | None = None,
        uncertain: bool = False,
        page_size: int = PAGE_SIZE,
    ) -> AsyncIterator[LedgerItem]:
        """Items ordered by id, read a page at a time: of these `states`, expiring before
        `expiring_before`, still alive at `alive_at`, of this `kind`, whose last upload
        was uncertain (each when given)."""
        if states is not None and not states:
            return
        conditions, extra = _item_filter(states, expiring_before, alive_at, kind, uncertain)
        where, head = _where(target, "id > ?", *conditions)
        table = "items" if conditions else self.ITEMS_BY_ID
        sql = f"SELECT {_ITEM_COLUMNS} FROM {table}{where} ORDER BY id LIMIT ?"
        last_id = 0
        while True:
            page = await self._fetch_items(sql, [*head, last_id, *extra, page_size])
            for item in page:
                yield item
            if len(page) < page_size:
                return
            last_id = page[-1].id

    async def count_items(
        self,
        target: str | None = None,
        *,
        states: Collection[ItemState] | None = None,
        expiring_before: float | None = None,
        alive_at: float | None = None,
        kind: SourceKind | None = None,
    ) -> tuple[int, int]:
        """How many items `iter_items` with the same filter yields, and their known bytes."""
        if states is not None and not states:
            return 0, 0
        conditions, extra = _item_filter(states, expiring_before, alive_at, kind)
        where, head = _where(target, *conditions)
        sql = f"SELECT COUNT(*), COALESCE(SUM(size), 0) FROM items{where}"
        rows = await self._fetch(sql, [*head, *extra])
        return int(rows[0][0]), int(rows[0][1])

    async def id_span(self) -> tuple[int, int]:
        """The lowest and the highest id of any item (0, 0 when there is none): a look at
        either end of the table, whatever it holds."""
        rows = await self._fetch(  # one MIN and one MAX each: either is a single b-tree step
            "SELECT COALESCE((SELECT MIN(id) FROM items), 0), "
            "COALESCE((SELECT MAX(id) FROM items), 0)",
            [],
        )
        low, high = rows[0]
        return int(low), int(high)

    async def state_counts(self, target: str | None = None) -> dict[ItemState, tuple[int, int]]:
        """state -> (items, bytes of known size), every state present (zeros included)."""
        where, params = _where(target)
        rows = await self._fetch(
            f"SELECT state, COUNT(*), COALESCE(SUM(size), 0) FROM items{where} GROUP BY state",
            params,
        )
        counts = {state: (0, 0) for state in ItemState}
        for state, count, size in rows:
            with self._errors():
                counts[ItemState(state)] = (int(count), int(size))
        return counts

    async def counts_and_expiry(
        self, target: str | None, now: float, horizons: Sequence[float]
    ) -> tuple[dict[ItemState, tuple[int, int]], list[int]]:
        """`state_counts` and `expiry_histogram` read in one pass over the items (one scan
        of an index that holds state, expiry and size: a million items, a third of a
        second less than two)."""
        where, params = _where(target)
        counted = ", ".join(
            "COALESCE(SUM(CASE WHEN expires_at <= ? THEN 1 ELSE 0 END), 0)" for _ in horizons
        )
        rows = await self._fetch(
            f"SELECT state, COUNT(*), COALESCE(SUM(size), 0){', ' if horizons else ''}{counted} "
            f"FROM items{where} GROUP BY state",
            [*(now + horizon for horizon in horizons), *params],
        )
        counts = {state: (0, 0) for state in ItemState}
        histogram = [0 for _ in horizons]
        for state, count, size, *expiring in rows:
            with self._errors():
                counts[ItemState(state)] = (int(count), int(size))
            if state == ItemState.DONE.value:
                histogram = [int(n) for n in expiring]
        return counts, histogram

    async def next_expiry(
        self, target: str | None = None, *, after: float | None = None
    ) -> float | None:
        """The earliest expires_at of a DONE item (of one still alive `after`), or None."""
        alive = ["expires_at >= ?"] if after is not None else []
        where, params = _where(target, "state = ?", "expires_at IS NOT NULL", *alive)
        rows = await self._fetch(
            f"SELECT MIN(expires_at) FROM items{where}",
            [*params, ItemState.DONE.value, *([after] if after is not None else [])],
        )
        return None if not rows or rows[0][0] is None else float(rows[0][0])

    async def expiry_histogram(
        self, target: str | None, now: float, horizons: Sequence[float]
    ) -> list[int]:
        """For each horizon, how many DONE items expire at or before `now + horizon`."""
        if not horizons:
            return []
        where, params = _where(target, "state = ?", "expires_at IS NOT NULL")
        counted = "COALESCE(SUM(CASE WHEN expires_at <= ? THEN 1 ELSE 0 END), 0)"
        sums = ", ".join(counted for _ in horizons)
        bounds = [now + horizon for horizon in horizons]
        rows = await self._fetch(
            f"SELECT {sums} FROM items{where}", [*bounds, *params, ItemState.DONE.value]
        )
        return [int(value) for value in rows[0]]

    async def recent_failures(self, target: str | None, limit: int = 20) -> list[LedgerItem]:
        """The most recently updated items that are failed, dead, mismatched or lost,
        newest first."""
        bad = [
            s.value for s in (ItemState.FAILED, ItemState.DEAD, ItemState.MISMATCH, ItemState.LOST)
        ]
        where, params = _where(target, f"state IN ({', '.join('?' for _ in bad)})")
        sql = f"SELECT {_ITEM_COLUMNS} FROM items{where} ORDER BY updated_at DESC, id DESC LIMIT ?"
        return await self._fetch_items(sql, [*params, *bad, limit])

    async def iter_keys(
        self, target: str | None = None, *, page_size: int = PAGE_SIZE * 10
    ) -> AsyncIterator[tuple[str, str]]:
        """Every item's (upload_path, file_name), read a page at a time: no rows built."""
        async for page in self.iter_columns(target, "id, upload_path, file_name", page_size):
            for _, upload_path, file_name in page:
                yield str(upload_path), str(file_name)

    async def iter_columns(
        self, target: str | None, columns: str, page_size: int = PAGE_SIZE * 5
    ) -> AsyncIterator[list[Sequence[Any]]]:
        """Pages of `columns` (SQL over the items table, its id first) of every item of
        `target`, in id order: what a caller makes of a row without building one."""
        where, head = _where(target, "id > ?")
        sql = f"SELECT {columns} FROM {self.ITEMS_BY_ID}{where} ORDER BY id LIMIT ?"
        last_id = 0
        while True:
            page = await self._fetch(sql, [*head, last_id, page_size])
            if page:
                yield page
            if len(page) < page_size:
                return
            last_id = int(page[-1][0])

    async def with_source(self, target: str | None, source: str) -> list[LedgerItem]:
        """The items whose source is exactly `source` (one, unless named twice)."""
        where, params = _where(target, "source = ?")
        sql = f"SELECT {_ITEM_COLUMNS} FROM items{where} ORDER BY id"
        return await self._fetch_items(sql, [*params, source])

    async def attempts_of(self, item_id: int) -> list[AttemptRow]:
        """Every attempt recorded for one item, oldest first."""
        sql = (
            f"SELECT {_ATTEMPT_COLUMNS} FROM attempts LEFT JOIN runs ON runs.id = attempts.run_id "
            "WHERE attempts.item_id = ? ORDER BY attempts.id"
        )
        return [AttemptRow(*row) for row in await self._fetch(sql, [item_id])]

    async def failed_in_run(
        self, run_id: int, limit: int = 10, *, besides: Sequence[str] = ()
    ) -> list[tuple[LedgerItem, AttemptRow]]:
        """The items whose last attempt in run `run_id` failed, with that attempt; attempts
        whose method is one of `besides` (a probe made on the side) are not looked at."""
        skipped = "".join(" AND method != ?" for _ in besides)
        sql = (
            f"SELECT {_QUALIFIED_ITEM_COLUMNS}, {_ATTEMPT_COLUMNS} FROM attempts "
            "JOIN items ON items.id = attempts.item_id "
            "LEFT JOIN runs ON runs.id = attempts.run_id "
            f"WHERE attempts.id IN (SELECT MAX(id) FROM attempts WHERE run_id = ?{skipped} "
            "GROUP BY item_id) AND attempts.outcome = 'failed' ORDER BY attempts.id LIMIT ?"
        )
        rows = await self._fetch(sql, [run_id, *besides, limit])
        width = len(_ITEM_COLUMNS.split(","))
        with self._errors():
            return [(_row_to_item(row[:width]), AttemptRow(*row[width:])) for row in rows]

    async def runs(self, limit: int = 10) -> list[RunRow]:
        """The latest runs, newest first."""
        rows = await self._fetch(
            "SELECT id, command, manifest, started_at, finished_at, status, pid, summary "
            "FROM runs ORDER BY id DESC LIMIT ?",
            [limit],
        )
        return [_row_to_run(row) for row in rows]

    async def last_runs(self, commands: Sequence[str]) -> list[RunRow]:
        """The latest run of each of `commands` that ran, in that order."""
        latest: list[RunRow] = []
        for command in commands:
            rows = await self._fetch(
                "SELECT id, command, manifest, started_at, finished_at, status, pid, summary "
                "FROM runs WHERE command = ? ORDER BY id DESC LIMIT 1",
                [command],
            )
            latest += [_row_to_run(row) for row in rows]
        return latest

    async def last_success_at(self, target: str | None = None) -> float | None:
        """The latest uploaded_at of a DONE item, or None."""
        where, params = _where(target, "state = ?")
        rows = await self._fetch(
            f"SELECT MAX(uploaded_at) FROM {self.ITEMS_BY_ID}{where}",
            [*params, ItemState.DONE.value],
        )
        return None if not rows or rows[0][0] is None else float(rows[0][0])

    async def downloads(self, target: str | None = None) -> tuple[int, float | None]:
        """How many items were downloaded, and when the latest one was."""
        where, params = _where(target, "downloaded_at IS NOT NULL")
        rows = await self._fetch(f"SELECT COUNT(*), MAX(downloaded_at) FROM items{where}", params)
        count, latest = rows[0] if rows else (0, None)
        return int(count), None if latest is None else float(latest)

    # -- internals --------------------------------------------------------------------------

    def _check_writable(self) -> None:
        if self.readonly:
            raise LedgerError(f"ledger {self.where} was opened read-only")
        if self._closed or self._closing:
            raise LedgerError(f"ledger {self.where} is closed")
        if self._failure is not None:
            raise type(self._failure)(str(self._failure))

    def _nudge(self) -> None:
        if self.pending >= self.batch_size:
            self._wake.set()

    async def _flush_loop(self) -> None:
        while not self._closing:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=self.flush_interval)
            self._wake.clear()
            if self._closing:
                return
            # A failure is kept in self._failure and raised by the next put or flush.
            with contextlib.suppress(LedgerError):
                await self.flush()

    @abc.abstractmethod
    async def _write_batch(
        self, items: list[dict[str, object]], attempts: list[dict[str, object]]
    ) -> None:
        """Write one batch in one transaction; LedgerError on failure."""

    @abc.abstractmethod
    async def _fetch(self, sql: str, params: Sequence[object]) -> list[Sequence[Any]]:
        """Rows of a query (`?` placeholders), buffered updates included."""

    @abc.abstractmethod
    def _errors(self) -> contextlib.AbstractContextManager[None]:
        """Turns the back end's failures into LedgerError naming this ledger."""

    async def _fetch_items(self, sql: str, params: Sequence[object]) -> list[LedgerItem]:
        rows = await self._fetch(sql, params)
        with self._errors():
            return [_row_to_item(row) for row in rows]


class Ledger(BaseLedger):
    """The SQLite ledger: one file, one writer (the run lock sees to that)."""

    folds_updates = True
    # SQLite searches (target, ...) for `target = ?`, then sorts every item of the target
    # for each page of `id > ? ORDER BY id LIMIT ?`: a million items, minutes. By id, it
    # reads each page where the last one ended. The latest success too: found through the
    # index on (target, state) it looks up every done item's row, 2.8 s of CPU for a
    # million; reading the table in order, 0.3 s.
    ITEMS_BY_ID = "items NOT INDEXED"

    def __init__(
        self,
        path: Path,
        conn: aiosqlite.Connection,
        *,
        readonly: bool,
        batch_size: int,
        flush_interval: float,
    ) -> None:
        super().__init__(
            str(path), readonly=readonly, batch_size=batch_size, flush_interval=flush_interval
        )
        self.path = path
        self._conn = conn

    @classmethod
    async def open(
        cls,
        path: Path,
        *,
        readonly: bool = False,
        batch_size: int = 256,
        flush_interval: float = 0.2,
    ) -> Ledger:
        """Open (or create) the ledger at `path`.

        `readonly` opens for status, export and plan: nothing is written, and a
        missing file yields an empty ledger without creating it.
        """
        path = Path(path)
        blank = False
        if readonly:
            conn, blank = await _open_readonly(path)
        else:
            conn = await _open_writable(path)
        ledger = cls(
            path, conn, readonly=readonly, batch_size=batch_size, flush_interval=flush_interval
        )
        ledger.blank = blank
        ledger._start_flusher()
        return ledger

    async def _disconnect(self) -> None:
        await self._conn.close()

    async def _checkpoint(self) -> None:
        """Fold the WAL into the file and truncate it, so that a run leaves no WAL behind
        on a disk that may be small; a busy or full disk only leaves it for later."""
        with contextlib.suppress(sqlite3.Error):
            await self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    async def start_run(self, command: str, manifest: str) -> int:
        """Record the start of a run (written at once) and return its id."""
        self._check_writable()
        sql = (
            "INSERT INTO runs (command, manifest, started_at, status, pid) "
            "VALUES (?, ?, ?, 'running', ?)"
        )
        params = (command, manifest, time.time(), os.getpid())
        async with self._db_lock:
            with _as_ledger_error(self.path):
                cursor = await self._conn.execute(sql, params)
                run_id = cursor.lastrowid
        if run_id is None:
            raise LedgerError(f"ledger {self.path}: the run could not be recorded")
        return run_id

    async def finish_run(self, run_id: int, status: str, summary: Mapping[str, object]) -> None:
        """Write what is buffered, then record the end of the run."""
        await self.flush()
        sql = "UPDATE runs SET finished_at = ?, status = ?, summary = ? WHERE id = ?"
        params = (time.time(), status, json.dumps(dict(summary), default=str), run_id)
        async with self._db_lock:
            with _as_ledger_error(self.path):
                await self._conn.execute(sql, params)

    async def set_fact(self, name: str, value: object) -> None:
        """Remember one fact about the job or the service (JSON), written at once."""
        self._check_writable()
        await self.flush()
        sql = (
            "INSERT INTO facts (name, value, updated_at) VALUES (?, ?, ?) "
            "ON CONFLICT (name) DO UPDATE SET value = excluded.value, "
            "updated_at = excluded.updated_at"
        )
        async with self._db_lock:
            with _as_ledger_error(self.path):
                await self._conn.execute(sql, (name, json.dumps(value), time.time()))

    async def _write_batch(
        self, items: list[dict[str, object]], attempts: list[dict[str, object]]
    ) -> None:
        conn = self._conn
        with _as_ledger_error(self.path):
            await conn.execute("BEGIN IMMEDIATE")
            try:
                if items:
                    await conn.executemany(_UPSERT_ITEM, items)
                if attempts:
                    await conn.executemany(_INSERT_ATTEMPT, attempts)
                await conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    await conn.execute("ROLLBACK")
                raise

    async def _fetch(self, sql: str, params: Sequence[object]) -> list[Sequence[Any]]:
        """Rows of a query, buffered updates included (they are written first)."""
        await self.flush()
        async with self._db_lock:
            with _as_ledger_error(self.path):
                rows = await self._conn.execute_fetchall(sql, params)  # one thread trip
        return list(rows)

    def _errors(self) -> contextlib.AbstractContextManager[None]:
        return _as_ledger_error(self.path)


async def open_ledger(manifest: Manifest, *, readonly: bool = False) -> BaseLedger:
    """The manifest's ledger: its PostgreSQL database when it names one, else its file."""
    if manifest.ledger_url is not None:
        from migrator.ledger_pg import PgLedger  # asyncpg only for those who use it

        return await PgLedger.open(manifest.ledger_url, readonly=readonly)
    return await Ledger.open(manifest.ledger, readonly=readonly)


def as_shared(ledger: BaseLedger) -> PgLedger | None:
    """The ledger as the shared (PostgreSQL) one it is, else None: a process on a SQLite
    ledger never loads the PostgreSQL back end, not even to ask `isinstance`."""
    return cast("PgLedger", ledger) if ledger.shared else None


__all__ = [
    "MIGRATIONS",
    "SCHEMA_VERSION",
    "AttemptRow",
    "BaseLedger",
    "Ledger",
    "Migration",
    "RunRow",
    "as_shared",
    "describe_sqlite_error",
    "open_ledger",
]
