"""Shared fixtures. Emulator fixtures: `api_key`, `emulator`, `emulator_process`."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from aiohttp import web

from migrator.emulator import Emulator

REPO_ROOT = Path(__file__).resolve().parents[1]
TEST_API_KEY = "test-key-0123456789abcdef"


@pytest.fixture
def api_key() -> str:
    """The bearer key every emulator fixture accepts."""
    return TEST_API_KEY


@pytest.fixture
async def emulator(tmp_path: Path, api_key: str) -> AsyncIterator[Emulator]:
    """An in-process emulator on a free 127.0.0.1 port, data dir under tmp_path."""
    async with Emulator(tmp_path / "emulator-data", api_key) as emu:
        yield emu


@dataclass(frozen=True, slots=True)
class EmulatorProcess:
    """A `python -m migrator emulator` subprocess and where it listens."""

    process: asyncio.subprocess.Process
    base_url: str
    data_dir: Path


def migrator_env() -> dict[str, str]:
    """The environment for a `python -m migrator` child: this checkout first on the path."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    return env


async def start_emulator_process(data_dir: Path, api_key: str, *extra: str) -> EmulatorProcess:
    """Start the CLI emulator on port 0 and read its `listening on` line (15 s at most)."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "migrator",
        "emulator",
        "--port",
        "0",
        "--data-dir",
        str(data_dir),
        "--api-key",
        api_key,
        *extra,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
        env=migrator_env(),
    )
    assert process.stdout is not None
    try:
        line = (await asyncio.wait_for(process.stdout.readline(), 15)).decode()
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    assert line.startswith("emulator listening on http://"), f"unexpected first line: {line!r}"
    return EmulatorProcess(process, line.rsplit(" ", 1)[1].strip(), data_dir)


async def stop_emulator_process(emu: EmulatorProcess) -> None:
    if emu.process.returncode is None:
        emu.process.terminate()
        try:
            await asyncio.wait_for(emu.process.wait(), 10)
        except TimeoutError:
            emu.process.kill()
            await emu.process.wait()


@pytest.fixture
async def emulator_process(tmp_path: Path, api_key: str) -> AsyncIterator[EmulatorProcess]:
    """`python -m migrator emulator --port 0` as a subprocess; terminated at the end."""
    emu = await start_emulator_process(tmp_path / "emulator-process-data", api_key)
    try:
        yield emu
    finally:
        await stop_emulator_process(emu)


# -- a loopback web origin for URL sources (added for the runner's end-to-end tests) --------


@dataclass
class Origin:
    """A web server on 127.0.0.1 serving `files` (name -> bytes); others answer 404.

    A name in `slow` sends its headers and first chunk, then stalls until the
    fixture ends (or `release` is set): a transfer that is reliably in flight.
    """

    base_url: str
    files: dict[str, bytes]
    slow: set[str]
    release: asyncio.Event
    gets: list[str]

    def url(self, name: str) -> str:
        return f"{self.base_url}/{name}"


async def _origin_handler(origin: Origin, request: web.Request) -> web.StreamResponse:
    name = request.match_info["name"]
    data = origin.files.get(name)
    if data is None:
        return web.Response(status=404, text="not here")
    if request.method == "GET":
        origin.gets.append(name)
    if request.method != "GET" or name not in origin.slow:
        return web.Response(body=data, content_type="application/octet-stream")
    response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
    response.content_length = len(data)
    await response.prepare(request)
    await response.write(data[:1024])
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(origin.release.wait(), 60)
    await response.write(data[1024:])
    return response


@pytest.fixture
async def origin() -> AsyncIterator[Origin]:
    """A loopback origin for URL sources; fill `origin.files` before a run."""
    server = Origin("", {}, set(), asyncio.Event(), [])
    app = web.Application()

    async def handle(request: web.Request) -> web.StreamResponse:
        return await _origin_handler(server, request)

    app.router.add_get("/{name:.*}", handle)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    server.base_url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    try:
        yield server
    finally:
        server.release.set()
        await runner.cleanup()


# -- a job folder and its files (shared by the run, lifecycle and CLI tests) ---------------


@pytest.fixture
def job(tmp_path: Path) -> Path:
    """An empty folder for a manifest and its sources."""
    folder = tmp_path / "job"
    folder.mkdir()
    return folder


def write_file(path: Path, size: int, seed: int = 0) -> bytes:
    """`size` deterministic bytes at `path` (folders made); returns them."""
    data = bytes((seed + i * 31) % 253 for i in range(size))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return data
