"""Shared fixtures and helpers.

Fixtures: `api_key`, `emulator`, `emulator_process`, `origin`, `job`, `postgres` (a real
server for the session, see tests/postgres_server.py), `pg_url` (a fresh database on it per test).
Helpers: `write_file`, `files_below`, `write_manifest`, `load`, `ledger_states`, `ledger_rows`,
`closed_port`, `run_cli` (and its `Finished`), `start_cli`, `web_server`, `gateway` (a
Pushgateway, `serving_gateway` over HTTPS), `samples_of`, and `item_update` (a ledger update
of one file, for tests of the ledger alone).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import socket
import sqlite3
import ssl
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import web
from postgres_server import PostgresServer, running_postgres
from prometheus_client.parser import text_string_to_metric_families

from migrator.emulator import Emulator
from migrator.ledger import Ledger
from migrator.manifest import load_manifest
from migrator.model import ItemState, ItemUpdate, LedgerItem, Manifest, SourceKind

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


DIRECT = {"NO_PROXY": "127.0.0.1", "no_proxy": "127.0.0.1"}  # loopback past any proxy set
LEDGER_TARGET = "http://127.0.0.1:9/api"  # the target of ledger-only tests: nothing listens


def item_update(name: str, state: ItemState = ItemState.PENDING, **fields: object) -> ItemUpdate:
    """An update of the local file /data/NAME, uploaded as batch/NAME to LEDGER_TARGET;
    `fields` set the rest."""
    values: dict[str, object] = {
        "target": LEDGER_TARGET,
        "upload_path": "batch",
        "file_name": name,
        "source": f"/data/{name}",
        "kind": SourceKind.FILE,
        "state": state,
    }
    values.update(fields)
    return ItemUpdate(**values)  # type: ignore[arg-type]


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


@contextlib.asynccontextmanager
async def web_server(
    handler: Any, *, ssl_context: ssl.SSLContext | None = None, **runner_options: Any
) -> AsyncIterator[str]:
    """A plain aiohttp app on 127.0.0.1 answering every request with `handler` (over HTTPS
    with `ssl_context`); yields its base URL. `runner_options` go to the AppRunner (e.g. a
    short shutdown_timeout)."""
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    runner = web.AppRunner(app, access_log=None, **runner_options)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ssl_context)
    await site.start()
    scheme = "http" if ssl_context is None else "https"
    try:
        yield f"{scheme}://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


# -- a real PostgreSQL server for the shared ledger ---------------------------------------------


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """A PostgreSQL server on 127.0.0.1 for the whole session; fails loudly without one."""
    with running_postgres() as server:
        yield server


@pytest.fixture
async def pg_url(postgres: PostgresServer) -> str:
    """The URL of an empty database of its own on the session's server."""
    import asyncpg

    name = f"t{os.getpid()}_{next(_DATABASES)}"
    conn = await asyncpg.connect(postgres.url())
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    return postgres.url(name)


_DATABASES = itertools.count()


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


def files_below(root: Path) -> dict[str, bytes]:
    """Every file below `root` (dot files included), by its path relative to root."""
    return {
        str(path.relative_to(root)): path.read_bytes() for path in root.rglob("*") if path.is_file()
    }


def write_manifest(
    folder: Path,
    base_url: str,
    sources: list[dict[str, Any]],
    *,
    name: str = "job",
    upload_path: str = "mig",
    **settings: Any,
) -> Path:
    """`folder`/job.yaml uploading `sources` to `base_url`, its ledger beside it.
    `settings` go to the manifest's settings (retries defaults to 1, and uncertain
    uploads settle for 1 s, not the 15 s a real service gets)."""
    document = {
        "version": 1,
        "name": name,
        "target": {"base_url": base_url, "upload_path": upload_path},
        "ledger": "ledger.sqlite",
        "settings": {"retries": 1, "settle": "1s", **settings},
        "sources": sources,
    }
    path = folder / "job.yaml"
    path.write_text(yaml.safe_dump(document), encoding="utf-8")
    return path


def load(path: Path) -> Manifest:
    """The manifest at `path`, read without the process environment."""
    return load_manifest(path, environ={})


def ledger_states(ledger: Path) -> dict[str, str]:
    """file name -> state, read straight from the SQLite file (read-only)."""
    with contextlib.closing(sqlite3.connect(f"file:{ledger}?mode=ro", uri=True)) as conn:
        return dict(conn.execute("SELECT file_name, state FROM items").fetchall())


async def ledger_rows(manifest: Manifest) -> dict[str, LedgerItem]:
    """The manifest's ledger rows, by file name, read through the library."""
    async with await Ledger.open(manifest.ledger, readonly=True) as ledger:
        return {row.file_name: row async for row in ledger.iter_items(manifest.target.base_url)}


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True, slots=True)
class Finished:
    """How a `python -m migrator` child ended."""

    code: int
    stdout: str
    stderr: str

    def error_lines(self) -> list[str]:
        """The stderr lines, each migrator's own; fails on a traceback."""
        assert "Traceback" not in self.stderr + self.stdout, self.stderr
        lines = self.stderr.strip().splitlines()
        assert all(line.startswith("migrator") for line in lines), self.stderr
        return lines

    def one_error_line(self) -> str:
        """The single stderr line; fails on a traceback or multi-line noise."""
        lines = self.error_lines()
        assert len(lines) == 1, self.stderr
        return lines[0]


async def start_cli(
    *args: str,
    key: str | None = None,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
    stdout: Any = asyncio.subprocess.PIPE,
    stderr: Any = asyncio.subprocess.PIPE,
) -> asyncio.subprocess.Process:
    """`python -m migrator ARGS` started, not awaited: KIE_API_KEY set to `key` (or unset),
    every MIGRATOR_* variable unset, `env` added. For a test that signals or kills the child."""
    child_env = {k: v for k, v in migrator_env().items() if not k.startswith("MIGRATOR_")}
    child_env.pop("KIE_API_KEY", None)
    child_env.update(env or {})
    if key is not None:
        child_env["KIE_API_KEY"] = key
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "migrator",
        *args,
        stdout=stdout,
        stderr=stderr,
        env=child_env,
        cwd=cwd,
    )


async def run_cli(
    *args: str,
    key: str | None = None,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
    stdout: int | None = asyncio.subprocess.PIPE,
    limit: float = 30,
) -> Finished:
    """`python -m migrator ARGS` with KIE_API_KEY set to `key` (or unset), `env` added."""
    process = await start_cli(*args, key=key, cwd=cwd, env=env, stdout=stdout)
    try:
        out, err = await asyncio.wait_for(process.communicate(), limit)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    assert process.returncode is not None
    return Finished(process.returncode, (out or b"").decode(), err.decode())


# -- a Prometheus Pushgateway on loopback ----------------------------------------------------

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def samples_of(text: str) -> Samples:
    found: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[sample.name, tuple(sorted(sample.labels.items()))] = sample.value
    return found


@dataclass
class Gateway:
    """What a Pushgateway was sent: the groups (from the URL path) and their bodies."""

    url: str = ""
    pushes: list[tuple[str, str, dict[str, str]]] = field(default_factory=list)
    refuse: bool = False

    def group(self, **labels: str) -> Samples:
        bodies = [text for _, text, group in self.pushes if group == labels]
        assert len(bodies) == 1, self.pushes
        return samples_of(bodies[0])


@pytest.fixture
async def gateway() -> AsyncIterator[Gateway]:
    async with serving_gateway() as gateway:
        yield gateway


@contextlib.asynccontextmanager
async def serving_gateway(ssl_context: ssl.SSLContext | None = None) -> AsyncIterator[Gateway]:
    """A Pushgateway on 127.0.0.1 (HTTPS with `ssl_context`) recording what it was sent."""
    gateway = Gateway()

    async def handle(request: web.Request) -> web.StreamResponse:
        parts = request.path.strip("/").split("/")
        if request.method not in ("PUT", "POST") or parts[:2] != ["metrics", "job"]:
            return web.Response(status=405 if parts[:1] == ["metrics"] else 404)
        group = dict(zip(parts[1::2], parts[2::2], strict=True))
        text = await request.text()
        if gateway.refuse:
            return web.Response(status=400, text="pushed metrics are invalid or inconsistent")
        samples_of(text)  # a body the real gateway could not parse fails the test
        gateway.pushes.append((request.method, text, group))
        return web.Response(status=200)

    async with web_server(handle, ssl_context=ssl_context) as url:
        gateway.url = url
        yield gateway
