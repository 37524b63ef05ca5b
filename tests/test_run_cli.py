"""`python -m migrator run` as an operator runs it: exit codes, kill -9, the lock, signals."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import sqlite3
import stat
import time
from pathlib import Path

import pytest
from conftest import (
    REPO_ROOT,
    Finished,
    Origin,
    ledger_states,
    run_cli,
    start_cli,
    write_file,
    write_manifest,
)
from test_run import export_jsonl, fetch

from migrator.emulator import Emulator
from migrator.lock import RunLock

pytestmark = pytest.mark.timeout(90)

SUMMARY_RE = re.compile(r"^run: (\d+) uploaded, (\d+) skipped, (\d+) failed", re.MULTILINE)


def counts(result: Finished) -> tuple[int, int, int]:
    """(uploaded, skipped, failed) from the summary line on stdout."""
    match = SUMMARY_RE.search(result.stdout)
    assert match is not None, result.stdout
    uploaded, skipped, failed = match.groups()
    return int(uploaded), int(skipped), int(failed)


async def run(manifest: Path, api_key: str | None, *args: str) -> Finished:
    """`python -m migrator run MANIFEST --no-progress ARGS`, awaited."""
    return await run_cli("run", str(manifest), "--no-progress", *args, key=api_key)


async def start_run(
    manifest: Path, api_key: str | None, *args: str, out_dir: Path
) -> asyncio.subprocess.Process:
    """`python -m migrator run MANIFEST --no-progress ARGS`, not awaited, its output going
    to files in out_dir rather than pipes: the test signals or kills it without reading
    its output meanwhile, and `finish` reads the files afterwards."""
    await asyncio.to_thread(out_dir.mkdir, parents=True, exist_ok=True)
    with (out_dir / "stdout").open("wb") as stdout, (out_dir / "stderr").open("wb") as stderr:
        return await start_cli(
            "run", str(manifest), "--no-progress", *args, key=api_key, stdout=stdout, stderr=stderr
        )


async def finish(process: asyncio.subprocess.Process, out_dir: Path, limit: float = 30) -> Finished:
    """How a `start_run` child ended, its output read back from out_dir."""
    try:
        code = await asyncio.wait_for(process.wait(), limit)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    return Finished(
        code,
        (out_dir / "stdout").read_text(encoding="utf-8"),
        (out_dir / "stderr").read_text(encoding="utf-8"),
    )


def done_count(ledger: Path) -> int:
    """Items done, while a run may still be creating the ledger: 0 until its file and
    schema are there (ledger_states alone would raise)."""
    try:
        return list(ledger_states(ledger).values()).count("done")
    except sqlite3.OperationalError:
        return 0


# -- kill -9 and resume -------------------------------------------------------------------


async def wait_for_requests(emulator: Emulator, count: int, limit: float = 20) -> None:
    deadline = time.monotonic() + limit
    while len(emulator.requests) < count:
        assert time.monotonic() < deadline, "the run sent too few requests"
        await asyncio.sleep(0.005)


async def requests_settled(emulator: Emulator, quiet: float = 0.3, limit: float = 10) -> int:
    """The request count once the in-process emulator has served what the killed run
    had already sent: the loop was blocked meanwhile, so those arrive late."""
    deadline = time.monotonic() + limit
    count = -1
    while count != len(emulator.requests) and time.monotonic() < deadline:
        count = len(emulator.requests)
        await asyncio.sleep(quiet)
    return count


def wait_for_done_items_while_the_service_stalls(ledger: Path, count: int) -> int:
    """Block the event loop (and so the in-process emulator) until the ledger shows
    `count` done items: the run cannot finish meanwhile, but its flusher commits."""
    deadline = time.monotonic() + 10
    while (done := done_count(ledger)) < count and time.monotonic() < deadline:
        time.sleep(0.05)
    return done


async def test_a_run_killed_with_sigkill_resumes_and_finishes_with_a_complete_export(
    job: Path, emulator: Emulator, api_key: str
) -> None:
    files = {
        f"f{i:02}.bin": write_file(job / "data" / f"f{i:02}.bin", 5000, seed=i) for i in range(60)
    }
    manifest = write_manifest(job, emulator.base_url, [{"glob": "./data/*.bin"}])
    ledger = job / "ledger.sqlite"

    first = await start_run(manifest, api_key, "--concurrency", "2", out_dir=job / "run1")
    await wait_for_requests(emulator, 10)
    wait_for_done_items_while_the_service_stalls(ledger, 3)
    first.kill()
    assert await first.wait() == -signal.SIGKILL
    done_before = done_count(ledger)
    assert 3 <= done_before < 60

    sent = await requests_settled(emulator)
    second = await run(manifest, api_key, "--concurrency", "2")
    assert second.code == 0, second.stderr
    assert counts(second) == (60 - done_before, done_before, 0)
    assert len(emulator.requests) - sent == 60 - done_before

    records = await export_jsonl(manifest, job / "export.jsonl")
    assert sorted(r["file_name"] for r in records) == sorted(files)
    for record in records:
        assert record["status"] == "done"
        assert await fetch(record["download_url"]) == files[record["file_name"]]

    sent = len(emulator.requests)
    third = await run(manifest, api_key)
    assert third.code == 0
    assert counts(third) == (0, 60, 0)
    assert len(emulator.requests) == sent


# -- exit codes ---------------------------------------------------------------------------


async def test_a_wrong_key_exits_3_fails_no_item_and_is_printed_nowhere(
    job: Path, emulator: Emulator
) -> None:
    wrong_key = "wrong-key-5d1c0ffee7"
    for name in ("a.txt", "b.txt"):
        write_file(job / name, 10)
    manifest = write_manifest(job, emulator.base_url, [{"glob": "./*.txt"}])
    log_file = job / "run.log"

    result = await run(manifest, wrong_key, "--log-file", str(log_file))

    assert result.code == 3
    assert "rejected" in result.stderr.lower() or "401" in result.stderr
    assert "failed" not in ledger_states(job / "ledger.sqlite").values()
    log_text = log_file.read_text(encoding="utf-8")
    assert "401" in log_text  # the log file does record the attempt...
    for text in (result.stdout, result.stderr, log_text):
        assert wrong_key not in text  # ...but never the key


async def test_a_held_lock_exits_75_with_one_line_and_no_traceback(
    job: Path, emulator: Emulator, api_key: str
) -> None:
    write_file(job / "a.txt", 10)
    manifest = write_manifest(job, emulator.base_url, [{"path": "./a.txt"}])

    with RunLock(job / "ledger.sqlite"):
        result = await run(manifest, api_key)

    assert result.code == 75
    result.one_error_line()
    assert "lock" in result.stderr
    assert emulator.requests == []


async def test_a_bad_manifest_exits_2_with_one_line_and_no_traceback(job: Path) -> None:
    manifest = job / "job.yaml"
    manifest.write_text("version: 1\nname: job\ntarget: {base_url: embedded}\n", encoding="utf-8")

    result = await run(manifest, "k" * 20)

    assert result.code == 2
    result.one_error_line()
    assert "sources" in result.stderr


async def test_a_missing_api_key_exits_2_naming_the_variable(job: Path, emulator: Emulator) -> None:
    write_file(job / "a.txt", 10)
    manifest = write_manifest(job, emulator.base_url, [{"path": "./a.txt"}])

    result = await run(manifest, None)

    assert result.code == 2
    result.one_error_line()
    assert "KIE_API_KEY" in result.stderr
    assert emulator.requests == []
    assert not (job / "ledger.sqlite").exists()  # refused before anything was written


# -- signals ------------------------------------------------------------------------------


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
async def test_a_signal_mid_transfer_exits_128_plus_it_and_the_item_is_interrupted_then_resumed(
    job: Path, emulator: Emulator, origin: Origin, api_key: str, signum: signal.Signals, code: int
) -> None:
    origin.files["slow.bin"] = data = bytes(range(256)) * 1200
    origin.slow.add("slow.bin")
    manifest = write_manifest(
        job, emulator.base_url, [{"url": origin.url("slow.bin")}], url_max="100KiB"
    )

    process = await start_run(manifest, api_key, "--grace", "1", out_dir=job / "run1")
    deadline = time.monotonic() + 20
    while "slow.bin" not in origin.gets:  # the stream-through is in flight
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)
    process.send_signal(signum)
    result = await finish(process, job / "run1")

    assert result.code == code
    assert "Traceback" not in result.stderr
    assert ledger_states(job / "ledger.sqlite") == {"slow.bin": "interrupted"}

    origin.slow.clear()
    again = await run(manifest, api_key)
    assert again.code == 0, again.stderr
    assert counts(again) == (1, 0, 0)
    [record] = await export_jsonl(manifest, job / "export.jsonl")
    assert await fetch(record["download_url"]) == data


# -- secrets and permissions --------------------------------------------------------------


async def test_ledger_is_private_and_the_key_is_in_no_file_the_run_writes(
    job: Path, emulator: Emulator, api_key: str
) -> None:
    write_file(job / "a.txt", 10)
    write_file(job / "b.txt", 10)
    manifest = write_manifest(job, emulator.base_url, [{"glob": "./*.txt"}], concurrency=1)
    emulator.inject_faults(400, 1)  # one failure: an error message in the ledger and the log
    log_file = job / "run.log"

    result = await run(manifest, api_key, "--log-file", str(log_file))
    await export_jsonl(manifest, job / "export.jsonl")

    assert result.code == 1
    ledger = job / "ledger.sqlite"
    assert stat.S_IMODE(ledger.stat().st_mode) == 0o600
    assert b"upload.failed" in log_file.read_bytes()
    written = [ledger, log_file, job / "export.jsonl"]
    written += await asyncio.to_thread(lambda: list(job.glob("ledger.sqlite-*")))
    for path in written:
        assert api_key.encode() not in path.read_bytes(), path
    assert api_key not in result.stdout
    assert api_key not in result.stderr


# -- the quickstart -----------------------------------------------------------------------


async def test_quickstart_runs_and_a_second_run_uploads_nothing(tmp_path: Path) -> None:
    folder = tmp_path / "sample_manifests"
    shutil.copytree(
        REPO_ROOT / "sample_manifests", folder, ignore=shutil.ignore_patterns("out", ".migrator")
    )
    args = ["run", "quickstart.yaml", "--ledger", str(tmp_path / "q.sqlite")]

    first = await run_cli(*args, cwd=folder, limit=60)
    assert first.code == 0, first.stderr
    assert "0 failed" in first.stdout
    second = await run_cli(*args, cwd=folder, limit=60)
    assert second.code == 0, second.stderr
    assert "run: 0 uploaded" in second.stdout


async def test_a_changed_file_whose_new_upload_is_interrupted_is_uploaded_by_the_next_run(
    job: Path, emulator: Emulator, api_key: str
) -> None:
    write_file(job / "a.txt", 10)
    manifest = write_manifest(job, emulator.base_url, [{"path": "./a.txt"}], retries=2)
    assert (await run(manifest, api_key)).code == 0
    changed = write_file(job / "a.txt", 20, seed=3)
    emulator.inject_faults(503, 1, retry_after=60)  # the new upload waits to retry...

    process = await start_run(manifest, api_key, out_dir=job / "run2")
    await wait_for_requests(emulator, 2)
    process.send_signal(signal.SIGTERM)  # ...and is stopped while it waits
    assert (await finish(process, job / "run2")).code == 143

    again = await run(manifest, api_key)
    assert again.code == 0
    assert counts(again) == (1, 0, 0)
    [record] = await export_jsonl(manifest, job / "export.jsonl")
    assert await fetch(record["download_url"]) == changed


async def test_a_dry_run_sends_nothing_and_writes_nothing_beside_the_manifest(
    job: Path, emulator: Emulator, api_key: str
) -> None:
    write_file(job / "a.txt", 10)
    manifest = write_manifest(job, emulator.base_url, [{"path": "./a.txt"}])
    before = sorted(await asyncio.to_thread(os.listdir, job))

    result = await run(manifest, api_key, "--dry-run")

    assert result.code == 0
    assert "would upload: 1 new" in result.stdout
    assert emulator.requests == []
    assert sorted(await asyncio.to_thread(os.listdir, job)) == before
