"""The SQLite ledger: durable, batched, never a traceback, never overwrites what it cannot read."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import stat
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import LEDGER_TARGET as TARGET
from conftest import item_update

from migrator.errors import LedgerError
from migrator.ledger import SCHEMA_VERSION, Ledger
from migrator.model import AttemptRecord, ItemState, ItemUpdate, Method, SourceKind

HOUR = 3600.0


def done(name: str, *, uploaded_at: float, expires_at: float, size: int = 10) -> ItemUpdate:
    return item_update(
        name,
        ItemState.DONE,
        size=size,
        method=Method.BASE64,
        download_url=f"https://files.example/{name}",
        uploaded_at=uploaded_at,
        expires_at=expires_at,
        last_error=None,
    )


def attempt(name: str, run_id: int, number: int, outcome: str = "ok") -> AttemptRecord:
    return AttemptRecord(
        run_id=run_id,
        target=TARGET,
        upload_path="batch",
        file_name=name,
        method=Method.BASE64,
        attempt=number,
        started_at=1_700_000_000.0,
        duration=0.25,
        outcome=outcome,
        http_status=200 if outcome == "ok" else 503,
        bytes_sent=10,
    )


@pytest.fixture
def ledger_path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "job.ledger.sqlite"


@pytest.fixture
async def ledger(ledger_path: Path) -> AsyncIterator[Ledger]:
    # A long interval: these tests decide when writes happen.
    opened = await Ledger.open(ledger_path, flush_interval=60.0)
    yield opened
    await opened.close()


# Plain file access for the checks (sync helpers: the tests read small files).
def read_bytes(path: Path) -> bytes:
    return path.read_bytes()


def write_bytes(path: Path, data: bytes) -> None:
    path.write_bytes(data)


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def sql_rows(path: Path, query: str) -> list[tuple[object, ...]]:
    conn = sqlite3.connect(path)
    try:
        return list(conn.execute(query).fetchall())
    finally:
        conn.close()


async def test_new_ledger_file_is_private_and_its_folder_is_created(ledger_path: Path) -> None:
    async with await Ledger.open(ledger_path):
        pass
    assert mode_of(ledger_path) == 0o600
    assert mode_of(ledger_path.parent) == 0o700


async def test_ledger_uses_write_ahead_logging(ledger_path: Path) -> None:
    async with await Ledger.open(ledger_path):
        pass
    assert sql_rows(ledger_path, "PRAGMA journal_mode") == [("wal",)]


async def test_schema_version_is_recorded(ledger_path: Path) -> None:
    async with await Ledger.open(ledger_path):
        pass
    rows = sql_rows(ledger_path, "SELECT MAX(version) FROM schema_migrations")
    assert rows == [(SCHEMA_VERSION,)]


async def test_reopening_keeps_items(ledger_path: Path) -> None:
    async with await Ledger.open(ledger_path) as first:
        first.put_item(item_update("a.txt"))
    async with await Ledger.open(ledger_path) as second:
        item = await second.get(TARGET, "batch", "a.txt")
    assert item is not None
    assert item.state is ItemState.PENDING


async def test_update_without_link_keeps_the_known_link(ledger: Ledger) -> None:
    ledger.put_item(done("a.txt", uploaded_at=100.0, expires_at=200.0))
    await ledger.flush()
    ledger.put_item(item_update("a.txt", ItemState.DONE, last_error="refresh failed: 503"))
    item = await ledger.get(TARGET, "batch", "a.txt")
    assert item is not None
    assert item.download_url == "https://files.example/a.txt"
    assert (item.uploaded_at, item.expires_at) == (100.0, 200.0)
    assert item.last_error == "refresh failed: 503"


async def test_state_is_always_written_and_a_field_given_none_is_cleared(ledger: Ledger) -> None:
    ledger.put_item(item_update("a.txt", ItemState.FAILED, last_error="HTTP 400"))
    await ledger.flush()
    ledger.put_item(done("a.txt", uploaded_at=1.0, expires_at=2.0))
    item = await ledger.get(TARGET, "batch", "a.txt")
    assert item is not None
    assert item.state is ItemState.DONE
    assert item.last_error is None


async def test_a_field_left_out_keeps_its_value(ledger: Ledger) -> None:
    ledger.put_item(item_update("a.txt", ItemState.FAILED, last_error="HTTP 400", sha256="ab" * 32))
    await ledger.flush()
    ledger.put_item(item_update("a.txt", ItemState.INTERRUPTED))
    item = await ledger.get(TARGET, "batch", "a.txt")
    assert item is not None
    assert (item.state, item.last_error, item.sha256) == (
        ItemState.INTERRUPTED,
        "HTTP 400",
        "ab" * 32,
    )


async def test_a_download_is_cleared_by_an_upload_of_other_bytes(ledger: Ledger) -> None:
    ledger.put_item(
        item_update("a.txt", ItemState.DONE, downloaded_path="/dl/a.txt", downloaded_at=5.0)
    )
    await ledger.flush()
    ledger.put_item(item_update("a.txt", ItemState.DONE, downloaded_path=None, downloaded_at=None))
    item = await ledger.get(TARGET, "batch", "a.txt")
    assert item is not None
    assert (item.downloaded_path, item.downloaded_at) == (None, None)


async def test_given_size_and_method_replace_the_old_ones(ledger: Ledger) -> None:
    ledger.put_item(item_update("a.txt", size=10, method=Method.BASE64))
    await ledger.flush()
    ledger.put_item(item_update("a.txt", size=5_000_000, method=Method.STREAM))
    ledger.put_item(item_update("a.txt"))
    item = await ledger.get(TARGET, "batch", "a.txt")
    assert item is not None
    assert (item.size, item.method) == (5_000_000, Method.STREAM)


async def test_attempts_accumulate_across_updates(ledger: Ledger) -> None:
    ledger.put_item(item_update("a.txt", attempts_added=2))
    await ledger.flush()
    ledger.put_item(item_update("a.txt", attempts_added=3))
    item = await ledger.get(TARGET, "batch", "a.txt")
    assert item is not None
    assert item.attempts == 5


async def test_updates_to_one_item_in_one_batch_apply_in_order(ledger: Ledger) -> None:
    ledger.put_item(item_update("a.txt", ItemState.PENDING, attempts_added=1))
    ledger.put_item(item_update("a.txt", ItemState.FAILED, last_error="boom", attempts_added=1))
    ledger.put_item(done("a.txt", uploaded_at=1.0, expires_at=2.0))
    await ledger.flush()
    item = await ledger.get(TARGET, "batch", "a.txt")
    assert item is not None
    assert (item.state, item.last_error, item.attempts) == (ItemState.DONE, None, 2)
    assert ledger.flushes == 1


async def test_updates_of_one_item_in_one_batch_leave_the_row_writing_each_would(
    tmp_path: Path,
) -> None:
    updates = [
        item_update("a.txt", size=10, etag="e1"),
        item_update("a.txt", ItemState.FAILED, last_error="boom", attempts_added=1, size=None),
        ItemUpdate(TARGET, "batch", "a.txt", ItemState.PENDING, uncertain_at=5.0),
        done("a.txt", uploaded_at=1.0, expires_at=2.0, size=12),
        ItemUpdate(TARGET, "batch", "a.txt", ItemState.DONE, checked_at=3.0, attempts_added=2),
    ]
    rows = []
    for flush_each in (True, False):
        async with await Ledger.open(tmp_path / f"{flush_each}.sqlite") as ledger:
            for change in updates:
                ledger.put_item(change)
                if flush_each:
                    await ledger.flush()
            await ledger.flush()
            rows.append(await ledger.get(TARGET, "batch", "a.txt"))
    assert rows[0] is not None and rows[1] is not None
    assert replace(rows[1], updated_at=rows[0].updated_at) == rows[0]
    assert rows[0].attempts == 3


async def test_an_attempt_of_a_new_item_done_in_the_same_batch_is_recorded(
    ledger: Ledger, ledger_path: Path
) -> None:
    run_id = await ledger.start_run("run", "job.yaml")
    ledger.put_item(item_update("a.txt"))
    ledger.put_attempt(attempt("a.txt", run_id, 1))
    ledger.put_item(done("a.txt", uploaded_at=1.0, expires_at=2.0))
    await ledger.flush()
    item = await ledger.get(TARGET, "batch", "a.txt")
    assert item is not None and item.state is ItemState.DONE
    assert [row.outcome for row in await ledger.attempts_of(item.id)] == ["ok"]


async def test_items_are_keyed_by_target(ledger: Ledger) -> None:
    ledger.put_item(done("a.txt", uploaded_at=1.0, expires_at=2.0))
    assert await ledger.get("http://elsewhere/api", "batch", "a.txt") is None
    assert await ledger.get(TARGET, "batch", "a.txt") is not None


async def test_lookup_sees_buffered_updates(ledger: Ledger) -> None:
    ledger.put_item(item_update("a.txt"))
    ledger.put_item(item_update("b.txt"))
    found = await ledger.lookup(TARGET, [("batch", "a.txt"), ("batch", "b.txt"), ("x", "y")])
    assert set(found) == {("batch", "a.txt"), ("batch", "b.txt")}
    assert found["batch", "a.txt"].source == "/data/a.txt"


async def test_lookup_of_more_keys_than_one_query_takes(ledger: Ledger) -> None:
    names = [f"f{i:05d}" for i in range(1_300)]
    for name in names:
        ledger.put_item(item_update(name))
    keys = [("batch", name) for name in names] + [("batch", "missing")]
    found = await ledger.lookup(TARGET, keys)
    assert len(found) == 1_300


async def test_lookup_found_reads_what_deciding_needs_as_lookup_does(ledger: Ledger) -> None:
    ledger.put_item(done("a.txt", uploaded_at=1.0, expires_at=2.0))
    ledger.put_item(item_update("b.txt", sha256="ab" * 32))
    keys = [("batch", "a.txt"), ("batch", "b.txt"), ("x", "y")]
    whole, found = await ledger.lookup(TARGET, keys), await ledger.lookup_found(TARGET, keys)
    assert set(found) == set(whole) == {("batch", "a.txt"), ("batch", "b.txt")}
    for key, row in found.items():
        assert row == tuple(getattr(whole[key], name) for name in row._fields)
    assert found["batch", "a.txt"].state is ItemState.DONE
    assert found["batch", "a.txt"].kind is SourceKind.FILE


async def test_ten_thousand_updates_take_few_transactions(ledger: Ledger) -> None:
    for i in range(10_000):
        ledger.put_item(item_update(f"f{i:05d}", size=i))
    await ledger.flush()
    assert ledger.flushes <= 2
    counts = await ledger.state_counts(TARGET)
    assert counts[ItemState.PENDING] == (10_000, sum(range(10_000)))


async def test_a_full_batch_is_written_without_waiting_for_the_interval(ledger_path: Path) -> None:
    async with await Ledger.open(ledger_path, batch_size=10, flush_interval=3600.0) as ledger:
        for i in range(10):
            ledger.put_item(item_update(f"f{i}"))
        count = "SELECT COUNT(*) FROM items"
        # `pending` drops when the batch is taken, before it commits: watch the file itself.
        for _ in range(3000):
            if sql_rows(ledger_path, count) == [(10,)]:
                break
            await asyncio.sleep(0.01)
        assert sql_rows(ledger_path, count) == [(10,)]
        assert ledger.pending == 0


async def test_buffered_updates_are_written_after_the_interval(ledger_path: Path) -> None:
    async with await Ledger.open(ledger_path, flush_interval=0.02) as ledger:
        ledger.put_item(item_update("a.txt"))
        names = "SELECT file_name FROM items"
        for _ in range(3000):
            if sql_rows(ledger_path, names):
                break
            await asyncio.sleep(0.01)
        assert sql_rows(ledger_path, names) == [("a.txt",)]


async def test_close_writes_what_is_buffered(ledger_path: Path) -> None:
    ledger = await Ledger.open(ledger_path, flush_interval=3600.0)
    ledger.put_item(item_update("a.txt"))
    await ledger.close()
    assert sql_rows(ledger_path, "SELECT file_name FROM items") == [("a.txt",)]


async def test_attempts_are_recorded_against_their_item(ledger: Ledger, ledger_path: Path) -> None:
    run_id = await ledger.start_run("run", "/m/job.yaml")
    ledger.put_item(item_update("a.txt", attempts_added=2))
    ledger.put_attempt(attempt("a.txt", run_id, 1, "retry"))
    ledger.put_attempt(attempt("a.txt", run_id, 2, "ok"))
    await ledger.flush()
    rows = sql_rows(
        ledger_path,
        "SELECT a.run_id, a.attempt, a.outcome, a.http_status, i.file_name "
        "FROM attempts a JOIN items i ON i.id = a.item_id ORDER BY a.id",
    )
    assert rows == [(run_id, 1, "retry", 503, "a.txt"), (run_id, 2, "ok", 200, "a.txt")]


async def test_runs_are_recorded_with_their_summary(ledger: Ledger) -> None:
    first = await ledger.start_run("run", "/m/job.yaml")
    await ledger.finish_run(first, "ok", {"done": 3, "failed": 0})
    second = await ledger.start_run("refresh", "/m/job.yaml")
    runs = await ledger.runs()
    assert [r.id for r in runs] == [second, first]
    assert runs[0].status == "running" and runs[0].finished_at is None
    assert runs[0].pid == os.getpid()
    assert runs[1].summary == {"done": 3, "failed": 0}
    assert runs[1].finished_at is not None and runs[1].finished_at >= runs[1].started_at


async def test_finish_run_writes_buffered_updates_first(ledger: Ledger, ledger_path: Path) -> None:
    run_id = await ledger.start_run("run", "/m/job.yaml")
    ledger.put_item(item_update("a.txt"))
    await ledger.finish_run(run_id, "ok", {})
    assert sql_rows(ledger_path, "SELECT file_name FROM items") == [("a.txt",)]


async def test_iter_items_streams_pages_in_id_order(ledger: Ledger) -> None:
    names = [f"f{i:02d}" for i in range(23)]
    for name in names:
        ledger.put_item(item_update(name))
    seen = [item.file_name async for item in ledger.iter_items(TARGET, page_size=5)]
    assert seen == names


async def test_iter_items_filters_by_state_and_expiry(ledger: Ledger) -> None:
    ledger.put_item(done("soon", uploaded_at=0.0, expires_at=10.0))
    ledger.put_item(done("later", uploaded_at=0.0, expires_at=1_000.0))
    ledger.put_item(item_update("failed", ItemState.FAILED, last_error="HTTP 400"))
    done_names = [i.file_name async for i in ledger.iter_items(states={ItemState.DONE})]
    expiring = [i.file_name async for i in ledger.iter_items(TARGET, expiring_before=100.0)]
    assert done_names == ["soon", "later"]
    assert expiring == ["soon"]


async def test_summaries_of_the_ledger(ledger: Ledger) -> None:
    now = 1_700_000_000.0
    ledger.put_item(done("a", uploaded_at=now - 70 * HOUR, expires_at=now + 2 * HOUR, size=5))
    ledger.put_item(done("b", uploaded_at=now - 10 * HOUR, expires_at=now + 62 * HOUR, size=7))
    ledger.put_item(item_update("c", ItemState.FAILED, size=100, last_error="HTTP 413"))
    ledger.put_item(item_update("d", ItemState.PENDING))
    counts = await ledger.state_counts()
    assert counts[ItemState.DONE] == (2, 12)
    assert counts[ItemState.FAILED] == (1, 100)
    assert counts[ItemState.PENDING] == (1, 0)
    assert counts[ItemState.LOST] == (0, 0)
    assert await ledger.next_expiry(TARGET) == now + 2 * HOUR
    assert await ledger.last_success_at(TARGET) == now - 10 * HOUR
    assert await ledger.expiry_histogram(TARGET, now, [HOUR, 12 * HOUR, 72 * HOUR]) == [0, 1, 2]
    assert await ledger.counts_and_expiry(TARGET, now, [HOUR, 12 * HOUR, 72 * HOUR]) == (
        await ledger.state_counts(TARGET),
        [0, 1, 2],
    )
    failures = await ledger.recent_failures(TARGET)
    assert [(f.file_name, f.last_error) for f in failures] == [("c", "HTTP 413")]


async def test_summaries_of_an_empty_target_are_empty(ledger: Ledger) -> None:
    ledger.put_item(done("a", uploaded_at=1.0, expires_at=2.0))
    assert await ledger.next_expiry("http://other") is None
    assert await ledger.last_success_at("http://other") is None
    assert await ledger.expiry_histogram("http://other", 0.0, [10.0]) == [0]


async def test_a_file_that_is_not_a_database_is_refused_and_left_untouched(
    ledger_path: Path,
) -> None:
    ledger_path.parent.mkdir(parents=True)
    garbage = bytes(range(256)) * 16
    write_bytes(ledger_path, garbage)
    with pytest.raises(LedgerError, match="not a readable migrator ledger") as caught:
        await Ledger.open(ledger_path)
    assert str(ledger_path) in str(caught.value)
    assert read_bytes(ledger_path) == garbage


async def test_a_truncated_database_is_refused_and_left_untouched(ledger_path: Path) -> None:
    async with await Ledger.open(ledger_path) as ledger:
        for i in range(2_000):
            ledger.put_item(item_update(f"f{i:05d}", last_error="x" * 100))
    damaged = read_bytes(ledger_path)[:4096] + b"\x00garbage" * 512
    write_bytes(ledger_path, damaged)
    with pytest.raises(LedgerError, match=str(ledger_path)):
        async with await Ledger.open(ledger_path) as reopened:
            _ = [item async for item in reopened.iter_items()]
    assert read_bytes(ledger_path) == damaged


async def test_another_programs_database_is_refused_and_left_untouched(ledger_path: Path) -> None:
    ledger_path.parent.mkdir(parents=True)
    conn = sqlite3.connect(ledger_path)
    conn.execute("CREATE TABLE photos (id INTEGER)")
    conn.commit()
    conn.close()
    before = read_bytes(ledger_path)
    with pytest.raises(LedgerError, match="not a migrator ledger"):
        await Ledger.open(ledger_path)
    assert read_bytes(ledger_path) == before


async def test_an_unwritable_location_says_how_to_move_the_ledger(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where a folder should be")
    path = blocker / "job.ledger.sqlite"
    with pytest.raises(LedgerError, match="--ledger PATH or MIGRATOR_LEDGER_DIR") as caught:
        await Ledger.open(path)
    assert str(path) in str(caught.value)


async def test_a_ledger_from_a_newer_migrator_is_refused(ledger_path: Path) -> None:
    async with await Ledger.open(ledger_path):
        pass
    conn = sqlite3.connect(ledger_path)
    conn.execute(
        "INSERT INTO schema_migrations (version, description, applied_at) VALUES (99, 'x', 0)"
    )
    conn.commit()
    conn.close()
    with pytest.raises(LedgerError, match=r"written by a newer migrator \(schema 99\)"):
        await Ledger.open(ledger_path)
    with pytest.raises(LedgerError, match=r"newer migrator \(schema 99\)"):
        await Ledger.open(ledger_path, readonly=True)


async def test_readonly_open_of_a_missing_ledger_creates_nothing(tmp_path: Path) -> None:
    path = tmp_path / "nowhere" / "job.ledger.sqlite"
    async with await Ledger.open(path, readonly=True) as ledger:
        assert [item async for item in ledger.iter_items()] == []
        assert await ledger.get(TARGET, "batch", "a.txt") is None
        assert await ledger.runs() == []
        assert (await ledger.state_counts())[ItemState.DONE] == (0, 0)
    assert not path.parent.exists()


async def test_readonly_open_reads_what_a_writer_committed(ledger_path: Path) -> None:
    async with await Ledger.open(ledger_path) as writer:
        writer.put_item(done("a.txt", uploaded_at=1.0, expires_at=2.0))
        await writer.flush()
        async with await Ledger.open(ledger_path, readonly=True) as reader:
            item = await reader.get(TARGET, "batch", "a.txt")
    assert item is not None
    assert item.download_url == "https://files.example/a.txt"


async def test_readonly_ledger_refuses_writes(ledger_path: Path) -> None:
    async with await Ledger.open(ledger_path, readonly=True) as ledger:
        with pytest.raises(LedgerError, match="read-only"):
            ledger.put_item(item_update("a.txt"))


async def test_a_full_disk_surfaces_as_ledger_error_and_keeps_the_data(ledger_path: Path) -> None:
    ledger = await Ledger.open(ledger_path, flush_interval=3600.0)
    ledger.put_item(item_update("kept.txt"))
    await ledger.flush()
    # Cap the file at its current size: SQLite then answers "database or disk is full".
    await ledger._conn.execute("PRAGMA max_page_count = 1")
    for i in range(500):
        ledger.put_item(item_update(f"f{i:04d}", last_error="x" * 200))
    with pytest.raises(LedgerError, match="full"):
        await ledger.flush()
    with pytest.raises(LedgerError, match="full"):
        ledger.put_item(item_update("more.txt"))
    assert sql_rows(ledger_path, "SELECT file_name FROM items") == [("kept.txt",)]
    await ledger._conn.execute("PRAGMA max_page_count = 1000000")
    await ledger.close()
    assert sql_rows(ledger_path, "SELECT COUNT(*) FROM items") == [(501,)]


async def test_a_cancelled_flush_still_commits_its_whole_batch(
    ledger: Ledger, ledger_path: Path
) -> None:
    for i in range(5_000):
        ledger.put_item(item_update(f"f{i:05d}"))
    flushing = asyncio.create_task(ledger.flush())
    await asyncio.sleep(0)
    flushing.cancel()
    with pytest.raises(asyncio.CancelledError):
        await flushing
    assert sql_rows(ledger_path, "SELECT COUNT(*) FROM items") == [(5_000,)]
    ledger.put_item(item_update("after.txt"))
    await ledger.flush()
    assert sql_rows(ledger_path, "SELECT COUNT(*) FROM items") == [(5_001,)]
