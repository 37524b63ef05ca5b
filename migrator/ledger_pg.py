"""The PostgreSQL ledger: one database that any number of worker processes share.

The schema is the SQLite ledger's (the same migrations, with PostgreSQL's types), plus
one table of its own, `queue`: the work of the current plan, one row per item to
upload, which workers claim a small batch at a time. A claim sets an owner, a new
attempt number (the fencing token) and a lease deadline on the database's clock; the
owner renews the leases of what it still holds, and a result is written only while the
row still names that owner and attempt. A worker that dies simply stops renewing: its
rows come back when their leases run out, with no cleanup process.

Each process keeps one connection (asyncpg, imported only here): 50 workers are 50
connections, under PostgreSQL's default of 100. Writes are buffered and flushed in
batches as in the SQLite ledger; a flush never waits on a transfer.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import socket
import time
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from migrator.errors import LedgerError
from migrator.ledger import (
    _INSERT_ATTEMPT,
    _QUALIFIED_ITEM_COLUMNS,
    _UPSERT_ITEM,
    MIGRATIONS,
    SCHEMA_VERSION,
    BaseLedger,
    _item_params,
    _row_to_item,
)
from migrator.logs import get_logger, register_secret
from migrator.model import ITEM_UPDATE_FIELDS, AttemptRecord, ItemState, ItemUpdate, LedgerItem

log = get_logger("migrator.ledger")

CONNECT_TIMEOUT = 15.0
PLAN_LOCK_POLL = 0.2  # seconds between tries for the planning lock
_NOW = "extract(epoch from clock_timestamp())"

# A claimed item keeps its lease through these states (still being worked on) ...
_KEEPS_LEASE = frozenset({ItemState.PENDING})
# ... is handed back to the queue at once through these (another worker may take it) ...
_RELEASES = frozenset({ItemState.INTERRUPTED})
# ... and is finished by any other state.


def redacted(url: str) -> str:
    """The URL without its password, for messages and logs; the password is registered
    as a secret so that no log event shows it either."""
    parts = urlsplit(url)
    if parts.password:
        register_secret(parts.password)
    host = parts.netloc.rpartition("@")[2]
    user = f"{parts.username}@" if parts.username else ""
    return urlunsplit((parts.scheme, user + host, parts.path, "", ""))


# -- schema ---------------------------------------------------------------------------------


def _pg_types(statement: str) -> str:
    """A SQLite migration statement in PostgreSQL's types (pure): the same schema."""
    statement = statement.replace("INTEGER PRIMARY KEY", "BIGSERIAL PRIMARY KEY")
    statement = re.sub(r"\bINTEGER\b", "BIGINT", statement)
    return re.sub(r"\bREAL\b", "DOUBLE PRECISION", statement)


_QUEUE_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS queue (
        item_id BIGINT NOT NULL REFERENCES items (id) ON DELETE CASCADE,
        target TEXT NOT NULL,
        work TEXT NOT NULL,
        owner TEXT,
        attempt INTEGER NOT NULL DEFAULT 0,
        lease_until DOUBLE PRECISION,
        finished BOOLEAN NOT NULL DEFAULT FALSE,
        redo BOOLEAN NOT NULL DEFAULT FALSE,
        PRIMARY KEY (item_id, target)
    )""",
    # A queue of one command (run's is named after the target, the others' after the
    # command too): an item can be in several at once. Older queues had one row an item.
    """DO $$ BEGIN
        IF (SELECT array_length(conkey, 1) FROM pg_constraint WHERE conname = 'queue_pkey') = 1
        THEN ALTER TABLE queue DROP CONSTRAINT queue_pkey, ADD PRIMARY KEY (item_id, target);
        END IF;
    END $$""",
    "CREATE INDEX IF NOT EXISTS queue_open ON queue (target, item_id) WHERE NOT finished",
    # When the row was last finished (the database's clock): the end of a queue's last
    # round, which a command launched before it joins rather than doing it again.
    """DO $$ BEGIN
        IF NOT EXISTS (SELECT 1 FROM information_schema.columns
                       WHERE table_name = 'queue' AND column_name = 'finished_at')
        THEN ALTER TABLE queue ADD COLUMN finished_at DOUBLE PRECISION;
        END IF;
    END $$""",
    """CREATE TABLE IF NOT EXISTS workers (
        owner TEXT PRIMARY KEY,
        target TEXT NOT NULL,
        seen_at DOUBLE PRECISION NOT NULL
    )""",
)
_MIGRATION_LOCK = 0x6D696772  # "migr": one process migrates at a time


def _numbered(sql: str) -> str:
    """`?` placeholders as PostgreSQL's `$1, $2, ...` (pure)."""
    counter = iter(range(1, 1 << 30))
    return re.sub(r"\?", lambda _: f"${next(counter)}", sql)


def _named(sql: str) -> tuple[str, list[str]]:
    """`:name` placeholders as `$n`, and the names in their order (pure)."""
    names: list[str] = []

    def number(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in names:
            names.append(name)
        return f"${names.index(name) + 1}"

    return re.sub(r"(?<![:\w]):([a-z_][a-z0-9_]*)", number, sql), names


_UPSERT_SQL, _UPSERT_NAMES = _named(_UPSERT_ITEM)
_ITEM_FIELDS = ", ".join(ITEM_UPDATE_FIELDS)
_ATTEMPT_SQL, _ATTEMPT_NAMES = _named(
    _INSERT_ATTEMPT.replace(":run_id,", ":run_id::bigint,")
    .replace(":method,", ":method::text,")
    .replace(":attempt,", ":attempt::bigint,")
    .replace(":started_at,", ":started_at::float8,")
    .replace(":duration,", ":duration::float8,")
    .replace(":http_status,", ":http_status::bigint,")
    .replace(":outcome,", ":outcome::text,")
    .replace(":bytes_sent,", ":bytes_sent::bigint,")
    .replace(":error\n", ":error::text\n")
)
# A claimed item's results are written in three statements per batch, whatever its size:
# lock the queue rows still held by this owner and attempt (in id order), update those
# items, then finish or hand back their queue rows. What is not held is refused.


def _mine(first: int) -> str:
    """The queue rows of this owner's claims, locked in id order (pure): the owner is
    $1, the claims' ids, attempts and queues (`_fence`) are $first, $first+1, $first+2."""
    ids, attempts, queues = first, first + 1, first + 2
    return f"""
        SELECT queue.item_id, queue.target FROM queue
        JOIN unnest(${ids}::bigint[], ${attempts}::int[], ${queues}::text[])
            AS mine (item_id, attempt, target)
            ON queue.item_id = mine.item_id AND queue.target = mine.target
        WHERE queue.attempt = mine.attempt AND queue.owner = $1
        ORDER BY queue.item_id FOR UPDATE OF queue"""


_HOLD_SQL = _mine(2)
_HELD_ITEM_SQL, _HELD_ITEM_NAMES = _named(
    f"""
UPDATE items SET
    attempts = attempts + :attempts_added,
    updated_at = :updated_at,
    {
        ", ".join(
            f"{name} = CASE WHEN :keep_{name} THEN {name} ELSE :{name} END"
            for name in ITEM_UPDATE_FIELDS
        )
    }
WHERE id = :item_id
"""
)
# The same in one statement, for a batch with one result per claim: the results travel
# as one JSON array (typed by the items table itself), locks are taken in id order; the
# batch's attempts rows ($6, in their order, each with its item's id: all of them are of
# claimed items) are written by the same statement.
_WRITE_HELD_SQL = f"""
WITH held AS ({_mine(2)}),
results AS MATERIALIZED (
    SELECT item.*, flags.*
    FROM jsonb_populate_recordset(NULL::items, $5::jsonb) AS item
    JOIN jsonb_to_recordset($5::jsonb) AS flags (
        item_id BIGINT, attempts_added BIGINT, finish BOOLEAN, release BOOLEAN,
        {", ".join(f"keep_{name} BOOLEAN" for name in ITEM_UPDATE_FIELDS)}
    ) ON flags.item_id = item.id
),
written AS (
    UPDATE items SET
        attempts = items.attempts + r.attempts_added,
        updated_at = r.updated_at,
        {
    ", ".join(
        f"{name} = CASE WHEN r.keep_{name} THEN items.{name} ELSE r.{name} END"
        for name in ITEM_UPDATE_FIELDS
    )
}
    FROM results AS r JOIN held USING (item_id)
    WHERE items.id = r.item_id
),
settled AS (
    UPDATE queue SET
        finished = (queue.finished OR r.finish) AND NOT queue.redo,
        finished_at = CASE WHEN r.finish THEN {_NOW} ELSE queue.finished_at END,
        redo = FALSE,
        owner = CASE WHEN r.release THEN NULL ELSE queue.owner END,
        lease_until = CASE WHEN r.release THEN NULL ELSE queue.lease_until END
    FROM results AS r JOIN held USING (item_id)
    WHERE queue.item_id = held.item_id AND queue.target = held.target
        AND (r.finish OR r.release)
),
logged AS (
    INSERT INTO attempts (
        run_id, item_id, method, attempt, started_at, duration, http_status, outcome,
        bytes_sent, error
    )
    SELECT a.run_id, items.id, a.method, a.attempt, a.started_at, a.duration, a.http_status,
        a.outcome, a.bytes_sent, a.error
    FROM jsonb_to_recordset($6::jsonb) AS a (
        n BIGINT, item_id BIGINT, run_id BIGINT, method TEXT, attempt BIGINT,
        started_at DOUBLE PRECISION, duration DOUBLE PRECISION, http_status BIGINT,
        outcome TEXT, bytes_sent BIGINT, error TEXT
    )
    JOIN items ON items.id = a.item_id
    ORDER BY a.n
)
SELECT item_id FROM held
"""
_SETTLE_QUEUE_SQL = f"""
UPDATE queue SET
    finished = (finished OR $2) AND NOT redo,
    finished_at = CASE WHEN $2 THEN {_NOW} ELSE finished_at END,
    redo = FALSE,
    owner = CASE WHEN $3 THEN NULL ELSE owner END,
    lease_until = CASE WHEN $3 THEN NULL ELSE lease_until END
WHERE item_id = $1 AND target = $4
"""
# Queue a plan's work, creating the rows of its new items first: one statement a batch.
_ENQUEUE_SQL = f"""
WITH added AS (
    INSERT INTO items (target, upload_path, file_name, attempts, updated_at, {_ITEM_FIELDS})
    SELECT target, upload_path, file_name, attempts, updated_at, {_ITEM_FIELDS}
    FROM jsonb_populate_recordset(NULL::items, $5::jsonb)
    ON CONFLICT (target, upload_path, file_name) DO NOTHING
    RETURNING id, upload_path, file_name
),
work AS (
    SELECT * FROM unnest($2::text[], $3::text[], $4::text[]) AS w (upload_path, file_name, work)
),
known AS (
    SELECT id, upload_path, file_name FROM added
    UNION ALL
    SELECT items.id, items.upload_path, items.file_name FROM items JOIN work
        ON items.target = $1 AND items.upload_path = work.upload_path
        AND items.file_name = work.file_name
)
INSERT INTO queue (item_id, target, work)
SELECT known.id, $6, work.work FROM work JOIN known USING (upload_path, file_name)
ORDER BY known.id
ON CONFLICT (item_id, target) DO UPDATE SET work = excluded.work,
    finished = FALSE, owner = NULL, lease_until = NULL WHERE queue.finished
"""
# A refused final result means a stale worker's upload may have landed after the current
# owner's, replacing its file: the item is done again. A finished row reopens; a held one
# is marked `redo`, so that its holder's result reopens it (its upload may have landed
# first); a fresh claim clears the mark, its upload starting after the stale one ended.
_REDO_SQL = """
UPDATE queue SET
    redo = NOT finished AND owner IS NOT NULL,
    finished = FALSE,
    owner = CASE WHEN finished THEN NULL ELSE owner END,
    lease_until = CASE WHEN finished THEN NULL ELSE lease_until END
FROM (
    SELECT item_id, target FROM queue
    WHERE (item_id, target) IN (SELECT * FROM unnest($1::bigint[], $2::text[]))
    ORDER BY item_id FOR UPDATE
) AS stale
WHERE queue.item_id = stale.item_id AND queue.target = stale.target
"""


@dataclass(frozen=True, slots=True)
class Claim:
    """This process's hold on one queued item: the fencing token of its results."""

    item_id: int
    attempt: int
    key: tuple[str, str, str]  # target, upload_path, file_name
    queue: str  # the queue it was claimed from (`run`'s: the target)


@dataclass(frozen=True, slots=True)
class ClaimedWork:
    """One claimed queue row: the work as planned, and the item's row as it is now."""

    claim: Claim
    work: Mapping[str, Any]
    row: LedgerItem | None
    taken_from: str | None  # the previous owner, when its lease ran out


def worker_name() -> str:
    """This process among the workers: host and pid, unique while it lives."""
    return f"{socket.gethostname()}:{os.getpid()}"


class PgLedger(BaseLedger):
    """The items, attempts and runs of one job in PostgreSQL, shared by many processes."""

    shared = True  # many processes write it at once: no run lock, leases instead

    def __init__(
        self,
        url: str,
        conn: Any,
        *,
        readonly: bool,
        batch_size: int,
        flush_interval: float,
        owner: str,
    ) -> None:
        super().__init__(
            redacted(url), readonly=readonly, batch_size=batch_size, flush_interval=flush_interval
        )
        self.owner = owner
        self.refused = 0  # results refused because another worker holds the item now
        # `run`: an item's state says when its claim ends (done, failed: finished; cut
        # short: handed back). Other commands end a claim with `finish`, after the item.
        self.settles_by_state = True
        self._conn = conn
        self._claims: dict[tuple[str, str, str], Claim] = {}
        self._lost: dict[tuple[str, str, str], Claim] = {}  # what is written of them is refused
        self._until: dict[int, float] = {}  # item id -> when its lease ends, on our monotonic clock

    @classmethod
    async def open(
        cls,
        url: str,
        *,
        readonly: bool = False,
        batch_size: int = 256,
        flush_interval: float = 0.2,
        owner: str | None = None,
    ) -> PgLedger:
        """Connect to the database at `url`, creating or upgrading the schema."""
        where = redacted(url)
        conn = await _connect(url, where)
        ledger = cls(
            url,
            conn,
            readonly=readonly,
            batch_size=batch_size,
            flush_interval=flush_interval,
            owner=owner or worker_name(),
        )
        try:
            await ledger._migrate()
        except BaseException:
            await conn.close()
            raise
        ledger._start_flusher()
        return ledger

    async def _disconnect(self) -> None:
        with contextlib.suppress(Exception):
            await self._conn.close()

    # -- runs and facts -----------------------------------------------------------------------

    async def start_run(self, command: str, manifest: str) -> int:
        self._check_writable()
        sql = (
            "INSERT INTO runs (command, manifest, started_at, status, pid) "
            "VALUES ($1, $2, $3, 'running', $4) RETURNING id"
        )
        async with self._locked():
            run_id: int = await self._conn.fetchval(
                sql, command, manifest, time.time(), os.getpid()
            )
        return run_id

    async def finish_run(self, run_id: int, status: str, summary: Mapping[str, object]) -> None:
        await self.flush()
        sql = "UPDATE runs SET finished_at = $1, status = $2, summary = $3 WHERE id = $4"
        text = json.dumps(dict(summary), default=str)
        async with self._locked():
            await self._conn.execute(sql, time.time(), status, text, run_id)

    async def set_fact(self, name: str, value: object) -> None:
        self._check_writable()
        await self.flush()
        sql = (
            "INSERT INTO facts (name, value, updated_at) VALUES ($1, $2, $3) "
            "ON CONFLICT (name) DO UPDATE SET value = excluded.value, "
            "updated_at = excluded.updated_at"
        )
        async with self._locked():
            await self._conn.execute(sql, name, json.dumps(value), time.time())

    async def _lookup_rows(
        self, target: str, keys: Sequence[tuple[str, str]], columns: str
    ) -> list[Sequence[Any]]:
        if not keys:
            return []
        sql = (
            f"SELECT {columns} "
            "FROM unnest(?::text[], ?::text[]) AS keys (upload_path, file_name) "
            "JOIN items ON items.target = ? AND items.upload_path = keys.upload_path "
            "AND items.file_name = keys.file_name"
        )
        paths, names = [key[0] for key in keys], [key[1] for key in keys]
        return await self._fetch(sql, [paths, names, target])

    # -- the queue ------------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def planning(self, target: str, launched_at: float | None = None) -> Any:
        """Hold the planning lock of the queue `target`; yields whether this process
        plans: the queue has no open work (the first process, or the first after the
        last round ended), and, with `launched_at` (when this command was launched, on
        our wall clock), the last round did not end after that: a command launched
        before a round ended joins that round, even when it is done by the time the
        command looks at the queue. While another process plans, this one joins as soon
        as that plan has queued work (without the lock)."""
        await self.flush()
        if not await self._lock_to_plan(target):
            yield False
            return
        try:
            open_items, ended = await self._last_round(target)
            joins_ended = launched_at is not None and ended is not None and ended >= launched_at
            yield open_items == 0 and not joins_ended
        finally:
            async with self._locked():
                await self._conn.execute(
                    "SELECT pg_advisory_unlock(hashtext($1))", _plan_key(target)
                )

    async def _lock_to_plan(self, target: str) -> bool:
        """Take the planning lock of `target` (True), or find that another process is
        planning it and has queued work already (False)."""
        while True:
            async with self._locked():
                got: bool = await self._conn.fetchval(
                    "SELECT pg_try_advisory_lock(hashtext($1))", _plan_key(target)
                )
            if got:
                return True
            if (await self.open_work(target))[0]:
                return False
            await asyncio.sleep(PLAN_LOCK_POLL)

    async def being_planned(self, target: str) -> bool:
        """Whether another process holds the planning lock of `target` (it may queue
        more work yet)."""
        key = _plan_key(target)
        async with self._locked():
            free = await self._conn.fetchval("SELECT pg_try_advisory_lock(hashtext($1))", key)
            if free:
                await self._conn.execute("SELECT pg_advisory_unlock(hashtext($1))", key)
        return not free

    async def _last_round(self, queue: str) -> tuple[int, float | None]:
        """How many items of `queue` are open, and when its last item was finished,
        on our wall clock (None: never)."""
        sql = (
            f"SELECT COUNT(*) FILTER (WHERE NOT finished), MAX(finished_at), {_NOW} "
            "FROM queue WHERE target = ?"
        )
        ((open_items, ended, db_now),) = await self._fetch(sql, [queue])
        ours = time.time()
        return int(open_items), None if ended is None else float(ended) - float(db_now) + ours

    async def enqueue(
        self,
        target: str,
        work: Sequence[tuple[str, str, Mapping[str, Any]]],
        queue: str | None = None,
        *,
        new: Sequence[ItemUpdate] = (),
    ) -> int:
        """Queue (upload_path, file_name, work) for items of `target`, in `queue`
        (default: the target's own, `run`'s); a row still open is left as it is, and
        the first of two works for one item is kept. `new`: the rows of items the ledger
        does not hold yet, written by the same statement (the queue refers to them).
        Returns how many rows were queued."""
        await self.flush()
        works: dict[tuple[str, str], str] = {}
        for path, name, planned in work:
            works.setdefault((path, name), json.dumps(dict(planned)))
        now = time.time()
        rows = json.dumps([_new_item(update, now) for update in new], default=str)
        paths, names = [key[0] for key in works], [key[1] for key in works]
        async with self._locked():
            await self._conn.execute(
                _ENQUEUE_SQL, target, paths, names, list(works.values()), rows, queue or target
            )
        return len(works)

    async def claim(self, queue: str, limit: int, lease: float) -> list[ClaimedWork]:
        """Claim up to `limit` open items of `queue` that nobody holds (or whose lease ran
        out), lowest ids first, each with a new attempt number and a lease of `lease`
        seconds on the database's clock. A queue is named after its items' target (the
        work names the target when the queue is another command's). What is buffered
        is not written first: a claim never waits for the results of the last ones."""
        sql = f"""
            WITH claimed AS (
                UPDATE queue SET owner = $1, attempt = queue.attempt + 1, redo = FALSE,
                    lease_until = {_NOW} + $2
                FROM (
                    SELECT item_id, owner AS was FROM queue
                    WHERE target = $3 AND NOT finished
                        AND (lease_until IS NULL OR lease_until < {_NOW})
                    ORDER BY item_id FOR UPDATE SKIP LOCKED LIMIT $4
                ) AS picked
                WHERE queue.item_id = picked.item_id AND queue.target = $3
                RETURNING queue.item_id, queue.attempt, queue.work, picked.was
            )
            SELECT claimed.item_id, claimed.attempt, claimed.work, claimed.was,
                {_QUALIFIED_ITEM_COLUMNS}
            FROM claimed LEFT JOIN items ON items.id = claimed.item_id"""
        sent = time.monotonic()  # the lease ends no sooner than `lease` after this
        async with self._locked():
            claimed = await self._conn.fetch(sql, self.owner, lease, queue, limit)
        with self._errors():
            rows = {r[0]: _row_to_item(tuple(r)[4:]) for r in claimed if r[4] is not None}
        found: list[ClaimedWork] = []
        for item_id, attempt, work, was, *_row in sorted(claimed, key=lambda r: int(r[0])):
            row = rows.get(item_id)
            decoded = json.loads(work)
            key = (decoded.get("target", queue), decoded["upload_path"], decoded["file_name"])
            claim = Claim(item_id, attempt, key, queue)
            self._claims[key] = claim
            self._until[item_id] = sent + lease
            self._lost.pop(key, None)
            found.append(ClaimedWork(claim, decoded, row, was))
        return found

    async def renew(self, lease: float) -> list[Claim]:
        """Extend the leases of every item this process still holds; returns the claims
        it lost (another worker took the item after the lease ran out)."""
        held = list(self._claims.values())
        if not held:
            return []
        sql = f"""
            UPDATE queue SET lease_until = {_NOW} + $2
            FROM ({_mine(3)}) AS mine
            WHERE queue.item_id = mine.item_id AND queue.target = mine.target
            RETURNING queue.item_id"""
        sent = time.monotonic()
        async with self._locked():
            kept = {r[0] for r in await self._conn.fetch(sql, self.owner, lease, *_fence(held))}
        for item_id in kept:
            self._until[item_id] = sent + lease
        # Another renewal may have run meanwhile: report each loss once.
        lost = [c for c in held if c.item_id not in kept and self._claims.get(c.key) == c]
        for claim in lost:
            self._until.pop(claim.item_id, None)
            del self._claims[claim.key]
            self._lost[claim.key] = claim
        return lost

    async def release_held(self) -> None:
        """Hand back to the queue, for any worker to claim at once, every item this
        process holds (claimed, and not finished: never started, or cut short)."""
        await self.flush()
        held = list(self._claims.values())
        if not held:
            return
        sql = f"""
            UPDATE queue SET owner = NULL, lease_until = NULL
            FROM ({_mine(2)}) AS mine
            WHERE queue.item_id = mine.item_id AND queue.target = mine.target"""
        async with self._locked():
            await self._conn.execute(sql, self.owner, *_fence(held))
        for claim in held:
            self._claims.pop(claim.key, None)

    async def finish(self, claim: Claim) -> bool:
        """Mark the item of `claim` done with in its queue, after what was written about
        it (the results and this land together); False when the claim was lost."""
        await self.flush()
        sql = f"""
            UPDATE queue SET finished = TRUE, finished_at = {_NOW}, owner = NULL,
                lease_until = NULL
            FROM ({_mine(2)}) AS mine
            WHERE queue.item_id = mine.item_id AND queue.target = mine.target
            RETURNING queue.item_id"""
        async with self._locked():
            done = await self._conn.fetch(sql, self.owner, *_fence([claim]))
        if self._claims.get(claim.key) == claim:
            del self._claims[claim.key]
            self._until.pop(claim.item_id, None)
        return bool(done)

    async def heartbeat(self, target: str, lease: float) -> int:
        """Say this worker is alive; returns how many workers of `target` are (itself
        included): those seen within the last `lease` seconds."""
        async with self._locked():
            await self._conn.execute(
                f"INSERT INTO workers (owner, target, seen_at) VALUES ($1, $2, {_NOW}) "
                "ON CONFLICT (owner) DO UPDATE SET target = excluded.target, "
                "seen_at = excluded.seen_at",
                self.owner,
                target,
            )
            live: int = await self._conn.fetchval(
                f"SELECT COUNT(*) FROM workers WHERE target = $1 AND seen_at > {_NOW} - $2",
                target,
                lease,
            )
        return max(1, live)

    async def sign_off(self) -> None:
        """This worker is done: the others take its share of the limits at once."""
        async with self._locked():
            await self._conn.execute("DELETE FROM workers WHERE owner = $1", self.owner)

    def holds(self, claim: Claim) -> bool:
        """Whether this process surely still holds `claim`: it has not lost it, and the
        lease has not run out by our clock (a process stopped for longer than its lease
        cannot know without asking: `renew` tells)."""
        live = time.monotonic() < self._until.get(claim.item_id, 0.0)
        return live and self.claimed(claim)

    def claimed(self, claim: Claim) -> bool:
        """Whether `claim` is among what this process claimed and did not lose."""
        return self._claims.get(claim.key) == claim

    async def open_work(self, target: str) -> tuple[int, float | None]:
        """How many queued items of `target` are not finished, and in how many seconds
        the first lease held on them runs out (None: none is held)."""
        sql = (
            f"SELECT COUNT(*), MIN(lease_until) - {_NOW} FROM queue "
            "WHERE target = ? AND NOT finished"
        )
        rows = await self._fetch(sql, [target])
        count, wait = rows[0]
        return int(count), None if wait is None else float(wait)

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[Any]:
        """The connection, to this task alone, inside one transaction (for bulk copies)."""
        await self.flush()
        async with self._db_lock, self._transaction():
            yield self._conn

    # -- internals ----------------------------------------------------------------------------

    def put_item(self, update: ItemUpdate) -> None:
        super().put_item(update)
        key = (update.target, update.upload_path, update.file_name)
        claim = self._claims.get(key) or self._lost.get(key)
        if claim is not None:
            params = self._items[-1]
            state = update.state if isinstance(update.state, ItemState) else None
            state = state if self.settles_by_state else None
            params["claim"] = claim
            params["release"] = state is not None and state not in _KEEPS_LEASE
            params["finish"] = state is not None and state not in _KEEPS_LEASE | _RELEASES

    def put_attempt(self, record: AttemptRecord) -> None:
        super().put_attempt(record)
        key = (record.target, record.upload_path, record.file_name)
        claim = self._claims.get(key) or self._lost.get(key)
        if claim is not None:  # its row is known: written with the results, by id
            self._attempts[-1]["item_id"] = claim.item_id

    async def _migrate(self) -> None:
        async with self._db_lock, self._transaction():
            await self._conn.execute("SELECT pg_advisory_xact_lock($1)", _MIGRATION_LOCK)
            await self._conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations (version BIGINT PRIMARY KEY, "
                "description TEXT NOT NULL, applied_at DOUBLE PRECISION NOT NULL)"
            )
            current = await self._conn.fetchval("SELECT MAX(version) FROM schema_migrations")
            current = int(current or 0)
            if current > SCHEMA_VERSION:
                raise LedgerError(
                    f"ledger {self.where} was written by a newer migrator (schema {current}); "
                    f"this one knows schema {SCHEMA_VERSION}: upgrade migrator"
                )
            for migration in MIGRATIONS:
                if migration.version <= current:
                    continue
                for statement in migration.statements:
                    await self._conn.execute(_pg_types(statement))
                await self._conn.execute(
                    "INSERT INTO schema_migrations VALUES ($1, $2, $3)",
                    migration.version,
                    migration.description,
                    time.time(),
                )
            for statement in _QUEUE_SCHEMA:
                await self._conn.execute(statement)

    async def _write_batch(
        self, items: list[dict[str, object]], attempts: list[dict[str, object]]
    ) -> None:
        plain = [p for p in items if "claim" not in p]
        fenced = sorted((p for p in items if "claim" in p), key=_claim_id)
        by_id = all("item_id" in a for a in attempts)
        if fenced and not plain and by_id and _one_result_per_claim(fenced):
            await self._write_results(fenced, attempts)  # one statement: no transaction
            return
        refused: list[dict[str, object]] = []
        async with self._transaction():
            if plain:
                await self._conn.executemany(_UPSERT_SQL, [_args(p, _UPSERT_NAMES) for p in plain])
            if fenced:
                held = await self._write_held(fenced)
                refused = [p for p in fenced if _claim(p).item_id not in held]
            await self._record_refusals(refused, attempts)
        self._after_write(fenced, refused)

    async def _record_refusals(
        self, refused: list[dict[str, object]], attempts: list[dict[str, object]]
    ) -> None:
        """Queue again the items of refused final results, and write the attempts rows
        (one per refusal besides `attempts`); inside the caller's transaction."""
        redo = sorted({(_claim(p).item_id, _claim(p).queue) for p in refused if p["release"]})
        if redo:
            await self._conn.execute(_REDO_SQL, *map(list, zip(*redo, strict=True)))
        records = attempts + _refusals(refused)
        if records:
            rows = [_args(p, _ATTEMPT_NAMES) for p in records]
            await self._conn.executemany(_ATTEMPT_SQL, rows)

    async def _write_results(
        self, fenced: list[dict[str, object]], attempts: list[dict[str, object]]
    ) -> None:
        """Results, one per claim, and attempts rows: written in one statement, each
        result where its claim is held; the refused are then recorded as the
        transaction path does."""
        held = await self._write_held(fenced, attempts)
        refused = [p for p in fenced if _claim(p).item_id not in held]
        if refused:
            async with self._transaction():
                await self._record_refusals(refused, [])
        self._after_write(fenced, refused)

    async def _write_held(
        self, fenced: list[dict[str, object]], attempts: list[dict[str, object]] | None = None
    ) -> set[int]:
        """Write the results of claims this process still holds, in one statement when
        each claim has one result (with `attempts`, when given); returns the ids of the
        held items."""
        claims = [_claim(p) for p in fenced]
        if _one_result_per_claim(fenced):
            results = json.dumps([_result(p) for p in fenced], default=str)
            logged = json.dumps([{**a, "n": n} for n, a in enumerate(attempts or [])])
            found = await self._conn.fetch(
                _WRITE_HELD_SQL, self.owner, *_fence(claims), results, logged
            )
            return {r[0] for r in found}
        assert not attempts, "attempts go with one result per claim, or by the caller"
        claims = list(set(claims))
        held = {r[0] for r in await self._conn.fetch(_HOLD_SQL, self.owner, *_fence(claims))}
        written = [p for p in fenced if _claim(p).item_id in held]
        if written:
            rows = [_args({**p, "item_id": _claim(p).item_id}, _HELD_ITEM_NAMES) for p in written]
            await self._conn.executemany(_HELD_ITEM_SQL, rows)
            settled = [
                (_claim(p).item_id, p["finish"], p["release"], _claim(p).queue)
                for p in written
                if p["finish"] or p["release"]
            ]
            if settled:
                await self._conn.executemany(_SETTLE_QUEUE_SQL, settled)
        return held

    def _after_write(
        self, fenced: list[dict[str, object]], refused: list[dict[str, object]]
    ) -> None:
        for params in fenced:
            claim = params["claim"]
            assert isinstance(claim, Claim)
            gone = params["release"] or any(params is r for r in refused)
            if gone and self._claims.get(claim.key) == claim:
                del self._claims[claim.key]
        for params in refused:
            claim = params["claim"]
            assert isinstance(claim, Claim)
            self.refused += 1
            log.warning(
                "lease.result_refused",
                item=f"{params['upload_path']}/{params['file_name']}",
                state=params["state"],
                attempt=claim.attempt,
                why="another worker holds the item now: this worker's lease ran out",
                then="queued again, in case this worker's upload replaced the other's"
                if params["release"]
                else None,
            )

    async def _fetch(self, sql: str, params: Sequence[object]) -> list[Sequence[Any]]:
        await self.flush()
        async with self._locked():
            records = await self._conn.fetch(_numbered(sql), *params)
        return [tuple(record) for record in records]

    def _errors(self) -> contextlib.AbstractContextManager[None]:
        return _as_ledger_error(self.where)

    @contextlib.asynccontextmanager
    async def _locked(self) -> AsyncIterator[None]:
        """The connection to this task alone, its failures as LedgerError."""
        async with self._db_lock:
            with self._errors():
                yield

    @contextlib.asynccontextmanager
    async def _transaction(self) -> AsyncIterator[None]:
        with self._errors():
            async with self._conn.transaction():
                yield


def _plan_key(target: str) -> str:
    return f"migrator.plan:{target}"


def _fence(claims: Sequence[Claim]) -> tuple[list[int], list[int], list[str]]:
    """The ids, attempts and queues of `claims`, as `_mine` takes them (pure)."""
    return [c.item_id for c in claims], [c.attempt for c in claims], [c.queue for c in claims]


def _claim(params: Mapping[str, object]) -> Claim:
    claim = params["claim"]
    assert isinstance(claim, Claim)
    return claim


def _one_result_per_claim(fenced: list[dict[str, object]]) -> bool:
    return len({_claim(p) for p in fenced}) == len(fenced)


def _result(params: Mapping[str, object]) -> dict[str, object]:
    """One fenced result as `_WRITE_HELD_SQL` reads it (pure)."""
    row = dict(zip(_HELD_ITEM_NAMES, _args(params, _HELD_ITEM_NAMES), strict=True))
    row["id"] = row["item_id"] = _claim(params).item_id
    row["finish"], row["release"] = bool(params["finish"]), bool(params["release"])
    return row


def _claim_id(params: dict[str, object]) -> int:
    return _claim(params).item_id


def _new_item(update: ItemUpdate, now: float) -> dict[str, object]:
    """A new item's row as `_ENQUEUE_SQL` reads it (pure): what it keeps is NULL."""
    row = _item_params(update, now)
    row["attempts"] = row.pop("attempts_added")
    return row


def _args(params: Mapping[str, object], names: Sequence[str]) -> list[object]:
    return [bool(params[n]) if n.startswith("keep_") else params.get(n) for n in names]


def _refusals(refused: list[dict[str, object]]) -> list[dict[str, object]]:
    """An attempts row per refused result, so the ledger shows it as the log does."""
    records: list[dict[str, object]] = []
    for params in refused:
        claim = params["claim"]
        assert isinstance(claim, Claim)
        records.append(
            {
                "run_id": None,
                "target": params["target"],
                "upload_path": params["upload_path"],
                "file_name": params["file_name"],
                "method": params.get("method"),
                "attempt": claim.attempt,
                "started_at": time.time(),
                "duration": None,
                "http_status": None,
                "outcome": "refused",
                "bytes_sent": None,
                "error": f"result ({params['state']}) of claim {claim.attempt} refused: "
                "the lease ran out and another worker holds the item",
            }
        )
    return records


async def _connect(url: str, where: str) -> Any:
    try:
        import asyncpg
    except ImportError:
        raise LedgerError(
            f"ledger {where} is a PostgreSQL database: install kie-migrator[postgresql] (asyncpg)"
        ) from None
    with _as_ledger_error(where):
        try:
            return await asyncpg.connect(url, timeout=CONNECT_TIMEOUT)
        except ValueError as err:  # a port out of range, an option asyncpg does not know
            raise LedgerError(f"ledger {where} is not a usable PostgreSQL URL: {err}") from None


@contextlib.contextmanager
def _as_ledger_error(where: str) -> Iterator[None]:
    try:
        yield
    except LedgerError:
        raise
    except (OSError, TimeoutError) as err:
        raise LedgerError(f"cannot reach the ledger {where}: {_one_line(err)}") from None
    except Exception as err:
        if type(err).__module__.startswith("asyncpg"):
            raise LedgerError(f"ledger {where}: {_one_line(err)}") from None
        raise


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


__all__ = ["Claim", "ClaimedWork", "PgLedger", "redacted", "worker_name"]
