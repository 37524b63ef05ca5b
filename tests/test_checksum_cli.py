"""`run --checksum` (and settings.checksum) as in rsync and rclone, through the real CLI:
a touched file whose bytes are those uploaded is skipped and its new mtime recorded;
other bytes under the same size and mtime are sent."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from conftest import Finished, ledger_rows, load, run_cli, write_file, write_manifest
from test_run import rewrite_keeping_size_and_mtime

from migrator.emulator import Emulator

pytestmark = pytest.mark.timeout(90)


async def run(manifest: Path, api_key: str, *args: str) -> Finished:
    result = await run_cli("run", str(manifest), "--no-progress", *args, key=api_key)
    assert result.code == 0, result.stderr
    return result


def touch_later(path: Path) -> int:
    """A new mtime, the bytes unchanged (a `cp` without -p, a restore); returns it."""
    info = path.stat()
    later = info.st_mtime_ns + 5_000_000_000
    os.utime(path, ns=(info.st_atime_ns, later))
    return later


@pytest.fixture
def uploaded(job: Path, emulator: Emulator) -> Path:
    write_file(job / "a.txt", 100)
    return write_manifest(job, emulator.base_url, [{"path": "a.txt"}])


async def test_checksum_skips_a_touched_file_whose_bytes_match(
    uploaded: Path, emulator: Emulator, api_key: str
) -> None:
    await run(uploaded, api_key)
    touch_later(uploaded.parent / "a.txt")

    result = await run(uploaded, api_key, "--checksum")

    assert "run: 0 uploaded, 1 skipped" in result.stdout
    assert len(emulator.requests) == 1


async def test_checksum_records_the_new_mtime_so_the_next_run_does_not_hash_again(
    uploaded: Path, api_key: str
) -> None:
    await run(uploaded, api_key)
    later = touch_later(uploaded.parent / "a.txt")

    await run(uploaded, api_key, "--checksum")

    rows = await ledger_rows(load(uploaded))
    assert rows["a.txt"].mtime_ns == later
    plan = await run_cli("plan", str(uploaded))
    assert "unchanged" in plan.stdout  # by size and mtime alone, without --checksum


async def test_without_checksum_a_touched_file_is_sent_again(
    uploaded: Path, emulator: Emulator, api_key: str
) -> None:
    await run(uploaded, api_key)
    touch_later(uploaded.parent / "a.txt")

    result = await run(uploaded, api_key)

    assert "run: 1 uploaded, 0 skipped" in result.stdout
    assert len(emulator.requests) == 2


async def test_checksum_sends_other_bytes_under_the_same_size_and_mtime(
    uploaded: Path, emulator: Emulator, api_key: str
) -> None:
    await run(uploaded, api_key)
    rewrite_keeping_size_and_mtime(uploaded.parent / "a.txt")

    result = await run(uploaded, api_key, "--checksum")

    assert "run: 1 uploaded, 0 skipped" in result.stdout
    rows = await ledger_rows(load(uploaded))
    assert rows["a.txt"].size == 100
    assert len(emulator.requests) == 2


async def test_checksum_sends_a_touched_file_whose_bytes_changed(
    uploaded: Path, emulator: Emulator, api_key: str
) -> None:
    await run(uploaded, api_key)
    rewrite_keeping_size_and_mtime(uploaded.parent / "a.txt")
    touch_later(uploaded.parent / "a.txt")

    result = await run(uploaded, api_key, "--checksum")

    assert "run: 1 uploaded, 0 skipped" in result.stdout


async def test_the_checksum_setting_works_as_the_flag(
    job: Path, emulator: Emulator, api_key: str
) -> None:
    write_file(job / "a.txt", 100)
    manifest = write_manifest(job, emulator.base_url, [{"path": "a.txt"}], checksum=True)
    await run(manifest, api_key)
    touch_later(job / "a.txt")

    result = await run(manifest, api_key)

    assert "run: 0 uploaded, 1 skipped" in result.stdout
    assert len(emulator.requests) == 1
