"""Folding SQLite ledgers into one: `migrator ledger merge`, and the union that `status`
and `export` read when given several `--ledger`s.

The usual inputs are the ledgers of `--shard K/N` runs, which hold disjoint items. When
an item is in several ledgers anyway, the row from the ledger holding its newest attempt
wins (the last upload to a name is what the service serves), then the most recently
updated row. Every attempt and every run of every ledger is kept, each once: merging a
ledger twice, or a merged ledger with its own shards again, adds nothing. Facts (the
service's clock, link deaths) keep their newest value.

The output is built in a new file beside OUT and renamed over it: a merge that fails
leaves OUT as it was. OUT is locked meanwhile, and so is every input whose folder can
take a lock file: a shard still running is refused, not merged halfway.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import tempfile
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

from migrator.errors import LedgerError
from migrator.ledger import Ledger, ledger_error, locked

_RUN_COLUMNS = ("command", "manifest", "started_at", "finished_at", "status", "pid", "summary")
_RUN_IDENTITY = ("command", "manifest", "started_at", "pid")  # one run, in whichever ledger

_RUN_MAP = "CREATE TEMP TABLE run_map (src_id INTEGER PRIMARY KEY, id INTEGER)"
_NEWEST_ATTEMPT = (
    "COALESCE((SELECT MAX(a.started_at) FROM {schema}.attempts AS a "
    "WHERE a.item_id = {item}.id), -1)"
)
_SAME_ITEM = (
    "{a}.target = {b}.target AND {a}.upload_path = {b}.upload_path "
    "AND {a}.file_name = {b}.file_name"
)


@dataclass(frozen=True, slots=True)
class MergeCounts:
    """What a merged ledger holds, and how many input rows named an item already seen."""

    ledgers: int
    items: int
    attempts: int
    runs: int
    overlapping: int  # item rows beyond the first for the same item (0 for true shards)

    def line(self, out: Path) -> str:
        text = (
            f"merged {self.ledgers} ledgers into {out}: {self.items:,} items, "
            f"{self.attempts:,} attempts, {self.runs:,} runs"
        )
        if self.overlapping:
            text += (
                f"; {self.overlapping:,} item rows named an item another ledger also holds "
                "(the newest attempt won)"
            )
        return text


async def merge_ledgers(out: Path, inputs: Sequence[Path]) -> MergeCounts:
    """Replace `out` (absent, or a migrator ledger) with the union of `inputs`. Name
    `out` among the inputs to fold the others into it. Raises LedgerError."""
    out = Path(out)
    await _check_out(out)
    await _check_inputs(inputs)
    with contextlib.ExitStack() as locks:
        locks.enter_context(locked(out))
        held = [out]
        for path in inputs:
            if not any(_same_file(path, other) for other in held) and _lockable(path):
                locks.enter_context(locked(path))
                held.append(path)
        with _scratch_beside(out) as scratch:
            counts = await _build(scratch, inputs)
            _replace(out, scratch)
    return counts


@contextlib.asynccontextmanager
async def union_of(ledgers: Sequence[Path]) -> AsyncIterator[Path]:
    """A ledger file holding the union of `ledgers` (the one itself when alone), for
    reading; a union is built in a temporary folder, removed afterwards."""
    if len(ledgers) == 1:
        yield ledgers[0]
        return
    await _check_inputs(ledgers)
    with tempfile.TemporaryDirectory(prefix="migrator-union-") as folder:
        path = Path(folder) / "union.sqlite"
        await _build(path, ledgers)
        yield path


# -- checks ----------------------------------------------------------------------------------


async def _check_out(out: Path) -> None:
    """OUT may be absent or a migrator ledger; anything else is left alone."""
    refusal = f"{out} is not a migrator ledger: refusing to overwrite it; choose another OUT"
    state = _file_state(out)
    if state == "absent":
        return
    if state != "file":
        raise LedgerError(f"{refusal} (it {state})")
    try:
        async with await Ledger.open(out, readonly=True):
            pass
    except LedgerError:
        raise LedgerError(refusal) from None


async def _check_inputs(paths: Sequence[Path]) -> None:
    """Each input must be an existing ledger of this schema (Ledger.open says why not)."""
    for path in paths:
        state = _file_state(path)
        if state != "file":
            raise LedgerError(f"ledger {path} {'does not exist' if state == 'absent' else state}")
        async with await Ledger.open(path, readonly=True):
            pass


def _file_state(path: Path) -> str:
    """`file`, `absent`, or what else the path is, in words for a message."""
    if not path.exists():
        return "absent"
    if not path.is_file():
        return "is not a file"
    return "is empty" if path.stat().st_size == 0 else "file"


def _lockable(path: Path) -> bool:
    """A ledger on a read-only mount cannot take a lock file, nor be written by a run."""
    return os.access(path.parent, os.W_OK)


def _same_file(a: Path, b: Path) -> bool:
    with contextlib.suppress(OSError):
        return a.samefile(b)
    return False


# -- building --------------------------------------------------------------------------------


async def _build(path: Path, inputs: Sequence[Path]) -> MergeCounts:
    """A new ledger at `path` (absent or empty) holding the union of `inputs`."""
    async with await Ledger.open(path):  # the schema, made as any ledger's is
        pass
    return await asyncio.to_thread(_fold_all, path, list(inputs))


def _fold_all(path: Path, inputs: list[Path]) -> MergeCounts:
    conn = sqlite3.connect(_uri(path), uri=True, isolation_level=None)
    try:
        with _naming(path):
            conn.execute(_RUN_MAP)
        runs = _merge_runs(conn, inputs)
        seen = 0
        for source in inputs:
            with _attached(conn, source):
                seen += _fold(conn, runs)
        with _naming(path):
            counts = _counts(conn, len(inputs), seen)
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        return counts
    finally:
        conn.close()


def _uri(path: Path, *, readonly: bool = False) -> str:
    return f"file:{quote(str(path))}" + ("?mode=ro" if readonly else "")


@contextlib.contextmanager
def _naming(path: Path) -> Iterator[None]:
    """A SQLite failure as the LedgerError naming the ledger it happened in."""
    try:
        yield
    except sqlite3.Error as err:
        raise ledger_error(path, err) from err


@contextlib.contextmanager
def _attached(conn: sqlite3.Connection, path: Path) -> Iterator[None]:
    """`path` as the schema `src`, read-only; what fails meanwhile names it."""
    with _naming(path):
        conn.execute("ATTACH DATABASE ? AS src", (_uri(path, readonly=True),))
        try:
            yield
        finally:
            conn.execute("DETACH DATABASE src")


RunKey = tuple[Any, ...]


def _merge_runs(conn: sqlite3.Connection, inputs: list[Path]) -> dict[RunKey, int]:
    """Every input's runs, each once, numbered in the order they started (so the last
    run `status` shows is the one that started last); returns run identity -> id."""
    found: dict[RunKey, tuple[Any, ...]] = {}
    for source in inputs:
        with _attached(conn, source):
            rows = conn.execute(f"SELECT {', '.join(_RUN_COLUMNS)} FROM src.runs ORDER BY id")
            for row in rows:
                found.setdefault(_run_key(row), row)
    ordered = sorted(found.values(), key=lambda row: row[2] or 0.0)
    ids: dict[RunKey, int] = {}
    with _transaction(conn):
        for row in ordered:
            _run_id(conn, ids, row)
    return ids


def _run_id(conn: sqlite3.Connection, ids: dict[RunKey, int], row: Sequence[Any]) -> int:
    """The merged id of the run `row` describes, inserted when new (a union of live
    ledgers may meet a run that started after the runs were gathered)."""
    key = _run_key(row)
    if key not in ids:
        placeholders = ", ".join("?" for _ in _RUN_COLUMNS)
        sql = f"INSERT INTO main.runs ({', '.join(_RUN_COLUMNS)}) VALUES ({placeholders})"
        cursor = conn.execute(sql, tuple(row))
        assert cursor.lastrowid is not None
        ids[key] = cursor.lastrowid
    return ids[key]


def _run_key(row: Sequence[Any]) -> RunKey:
    return tuple(row[_RUN_COLUMNS.index(name)] for name in _RUN_IDENTITY)


def _fold(conn: sqlite3.Connection, runs: dict[RunKey, int]) -> int:
    """Fold the attached `src` into main; returns how many items `src` holds."""
    columns = _item_columns(conn)
    run_query = f"SELECT id, {', '.join(_RUN_COLUMNS)} FROM src.runs"
    with _transaction(conn):  # one snapshot of src, even of a ledger a run is writing
        rows = conn.execute(run_query).fetchall()
        mapping = [(row[0], _run_id(conn, runs, row[1:])) for row in rows]
        conn.execute("DELETE FROM temp.run_map")
        conn.executemany("INSERT INTO temp.run_map (src_id, id) VALUES (?, ?)", mapping)
        conn.execute(_update_winners(columns))
        conn.execute(_insert_new_items(columns))
        conn.execute(_INSERT_ATTEMPTS)
        conn.execute(_MERGE_FACTS)
        (count,) = conn.execute("SELECT COUNT(*) FROM src.items").fetchone()
    return int(count)


def _item_columns(conn: sqlite3.Connection) -> list[str]:
    """Every column of items but the id, as this migrator's schema has them."""
    rows = conn.execute("SELECT name FROM pragma_table_info('items', 'main')").fetchall()
    return [str(name) for (name,) in rows if name != "id"]


def _update_winners(columns: list[str]) -> str:
    """Rows of main that an incoming row beats: a newer attempt, or as new and updated later."""
    assignments = ", ".join(f"{c} = s.{c}" for c in columns)
    incoming = f"({_NEWEST_ATTEMPT.format(schema='src', item='s')}, COALESCE(s.updated_at, -1))"
    current = f"({_NEWEST_ATTEMPT.format(schema='main', item='m')}, COALESCE(m.updated_at, -1))"
    return (
        f"UPDATE main.items AS m SET {assignments} FROM src.items AS s "
        f"WHERE {_SAME_ITEM.format(a='s', b='m')} AND {incoming} > {current}"
    )


def _insert_new_items(columns: list[str]) -> str:
    names = ", ".join(columns)
    return (
        f"INSERT INTO main.items ({names}) SELECT {', '.join(f's.{c}' for c in columns)} "
        f"FROM src.items AS s WHERE NOT EXISTS "
        f"(SELECT 1 FROM main.items AS m WHERE {_SAME_ITEM.format(a='m', b='s')}) ORDER BY s.id"
    )


_ATTEMPT_FIELDS = (
    "method",
    "attempt",
    "started_at",
    "duration",
    "http_status",
    "outcome",
    "bytes_sent",
    "error",
)
_INSERT_ATTEMPTS = f"""
INSERT INTO main.attempts (run_id, item_id, {", ".join(_ATTEMPT_FIELDS)})
SELECT r.id, m.id, {", ".join(f"a.{c}" for c in _ATTEMPT_FIELDS)}
FROM src.attempts AS a
JOIN src.items AS s ON s.id = a.item_id
JOIN main.items AS m ON {_SAME_ITEM.format(a="m", b="s")}
LEFT JOIN temp.run_map AS r ON r.src_id = a.run_id
WHERE NOT EXISTS (
    SELECT 1 FROM main.attempts AS d
    WHERE d.item_id = m.id AND d.run_id IS r.id AND d.attempt IS a.attempt
    AND d.started_at IS a.started_at AND d.method IS a.method
)
ORDER BY a.id
"""

_MERGE_FACTS = """
INSERT INTO main.facts (name, value, updated_at)
SELECT name, value, updated_at FROM src.facts WHERE true
ON CONFLICT (name) DO UPDATE SET value = excluded.value, updated_at = excluded.updated_at
WHERE excluded.updated_at > facts.updated_at
"""


@contextlib.contextmanager
def _transaction(conn: sqlite3.Connection) -> Iterator[None]:
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def _counts(conn: sqlite3.Connection, ledgers: int, seen: int) -> MergeCounts:
    def count(table: str) -> int:
        return int(conn.execute(f"SELECT COUNT(*) FROM main.{table}").fetchone()[0])

    items = count("items")
    return MergeCounts(ledgers, items, count("attempts"), count("runs"), seen - items)


# -- putting the result in place -------------------------------------------------------------


@contextlib.contextmanager
def _scratch_beside(out: Path) -> Iterator[Path]:
    """A path in OUT's folder (so the rename is atomic), removed unless it was renamed."""
    try:
        out.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".merging", dir=out.parent)
    except OSError as err:
        raise LedgerError(f"cannot write beside {out}: {err.strerror or err}") from None
    os.close(fd)
    scratch = Path(name)
    try:
        yield scratch
    finally:
        for leftover in (scratch, *_sidecars(scratch)):
            with contextlib.suppress(FileNotFoundError):
                leftover.unlink()


def _sidecars(path: Path) -> tuple[Path, Path]:
    return path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")


def _replace(out: Path, built: Path) -> None:
    """Rename `built` over `out`. A WAL left beside an old OUT would be replayed into
    the new file: it is folded into the old one first, and removed."""
    try:
        if out.exists():
            _fold_wal(out)
        for sidecar in _sidecars(out):
            with contextlib.suppress(FileNotFoundError):
                sidecar.unlink()
        _fsync(built)
        built.replace(out)
        _fsync(out.parent)
    except OSError as err:
        raise LedgerError(f"cannot replace the ledger {out}: {err.strerror or err}") from None


def _fold_wal(path: Path) -> None:
    conn = sqlite3.connect(_uri(path), uri=True, isolation_level=None)
    try:
        with _naming(path):
            busy, _, _ = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
    finally:
        conn.close()
    if busy:
        raise LedgerError(f"ledger {path} is busy; is another process reading it?")


def _fsync(path: Path) -> None:
    flags = os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0)
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
