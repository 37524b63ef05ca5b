"""`migrator refresh` and `migrator download` as subprocesses: exit codes, messages, SIGKILL.

The emulator runs in the test's own event loop, so the child is awaited with asyncio
(a blocking wait would starve the emulator it talks to).
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import aiohttp
import pytest
from conftest import (
    files_below,
    ledger_rows,
    ledger_states,
    run_cli,
    start_cli,
    write_file,
    write_manifest,
)

from migrator.emulator import Emulator
from migrator.errors import ExitCode
from migrator.manifest import load_manifest
from migrator.model import HOUR, Manifest
from migrator.runner import RunOptions, run_manifest

pytestmark = pytest.mark.timeout(60)


def load(path: Path) -> Manifest:
    """Not conftest's load: these tests read the ledger after deleting a `path:` source,
    which the loader refuses unless told not to check the sources."""
    return load_manifest(path, environ={}, check_sources=False)


async def run(path: Path, api_key: str) -> None:
    summary = await run_manifest(load(path), RunOptions(seed=1), environ={"KIE_API_KEY": api_key})
    assert summary.exit_code is ExitCode.OK, summary.as_dict()


@pytest.fixture
async def uploaded(job: Path, emulator: Emulator, api_key: str) -> Path:
    """Two local files uploaded; returns the manifest's path."""
    write_file(job / "files" / "one.txt", 500)
    write_file(job / "files" / "two.bin", 9000, seed=1)
    manifest = write_manifest(
        job, emulator.base_url, [{"glob": "./files/*"}], name="clijob", base64_max="4KiB"
    )
    await run(manifest, api_key)
    return manifest


# -- refresh ------------------------------------------------------------------------------


async def test_refresh_exits_0_when_every_item_was_refreshed(
    uploaded: Path, emulator: Emulator, api_key: str
) -> None:
    emulator.advance_clock(70 * HOUR)

    done = await run_cli("refresh", str(uploaded), "--within", "73h", key=api_key)

    assert done.code == 0, done.stderr
    assert done.stdout.startswith("refresh: 2 refreshed in ")


async def test_refresh_exits_0_with_nothing_to_do_inside_the_default_window(
    uploaded: Path, emulator: Emulator, api_key: str
) -> None:
    uploads_before = len(emulator.requests)

    done = await run_cli("refresh", str(uploaded), key=api_key)

    assert done.code == 0, done.stderr
    assert done.stdout.startswith("refresh: nothing to do in ")
    assert emulator.requests[uploads_before:] == []


async def test_refresh_copies_an_item_whose_path_source_was_deleted_from_the_service(
    job: Path, emulator: Emulator, api_key: str
) -> None:
    data = write_file(job / "report.bin", 3000)
    manifest = write_manifest(
        job, emulator.base_url, [{"path": "./report.bin"}], name="clijob", base64_max="4KiB"
    )
    await run(manifest, api_key)
    old_link = (await ledger_rows(load(manifest)))["report.bin"].download_url
    (job / "report.bin").unlink()
    emulator.advance_clock(70 * HOUR)

    done = await run_cli("refresh", str(manifest), "--within", "73h", key=api_key)

    assert done.code == 0, done.stderr
    assert emulator.requests[-1].endpoint == "url"
    assert emulator.requests[-1].file_url == old_link
    new_link = (await ledger_rows(load(manifest)))["report.bin"].download_url
    assert new_link is not None
    async with aiohttp.ClientSession() as session, session.get(new_link) as response:
        assert await response.read() == data


async def test_refresh_exits_1_when_an_expired_item_has_no_source_left(
    job: Path, tmp_path: Path, api_key: str
) -> None:
    async with Emulator(tmp_path / "emu", api_key, response_shape="endpoint") as emulator:
        write_file(job / "files" / "gone.txt", 300)
        # A glob, not `path:`: the manifest loader refuses a `path:` that no longer exists.
        manifest = write_manifest(
            job,
            emulator.base_url,
            [{"glob": "./files/*"}],
            ttl="1s",
            refresh_within="0.5s",
            name="clijob",
            base64_max="4KiB",
        )
        await run(manifest, api_key)
        (job / "files" / "gone.txt").unlink()
        emulator.advance_clock(73 * HOUR)
        expires_at = (await ledger_rows(load(manifest)))["gone.txt"].expires_at or 0.0
        await asyncio.sleep(max(0.0, expires_at - time.time()) + 0.05)

        done = await run_cli("refresh", str(manifest), "--within", "1h", key=api_key)

    assert done.code == 1, done.stderr
    assert "1 lost" in done.stdout


async def test_refresh_with_a_rejected_key_stops_with_exit_3_and_one_line(
    uploaded: Path, emulator: Emulator, api_key: str
) -> None:
    done = await run_cli("refresh", str(uploaded), "--within", "73h", key="not-the-key")

    assert done.code == 3
    assert len(done.stderr.strip().splitlines()) == 1
    assert done.stderr.startswith("migrator: ")
    assert "not-the-key" not in done.stderr + done.stdout


@pytest.mark.parametrize("command", ["refresh", "download"])
async def test_a_bad_within_value_exits_2_with_one_line(
    uploaded: Path, tmp_path: Path, api_key: str, command: str
) -> None:
    extra = ["--dest", str(tmp_path / "dest")] if command == "download" else []

    done = await run_cli(command, str(uploaded), *extra, "--within", "soon", key=api_key)

    assert done.code == 2
    assert done.stderr.count("\n") == 1
    assert done.stderr.startswith(f"migrator {command}: --within: ")
    assert "soon" in done.stderr
    assert done.stdout == ""


# -- download -----------------------------------------------------------------------------


async def test_download_exits_0_and_writes_every_file(
    uploaded: Path, job: Path, tmp_path: Path, api_key: str
) -> None:
    done = await run_cli("download", str(uploaded), "--dest", str(tmp_path / "dest"), key=api_key)

    assert done.code == 0, done.stderr
    assert done.stdout.startswith("download: 2 downloaded in ")
    assert files_below(tmp_path / "dest") == {
        "mig/one.txt": (job / "files" / "one.txt").read_bytes(),
        "mig/two.bin": (job / "files" / "two.bin").read_bytes(),
    }


async def test_download_exits_1_and_records_a_link_that_no_longer_works_dead(
    uploaded: Path, emulator: Emulator, tmp_path: Path, api_key: str
) -> None:
    # Someone else uploads to the same name: the service replaces the file, the old link dies.
    async with aiohttp.ClientSession() as session:
        response = await session.post(
            f"{emulator.base_url}/api/file-base64-upload",
            json={"base64Data": "aGVsbG8=", "uploadPath": "mig", "fileName": "one.txt"},
            headers={"Authorization": f"Bearer {api_key}"},
        )
        assert response.status == 200

    done = await run_cli("download", str(uploaded), "--dest", str(tmp_path / "dest"), key=api_key)

    assert done.code == 1
    assert "1 dead" in done.stdout
    assert set(files_below(tmp_path / "dest")) == {"mig/two.bin"}
    assert ledger_states(uploaded.parent / "ledger.sqlite")["one.txt"] == "dead"


async def test_download_resumes_after_sigkill_and_leaves_no_temporary_files(
    job: Path, emulator: Emulator, tmp_path: Path, api_key: str
) -> None:
    sources = {
        f"mig/batch/f{i:02d}.bin": write_file(job / "batch" / f"f{i:02d}.bin", 96 * 1024, seed=i)
        for i in range(40)
    }
    manifest = write_manifest(
        job,
        emulator.base_url,
        [{"glob": "./batch/*.bin", "upload_path": "batch"}],
        name="clijob",
        base64_max="4KiB",
    )
    await run(manifest, api_key)
    dest = tmp_path / "dest"
    args = ["download", str(manifest), "--dest", str(dest), "--concurrency", "2"]

    child = await start_cli(*args, key=api_key)
    done_files: list[Path] = []
    deadline = time.monotonic() + 30
    while not done_files and child.returncode is None and time.monotonic() < deadline:
        await asyncio.sleep(0)  # lets the emulator, in this loop, serve a little more
        done_files = [p for p in dest.rglob("f*.bin")]
    os.kill(child.pid, signal.SIGKILL)
    assert await child.wait() == -signal.SIGKILL
    assert 0 < len(list(dest.rglob("f*.bin"))) < 40, "the kill did not land mid-way"

    again = await run_cli(*args, key=api_key)

    assert again.code == 0, again.stderr
    assert files_below(dest) == sources
    assert not list(dest.rglob("*.part"))
