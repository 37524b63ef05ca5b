"""Hostile or broken servers: one bad answer must not brick a job, fill a disk or hold a worker.

A loopback stand-in for the service answers with the times a test chooses and can
serve links whose bodies never end; loopback origins lie about sizes, never stop
sending, or drip one byte at a time.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import sqlite3
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from conftest import ledger_rows, load, run_cli, web_server, write_file, write_manifest

from migrator.client import UploadClient
from migrator.command import Outcome
from migrator.download import download
from migrator.emulator import Emulator
from migrator.errors import ExitCode
from migrator.model import HOUR, ItemState, Method, SourceKind
from migrator.pacer import plain_sleep
from migrator.runner import RunOptions, run_manifest
from migrator.transfer import (
    Connection,
    Http,
    Limits,
    Meter,
    Send,
    already_open,
    names_private_address,
    send,
)

pytestmark = pytest.mark.timeout(60)
KEY = {"KIE_API_KEY": "hostile-key-0123456789"}


@dataclass
class FakeService:
    """Stores base64 uploads and serves them; answers with `expires_at` as given."""

    base_url: str = ""
    expires_at: object = None
    endless_links: bool = False
    files: dict[str, bytes] = field(default_factory=dict)


async def _fake_service_handler(service: FakeService, request: web.Request) -> web.StreamResponse:
    if request.method == "POST":
        body = await request.json()
        encoded = str(body["base64Data"]).split(",", 1)[-1]
        name = f"{body['uploadPath']}/{body['fileName']}"
        service.files[name] = base64.b64decode(encoded)
        data = {
            "downloadUrl": f"{service.base_url}/f/{name}",
            "fileSize": len(service.files[name]),
            "expiresAt": service.expires_at,
        }
        return web.json_response({"success": True, "code": 200, "msg": "ok", "data": data})
    data = service.files.get(request.path.removeprefix("/f/"))
    if data is None:
        return web.Response(status=404)
    if not service.endless_links:
        return web.Response(body=data)
    response = web.StreamResponse()
    await response.prepare(request)
    with contextlib.suppress(ConnectionError):
        while True:  # until the client gives up
            await response.write(b"x" * 65536)
    return response


@pytest.fixture
async def fake_service() -> AsyncIterator[FakeService]:
    service = FakeService()

    async def handle(request: web.Request) -> web.StreamResponse:
        return await _fake_service_handler(service, request)

    async with web_server(handle, shutdown_timeout=0.5) as base_url:
        service.base_url = base_url
        yield service


def small_job(job: Path, base_url: str, **settings: object) -> Path:
    for i in range(3):
        write_file(job / "files" / f"f{i}.txt", 100 + i, seed=i)
    return write_manifest(job, base_url, [{"glob": "./files/*.txt"}], **settings)


# -- times that cannot be true ------------------------------------------------------------------


@pytest.mark.parametrize(
    "expires_at",
    [1_750_000_000_000_000, "9999-12-31T23:59:59Z", "2021-01-01T00:00:00Z", 1],
    ids=["microseconds", "far-future", "already-past", "epoch-one"],
)
async def test_an_unbelievable_expires_at_gives_the_item_ttl_and_every_command_works(
    job: Path, fake_service: FakeService, tmp_path: Path, expires_at: object
) -> None:
    fake_service.expires_at = expires_at
    path = small_job(job, fake_service.base_url)

    first = await run_manifest(load(path), RunOptions(seed=1), environ=KEY)
    again = await run_manifest(load(path), RunOptions(seed=1), environ=KEY)

    assert first.count(Outcome.UPLOADED) == 3
    assert again.count(Outcome.SKIPPED) == 3  # not expired, not re-uploaded
    for row in (await ledger_rows(load(path))).values():
        assert row.uploaded_at is not None and row.expires_at is not None
        assert row.expires_at - row.uploaded_at == pytest.approx(72 * HOUR)
    for command in (["status"], ["export"], ["status", "--format", "json"]):
        assert (await run_cli(command[0], str(path), *command[1:])).code == 0
    fetched = await download(load(path), tmp_path / "home")
    assert fetched.count(Outcome.DOWNLOADED) == 3


async def test_a_time_from_no_calendar_in_an_old_ledger_does_not_break_status(
    job: Path, fake_service: FakeService
) -> None:
    path = small_job(job, fake_service.base_url)
    await run_manifest(load(path), RunOptions(seed=1), environ=KEY)
    with contextlib.closing(sqlite3.connect(job / "ledger.sqlite")) as conn, conn:
        conn.execute("UPDATE items SET expires_at = 1.7e15")

    for command in (["status"], ["export"], ["status", "--format", "json"]):
        done = await run_cli(command[0], str(path), *command[1:])
        assert done.code == 0, done.stderr


# -- bodies that never end ---------------------------------------------------------------------


async def test_a_link_whose_body_never_ends_fails_its_item_and_fills_no_disk(
    job: Path, fake_service: FakeService, tmp_path: Path
) -> None:
    path = small_job(job, fake_service.base_url, retries=0)
    await run_manifest(load(path), RunOptions(seed=1), environ=KEY)
    fake_service.endless_links = True

    summary = await download(load(path), tmp_path / "home")

    assert summary.exit_code is ExitCode.ITEMS_FAILED
    assert summary.count(Outcome.FAILED) == 3
    assert all("more than the 10" in (p.error or "") for p in summary.problems)
    assert not any(p.is_file() for p in (tmp_path / "home").rglob("*"))


@contextlib.asynccontextmanager
async def origin_serving(handler: object) -> AsyncIterator[str]:
    async with web_server(handler, shutdown_timeout=0.5) as base_url:
        yield base_url


async def endless(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse()  # no Content-Length: chunked, for ever
    await response.prepare(request)
    if request.method == "GET":
        with contextlib.suppress(ConnectionError):
            while True:
                await response.write(b"y" * 65536)
    return response


async def drip(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse()
    response.content_length = 1_000_000
    await response.prepare(request)
    if request.method == "GET":
        with contextlib.suppress(ConnectionError):
            for _ in range(1_000_000):
                await response.write(b"z")
                await asyncio.sleep(0.2)
    return response


async def short(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse()
    response.content_length = 1000  # and then only 500 bytes
    await response.prepare(request)
    if request.method == "GET":
        await response.write(b"s" * 500)
        request.transport.close()  # type: ignore[union-attr]
    return response


async def stream_through(
    job: Path, emulator: Emulator, api_key: str, origin: str, **settings: object
) -> tuple[ExitCode, str]:
    path = write_manifest(
        job,
        emulator.base_url,
        [{"url": f"{origin}/file.bin", "method": "stream"}],
        retries=0,
        **settings,
    )
    summary = await run_manifest(load(path), RunOptions(seed=1), environ={"KIE_API_KEY": api_key})
    [problem] = summary.problems
    assert (await ledger_rows(load(path)))["file.bin"].state is ItemState.FAILED
    return summary.exit_code, problem.error or ""


async def test_an_origin_that_never_stops_sending_is_cut_off_at_max_size(
    job: Path, emulator: Emulator, api_key: str
) -> None:
    async with origin_serving(endless) as origin:
        code, error = await stream_through(job, emulator, api_key, origin, max_size="256KiB")

    assert code is ExitCode.ITEMS_FAILED
    assert "more than 262144 bytes" in error
    assert [r.status for r in emulator.requests if r.status == 200] == []


async def test_an_origin_that_drips_is_given_up_on_by_its_deadline(
    job: Path, emulator: Emulator, api_key: str
) -> None:
    async with origin_serving(drip) as origin:
        code, error = await stream_through(
            job, emulator, api_key, origin, timeout="1s", min_rate="1MiB"
        )

    assert code is ExitCode.ITEMS_FAILED
    assert "too slow" in error


async def test_an_origin_whose_content_length_lies_fails_the_item_with_a_clear_line(
    job: Path, emulator: Emulator, api_key: str
) -> None:
    async with origin_serving(short) as origin:
        code, error = await stream_through(job, emulator, api_key, origin)

    assert code is ExitCode.ITEMS_FAILED
    assert "\n" not in error and error


# -- a stream-through is not a way into private networks -------------------------------------


@pytest.mark.parametrize(
    ("url", "private"),
    [
        ("http://127.0.0.1:8080/a", True),
        ("http://[::1]/a", True),
        ("http://10.1.2.3/a", True),
        ("http://192.168.0.7/a", True),
        ("http://169.254.169.254/latest/meta-data", True),  # a cloud's metadata service
        ("http://[fe80::1]/a", True),
        ("http://0.0.0.0/a", True),
        ("http://93.184.216.34/a", False),
        ("http://[2606:4700::1111]/a", False),
        ("http://no-such-host.invalid/a", True),  # unresolvable: not trusted as public
    ],
)
async def test_which_addresses_count_as_private(url: str, private: bool) -> None:
    assert await names_private_address(url) is private


async def test_a_redirect_between_origins_the_manifest_names_on_loopback_is_followed(
    job: Path, emulator: Emulator, api_key: str
) -> None:
    data = b"moved " * 1000

    async def handle(request: web.Request) -> web.StreamResponse:
        if request.path == "/old.bin":
            raise web.HTTPFound("/new.bin")
        return web.Response(body=data)

    async with origin_serving(handle) as origin:
        path = write_manifest(
            job, emulator.base_url, [{"url": f"{origin}/old.bin", "method": "stream"}]
        )
        summary = await run_manifest(
            load(path), RunOptions(seed=1), environ={"KIE_API_KEY": api_key}
        )

    assert summary.count(Outcome.UPLOADED) == 1
    assert [r.size for r in emulator.requests if r.status == 200] == [len(data)]


# -- files that change under our feet ---------------------------------------------------------


async def test_a_file_planned_as_base64_that_grew_since_is_streamed_not_read_whole(
    tmp_path: Path, emulator: Emulator, api_key: str
) -> None:
    grown = write_file(tmp_path / "grows.txt", 50_000, seed=3)
    planned = Send(str(tmp_path / "grows.txt"), SourceKind.FILE, Method.BASE64, "p", "g.txt", 900)
    async with aiohttp.ClientSession() as session:
        conn = Connection(
            target_id=emulator.base_url,
            base_url=emulator.base_url,
            http=already_open(Http(session, UploadClient(session, emulator.base_url, api_key))),
            url_vars={},
            limits=Limits(base64_max=2048),
        )
        sent = await send(conn, planned, Meter(conn.pacer, plain_sleep, lambda n: None))

    assert [r.endpoint for r in emulator.requests] == ["stream"]
    assert (sent.size, sent.method) == (len(grown), Method.STREAM)
