"""Where operators run migrator: behind a proxy, under cron, with the usual environment."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from conftest import run_cli, web_server, write_file, write_manifest

from migrator.emulator import Emulator

pytestmark = pytest.mark.timeout(60)
HOP_BY_HOP = frozenset(
    {"host", "connection", "proxy-connection", "keep-alive", "transfer-encoding"}
)


@dataclass
class ForwardProxy:
    """A plain HTTP forward proxy on loopback that notes every request it passes on."""

    url: str = ""
    seen: list[tuple[str, str]] = field(default_factory=list)


@pytest.fixture
async def proxy() -> AsyncIterator[ForwardProxy]:
    forward = ForwardProxy()
    session = aiohttp.ClientSession()

    async def handle(request: web.Request) -> web.StreamResponse:
        forward.seen.append((request.method, request.raw_path))
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
        async with session.request(
            request.method, request.raw_path, headers=headers, data=await request.read()
        ) as answer:
            body = await answer.read()
            kept = {
                k: v for k, v in answer.headers.items() if k.lower() in ("content-type", "date")
            }
            return web.Response(status=answer.status, body=body, headers=kept)

    try:
        async with web_server(handle) as url:
            forward.url = url
            yield forward
    finally:
        await session.close()


async def test_every_request_goes_through_the_proxy_the_environment_names(
    job: Path, emulator: Emulator, proxy: ForwardProxy, api_key: str, tmp_path: Path
) -> None:
    for i in range(3):
        write_file(job / "files" / f"f{i}.txt", 200, seed=i)
    manifest = write_manifest(job, emulator.base_url, [{"glob": "./files/*.txt"}])
    env = {"HTTP_PROXY": proxy.url, "NO_PROXY": ""}

    ran = await run_cli("run", str(manifest), "--no-progress", key=api_key, env=env)
    fetched = await run_cli(
        "download", str(manifest), "--dest", str(tmp_path / "home"), "--no-progress", env=env
    )

    assert (ran.code, fetched.code) == (0, 0), ran.stderr + fetched.stderr
    uploads = [path for method, path in proxy.seen if method == "POST"]
    downloads = [path for method, path in proxy.seen if method == "GET" and "/files/" in path]
    assert len(uploads) == len(emulator.requests) == 3
    assert all(path.startswith(emulator.base_url) for path in uploads)
    assert len(downloads) == 3


async def test_no_proxy_keeps_the_named_hosts_direct(
    job: Path, emulator: Emulator, proxy: ForwardProxy, api_key: str
) -> None:
    write_file(job / "a.txt", 200)
    manifest = write_manifest(job, emulator.base_url, [{"path": "./a.txt"}])
    env = {"HTTP_PROXY": proxy.url, "NO_PROXY": "127.0.0.1"}

    ran = await run_cli("run", str(manifest), "--no-progress", key=api_key, env=env)

    assert ran.code == 0, ran.stderr
    assert proxy.seen == []
    assert len(emulator.requests) == 1


async def test_a_url_sources_probe_goes_through_the_proxy_the_environment_names(
    job: Path, emulator: Emulator, proxy: ForwardProxy
) -> None:
    async def origin(request: web.Request) -> web.Response:
        return web.Response(body=b"x" * 50)

    async with web_server(origin) as base:
        manifest = write_manifest(job, emulator.base_url, [{"url": f"{base}/one.bin"}])
        env = {"HTTP_PROXY": proxy.url, "NO_PROXY": ""}

        planned = await run_cli("plan", str(manifest), env=env)

    assert planned.code == 0, planned.stderr
    assert proxy.seen
    assert {path for _, path in proxy.seen} == {f"{base}/one.bin"}


async def test_an_origin_login_in_the_netrc_file_is_sent_to_that_origin(
    job: Path, emulator: Emulator, tmp_path: Path
) -> None:
    seen: list[str | None] = []

    async def origin(request: web.Request) -> web.Response:
        seen.append(request.headers.get("Authorization"))
        return web.Response(body=b"x" * 50)

    netrc = tmp_path / "netrc"
    netrc.write_text("machine 127.0.0.1 login reader password s3cret\n", encoding="utf-8")
    netrc.chmod(0o600)
    async with web_server(origin) as base:
        manifest = write_manifest(job, emulator.base_url, [{"url": f"{base}/one.bin"}])

        planned = await run_cli("plan", str(manifest), env={"NETRC": str(netrc)})

    assert planned.code == 0, planned.stderr
    assert seen == ["Basic " + base64.b64encode(b"reader:s3cret").decode()]
