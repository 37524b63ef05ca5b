"""`migrator ledger import`: move a job's SQLite ledger into a PostgreSQL ledger.

Items, attempts, runs and facts are copied as they are; an item the database already
holds (same target, upload path and file name) takes the file's row when the file's is
newer. The same file (path, size and modification time) is imported once: a second
import is refused rather than doubling its attempts and runs.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from migrator.errors import LedgerError, UsageError
from migrator.ledger import _ITEM_COLUMNS, Ledger
from migrator.ledger_pg import PgLedger

PAGE = 1000

_COLUMNS = [c.strip() for c in _ITEM_COLUMNS.split(",")][1:]  # all but id
_KEY = ("target", "upload_path", "file_name")
_IMPORT_ITEM = f"""
INSERT INTO items ({", ".join(_COLUMNS)})
VALUES ({", ".join(f"${i}" for i in range(1, len(_COLUMNS) + 1))})
ON CONFLICT (target, upload_path, file_name) DO UPDATE SET
    {", ".join(f"{c} = excluded.{c}" for c in _COLUMNS if c not in _KEY)}
WHERE items.updated_at IS NULL OR excluded.updated_at >= items.updated_at
"""
_IMPORT_ATTEMPT = """
INSERT INTO attempts (run_id, item_id, method, attempt, started_at, duration, http_status,
    outcome, bytes_sent, error)
SELECT $1::bigint, id, $5::text, $6::bigint, $7::float8, $8::float8, $9::bigint, $10::text,
    $11::bigint, $12::text
FROM items WHERE target = $2 AND upload_path = $3 AND file_name = $4
"""
_IMPORT_RUN = """
INSERT INTO runs (command, manifest, started_at, finished_at, status, pid, summary)
VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING id
"""


@dataclass(frozen=True, slots=True)
class Imported:
    items: int
    attempts: int
    runs: int
    facts: int

    def line(self, source: Path, where: str) -> str:
        return (
            f"imported {self.items} items, {self.attempts} attempts, {self.runs} runs and "
            f"{self.facts} facts from {source} into {where}"
        )


def _import_marker(source: Path) -> str:
    """The fact that says this very file was imported (its path, size and mtime)."""
    if not source.is_file():
        raise UsageError(f"ledger import: {source} is not a ledger file")
    stamp = source.stat()
    return f"imported:{source.resolve()}:{stamp.st_size}:{stamp.st_mtime_ns}"


async def import_sqlite(source: Path, url: str) -> Imported:
    """Copy the SQLite ledger at `source` into the PostgreSQL ledger at `url`."""
    marker = _import_marker(source)
    async with await Ledger.open(source, readonly=True):
        pass  # refuses a file that is not a ledger, or of another schema
    with contextlib.closing(sqlite3.connect(f"file:{source}?mode=ro", uri=True)) as db:
        async with await PgLedger.open(url) as ledger:
            if await ledger.fact(marker) is not None:
                raise LedgerError(f"{source} was already imported into {ledger.where}")
            imported = await _copy(db, ledger)
            await ledger.set_fact(marker, True)
    return imported


async def _copy(db: sqlite3.Connection, ledger: PgLedger) -> Imported:
    items = attempts = runs = facts = 0
    run_ids: dict[int, int] = {}
    async with ledger.transaction() as conn:
        for row in _rows(db, "SELECT id, command, manifest, started_at, finished_at, status, "
                             "pid, summary FROM runs ORDER BY id"):  # fmt: skip
            run_ids[row[0]] = await conn.fetchval(_IMPORT_RUN, *row[1:])
            runs += 1
        for page in _pages(db, f"SELECT {', '.join(_COLUMNS)} FROM items ORDER BY id"):
            await conn.executemany(_IMPORT_ITEM, page)
            items += len(page)
        sql = (
            "SELECT a.run_id, i.target, i.upload_path, i.file_name, a.method, a.attempt, "
            "a.started_at, a.duration, a.http_status, a.outcome, a.bytes_sent, a.error "
            "FROM attempts a JOIN items i ON i.id = a.item_id ORDER BY a.id"
        )
        for page in _pages(db, sql):
            rows = [(run_ids.get(row[0]), *row[1:]) for row in page]
            await conn.executemany(_IMPORT_ATTEMPT, rows)
            attempts += len(rows)
        for row in _rows(db, "SELECT name, value, updated_at FROM facts"):
            await conn.execute(
                "INSERT INTO facts (name, value, updated_at) VALUES ($1, $2, $3) "
                "ON CONFLICT (name) DO UPDATE SET value = excluded.value, "
                "updated_at = excluded.updated_at WHERE excluded.updated_at >= facts.updated_at",
                *row,
            )
            facts += 1
    return Imported(items, attempts, runs, facts)


def _rows(db: sqlite3.Connection, sql: str) -> Iterator[Sequence[Any]]:
    for page in _pages(db, sql):
        yield from page


def _pages(db: sqlite3.Connection, sql: str) -> Iterator[list[tuple[Any, ...]]]:
    cursor = db.execute(sql)
    while page := cursor.fetchmany(PAGE):
        yield [tuple(row) for row in page]


__all__ = ["Imported", "import_sqlite"]
