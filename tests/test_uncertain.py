"""An upload the client gave up on can still land, and replace what a retry stored.

The emulator can hold an upload back and store it only after the client's read timed
out; by then a retry has stored the same name, and the late one replaces it, so the
link the ledger holds dies. The ledger must never keep claiming that link works.
"""

from __future__ import annotations

from pathlib import Path

import aiohttp
import pytest
from conftest import ledger_rows, load, write_file, write_manifest

from migrator.emulator import Emulator
from migrator.errors import ExitCode
from migrator.model import HOUR, ItemState, Manifest, Outcome
from migrator.refresh import RefreshOptions, refresh
from migrator.runner import RunOptions, run_manifest

pytestmark = pytest.mark.timeout(60)
# A read waits 1 s; the held-back upload lands 2 s after its body; links are checked
# 2.5 s after the doubt arose.
TIMING = {"timeout": "1s", "settle": "2.5s", "retries": 2}


async def fetch(url: str) -> tuple[int, bytes]:
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        return response.status, await response.read()


def one_file(job: Path, base_url: str) -> tuple[Manifest, bytes]:
    data = write_file(job / "a.txt", 300)
    return load(write_manifest(job, base_url, [{"path": "./a.txt"}], **TIMING)), data


async def test_a_run_finds_the_link_a_late_upload_killed_and_the_next_run_replaces_it(
    job: Path, emulator: Emulator, api_key: str
) -> None:
    manifest, data = one_file(job, emulator.base_url)
    emulator.delay_stores(2.0)
    key = {"KIE_API_KEY": api_key}

    first = await run_manifest(manifest, RunOptions(seed=1), environ=key)

    row = (await ledger_rows(manifest))["a.txt"]
    assert first.count(Outcome.UPLOADED) == 1
    assert (row.state, row.uncertain_at) == (ItemState.DEAD, None)  # found, not believed
    assert any("late upload" in note for note in first.notes)
    second = await run_manifest(manifest, RunOptions(seed=1), environ=key)
    row = (await ledger_rows(manifest))["a.txt"]
    assert (second.count(Outcome.UPLOADED), row.state) == (1, ItemState.DONE)
    assert await fetch(row.download_url or "") == (200, data)


async def test_an_upload_that_answered_in_time_is_not_doubted(
    job: Path, emulator: Emulator, api_key: str
) -> None:
    manifest, _ = one_file(job, emulator.base_url)

    summary = await run_manifest(manifest, RunOptions(seed=1), environ={"KIE_API_KEY": api_key})

    row = (await ledger_rows(manifest))["a.txt"]
    assert (row.state, row.uncertain_at, summary.notes) == (ItemState.DONE, None, ())
    assert emulator.link_requests == []  # nothing to probe


async def test_a_refresh_whose_answer_was_lost_does_not_keep_the_dead_link(
    job: Path, emulator: Emulator, api_key: str
) -> None:
    manifest, data = one_file(job, emulator.base_url)
    key = {"KIE_API_KEY": api_key}
    assert (await run_manifest(manifest, RunOptions(seed=1), environ=key)).exit_code == 0
    emulator.delay_stores(2.0)  # the refresh's upload of the local file: answer lost
    wide = RefreshOptions(within=73 * HOUR, seed=1)

    first = await refresh(manifest, wide, environ=key)

    assert (await ledger_rows(manifest))["a.txt"].state is ItemState.DEAD
    assert first.exit_code is ExitCode.OK  # the copy itself was refreshed; the check found it
    second = await refresh(manifest, wide, environ=key)
    row = (await ledger_rows(manifest))["a.txt"]
    assert (second.count(Outcome.REFRESHED), row.state) == (1, ItemState.DONE)
    assert await fetch(row.download_url or "") == (200, data)
