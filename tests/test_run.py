"""`run_manifest` end to end: real files, a loopback origin, the in-process emulator."""

from __future__ import annotations

import asyncio
import io
import json
import os
import socket
import sqlite3
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from conftest import Origin, closed_port, ledger_rows, load, write_file, write_manifest
from rich.console import Console

from migrator import cli
from migrator.command import CommandSummary, Observer, Outcome
from migrator.emulator import Emulator
from migrator.errors import ExitCode, StopReason
from migrator.ledger import Ledger
from migrator.model import ItemState, Method, PlanItem, SourceKind
from migrator.progress_bar import BarProgress
from migrator.resume import Decision
from migrator.runner import RunOptions, preview, run_manifest

pytestmark = pytest.mark.timeout(60)


# -- helpers ------------------------------------------------------------------------------


async def run(path: Path, api_key: str, **options: Any) -> CommandSummary:
    opts = RunOptions(seed=1, **options)
    return await run_manifest(load(path), opts, environ={"KIE_API_KEY": api_key})


async def export_jsonl(path: Path, out: Path) -> list[dict[str, Any]]:
    """`migrator export --format jsonl --output OUT`, read back."""
    args = ["export", str(path), "--format", "jsonl", "--output", str(out)]
    assert await asyncio.to_thread(cli.main, args) == 0
    text = await asyncio.to_thread(out.read_text, encoding="utf-8")
    return [json.loads(line) for line in text.splitlines()]


async def fetch(url: str) -> bytes:
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        assert response.status == 200, url
        return await response.read()


def endpoints_by_name(emulator: Emulator) -> dict[str | None, list[str]]:
    seen: dict[str | None, list[str]] = {}
    for request in emulator.requests:
        seen.setdefault(request.file_name, []).append(request.endpoint)
    return seen


# -- the whole path -----------------------------------------------------------------------


async def test_mixed_manifest_uploads_each_item_by_its_method_and_exports_working_links(
    job: Path, emulator: Emulator, origin: Origin, api_key: str
) -> None:
    sources = {
        "small.txt": write_file(job / "small.txt", 100),
        "big.bin": write_file(job / "big.bin", 200 * 1024, seed=1),
    }
    origin.files["remote-small.bin"] = sources["remote-small.bin"] = bytes(range(256)) * 40
    origin.files["remote-large.bin"] = sources["remote-large.bin"] = bytes(300 * 1024)
    manifest = write_manifest(
        job,
        emulator.base_url,
        [
            {"path": "./small.txt"},
            {"path": "./big.bin"},
            {"url": origin.url("remote-small.bin")},
            {"url": origin.url("remote-large.bin")},
        ],
        base64_max="64KiB",
        url_max="100KiB",
    )

    summary = await run(manifest, api_key)

    assert summary.exit_code is ExitCode.OK
    assert summary.count(Outcome.UPLOADED) == 4
    assert endpoints_by_name(emulator) == {
        "small.txt": ["base64"],
        "big.bin": ["stream"],
        "remote-small.bin": ["url"],
        "remote-large.bin": ["stream"],
    }
    records = await export_jsonl(manifest, job / "export.jsonl")
    assert sorted(r["file_name"] for r in records) == sorted(sources)
    for record in records:
        assert record["status"] == "done"
        assert await fetch(record["download_url"]) == sources[record["file_name"]]


async def test_response_without_expires_at_expires_ttl_after_upload(
    job: Path, tmp_path: Path, api_key: str
) -> None:
    write_file(job / "a.txt", 10)
    async with Emulator(tmp_path / "emu", api_key, response_shape="endpoint") as emu:
        manifest = write_manifest(
            job, emu.base_url, [{"path": "./a.txt"}], ttl="10h", refresh_within="1h"
        )
        summary = await run(manifest, api_key)

    assert summary.exit_code is ExitCode.OK
    item = (await ledger_rows(load(manifest)))["a.txt"]
    assert item.uploaded_at is not None and item.expires_at is not None
    assert item.expires_at - item.uploaded_at == pytest.approx(10 * 3600, abs=0.01)


# -- what a run does not do ---------------------------------------------------------------


async def test_dry_run_without_a_ledger_sends_nothing_and_creates_no_ledger(
    job: Path, emulator: Emulator, api_key: str
) -> None:
    write_file(job / "a.txt", 10)
    manifest = write_manifest(job, emulator.base_url, [{"path": "./a.txt"}])

    summary = await run(manifest, api_key, dry_run=True)

    assert summary.would == {"new": 1}
    assert emulator.requests == []
    assert not (job / "ledger.sqlite").exists()


async def test_dry_run_leaves_an_existing_ledger_byte_for_byte_unchanged(
    job: Path, emulator: Emulator, api_key: str
) -> None:
    write_file(job / "a.txt", 10)
    manifest = write_manifest(job, emulator.base_url, [{"path": "./a.txt"}])
    await run(manifest, api_key)
    write_file(job / "a.txt", 20)  # now the run would upload it again
    before, requests_before = (job / "ledger.sqlite").read_bytes(), len(emulator.requests)

    summary = await run(manifest, api_key, dry_run=True)

    assert summary.would == {"changed": 1}
    assert len(emulator.requests) == requests_before
    assert (job / "ledger.sqlite").read_bytes() == before


async def test_rerun_of_a_finished_manifest_sends_no_request(
    job: Path, emulator: Emulator, origin: Origin, api_key: str
) -> None:
    write_file(job / "a.txt", 10)
    write_file(job / "b.bin", 100 * 1024)
    origin.files["r.bin"] = b"remote"
    manifest = write_manifest(
        job,
        emulator.base_url,
        [{"path": "./a.txt"}, {"path": "./b.bin"}, {"url": origin.url("r.bin")}],
        base64_max="64KiB",
    )
    await run(manifest, api_key)
    sent, fetched = len(emulator.requests), len(origin.gets)

    summary = await run(manifest, api_key)

    assert (summary.exit_code, summary.count(Outcome.UPLOADED), summary.count(Outcome.SKIPPED)) == (
        0,
        0,
        3,
    )
    assert len(emulator.requests) == sent
    assert len(origin.gets) == fetched


async def test_the_plan_carries_the_ledger_row_of_an_item_with_work_only(
    job: Path, emulator: Emulator, api_key: str
) -> None:
    for name in ("same.txt", "resized.txt"):
        write_file(job / name, 50)
    manifest = write_manifest(job, emulator.base_url, [{"glob": "./*.txt"}])
    await run(manifest, api_key)
    write_file(job / "resized.txt", 60)
    write_file(job / "new.txt", 10)

    entries = {item.file_name: (d, row) async for item, d, row in preview(load(manifest))}

    assert entries["same.txt"] == (Decision.UNCHANGED, None)
    assert entries["new.txt"] == (Decision.NEW, None)
    decision, row = entries["resized.txt"]
    assert decision is Decision.CHANGED
    assert row is not None and (row.state, row.size) == (ItemState.DONE, 50)


async def test_changed_sources_are_uploaded_again_and_unchanged_ones_are_not(
    job: Path, emulator: Emulator, api_key: str
) -> None:
    for name in ("same.txt", "resized.txt", "touched.txt"):
        write_file(job / name, 50)
    manifest = write_manifest(job, emulator.base_url, [{"glob": "./*.txt"}])
    await run(manifest, api_key)
    first = len(emulator.requests)
    write_file(job / "resized.txt", 60)
    stat = (job / "touched.txt").stat()
    os.utime(job / "touched.txt", ns=(stat.st_atime_ns, stat.st_mtime_ns + 5_000_000_000))

    summary = await run(manifest, api_key)

    assert (summary.count(Outcome.UPLOADED), summary.count(Outcome.SKIPPED)) == (2, 1)
    assert sorted(r.file_name or "" for r in emulator.requests[first:]) == [
        "resized.txt",
        "touched.txt",
    ]
    items = await ledger_rows(load(manifest))
    assert items["resized.txt"].size == 60
    assert (
        await fetch(items["resized.txt"].download_url or "") == (job / "resized.txt").read_bytes()
    )


# -- retries and failures -----------------------------------------------------------------


async def test_two_503s_with_retry_after_are_retried_and_the_item_is_done_after_3_attempts(
    job: Path, emulator: Emulator, api_key: str
) -> None:
    write_file(job / "a.txt", 10)
    manifest = write_manifest(job, emulator.base_url, [{"path": "./a.txt"}], retries=2)
    emulator.inject_faults(503, 2, retry_after=0)

    summary = await run(manifest, api_key)

    assert summary.exit_code is ExitCode.OK
    assert [r.status for r in emulator.requests] == [503, 503, 200]
    item = (await ledger_rows(load(manifest)))["a.txt"]
    assert (item.state, item.attempts) == (ItemState.DONE, 3)


async def test_a_400_fails_the_item_at_once_with_the_service_msg_and_exit_1(
    job: Path, emulator: Emulator, api_key: str
) -> None:
    write_file(job / "a.txt", 10)
    write_file(job / "b.txt", 10)
    manifest = write_manifest(
        job, emulator.base_url, [{"path": "./a.txt"}, {"path": "./b.txt"}], concurrency=1, retries=2
    )
    emulator.inject_faults(400, 1)

    summary = await run(manifest, api_key)

    assert summary.exit_code is ExitCode.ITEMS_FAILED
    assert (summary.count(Outcome.FAILED), summary.count(Outcome.UPLOADED)) == (1, 1)
    assert len(emulator.requests) == 2
    rows = await ledger_rows(load(manifest))
    failed = [i for i in rows.values() if i.state is ItemState.FAILED]
    assert len(failed) == 1
    assert failed[0].attempts == 1
    assert failed[0].last_error is not None
    assert "400" in failed[0].last_error and "bad request" in failed[0].last_error


async def test_an_error_code_in_a_200_body_is_retried(
    job: Path, emulator: Emulator, api_key: str
) -> None:
    write_file(job / "a.txt", 10)
    manifest = write_manifest(job, emulator.base_url, [{"path": "./a.txt"}], retries=2)
    emulator.inject_faults(200, 1, body_code=500)

    summary = await run(manifest, api_key)

    assert summary.exit_code is ExitCode.OK
    item = (await ledger_rows(load(manifest)))["a.txt"]
    assert (item.state, item.attempts) == (ItemState.DONE, 2)


async def test_a_url_the_origin_answers_404_fails_naming_the_url_after_the_stream_fallback(
    job: Path, emulator: Emulator, origin: Origin, api_key: str
) -> None:
    url = origin.url("missing.bin")
    manifest = write_manifest(job, emulator.base_url, [{"url": url}])

    summary = await run(manifest, api_key)

    assert summary.exit_code is ExitCode.ITEMS_FAILED
    assert [r.endpoint for r in emulator.requests] == ["url"]  # the stream-through never sent
    item = (await ledger_rows(load(manifest)))["missing.bin"]
    assert item.state is ItemState.FAILED
    assert item.last_error is not None
    assert url in item.last_error and "404" in item.last_error


async def test_a_dead_origin_fails_the_item_with_a_message_naming_the_url(
    job: Path, emulator: Emulator, api_key: str
) -> None:
    url = f"http://127.0.0.1:{closed_port()}/gone.bin"
    manifest = write_manifest(job, emulator.base_url, [{"url": url}], retries=0)

    summary = await run(manifest, api_key)

    assert summary.exit_code is ExitCode.ITEMS_FAILED
    item = (await ledger_rows(load(manifest)))["gone.bin"]
    assert item.state is ItemState.FAILED
    assert item.last_error is not None and url in item.last_error
    assert "\n" not in item.last_error


async def test_a_rejected_key_stops_the_run_with_exit_3_and_fails_no_item(
    job: Path, emulator: Emulator
) -> None:
    for name in ("a.txt", "b.txt", "c.txt"):
        write_file(job / name, 10)
    manifest = write_manifest(job, emulator.base_url, [{"glob": "./*.txt"}], concurrency=1)

    summary = await run(manifest, "wrong-key-000000")

    assert summary.exit_code is ExitCode.AUTH
    assert len(emulator.requests) == 1  # the run stops at the first rejection
    rows = await ledger_rows(load(manifest))
    assert rows, "the ledger holds no row for the item the run reached"
    assert set(rows) <= {"a.txt", "b.txt", "c.txt"}
    assert [name for name, i in rows.items() if i.state is ItemState.FAILED] == []


async def test_a_base_url_that_does_not_serve_the_api_stops_the_run_with_exit_2(
    job: Path, origin: Origin, api_key: str
) -> None:
    write_file(job / "a.txt", 10)
    manifest = write_manifest(job, origin.base_url, [{"path": "./a.txt"}])

    summary = await run(manifest, api_key)

    assert summary.exit_code is ExitCode.USAGE
    assert summary.stop_reason is StopReason.ENDPOINT
    assert (await ledger_rows(load(manifest)))["a.txt"].state is ItemState.PENDING


def test_the_progress_bar_prints_a_failed_items_path_and_error_literally() -> None:
    screen = io.StringIO()
    item = PlanItem(
        source="/data/notes[/draft] [bold].txt",
        kind=SourceKind.FILE,
        upload_path="mig",
        file_name="notes.txt",
        size=1,
        method=Method.BASE64,
    )
    with BarProgress(Console(file=screen, width=200)) as bar:
        bar.on_totals(1, 1)
        bar.on_item_done(item.source, Outcome.FAILED, "origin answered [404]")

    assert "failed /data/notes[/draft] [bold].txt: origin answered [404]" in screen.getvalue()


# -- what the ledger keeps of attempts and failures ------------------------------------------


def attempt_rows(manifest_path: Path) -> list[tuple[int, str, str, int | None]]:
    """(attempt, method, outcome, http_status) of every recorded attempt, in order."""
    ledger = load(manifest_path).ledger
    with sqlite3.connect(f"file:{ledger}?mode=ro", uri=True) as db:
        query = "SELECT attempt, method, outcome, http_status FROM attempts ORDER BY id"
        return [tuple(row) for row in db.execute(query)]


async def test_every_attempt_of_a_new_item_is_recorded_with_its_outcome_and_status(
    job: Path, emulator: Emulator, api_key: str
) -> None:
    write_file(job / "a.txt", 10)
    manifest = write_manifest(job, emulator.base_url, [{"path": "./a.txt"}], retries=2)
    emulator.inject_faults(503, 2, retry_after=0)

    await run(manifest, api_key)

    assert attempt_rows(manifest) == [
        (1, "base64", "retry", 503),
        (2, "base64", "retry", 503),
        (3, "base64", "ok", 200),
    ]


async def test_a_url_the_service_refuses_is_recorded_as_next_then_streamed_through(
    job: Path, emulator: Emulator, api_key: str, origin: Origin
) -> None:
    origin.files["pic.png"] = b"png bytes"
    manifest = write_manifest(job, emulator.base_url, [{"url": origin.url("pic.png")}])
    emulator.inject_faults(400, 1, endpoint="url")

    summary = await run(manifest, api_key)

    assert summary.exit_code is ExitCode.OK
    assert attempt_rows(manifest) == [(1, "url", "next", 400), (2, "stream", "ok", 200)]


async def test_a_done_item_whose_new_upload_fails_stays_done_and_is_tried_again_next_run(
    job: Path, emulator: Emulator, api_key: str
) -> None:
    old = write_file(job / "a.txt", 10)
    manifest = write_manifest(job, emulator.base_url, [{"path": "./a.txt"}])
    await run(manifest, api_key)
    first = (await ledger_rows(load(manifest)))["a.txt"]
    write_file(job / "a.txt", 20, seed=3)
    emulator.inject_faults(400, 1)

    failed_run = await run(manifest, api_key)

    assert failed_run.exit_code is ExitCode.ITEMS_FAILED
    kept = (await ledger_rows(load(manifest)))["a.txt"]
    assert (kept.state, kept.download_url, kept.size) == (ItemState.DONE, first.download_url, 10)
    assert kept.last_error is not None and "400" in kept.last_error
    assert await fetch(first.download_url) == old
    next_run = await run(manifest, api_key)
    assert (next_run.exit_code, next_run.count(Outcome.UPLOADED)) == (ExitCode.OK, 1)


class Explodes(Observer):
    def on_item_done(self, label: str, outcome: Outcome, error: str | None) -> None:
        raise RuntimeError("observer bug")


async def test_a_run_that_ends_in_an_unexpected_error_is_recorded_as_an_error(
    job: Path, emulator: Emulator, api_key: str
) -> None:
    write_file(job / "a.txt", 10)
    manifest = write_manifest(job, emulator.base_url, [{"path": "./a.txt"}])
    metrics = job / "metrics.prom"

    with pytest.raises(RuntimeError, match="observer bug"):
        await run_manifest(
            load(manifest),
            RunOptions(seed=1, metrics_file=metrics),
            Explodes(),
            environ={"KIE_API_KEY": api_key},
        )

    async with await Ledger.open(load(manifest).ledger, readonly=True) as ledger:
        last = (await ledger.runs(limit=1))[0]
    assert last.status == "error"
    assert 'migrator_last_run_exit_code{migration="job",command="run"} 70' in metrics.read_text()


async def test_the_embedded_target_moves_to_a_free_port_when_its_old_one_is_taken(
    job: Path,
) -> None:
    write_file(job / "a.txt", 10)
    manifest = write_manifest(job, "embedded", [{"path": "./a.txt"}])
    assert (await run(manifest, "unused")).exit_code is ExitCode.OK
    port_file = load(manifest).ledger.parent / "job.embedded" / "port"
    old_port = int(port_file.read_text())
    write_file(job / "a.txt", 11)  # changed: the next run must reach the emulator

    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", old_port))
        squatter.listen()
        summary = await run(manifest, "unused")

    assert (summary.exit_code, summary.count(Outcome.UPLOADED)) == (ExitCode.OK, 1)
    assert int(port_file.read_text()) != old_port


# -- --checksum ------------------------------------------------------------------------------


def rewrite_keeping_size_and_mtime(path: Path) -> None:
    """New bytes that size + mtime cannot see: same length, same modification time."""
    info = path.stat()
    path.write_bytes(bytes(255 - b for b in path.read_bytes()))
    os.utime(path, ns=(info.st_atime_ns, info.st_mtime_ns))


async def test_without_checksum_a_same_size_same_mtime_edit_goes_unseen(
    job: Path, emulator: Emulator, api_key: str
) -> None:
    write_file(job / "a.txt", 100)
    manifest = write_manifest(job, emulator.base_url, [{"path": "./a.txt"}])
    await run(manifest, api_key)
    rewrite_keeping_size_and_mtime(job / "a.txt")

    summary = await run(manifest, api_key)

    assert (summary.count(Outcome.UPLOADED), summary.count(Outcome.SKIPPED)) == (0, 1)


async def test_checksum_uploads_a_same_size_same_mtime_edit_again(
    job: Path, emulator: Emulator, api_key: str
) -> None:
    write_file(job / "a.txt", 100)
    write_file(job / "b.txt", 100, seed=9)
    manifest = write_manifest(job, emulator.base_url, [{"glob": "./*.txt"}])
    await run(manifest, api_key)
    rewrite_keeping_size_and_mtime(job / "a.txt")

    summary = await run(manifest, api_key, checksum=True)

    assert (summary.count(Outcome.UPLOADED), summary.count(Outcome.SKIPPED)) == (1, 1)
    item = (await ledger_rows(load(manifest)))["a.txt"]
    assert await fetch(item.download_url or "") == (job / "a.txt").read_bytes()


async def test_a_checksum_dry_run_counts_the_edit_as_changed(
    job: Path, emulator: Emulator, api_key: str
) -> None:
    write_file(job / "a.txt", 100)
    manifest = write_manifest(job, emulator.base_url, [{"path": "./a.txt"}])
    await run(manifest, api_key)
    rewrite_keeping_size_and_mtime(job / "a.txt")
    sent = len(emulator.requests)

    summary = await run(manifest, api_key, dry_run=True, checksum=True)

    assert summary.would == {"changed": 1}
    assert len(emulator.requests) == sent
