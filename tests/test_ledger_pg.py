"""The PostgreSQL ledger: the SQLite ledger's reads and writes, plus claims with leases.

Every test runs against a real PostgreSQL server (tests/postgres_server.py), in a
database of its own.
"""

from __future__ import annotations

import asyncio
import io
import json
import time
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import LEDGER_TARGET as TARGET
from conftest import item_update, run_cli, write_file, write_manifest

from migrator.claims import (
    IDLE_POLL,
    SharedLimits,
    as_work,
    from_work,
    idle_wait,
    queue_of,
    share_of,
)
from migrator.export_lines import export_ledger
from migrator.ledger import Ledger
from migrator.ledger_pg import PgLedger, redacted
from migrator.manifest import load_manifest
from migrator.model import AttemptRecord, ItemState, ItemUpdate, Method, PlanItem, SourceKind
from migrator.pacer import Pacer
from migrator.resume import Decision

LEASE = 30.0


def done(name: str) -> ItemUpdate:
    return item_update(
        name,
        ItemState.DONE,
        size=10,
        method=Method.BASE64,
        download_url=f"https://files.example/{name}",
        uploaded_at=1_700_000_000.0,
        expires_at=1_700_259_200.0,
    )


async def queued(ledger: PgLedger, count: int) -> list[str]:
    """`count` pending items, each queued for upload; returns their names."""
    names = [f"f{i:04}" for i in range(count)]
    for name in names:
        ledger.put_item(item_update(name))
    await ledger.enqueue(TARGET, [("batch", name, {"upload_path": "batch", "file_name": name})
                                  for name in names])  # fmt: skip
    return names


async def test_items_written_are_read_back_as_in_sqlite(pg_url: str) -> None:
    async with await PgLedger.open(pg_url) as ledger:
        ledger.put_item(item_update("a"))
        ledger.put_item(done("b"))
        counts = await ledger.state_counts(TARGET)
        row = await ledger.get(TARGET, "batch", "b")
        names = [item.file_name async for item in ledger.iter_items(TARGET)]
    assert counts[ItemState.PENDING] == (1, 0)
    assert counts[ItemState.DONE] == (1, 10)
    assert row is not None and row.download_url == "https://files.example/b"
    assert names == ["a", "b"]


async def test_runs_and_facts_are_kept(pg_url: str) -> None:
    async with await PgLedger.open(pg_url) as ledger:
        run_id = await ledger.start_run("run", "/jobs/job.yaml")
        await ledger.set_fact("offset", 1.5)
        await ledger.finish_run(run_id, "done", {"uploaded": 3})
    async with await PgLedger.open(pg_url, readonly=True) as ledger:
        runs = await ledger.runs()
        fact = await ledger.fact("offset")
    assert [(r.id, r.status, r.summary) for r in runs] == [(run_id, "done", {"uploaded": 3})]
    assert fact == 1.5


async def test_concurrent_claims_are_disjoint_and_cover_the_queue(pg_url: str) -> None:
    async with await PgLedger.open(pg_url, owner="planner") as planner:
        names = await queued(planner, 200)
    workers = [await PgLedger.open(pg_url, owner=f"w{i}") for i in range(4)]
    try:

        async def drain(worker: PgLedger) -> list[str]:
            taken: list[str] = []
            while batch := await worker.claim(TARGET, 7, LEASE):
                taken += [work.work["file_name"] for work in batch]
            return taken

        shares = await asyncio.gather(*(drain(worker) for worker in workers))
    finally:
        for worker in workers:
            await worker.close()
    everything = [name for share in shares for name in share]
    assert sorted(everything) == names  # each item claimed once, none left out


async def test_a_held_result_is_written_whole_and_finishes_its_queue_row(pg_url: str) -> None:
    async with await PgLedger.open(pg_url, owner="w") as ledger:
        await queued(ledger, 2)
        [first, second] = await ledger.claim(TARGET, 2, LEASE)
        ledger.put_item(done("f0000"))  # one result per claim: written in one statement
        ledger.put_item(replace(done("f0001"), mtime_ns=1_700_000_000_123_456_789))
        await ledger.flush()
        rows = {name: await ledger.get(TARGET, "batch", name) for name in ("f0000", "f0001")}
        assert await ledger.open_work(TARGET) == (0, None)
        assert not ledger.claimed(first.claim) and not ledger.claimed(second.claim)
    expected = done("f0000")
    for row in rows.values():
        assert row is not None and row.state is ItemState.DONE
        assert (row.size, row.method, row.expires_at, row.uploaded_at) == (
            expected.size, expected.method, expected.expires_at, expected.uploaded_at
        )  # fmt: skip
    assert rows["f0000"] is not None and rows["f0000"].source == "/data/f0000"
    assert rows["f0001"] is not None and rows["f0001"].mtime_ns == 1_700_000_000_123_456_789


async def test_an_expired_lease_gives_the_item_to_the_next_claim(pg_url: str) -> None:
    async with (
        await PgLedger.open(pg_url, owner="dead") as dead,
        await PgLedger.open(pg_url, owner="alive") as alive,
    ):
        await queued(dead, 3)
        first = await dead.claim(TARGET, 3, lease=0.2)
        assert await alive.claim(TARGET, 3, LEASE) == []  # held by a live lease
        await asyncio.sleep(0.4)
        again = await alive.claim(TARGET, 3, LEASE)
    assert [w.claim.item_id for w in again] == [w.claim.item_id for w in first]
    assert all(w.taken_from == "dead" for w in again)
    assert all(w.claim.attempt == 2 for w in again)  # a new fencing token


async def test_a_stale_result_is_refused_and_recorded(pg_url: str) -> None:
    async with (
        await PgLedger.open(pg_url, owner="slow") as slow,
        await PgLedger.open(pg_url, owner="fast") as fast,
    ):
        await queued(slow, 1)
        await slow.claim(TARGET, 1, lease=0.1)
        await asyncio.sleep(0.3)
        await fast.claim(TARGET, 1, LEASE)
        fast.put_item(done("f0000"))
        await fast.flush()
        slow.put_item(item_update("f0000", ItemState.FAILED, last_error="late"))
        await slow.flush()
        row = await fast.get(TARGET, "batch", "f0000")
        refusals = await fast._fetch("SELECT error FROM attempts WHERE outcome = 'refused'", [])
        open_items, _wait = await fast.open_work(TARGET)
    assert slow.refused == 1 and fast.refused == 0
    assert row is not None and row.state is ItemState.DONE and row.last_error is None
    assert len(refusals) == 1 and "refused" in refusals[0][0]
    assert open_items == 1  # the late upload may have replaced the file: done again


async def test_a_stale_result_while_another_holds_the_item_reopens_it_after_that(
    pg_url: str,
) -> None:
    async with (
        await PgLedger.open(pg_url, owner="slow") as slow,
        await PgLedger.open(pg_url, owner="fast") as fast,
    ):
        await queued(slow, 1)
        await slow.claim(TARGET, 1, lease=0.1)
        await asyncio.sleep(0.3)
        await fast.claim(TARGET, 1, LEASE)
        slow.put_item(done("f0000"))
        await slow.flush()  # refused while fast uploads: fast's file may land first
        assert (await fast.open_work(TARGET))[0] == 1
        fast.put_item(done("f0000"))
        await fast.flush()
        again = await slow.claim(TARGET, 1, LEASE)
    assert fast.refused == 0 and [w.claim.attempt for w in again] == [3]


async def test_renewal_keeps_live_leases_and_reports_lost_ones(pg_url: str) -> None:
    async with (
        await PgLedger.open(pg_url, owner="a") as a,
        await PgLedger.open(pg_url, owner="b") as b,
    ):
        await queued(a, 2)
        held = await a.claim(TARGET, 2, lease=0.3)
        await asyncio.sleep(0.5)
        taken = await b.claim(TARGET, 1, LEASE)  # the first runs out and is taken
        lost = await a.renew(LEASE)
        assert await b.claim(TARGET, 1, LEASE) == []  # the second was renewed in time
    assert [c.item_id for c in lost] == [taken[0].claim.item_id]
    assert not a.holds(held[0].claim) and a.holds(held[1].claim)


def test_messages_never_show_the_password() -> None:
    where = redacted("postgresql://jobs:s3cret-pass@db.internal:5432/migrations?sslmode=require")
    assert where == "postgresql://jobs@db.internal:5432/migrations"


async def test_ledger_import_moves_a_sqlite_ledger_in_once(tmp_path: Path, pg_url: str) -> None:
    source = tmp_path / "job.sqlite"
    async with await Ledger.open(source) as sqlite_ledger:
        run_id = await sqlite_ledger.start_run("run", "/jobs/job.yaml")
        sqlite_ledger.put_item(done("a"))
        sqlite_ledger.put_item(item_update("b", ItemState.FAILED, last_error="HTTP 500"))
        sqlite_ledger.put_attempt(attempt_of("a", run_id))
        await sqlite_ledger.set_fact("offset", 2.0)
        await sqlite_ledger.finish_run(run_id, "done", {"uploaded": 1})
        expected = {item.file_name: item async for item in sqlite_ledger.iter_items()}

    first = await run_cli("ledger", "import", str(source), "--ledger", pg_url)
    again = await run_cli("ledger", "import", str(source), "--ledger", pg_url)

    assert first.code == 0, first.stderr
    assert "imported 2 items, 1 attempts, 1 runs and 1 facts" in first.stdout
    assert again.code != 0 and "was already imported" in again.one_error_line()
    async with await PgLedger.open(pg_url, readonly=True) as ledger:
        moved = {item.file_name: item async for item in ledger.iter_items()}
        runs = await ledger.runs()
        fact = await ledger.fact("offset")
        attempts = await ledger._fetch("SELECT outcome FROM attempts", [])
    assert {n: replace(i, id=0) for n, i in moved.items()} == {
        n: replace(i, id=0) for n, i in expected.items()
    }
    assert [(r.command, r.status, r.summary) for r in runs] == [("run", "done", {"uploaded": 1})]
    assert fact == 2.0 and attempts == [("ok",)]


def attempt_of(name: str, run_id: int) -> AttemptRecord:
    return AttemptRecord(
        run_id=run_id,
        target=TARGET,
        upload_path="batch",
        file_name=name,
        method=Method.BASE64,
        attempt=1,
        started_at=1_700_000_000.0,
        duration=0.25,
        outcome="ok",
        http_status=200,
        bytes_sent=10,
    )


def test_queued_work_reads_back_as_the_planned_item_and_decision() -> None:
    item = PlanItem(
        source="https://origin.example/a.bin",
        kind=SourceKind.URL,
        upload_path="mig/x",
        file_name="a.bin",
        size=None,
        method=Method.URL,
        method_forced=True,
        etag='"abc"',
    )
    assert from_work(json.loads(json.dumps(as_work(item, Decision.CHANGED)))) == (
        item,
        Decision.CHANGED,
    )


def test_an_idle_worker_looks_again_soon_after_the_first_lease_ends() -> None:
    assert idle_wait(0.3) == pytest.approx(0.35)
    assert idle_wait(45.0) == IDLE_POLL  # and never sleeps through a whole lease
    assert idle_wait(-2.0) == 0.05  # a lease already ran out: its item is claimable


# -- choosing the ledger -------------------------------------------------------------------

URL = "postgresql://jobs:secret-pw-77@db.internal/migrations"


def manifest_file(job: Path, ledger: str | None = None) -> Path:
    write_file(job / "a.bin", 10)
    path = write_manifest(job, "http://127.0.0.1:9/api", [{"path": str(job / "a.bin")}])
    if ledger is not None:
        text = path.read_text(encoding="utf-8").replace("ledger.sqlite", ledger)
        path.write_text(text, encoding="utf-8")
    return path


def test_a_postgresql_url_in_ledger_names_the_shared_ledger(job: Path) -> None:
    manifest = load_manifest(manifest_file(job, URL), environ={})
    assert manifest.ledger_url == URL


def test_migrator_ledger_in_the_environment_names_it_too(job: Path) -> None:
    manifest = load_manifest(manifest_file(job), environ={"MIGRATOR_LEDGER": URL})
    assert manifest.ledger_url == URL


def test_a_ledger_file_on_the_command_line_wins_over_the_environment(job: Path) -> None:
    manifest = load_manifest(
        manifest_file(job), ledger_override="mine.sqlite", environ={"MIGRATOR_LEDGER": URL}
    )
    assert manifest.ledger_url is None
    assert manifest.ledger == Path.cwd() / "mine.sqlite"


def test_without_a_url_the_sqlite_ledger_is_unchanged(job: Path) -> None:
    manifest = load_manifest(manifest_file(job), environ={})
    assert manifest.ledger_url is None and manifest.ledger == job / "ledger.sqlite"


# -- limits that stay global ---------------------------------------------------------------


async def test_each_live_worker_takes_its_share_of_the_limits(pg_url: str) -> None:
    pacer = Pacer(tps_limit=30.0, bwlimit=9_000_000)
    limits = SharedLimits(pacer)
    async with (
        await PgLedger.open(pg_url, owner="a") as a,
        await PgLedger.open(pg_url, owner="b") as b,
        await PgLedger.open(pg_url, owner="c") as c,
    ):
        await b.heartbeat(TARGET, LEASE)
        await c.heartbeat(TARGET, LEASE)
        limits.divide(await a.heartbeat(TARGET, LEASE))
        assert (pacer.tps_limit, pacer.bwlimit) == (10.0, 3_000_000)
        await b.sign_off()
        await c.sign_off()
        limits.divide(await a.heartbeat(TARGET, LEASE))
        assert (pacer.tps_limit, pacer.bwlimit) == (30.0, 9_000_000)


async def test_a_worker_that_stopped_beating_no_longer_counts(pg_url: str) -> None:
    async with (
        await PgLedger.open(pg_url, owner="a") as a,
        await PgLedger.open(pg_url, owner="gone") as gone,
    ):
        await gone.heartbeat(TARGET, LEASE)
        assert await a.heartbeat(TARGET, LEASE) == 2
        await asyncio.sleep(0.3)
        assert await a.heartbeat(TARGET, 0.2) == 1


def test_no_limit_stays_no_limit_whatever_the_workers() -> None:
    assert share_of(None, 8) is None
    assert share_of(12.0, 0) == 12.0


async def test_a_commands_queue_is_its_own_beside_the_run_queue(pg_url: str) -> None:
    async with await PgLedger.open(pg_url, owner="a") as ledger:
        names = await queued(ledger, 3)
        refresh_queue = queue_of("refresh", TARGET)
        work = [("batch", n, {"target": TARGET, "upload_path": "batch", "file_name": n})
                for n in names[:2]]  # fmt: skip
        assert await ledger.enqueue(TARGET, work, refresh_queue) == 2
        for_refresh = await ledger.claim(refresh_queue, 10, LEASE)
        assert [w.claim.key for w in for_refresh] == [(TARGET, "batch", n) for n in names[:2]]
        assert len(await ledger.claim(TARGET, 10, LEASE)) == 3  # run's queue is untouched
        assert await ledger.finish(for_refresh[0].claim)
        assert await ledger.open_work(refresh_queue) == (1, pytest.approx(LEASE, abs=5))


async def test_finishing_a_lost_claim_changes_nothing(pg_url: str) -> None:
    queue = queue_of("verify", TARGET)
    async with (
        await PgLedger.open(pg_url, owner="late") as late,
        await PgLedger.open(pg_url, owner="next") as other,
    ):
        late.put_item(item_update("f0000"))
        await late.enqueue(TARGET, [("batch", "f0000", {"upload_path": "batch",
                                                        "file_name": "f0000"})], queue)  # fmt: skip
        [stale] = await late.claim(queue, 1, 0.01)
        await asyncio.sleep(0.05)
        [taken] = await other.claim(queue, 1, LEASE)
        assert not await late.finish(stale.claim)
        assert await late.open_work(queue) == (1, pytest.approx(LEASE, abs=5))
        assert await other.finish(taken.claim)
        assert (await late.open_work(queue))[0] == 0


# -- rounds of refresh, download and verify --------------------------------------------------


async def a_finished_round(ledger: PgLedger, queue: str) -> None:
    """Three items queued in `queue`, claimed and finished."""
    names = await queued(ledger, 3)
    work = [("batch", n, {"target": TARGET, "upload_path": "batch", "file_name": n})
            for n in names]  # fmt: skip
    await ledger.enqueue(TARGET, work, queue)
    for claimed_work in await ledger.claim(queue, 10, LEASE):
        assert await ledger.finish(claimed_work.claim)


async def test_a_command_launched_before_the_last_round_ended_joins_it(pg_url: str) -> None:
    queue = queue_of("refresh", TARGET)
    async with await PgLedger.open(pg_url, owner="a") as ledger:
        launched = time.time()
        await a_finished_round(ledger, queue)
        async with ledger.planning(queue, launched) as must_plan:
            assert not must_plan  # it joins the round, which is done: nothing to redo


async def test_a_command_launched_after_the_last_round_ended_starts_another(
    pg_url: str,
) -> None:
    queue = queue_of("refresh", TARGET)
    async with await PgLedger.open(pg_url, owner="a") as ledger:
        await a_finished_round(ledger, queue)
        await asyncio.sleep(0.05)
        async with ledger.planning(queue, time.time()) as must_plan:
            assert must_plan


async def test_a_round_still_open_is_joined_whenever_the_command_was_launched(
    pg_url: str,
) -> None:
    queue = queue_of("verify", TARGET)
    async with await PgLedger.open(pg_url, owner="a") as ledger:
        ledger.put_item(item_update("f0000"))
        work = {"upload_path": "batch", "file_name": "f0000"}
        await ledger.enqueue(TARGET, [("batch", "f0000", work)], queue)
        async with ledger.planning(queue, time.time()) as must_plan:
            assert not must_plan


async def test_new_items_get_their_rows_with_their_queue_rows(pg_url: str) -> None:
    async with await PgLedger.open(pg_url, owner="planner") as ledger:
        ledger.put_item(item_update("known", ItemState.FAILED))
        await ledger.flush()
        work = [("batch", n, {"upload_path": "batch", "file_name": n}) for n in ("known", "new")]
        assert await ledger.enqueue(TARGET, work, new=[item_update("new")]) == 2
        known = await ledger.get(TARGET, "batch", "known")
        new = await ledger.get(TARGET, "batch", "new")
        claims = await ledger.claim(TARGET, 10, LEASE)
    assert known is not None and known.state is ItemState.FAILED  # left as it was
    assert new is not None and (new.state, new.source) == (ItemState.PENDING, "/data/new")
    assert sorted(w.work["file_name"] for w in claims) == ["known", "new"]


async def test_results_and_their_attempts_rows_are_written_together(pg_url: str) -> None:
    async with await PgLedger.open(pg_url, owner="w") as ledger:
        names = await queued(ledger, 3)
        run_id = await ledger.start_run("run", "job.yaml")
        await ledger.claim(TARGET, 3, LEASE)
        for name in names:
            ledger.put_item(done(name))
            for number in (1, 2):
                ledger.put_attempt(replace(attempt_of(name, run_id), attempt=number))
        await ledger.flush()
        assert await ledger.open_work(TARGET) == (0, None)
        rows = await ledger._fetch(
            "SELECT items.file_name, attempts.attempt FROM attempts "
            "JOIN items ON items.id = attempts.item_id ORDER BY attempts.id",
            [],
        )
        states = {n: (await ledger.get(TARGET, "batch", n)) for n in names}
    assert [tuple(r) for r in rows] == [(n, number) for n in names for number in (1, 2)]
    assert all(row is not None and row.state is ItemState.DONE for row in states.values())


async def test_a_process_joins_a_plan_in_progress_once_it_has_queued_work(pg_url: str) -> None:
    async with (
        await PgLedger.open(pg_url, owner="planner") as planner,
        await PgLedger.open(pg_url, owner="joiner") as joiner,
    ):
        async with planner.planning(TARGET) as must_plan:
            assert must_plan
            await queued(planner, 2)
            async with asyncio.timeout(5):
                async with joiner.planning(TARGET) as joins_as_planner:
                    assert not joins_as_planner
            assert await joiner.being_planned(TARGET)  # more may come: it stays
        assert not await joiner.being_planned(TARGET)


async def test_an_export_is_the_same_text_as_from_a_sqlite_ledger(
    pg_url: str, tmp_path: Path
) -> None:
    rows = [
        done("plain.bin"),
        replace(done('comma,"quote"\n.bin'), last_error='HTTP 500: "busy", again'),
        replace(done("ünïcode 名前 😀\x01.bin"), source="https://u:p@origin.example/ü"),
        replace(done("half.bin"), uploaded_at=0.0000005, expires_at=1796045002.9999995),
    ]
    async with (
        await PgLedger.open(pg_url) as shared,
        await Ledger.open(tmp_path / "ledger.sqlite") as local,
    ):
        for row in rows:
            shared.put_item(row)
            local.put_item(row)
        await local.flush()
        for fmt in ("jsonl", "csv", "json"):
            from_pg, from_sqlite = io.StringIO(), io.StringIO()
            assert await export_ledger(shared, TARGET, fmt, from_pg) == len(rows)
            await export_ledger(local, TARGET, fmt, from_sqlite)
            assert from_pg.getvalue() == from_sqlite.getvalue(), fmt
