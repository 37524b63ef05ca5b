"""The command core: what run, refresh and download share, and the same experience for each.

Dry runs that write and send nothing, a progress line without a terminal, a summary
that says what was not started, downloads on the one retry path (attempt rows,
Retry-After), and a ledger that never keeps a download of bytes it no longer holds.
"""

from __future__ import annotations

import asyncio
import contextlib
import resource
import sqlite3
import sys
from pathlib import Path

import pytest
from conftest import ledger_rows, load, migrator_env, run_cli, write_file, write_manifest

from migrator.command import CommandSummary, Outcome, workers_the_fd_limit_allows
from migrator.download import DownloadOptions, download
from migrator.emulator import Emulator
from migrator.errors import ExitCode, StopReason
from migrator.model import HOUR
from migrator.refresh import RefreshOptions, refresh
from migrator.runner import RunOptions, run_manifest

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def three_files(job: Path) -> Path:
    for name in ("a.txt", "b.txt", "c.txt"):
        write_file(job / "data" / name, 100, seed=ord(name[0]))
    return job


async def finished_job(folder: Path, emulator: Emulator, api_key: str) -> Path:
    manifest = write_manifest(folder, emulator.base_url, [{"glob": "./data/*.txt"}])
    summary = await run_manifest(load(manifest), RunOptions(seed=1), environ=key_env(api_key))
    assert summary.exit_code is ExitCode.OK
    return manifest


def key_env(api_key: str) -> dict[str, str]:
    return {"KIE_API_KEY": api_key}


def attempt_rows(ledger: Path) -> list[tuple[str, str, int | None]]:
    """(method, outcome, http_status) of every attempt, oldest first."""
    with contextlib.closing(sqlite3.connect(f"file:{ledger}?mode=ro", uri=True)) as conn:
        sql = "SELECT method, outcome, http_status FROM attempts ORDER BY id"
        return [tuple(row) for row in conn.execute(sql).fetchall()]


# -- the summary ------------------------------------------------------------------------------


def test_a_stopped_command_says_how_many_items_it_did_not_start() -> None:
    summary = CommandSummary(
        "run",
        {Outcome.UPLOADED: 3, Outcome.INTERRUPTED: 1},
        planned=1737,
        duration=2.0,
        stop_reason=StopReason.SIGINT,
    )
    assert summary.not_started == 1733
    assert summary.line().endswith("; 1733 not started: run again to resume")
    assert summary.exit_code is ExitCode.INTERRUPTED_INT


def test_a_finished_command_says_nothing_of_items_not_started() -> None:
    summary = CommandSummary("download", {Outcome.DOWNLOADED: 2}, planned=2, duration=1.0)
    assert summary.line() == "download: 2 downloaded in 1.0s"


@pytest.mark.parametrize("bad", [Outcome.FAILED, Outcome.LOST, Outcome.DEAD, Outcome.MISMATCH])
def test_any_bad_outcome_makes_the_exit_status_1(bad: Outcome) -> None:
    summary = CommandSummary("verify", {Outcome.ALIVE: 5, bad: 1}, planned=6, duration=1.0)
    assert summary.exit_code is ExitCode.ITEMS_FAILED


async def test_a_run_stopped_by_a_rejected_key_counts_the_rest_as_not_started(
    three_files: Path, emulator: Emulator
) -> None:
    manifest = write_manifest(three_files, emulator.base_url, [{"glob": "./data/*.txt"}])

    summary = await run_manifest(
        load(manifest), RunOptions(concurrency=1), environ=key_env("wrong-key-000000")
    )

    assert summary.stop_reason is StopReason.AUTH
    assert summary.not_started == 3
    assert "3 not started: run again to resume" in summary.line()


# -- dry runs ----------------------------------------------------------------------------------


async def test_refresh_dry_run_says_where_each_item_would_come_from_and_sends_nothing(
    three_files: Path, emulator: Emulator, api_key: str
) -> None:
    manifest = await finished_job(three_files, emulator, api_key)
    (three_files / "data" / "c.txt").unlink()
    sent = len(emulator.requests)
    before = await ledger_rows(load(manifest))

    summary = await refresh(load(manifest), RefreshOptions(within=73 * HOUR, dry_run=True))

    assert summary.dry_run
    assert summary.would == {"local": 2, "copy": 1}
    assert len(emulator.requests) == sent
    assert await ledger_rows(load(manifest)) == before


async def test_download_dry_run_counts_what_is_missing_and_writes_nothing(
    three_files: Path, emulator: Emulator, api_key: str, tmp_path: Path
) -> None:
    manifest = await finished_job(three_files, emulator, api_key)
    dest = tmp_path / "dest"

    summary = await download(load(manifest), dest, DownloadOptions(dry_run=True))

    assert summary.would == {"download": 3}
    assert not dest.exists()
    assert emulator.link_requests == []


async def test_the_cli_dry_run_of_refresh_prints_its_decisions_and_no_log(
    three_files: Path, emulator: Emulator, api_key: str
) -> None:
    manifest = await finished_job(three_files, emulator, api_key)
    log_file = three_files / "ledger.log"

    done = await run_cli("refresh", str(manifest), "--within", "73h", "--dry-run", key=api_key)

    assert done.code == 0, done.stderr
    assert done.stdout.startswith("dry run: 3 items, would refresh: 3 local; 0 skipped")
    assert not log_file.exists()


# -- progress -----------------------------------------------------------------------------------


async def test_refresh_without_a_terminal_prints_a_progress_line_every_stats_interval(
    three_files: Path, emulator: Emulator, api_key: str
) -> None:
    manifest = await finished_job(three_files, emulator, api_key)
    (three_files / "data" / "a.txt").unlink()
    emulator.inject_faults(503, 2, retry_after=0.6)  # keeps the refresh busy a moment

    done = await run_cli(
        "refresh", str(manifest), "--within", "73h", "--stats", "0.2s", key=api_key
    )

    assert done.code == 0, done.stderr
    assert "progress: " in done.stderr
    assert done.stdout.startswith("refresh: 3 refreshed in ")


# -- downloads on the one retry path -------------------------------------------------------------


async def test_a_throttled_download_waits_as_told_records_every_attempt_and_finishes(
    three_files: Path, api_key: str, tmp_path: Path
) -> None:
    for i in range(12):
        write_file(three_files / "data" / f"more{i:02d}.txt", 50, seed=i)
    async with Emulator(tmp_path / "limited", api_key, rate_limit=6) as emulator:
        manifest = write_manifest(
            three_files, emulator.base_url, [{"glob": "./data/*.txt"}], retries=5
        )
        run = await run_manifest(load(manifest), RunOptions(seed=1), environ=key_env(api_key))
        assert run.exit_code is ExitCode.OK

        summary = await download(load(manifest), tmp_path / "dest", DownloadOptions(seed=1))

        assert summary.exit_code is ExitCode.OK
        assert summary.count(Outcome.DOWNLOADED) == 15
        downloads = [
            row for row in attempt_rows(three_files / "ledger.sqlite") if row[0] == "download"
        ]
        refused = sum(link.status == 429 for link in emulator.link_requests)
        assert refused > 0
        assert len(downloads) == 15 + refused
        assert downloads.count(("download", "retry", 429)) == refused


# -- what the ledger says about downloads ----------------------------------------------------------


async def test_new_bytes_uploaded_over_a_downloaded_item_clear_its_download(
    three_files: Path, emulator: Emulator, api_key: str, tmp_path: Path
) -> None:
    manifest = await finished_job(three_files, emulator, api_key)
    await download(load(manifest), tmp_path / "dest")
    write_file(three_files / "data" / "a.txt", 120, seed=99)  # other bytes, other size

    await run_manifest(load(manifest), RunOptions(seed=1), environ=key_env(api_key))

    rows = await ledger_rows(load(manifest))
    assert (rows["a.txt"].downloaded_path, rows["a.txt"].downloaded_at) == (None, None)
    assert rows["a.txt"].size == 120
    assert rows["b.txt"].downloaded_path == str(tmp_path / "dest" / "mig" / "b.txt")


async def test_a_refresh_of_the_same_bytes_keeps_the_download(
    three_files: Path, emulator: Emulator, api_key: str, tmp_path: Path
) -> None:
    manifest = await finished_job(three_files, emulator, api_key)
    await download(load(manifest), tmp_path / "dest")

    summary = await refresh(
        load(manifest), RefreshOptions(within=73 * HOUR), environ=key_env(api_key)
    )

    assert summary.count(Outcome.REFRESHED) == 3
    rows = await ledger_rows(load(manifest))
    assert all(row.downloaded_path is not None for row in rows.values())


# -- the open-file limit -------------------------------------------------------------------------


def test_the_open_file_limit_caps_the_workers() -> None:
    assert workers_the_fd_limit_allows(256) == 56
    assert workers_the_fd_limit_allows(20) == 1


async def test_a_run_under_a_low_open_file_limit_fails_no_item(
    job: Path, emulator: Emulator, api_key: str
) -> None:
    for i in range(400):
        write_file(job / "many" / f"f{i:03d}.txt", 64, seed=i)
    manifest = write_manifest(job, emulator.base_url, [{"glob": "./many/*.txt"}], concurrency=256)

    def low_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))

    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "migrator",
        "run",
        str(manifest),
        "--no-progress",
        env={**migrator_env(), "KIE_API_KEY": api_key},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        preexec_fn=low_limit,
    )
    out, err = await asyncio.wait_for(process.communicate(), 50)

    assert process.returncode == 0, err.decode()
    assert out.decode().startswith("run: 400 uploaded, 0 skipped, 0 failed")
