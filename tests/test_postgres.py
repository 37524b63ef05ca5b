"""Many `migrator run` processes on one PostgreSQL ledger, through the real CLI.

A real PostgreSQL server (tests/postgres_server.py) and the emulator on loopback; the
workers are `python -m migrator` children that the tests start, stop, resume and kill.
"""

from __future__ import annotations

import asyncio
import dataclasses
import signal
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import asyncpg
import pytest
from conftest import (
    Finished,
    closed_port,
    load,
    run_cli,
    start_cli,
    write_file,
    write_manifest,
)
from test_run import fetch

from migrator.claims import plan_complete, plan_once
from migrator.emulator import Emulator
from migrator.ledger_pg import PgLedger
from migrator.runner import Entry, preview

pytestmark = pytest.mark.timeout(180)


def files(folder: Path, count: int) -> dict[str, bytes]:
    """`count` small files of mixed sizes under `folder`, by name."""
    return {
        f"f{i:05}.bin": write_file(folder / f"f{i:05}.bin", 64 + (i * 37) % 2000, seed=i)
        for i in range(count)
    }


def manifest_for(job: Path, emulator: Emulator, count: int) -> tuple[Path, dict[str, bytes]]:
    data = files(job / "src", count)
    path = write_manifest(
        job, emulator.base_url, [{"glob": str(job / "src" / "*.bin")}], concurrency=8, settle="0s"
    )
    return path, data


async def uploaded(
    job: Path, emulator: Emulator, api_key: str, url: str, count: int
) -> tuple[Path, dict[str, bytes]]:
    """A manifest of `count` files (and them, by name), uploaded by one run."""
    manifest, data = manifest_for(job, emulator, count)
    first = await run_cli("run", str(manifest), "--no-progress", "--ledger", url, key=api_key)
    assert first.code == 0, first.stderr
    return manifest, data


async def start_worker(
    manifest: Path, url: str, api_key: str, out: Path, *extra: str
) -> asyncio.subprocess.Process:
    await asyncio.to_thread(out.mkdir, parents=True, exist_ok=True)
    with (out / "stdout").open("wb") as stdout, (out / "stderr").open("wb") as stderr:
        return await start_cli(
            "run", str(manifest), "--no-progress", "--ledger", url, "--log-file",
            str(out / "log.jsonl"), *extra, key=api_key, stdout=stdout, stderr=stderr,
        )  # fmt: skip


async def finished(process: asyncio.subprocess.Process, out: Path, limit: float) -> Finished:
    code = await asyncio.wait_for(process.wait(), limit)
    stdout = (out / "stdout").read_text(encoding="utf-8")
    return Finished(code, stdout, (out / "stderr").read_text(encoding="utf-8"))


async def item_states(url: str) -> dict[str, tuple[str, str | None]]:
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch("SELECT file_name, state, download_url FROM items")
    finally:
        await conn.close()
    return {row[0]: (row[1], row[2]) for row in rows}


async def scalar(url: str, sql: str) -> object:
    conn = await asyncpg.connect(url)
    try:
        return await conn.fetchval(sql)
    finally:
        await conn.close()


async def assert_all_done_and_served(url: str, data: dict[str, bytes]) -> None:
    states = await item_states(url)
    assert sorted(states) == sorted(data)
    assert Counter(state for state, _link in states.values()) == {"done": len(data)}
    for name, (_state, link) in states.items():
        assert link is not None
        assert await fetch(link) == data[name], name


async def test_two_workers_share_the_work_and_upload_each_item_once(
    job: Path, emulator: Emulator, api_key: str, pg_url: str
) -> None:
    manifest, data = manifest_for(job, emulator, 120)
    outs = [job / f"w{i}" for i in range(2)]
    workers = [await start_worker(manifest, pg_url, api_key, out) for out in outs]
    results = [await finished(w, out, 60) for w, out in zip(workers, outs, strict=True)]
    assert [r.code for r in results] == [0, 0], [r.stderr for r in results]
    await assert_all_done_and_served(pg_url, data)
    uploads = Counter(request.file_name for request in emulator.requests)
    assert set(uploads.values()) == {1}  # nobody uploaded an item another one did
    assert await scalar(pg_url, "SELECT COUNT(*) FROM queue WHERE NOT finished") == 0


async def test_a_second_run_after_the_first_uploads_nothing(
    job: Path, emulator: Emulator, api_key: str, pg_url: str
) -> None:
    manifest, data = await uploaded(job, emulator, api_key, pg_url, 20)
    again = await run_cli("run", str(manifest), "--no-progress", "--ledger", pg_url, key=api_key)
    assert again.code == 0, again.stderr
    assert len(emulator.requests) == len(data)
    assert "0 uploaded, 20 skipped" in again.stdout


async def test_a_source_changed_after_the_run_is_uploaded_again_by_the_next_plan(
    job: Path, emulator: Emulator, api_key: str, pg_url: str
) -> None:
    manifest, data = await uploaded(job, emulator, api_key, pg_url, 5)
    data["f00002.bin"] = write_file(job / "src" / "f00002.bin", 999, seed=77)
    planned = await run_cli("plan", str(manifest), "--commit", "--ledger", pg_url)
    assert planned.code == 0 and "1 items queued" in planned.stdout, planned.stdout
    again = await run_cli("run", str(manifest), "--no-progress", "--ledger", pg_url, key=api_key)
    assert again.code == 0, again.stderr
    assert "1 uploaded" in again.stdout
    await assert_all_done_and_served(pg_url, data)


async def test_two_refresh_processes_refresh_each_due_item_once(
    job: Path, emulator: Emulator, api_key: str, pg_url: str
) -> None:
    manifest, data = await uploaded(job, emulator, api_key, pg_url, 60)
    command = ("refresh", str(manifest), "--no-progress", "--within", "73h", "--lease", "30s")
    command += ("--ledger", pg_url)
    # The first round must still be open when the second process looks at the queue (a
    # refresh that starts after a round ended starts a new one): hold its first uploads.
    emulator.delay_stores(8.0, count=8)
    refreshes = [await start_cli(*command, key=api_key) for _ in range(2)]
    outputs = [await asyncio.wait_for(r.communicate(), 60) for r in refreshes]
    assert [r.returncode for r in refreshes] == [0, 0], [err for _out, err in outputs]
    uploads = Counter(request.file_name for request in emulator.requests)
    assert uploads == {name: 2 for name in data}  # the run's upload, and one refresh
    await assert_all_done_and_served(pg_url, data)
    assert await scalar(pg_url, "SELECT COUNT(*) FROM queue WHERE NOT finished") == 0


async def test_a_worker_told_to_stop_hands_back_what_it_claimed_at_once(
    job: Path, emulator: Emulator, api_key: str, pg_url: str
) -> None:
    manifest, data = manifest_for(job, emulator, 100)
    emulator.delay_stores(0.3, count=100)  # about 25 uploads a second with 8 workers
    out = job / "stopped"
    worker = await start_worker(manifest, pg_url, api_key, out)
    await wait_for_done(pg_url, 8)
    worker.send_signal(signal.SIGTERM)  # it holds claims it has not started yet
    stopped = await finished(worker, out, 60)
    assert stopped.code != 0, stopped.stdout
    assert await scalar(pg_url, "SELECT COUNT(*) FROM queue WHERE NOT finished") > 0
    held = "SELECT COUNT(*) FROM queue WHERE NOT finished AND owner IS NOT NULL"
    assert await scalar(pg_url, held) == 0  # not left to wait for its 60 s leases
    rest = await run_cli("run", str(manifest), "--no-progress", "--ledger", pg_url, key=api_key)
    assert rest.code == 0, rest.stderr
    await assert_all_done_and_served(pg_url, data)
    assert set(Counter(request.file_name for request in emulator.requests).values()) == {1}


def refresh_command(manifest: Path, url: str) -> tuple[str, ...]:
    return ("refresh", str(manifest), "--no-progress", "--within", "73h", "--ledger", url)


async def test_a_refresh_launched_before_another_ended_its_round_does_not_redo_it(
    job: Path, emulator: Emulator, api_key: str, pg_url: str
) -> None:
    manifest, data = await uploaded(job, emulator, api_key, pg_url, 12)
    late = await start_cli(*refresh_command(manifest, pg_url), key=api_key)
    late.send_signal(signal.SIGSTOP)  # launched now, it looks at the queue after the round
    try:
        other = await run_cli(*refresh_command(manifest, pg_url), key=api_key)
        assert other.code == 0, other.stderr
    finally:
        late.send_signal(signal.SIGCONT)
    _out, err = await asyncio.wait_for(late.communicate(), 60)
    assert late.returncode == 0, err
    uploads = Counter(request.file_name for request in emulator.requests)
    assert uploads == {name: 2 for name in data}  # the run's upload, and one refresh


async def test_a_refresh_launched_after_the_last_round_ended_starts_another(
    job: Path, emulator: Emulator, api_key: str, pg_url: str
) -> None:
    manifest, data = await uploaded(job, emulator, api_key, pg_url, 4)
    for _round in range(2):
        refreshed = await run_cli(*refresh_command(manifest, pg_url), key=api_key)
        assert refreshed.code == 0, refreshed.stderr
    uploads = Counter(request.file_name for request in emulator.requests)
    assert uploads == {name: 3 for name in data}


async def test_the_password_of_the_ledger_url_never_shows(
    job: Path, emulator: Emulator, api_key: str, pg_url: str
) -> None:
    manifest, _data = manifest_for(job, emulator, 2)
    wrong = f"postgresql://migrator:pw-not-shown-1234@127.0.0.1:{closed_port()}/jobs"
    result = await run_cli("run", str(manifest), "--no-progress", "--ledger", wrong, key=api_key)
    assert result.code != 0
    line = result.one_error_line()
    assert "pw-not-shown-1234" not in result.stderr + result.stdout
    assert "cannot reach the ledger postgresql://migrator@127.0.0.1:" in line


# -- the acceptance run: four workers, one killed, one stopped past its lease ---------------

ITEMS = 5000  # as the issue asks: 57-68 s on the shared two-core box (load 4-6)
LEASE = "3s"  # short, yet long enough for a busy two-core box to renew in time


async def fetch_all(links: dict[str, str]) -> dict[str, bytes]:
    """name -> the bytes its link serves, 16 requests at a time on one session."""
    gate = asyncio.Semaphore(16)
    async with aiohttp.ClientSession() as session:

        async def one(name: str, link: str) -> tuple[str, bytes]:
            async with gate, session.get(link) as response:
                assert response.status == 200, link
                return name, await response.read()

        return dict(await asyncio.gather(*(one(n, link) for n, link in links.items())))


async def wait_for_done(url: str, at_least: int, limit: float = 60) -> None:
    async def enough() -> bool:
        try:
            done = await scalar(url, "SELECT COUNT(*) FROM items WHERE state = 'done'")
        except asyncpg.UndefinedTableError:  # the first worker has not made the schema yet
            return False
        return isinstance(done, int) and done >= at_least

    deadline = asyncio.get_running_loop().time() + limit
    while not await enough():
        assert asyncio.get_running_loop().time() < deadline, f"fewer than {at_least} done"
        await asyncio.sleep(0.1)


async def test_four_workers_survive_a_kill_and_a_stop_past_the_lease(
    job: Path, emulator: Emulator, api_key: str, pg_url: str
) -> None:
    data = files(job / "src", ITEMS)
    manifest = write_manifest(
        job, emulator.base_url, [{"glob": str(job / "src" / "*.bin")}],
        concurrency=8, settle="0s", base64_max="1KiB",
    )  # fmt: skip
    outs = [job / f"w{i}" for i in range(4)]
    workers = [await start_worker(manifest, pg_url, api_key, out, "--lease", LEASE) for out in outs]
    killed, stopped = workers[0], workers[1]

    await wait_for_done(pg_url, ITEMS // 10)
    killed.send_signal(signal.SIGKILL)  # mid-batch: it holds claims and uploads in flight
    await wait_for_done(pg_url, ITEMS // 5)
    stopped.send_signal(signal.SIGSTOP)
    await asyncio.sleep(7)  # its 3 s leases run out; the others take its items
    stopped.send_signal(signal.SIGCONT)

    assert await asyncio.wait_for(killed.wait(), 5) == -signal.SIGKILL
    results = [await finished(w, out, 120) for w, out in zip(workers[1:], outs[1:], strict=True)]
    assert [r.code for r in results] == [0, 0, 0], [r.stderr for r in results]

    states = await item_states(pg_url)
    assert Counter(state for state, _link in states.values()) == {"done": ITEMS}
    served = await fetch_all({name: link for name, (_s, link) in states.items() if link})
    assert served == data  # every item's link serves its bytes exactly
    refused = await scalar(pg_url, "SELECT COUNT(*) FROM attempts WHERE outcome = 'refused'")
    assert isinstance(refused, int) and refused >= 1  # the resumed worker's late results
    stopped_log = (outs[1] / "log.jsonl").read_text(encoding="utf-8")
    assert "lease.result_refused" in stopped_log
    assert await scalar(pg_url, "SELECT COUNT(*) FROM queue WHERE NOT finished") == 0


# -- a planner that dies midway ---------------------------------------------------------------


async def test_a_plan_cut_short_by_its_process_dying_is_finished_by_a_worker_that_joined(
    job: Path, emulator: Emulator, api_key: str, pg_url: str
) -> None:
    manifest_path, data = manifest_for(job, emulator, 120)
    manifest = dataclasses.replace(load(manifest_path), ledger_url=pg_url)

    async def two_thirds_then_death() -> AsyncIterator[Entry]:
        async for number, entry in aenumerate(preview(manifest)):
            if number == 80:  # past the first batch queued (FIRST_ENQUEUE)
                raise RuntimeError("the planning process died")
            yield entry

    async with await PgLedger.open(pg_url) as ledger:
        with pytest.raises(RuntimeError, match="died"):
            await plan_once(manifest, ledger, two_thirds_then_death())
        assert not await plan_complete(ledger, manifest.target.base_url)

    run = await run_cli("run", str(manifest_path), "--no-progress", "--ledger", pg_url, key=api_key)

    assert run.code == 0, run.stderr
    states = await item_states(pg_url)
    assert Counter(state for state, _link in states.values()) == {"done": len(data)}


async def aenumerate(entries: AsyncIterator[Entry]) -> AsyncIterator[tuple[int, Entry]]:
    number = 0
    async for entry in entries:
        yield number, entry
        number += 1
