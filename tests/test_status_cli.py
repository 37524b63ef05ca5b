"""`migrator status` knows the job, and commands report as an operator reads them.

Status compares the manifest with the ledger (offline), counts expired items apart
from done ones, lists what failed in the last refresh and download, and never tells
a negative duration. Commands show a progress bar with rates on a terminal, and print
their summary as JSON when asked.
"""

from __future__ import annotations

import asyncio
import json
import os
import pty
import re
import sys
import time
from pathlib import Path

import pytest
from aiohttp import web
from conftest import migrator_env, run_cli, web_server, write_file, write_manifest
from hypothesis import given
from hypothesis import strategies as st

from migrator.emulator import Emulator
from migrator.ledger import open_ledger
from migrator.manifest import load_manifest
from migrator.report import CommandResult, build_status, metrics_snapshot
from migrator.units import relative_time

pytestmark = pytest.mark.timeout(60)

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


async def status_json(manifest: Path) -> dict[str, object]:
    result = await run_cli("status", str(manifest), "--format", "json")
    assert result.code == 0, result.stderr
    report: dict[str, object] = json.loads(result.stdout)
    return report


async def status_text(manifest: Path) -> str:
    result = await run_cli("status", str(manifest), env={"COLUMNS": "200"})
    assert result.code == 0, result.stderr
    return result.stdout


async def run_job(manifest: Path, api_key: str, *args: str) -> None:
    result = await run_cli("run", str(manifest), "--no-progress", *args, key=api_key)
    assert result.code == 0, result.stderr


async def uploaded(job: Path, emulator: Emulator, api_key: str, *names: str) -> Path:
    """A job of `names` (files of 100 bytes) run to the end; returns its manifest."""
    for name in names:
        write_file(job / "files" / name, 100)
    manifest = write_manifest(job, emulator.base_url, [{"glob": "./files/*"}])
    await run_job(manifest, api_key)
    return manifest


# -- the manifest against the ledger ---------------------------------------------------------


async def test_status_counts_items_not_started_and_items_no_longer_in_the_manifest(
    job: Path, emulator: Emulator, api_key: str
) -> None:
    for name in ("a.txt", "b.txt"):
        write_file(job / "files" / name, 100)
    manifest = write_manifest(job, emulator.base_url, [{"glob": "./files/*"}])
    await run_job(manifest, api_key)
    (job / "files" / "a.txt").unlink()
    for name in ("c.txt", "d.txt", "e.txt"):
        write_file(job / "files" / name, 100)

    report = await status_json(manifest)
    text = await status_text(manifest)

    assert report["manifest"] == {"in_manifest": 4, "not_started": 3, "not_in_manifest": 1}
    assert "manifest: 4 items, 3 not started, 1 in the ledger no longer in the manifest" in text


async def test_status_asks_no_origin_to_know_which_items_the_manifest_names(
    job: Path, emulator: Emulator, api_key: str
) -> None:
    requests: list[str] = []

    async def origin(request: web.Request) -> web.Response:
        requests.append(request.method)
        return web.Response(body=b"x" * 50)

    async with web_server(origin) as base:
        manifest = write_manifest(job, emulator.base_url, [{"url": f"{base}/one.bin"}])
        await run_job(manifest, api_key)
        write_manifest(
            job, emulator.base_url, [{"url": f"{base}/one.bin"}, {"url": f"{base}/two.bin"}]
        )
        seen_by_origin, seen_by_service = len(requests), len(emulator.requests)

        report = await status_json(manifest)

    assert report["manifest"] == {"in_manifest": 2, "not_started": 1, "not_in_manifest": 0}
    assert len(requests) == seen_by_origin
    assert len(emulator.requests) == seen_by_service


async def test_status_does_not_compare_a_ledger_bigger_than_its_limit_and_says_how_to_ask(
    job: Path, emulator: Emulator, api_key: str
) -> None:
    manifest = await uploaded(job, emulator, api_key, "a.txt", "b.txt", "c.txt")

    report = await build_status(load_manifest(manifest), compare_limit=2)

    assert report.coverage is None
    assert report.not_compared is not None
    assert "the ledger holds 3 items, more than 2" in report.not_compared
    assert "status --compare" in report.not_compared


async def test_status_does_not_compare_a_manifest_naming_more_than_its_limit(
    job: Path, emulator: Emulator, api_key: str
) -> None:
    manifest = await uploaded(job, emulator, api_key, "a.txt")
    for name in ("b.txt", "c.txt"):
        write_file(job / "files" / name, 100)

    report = await build_status(load_manifest(manifest), compare_limit=2)

    assert report.coverage is None
    assert report.not_compared is not None
    assert "the manifest names more than 2 items" in report.not_compared


async def test_status_without_a_limit_compares_however_many_items(
    job: Path, emulator: Emulator, api_key: str
) -> None:
    manifest = await uploaded(job, emulator, api_key, "a.txt", "b.txt", "c.txt")

    report = await build_status(load_manifest(manifest), compare_limit=None)

    assert report.not_compared is None
    assert report.coverage is not None
    assert report.coverage.as_dict() == {"in_manifest": 3, "not_started": 0, "not_in_manifest": 0}


async def test_status_compare_option_compares_and_is_refused_with_ledger_only(
    job: Path, emulator: Emulator, api_key: str
) -> None:
    manifest = await uploaded(job, emulator, api_key, "a.txt")

    compared = await run_cli("status", str(manifest), "--format", "json", "--compare")
    both = await run_cli("status", str(manifest), "--compare", "--ledger-only")

    assert compared.code == 0, compared.stderr
    report = json.loads(compared.stdout)
    assert report["manifest"] == {"in_manifest": 1, "not_started": 0, "not_in_manifest": 0}
    assert report["manifest_not_compared"] is None
    assert both.code == 2
    assert "not allowed with" in both.stderr


# -- expiry ----------------------------------------------------------------------------------


async def job_expired_since(job: Path, tmp_path: Path, api_key: str) -> Path:
    """A job of one 100-byte file, uploaded to a service that kept it one second, now past
    its expiry on both clocks; returns its manifest."""
    write_file(job / "files" / "short.txt", 100)
    async with Emulator(tmp_path / "short-lived", api_key, ttl=1.0) as emulator:
        manifest = write_manifest(job, emulator.base_url, [{"glob": "./files/*"}])
        await run_job(manifest, api_key)
    await asyncio.sleep(1.5)  # past its expiry on both clocks
    return manifest


async def test_an_expired_item_counts_as_expired_not_done_and_no_duration_is_negative(
    job: Path, tmp_path: Path, api_key: str
) -> None:
    manifest = await job_expired_since(job, tmp_path, api_key)

    report = await status_json(manifest)
    text = await status_text(manifest)

    by_state = report["by_state"]
    assert isinstance(by_state, dict)
    assert by_state["done"]["items"] == 0
    assert by_state["expired"] == {"items": 1, "bytes": 100}
    assert report["next_expiry"] is None
    assert report["first_expired_at"] is not None
    assert re.search(r"expired: 1 item, the first \d+s ago", text), text
    assert "in -" not in text
    assert not re.search(r"-[\d.]+s\b", text), text


async def test_the_metrics_count_an_expired_item_as_expired_as_status_does(
    job: Path, tmp_path: Path, api_key: str
) -> None:
    manifest = await job_expired_since(job, tmp_path, api_key)
    loaded = load_manifest(manifest)

    async with await open_ledger(loaded, readonly=True) as ledger:
        snapshot = await metrics_snapshot(loaded, ledger, CommandResult("run", time.time(), 0))

    assert snapshot.items_by_state["done"] == 0
    assert snapshot.items_by_state["expired"] == 1
    assert snapshot.bytes_by_state["expired"] == 100
    assert snapshot.next_expiry_seconds is None


# -- failures of the last refresh and download -----------------------------------------------


async def test_status_lists_the_items_the_last_download_failed_with_their_errors(
    job: Path, emulator: Emulator, api_key: str, tmp_path: Path
) -> None:
    write_file(job / "files" / "fine.txt", 100)
    write_file(job / "files" / "blocked.txt", 100)
    manifest = write_manifest(job, emulator.base_url, [{"glob": "./files/*"}])
    await run_job(manifest, api_key)
    dest = tmp_path / "dest"
    (dest / "mig" / "blocked.txt" / "in-the-way").mkdir(parents=True)  # a folder, not a file

    download = await run_cli("download", str(manifest), "--dest", str(dest), "--no-progress")
    assert download.code == 1, download.stderr
    report = await status_json(manifest)
    text = await status_text(manifest)

    last = report["last_by_command"]
    assert isinstance(last, dict)
    failures = last["download"]["failures"]
    assert [f["file_name"] for f in failures] == ["blocked.txt"]
    assert failures[0]["error"]
    assert re.search(r"last download: failed at \S+: 1 downloaded, 1 failed", text), text
    assert re.search(r"\n  failed mig/blocked.txt <- \S+blocked.txt: \S", text), text


async def test_status_lists_the_items_the_last_refresh_failed_with_their_errors(
    job: Path, emulator: Emulator, api_key: str
) -> None:
    write_file(job / "files" / "a.txt", 100)
    manifest = write_manifest(job, emulator.base_url, [{"glob": "./files/*"}], retries=0)
    await run_job(manifest, api_key)
    emulator.inject_faults(400, 10)  # every way of uploading it again is refused

    refreshed = await run_cli(
        "refresh", str(manifest), "--within", "100h", "--no-progress", key=api_key
    )
    assert refreshed.code == 1, refreshed.stderr
    report = await status_json(manifest)

    last = report["last_by_command"]
    assert isinstance(last, dict)
    [failure] = last["refresh"]["failures"]
    assert failure["file_name"] == "a.txt"
    assert "400" in failure["error"]


# -- the progress bar and the summary --------------------------------------------------------


async def test_the_progress_bar_shows_items_per_second_bytes_per_second_and_failures(
    job: Path, emulator: Emulator, api_key: str
) -> None:
    for index in range(6):
        write_file(job / "files" / f"f{index}.txt", 2000, seed=index)
    manifest = write_manifest(job, emulator.base_url, [{"glob": "./files/*"}], retries=0)
    emulator.inject_faults(400, 1)  # one item fails for good

    screen = await run_on_a_terminal("run", str(manifest), key=api_key)

    last_items_row = [line for line in screen.splitlines() if "uploads" in line][-1]
    assert re.search(r"6/6 +(\?|[\d.]+) items/s +1 failed", last_items_row), screen
    last_bytes_row = [line for line in screen.splitlines() if line.startswith("bytes")][-1]
    assert re.search(r"9\.8 KiB +(\?|[\d.]+) (B|KiB|MiB)/s", last_bytes_row), screen


async def run_on_a_terminal(*args: str, key: str) -> str:
    """`python -m migrator ARGS` with stderr on a pseudo-terminal; what it drew there."""
    leader, follower = pty.openpty()
    env = {**migrator_env(), "KIE_API_KEY": key, "TERM": "xterm", "COLUMNS": "160"}
    env.pop("MIGRATOR_LEDGER_DIR", None)
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "migrator",
        *args,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=follower,
        env=env,
    )
    os.close(follower)
    try:
        drawn = await asyncio.wait_for(asyncio.to_thread(_read_all, leader), 30)
        assert await asyncio.wait_for(process.wait(), 10) == 1
    finally:
        os.close(leader)
        if process.returncode is None:
            process.kill()
            await process.wait()
    return ANSI.sub("", drawn.decode(errors="replace")).replace("\r", "\n")


def _read_all(fd: int) -> bytes:
    chunks = []
    while True:
        try:
            chunk = os.read(fd, 65536)
        except OSError:  # EIO: the child closed the terminal
            return b"".join(chunks)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


async def test_run_prints_its_summary_as_json_when_asked(
    job: Path, emulator: Emulator, api_key: str
) -> None:
    for name in ("a.txt", "b.txt"):
        write_file(job / "files" / name, 100)
    manifest = write_manifest(job, emulator.base_url, [{"glob": "./files/*"}])

    result = await run_cli(
        "run", str(manifest), "--no-progress", "--summary-format", "json", key=api_key
    )

    assert result.code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["command"] == "run"
    assert summary["summary"]["uploaded"] == 2
    assert summary["summary"]["exit_code"] == 0
    assert summary["line"].startswith("run: 2 uploaded")


async def test_refresh_prints_its_summary_as_json_when_asked(
    job: Path, emulator: Emulator, api_key: str
) -> None:
    write_file(job / "files" / "a.txt", 100)
    manifest = write_manifest(job, emulator.base_url, [{"glob": "./files/*"}])
    await run_job(manifest, api_key)

    result = await run_cli(
        "refresh", str(manifest), "--within", "100h", "--summary-format", "json", key=api_key
    )

    assert result.code == 0, result.stderr
    assert json.loads(result.stdout)["summary"]["refreshed"] == 1


@given(moment=st.floats(-1e9, 1e9), now=st.floats(-1e9, 1e9))
def test_a_relative_time_is_never_a_negative_duration(moment: float, now: float) -> None:
    words = relative_time(moment, now)

    assert "-" not in words
    assert words.startswith("in ") if moment >= now else words.endswith(" ago")


async def test_status_ledger_only_does_not_compare_with_the_manifest(
    job: Path, emulator: Emulator, api_key: str
) -> None:
    manifest = await uploaded(job, emulator, api_key, "a.txt")

    result = await run_cli("status", str(manifest), "--format", "json", "--ledger-only")

    assert result.code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["manifest"] is None
    assert report["by_state"]["done"]["items"] == 1
