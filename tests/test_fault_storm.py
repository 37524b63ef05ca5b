"""The class, not the cases: a fault storm and three kill -9s, and nothing is lost or wrong.

500 items of mixed sizes against an emulator that faults a fifth of all upload
requests (500s, errors in 200 bodies, 429s with Retry-After, connections cut before
and after the body, answers stalled past the read timeout, truncated answers, HTML
502/504/413 pages from a proxy, a 200 that is not JSON), seeded so a failure
replays; three runs are killed with SIGKILL at random moments; then `run` is
repeated until it exits 0. The job must end complete and byte-exact: every link
serves its file's bytes, the ledger passes `PRAGMA integrity_check`, and the service
holds exactly the 500 names the plan gave (no random-named upload).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import signal
import sqlite3
from pathlib import Path

import aiohttp
import pytest
from conftest import ledger_states, run_cli, start_cli, write_file, write_manifest

from migrator.emulator import Emulator

pytestmark = pytest.mark.timeout(300)
SEED = 20261130
SMALL, LARGE = 400, 100
RUNS_AFTER_KILLS = 15


def storm_job(job: Path, base_url: str) -> dict[str, bytes]:
    rng = random.Random(SEED)
    sources: dict[str, bytes] = {}
    for i in range(SMALL + LARGE):
        size = rng.randint(1, 3000) if i < SMALL else rng.randint(8_000, 60_000)
        name = f"f{i:04d}.bin"
        sources[f"mig/storm/{name}"] = write_file(job / "storm" / name, size, seed=i)
    write_manifest(
        job,
        base_url,
        [{"glob": "./storm/*.bin", "upload_path": "storm"}],
        concurrency=8,
        retries=3,
        base64_max="4KiB",
        timeout="1s",
        settle="2s",
        outage_limit="60s",
    )
    return sources


async def kill_mid_run(manifest: Path, key: str, after: float) -> None:
    process = await start_cli("run", str(manifest), "--no-progress", key=key)
    await asyncio.sleep(after)
    with contextlib.suppress(ProcessLookupError):
        process.send_signal(signal.SIGKILL)
    await process.wait()


async def links_serve_their_bytes(ledger: Path, sources: dict[str, bytes]) -> list[str]:
    """The items whose link does not serve exactly their file's bytes."""
    with contextlib.closing(sqlite3.connect(f"file:{ledger}?mode=ro", uri=True)) as conn:
        rows = conn.execute("SELECT upload_path, file_name, download_url FROM items").fetchall()
    gate = asyncio.Semaphore(16)
    wrong: list[str] = []
    async with aiohttp.ClientSession() as session:

        async def check(upload_path: str, file_name: str, url: str | None) -> None:
            async with gate, session.get(url or "http://127.0.0.1:1/") as answer:
                if (
                    answer.status != 200
                    or await answer.read() != sources[f"{upload_path}/{file_name}"]
                ):
                    wrong.append(f"{upload_path}/{file_name}")

        await asyncio.gather(*(check(*row) for row in rows))
    return wrong


async def test_a_fault_storm_with_three_kills_ends_complete_and_byte_exact(
    job: Path, api_key: str, tmp_path: Path
) -> None:
    rng = random.Random(SEED)
    async with Emulator(
        tmp_path / "storm-service", api_key, fault_rate=0.2, fault_seed=SEED, fault_stall=1.5
    ) as emulator:
        sources = storm_job(job, emulator.base_url)
        manifest = job / "job.yaml"
        for _ in range(3):
            await kill_mid_run(manifest, api_key, after=rng.uniform(0.5, 2.5))
        codes = []
        for _ in range(RUNS_AFTER_KILLS):
            done = await run_cli("run", str(manifest), "--no-progress", key=api_key, limit=120)
            assert "Traceback" not in done.stderr, done.stderr
            codes.append(done.code)
            if done.code == 0:
                break

        ledger = job / "ledger.sqlite"
        print(f"runs after the kills ended with {codes}")
        assert codes[-1] == 0, codes
        assert set(ledger_states(ledger).values()) == {"done"}
        assert len(ledger_states(ledger)) == SMALL + LARGE
        assert await links_serve_their_bytes(ledger, sources) == []
        with contextlib.closing(sqlite3.connect(ledger)) as conn:
            assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        store = tmp_path / "storm-service" / "emulator.sqlite3"
        with contextlib.closing(sqlite3.connect(store)) as conn:
            held = {f"{p}/{n}" for p, n in conn.execute("SELECT upload_path, file_name FROM files")}
        assert held == set(sources)  # only the planned names, each once
    faults = sum(request.status != 200 for request in emulator.requests)
    print(f"{faults} of {len(emulator.requests)} upload requests faulted")
    assert faults > 0.1 * len(emulator.requests)  # the storm did blow
