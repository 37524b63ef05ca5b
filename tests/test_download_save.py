"""How a download's body reaches its place: network failures are retried, disk ones are not."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from conftest import web_server

from migrator.download import save_download, temp_path_for
from migrator.errors import RetryableError
from migrator.model import ItemState, LedgerItem, Method, SourceKind

pytestmark = pytest.mark.timeout(20)


def row(url: str, size: int) -> LedgerItem:
    return LedgerItem(
        id=7,
        target="t",
        upload_path="p",
        file_name="f.bin",
        source="https://origin.test/f.bin",
        kind=SourceKind.URL,
        size=size,
        mtime_ns=None,
        etag=None,
        last_modified=None,
        sha256=None,
        method=Method.URL,
        state=ItemState.DONE,
        download_url=url,
        file_id=None,
        uploaded_at=None,
        expires_at=None,
        attempts=1,
        last_error=None,
    )


@pytest.fixture
async def stalling_link() -> AsyncIterator[str]:
    """Announces 1,000 bytes, sends 10, then goes quiet."""

    async def stall(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        response.content_length = 1000
        await response.prepare(request)
        await response.write(b"a" * 10)
        await asyncio.sleep(10)
        return response

    async with web_server(stall, shutdown_timeout=0.1) as base_url:
        yield f"{base_url}/f.bin"


async def test_a_link_that_stalls_mid_body_is_a_retryable_network_failure(
    stalling_link: str, tmp_path: Path
) -> None:
    dest = tmp_path / "f.bin"
    timeout = aiohttp.ClientTimeout(sock_read=0.3)
    async with (
        aiohttp.ClientSession(timeout=timeout) as session,
        session.get(stalling_link) as response,
    ):
        with pytest.raises(RetryableError, match="download of"):
            await save_download(response, dest, row(stalling_link, 1000))
    assert not dest.exists()
    assert not temp_path_for(dest, 7).exists()
