"""The File Upload API client: answer parsing (pure) and the three uploads over real HTTP.

Servers here are small aiohttp.web apps on 127.0.0.1 that each test scripts itself,
so a drift between the client and `migrator.emulator` cannot hide behind shared
code; a few round trips through the emulator close the file.
"""

from __future__ import annotations

import asyncio
import base64
import email.parser
import email.policy
import hashlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from conftest import closed_port

from migrator.client import READ_BUDGET, READ_SIZE, UploadClient, parse_response, read_size
from migrator.emulator import Emulator
from migrator.errors import (
    AuthRejectedError,
    EndpointError,
    PermanentError,
    RetryableError,
    SourceChangedError,
)
from migrator.units import parse_iso

KEY = "sk-test-5f1c9a7e2b"
NOW = 1_737_000_000.0
LINK = "https://tempfile.example.test/abc/images/cat.png"


# -- answers the service may give -------------------------------------------------------------


def collect(chunks: list[bytes]) -> Callable[[bytes], Awaitable[None]]:
    """An on_chunk that keeps every chunk it is told of."""

    async def on_chunk(chunk: bytes) -> None:
        chunks.append(chunk)

    return on_chunk


def quickstart(**data: Any) -> dict[str, Any]:
    """The success envelope of the quickstart page."""
    fields = {
        "fileId": "file_abc123",
        "fileName": "cat.png",
        "originalName": "cat.png",
        "fileSize": 10,
        "mimeType": "image/png",
        "uploadPath": "images",
        "fileUrl": "https://files.example.test/images/cat.png",
        "downloadUrl": LINK,
        "uploadTime": "2025-01-15T10:30:00Z",
        "expiresAt": "2025-01-18T10:30:00Z",
    }
    fields.update(data)
    return {"success": True, "code": 200, "msg": "File uploaded successfully", "data": fields}


def endpoint_page(**data: Any) -> dict[str, Any]:
    """The success envelope of the endpoint reference pages (no expiresAt)."""
    fields = {
        "fileName": "uploaded-image.png",
        "filePath": "images/user-uploads/uploaded-image.png",
        "downloadUrl": "https://tempfile.redpandaai.co/xxx/images/user-uploads/uploaded-image.png",
        "fileSize": 10,
        "mimeType": "image/png",
        "uploadedAt": "2025-01-01T12:00:00.000Z",
    }
    fields.update(data)
    return {"success": True, "code": 200, "msg": "File uploaded successfully", "data": fields}


def error_envelope(code: int, msg: str) -> dict[str, Any]:
    return {"success": False, "code": code, "msg": msg}


def parse(envelope: object, status: int = 200, headers: dict[str, str] | None = None) -> Any:
    body = envelope if isinstance(envelope, bytes) else json.dumps(envelope).encode()
    return parse_response(status, body, headers or {}, now=NOW, endpoint="/api/file-stream-upload")


# -- parse_response: success ---------------------------------------------------------------------


def test_quickstart_shape_gives_every_field() -> None:
    receipt = parse(quickstart())
    assert receipt.download_url == LINK
    assert receipt.file_id == "file_abc123"
    assert receipt.file_name == "cat.png"
    assert receipt.upload_path == "images"
    assert receipt.file_size == 10
    assert receipt.mime_type == "image/png"
    assert receipt.uploaded_at == parse_iso("2025-01-15T10:30:00Z")
    assert receipt.expires_at == parse_iso("2025-01-18T10:30:00Z")


def test_endpoint_page_shape_has_no_expiry_and_millisecond_upload_time() -> None:
    receipt = parse(endpoint_page())
    assert receipt.download_url.startswith("https://tempfile.redpandaai.co/")
    assert receipt.uploaded_at == parse_iso("2025-01-01T12:00:00.000Z")
    assert receipt.expires_at is None
    assert receipt.file_id is None


def test_download_url_wins_over_file_url() -> None:
    assert parse(quickstart()).download_url == LINK


def test_file_url_is_used_when_download_url_is_missing() -> None:
    assert parse(quickstart(downloadUrl=None)).download_url.startswith("https://files.")


def test_older_url_field_is_used_when_it_is_the_only_link() -> None:
    answer = {"success": True, "code": 200, "data": {"url": "http://old.example.test/f.bin"}}
    assert parse(answer).download_url == "http://old.example.test/f.bin"


def test_a_link_that_is_not_http_is_skipped_for_the_next_one() -> None:
    answer = quickstart(downloadUrl="", fileUrl="ftp://x/y", url="https://ok.example.test/y")
    assert parse(answer).download_url == "https://ok.example.test/y"


def test_success_without_any_link_is_permanent() -> None:
    with pytest.raises(PermanentError, match="without a download link"):
        parse({"success": True, "code": 200, "data": {"fileName": "a.png"}})


def test_success_without_data_is_permanent() -> None:
    with pytest.raises(PermanentError, match="without a download link"):
        parse({"success": True, "code": 200, "msg": "ok"})


def test_code_200_as_a_string_is_success() -> None:
    assert parse({**quickstart(), "code": "200"}).download_url == LINK


def test_envelope_without_success_or_code_is_success() -> None:
    assert parse({"data": quickstart()["data"]}).download_url == LINK


def test_any_2xx_status_is_accepted() -> None:
    assert parse(quickstart(), status=201).download_url == LINK


def test_file_size_as_numeric_string_is_an_int() -> None:
    assert parse(quickstart(fileSize="2048")).file_size == 2048


def test_unreadable_file_size_is_none() -> None:
    assert parse(quickstart(fileSize="big")).file_size is None


def test_epoch_seconds_are_tolerated_for_times() -> None:
    receipt = parse(quickstart(uploadTime=1_736_937_000, expiresAt="1737196200"))
    assert (receipt.uploaded_at, receipt.expires_at) == (1_736_937_000.0, 1_737_196_200.0)


def test_epoch_milliseconds_are_tolerated_for_times() -> None:
    assert parse(quickstart(expiresAt=1_737_196_200_500)).expires_at == 1_737_196_200.5


def test_unreadable_expiry_is_none_not_a_failure() -> None:
    assert parse(quickstart(expiresAt="in three days")).expires_at is None


def test_iso_time_with_offset_is_converted_to_utc() -> None:
    receipt = parse(quickstart(expiresAt="2025-01-18T12:30:00+02:00"))
    assert receipt.expires_at == parse_iso("2025-01-18T10:30:00Z")


# -- parse_response: failures ---------------------------------------------------------------------


@pytest.mark.parametrize("status", [401, 403])
def test_http_401_and_403_reject_the_key(status: int) -> None:
    with pytest.raises(
        AuthRejectedError, match=f"rejected the API key \\(HTTP {status}\\)"
    ) as info:
        parse(error_envelope(status, "Invalid API key"), status=status)
    assert "Invalid API key" in str(info.value)
    assert info.value.status == status


def test_code_401_in_a_200_body_rejects_the_key() -> None:
    with pytest.raises(AuthRejectedError, match="HTTP 401"):
        parse(error_envelope(401, "Unauthorized"))


@pytest.mark.parametrize("status", [404, 405])
def test_404_and_405_say_the_base_url_is_wrong(status: int) -> None:
    with pytest.raises(EndpointError, match="/api/file-stream-upload") as info:
        parse(b"<html>Not Found</html>", status=status)
    assert "target.base_url" in str(info.value)


def test_a_redirect_is_an_endpoint_error_naming_where_it_points() -> None:
    with pytest.raises(EndpointError, match=r"https://other\.example\.test/"):
        parse(b"", status=301, headers={"Location": "https://other.example.test/"})


@pytest.mark.parametrize("status", [408, 429, 500, 502, 503, 504])
def test_transient_statuses_are_retryable(status: int) -> None:
    with pytest.raises(RetryableError) as info:
        parse(error_envelope(status, "try later"), status=status)
    assert info.value.status == status


@pytest.mark.parametrize("status", [400, 402, 413, 415, 422])
def test_other_4xx_are_permanent_with_the_service_message(status: int) -> None:
    with pytest.raises(PermanentError, match="uploadPath is required") as info:
        parse(error_envelope(status, "uploadPath is required"), status=status)
    assert info.value.status == status


def test_retry_after_in_seconds_is_carried() -> None:
    with pytest.raises(RetryableError) as info:
        parse(error_envelope(429, "slow down"), status=429, headers={"Retry-After": "7"})
    assert info.value.retry_after == 7.0


def test_retry_after_as_http_date_becomes_seconds_from_now() -> None:
    date = "Thu, 16 Jan 2025 04:02:00 GMT"  # NOW + 120 s
    with pytest.raises(RetryableError) as info:
        parse(error_envelope(503, "busy"), status=503, headers={"Retry-After": date})
    assert info.value.retry_after == pytest.approx(120.0)


def test_retry_after_header_name_is_case_insensitive() -> None:
    with pytest.raises(RetryableError) as info:
        parse(error_envelope(429, "slow down"), status=429, headers={"retry-after": "3"})
    assert info.value.retry_after == 3.0


def test_retry_after_in_the_past_is_zero() -> None:
    with pytest.raises(RetryableError) as info:
        parse(b"", status=503, headers={"Retry-After": "Wed, 01 Jan 2020 00:00:00 GMT"})
    assert info.value.retry_after == 0.0


def test_unreadable_retry_after_is_ignored() -> None:
    with pytest.raises(RetryableError) as info:
        parse(b"", status=429, headers={"Retry-After": "soon"})
    assert info.value.retry_after is None


def test_no_retry_after_header_means_none() -> None:
    with pytest.raises(RetryableError) as info:
        parse(error_envelope(500, "oops"), status=500)
    assert info.value.retry_after is None


@pytest.mark.parametrize("code", [429, 500, 503, 999])
def test_error_code_in_a_200_body_is_retryable(code: int) -> None:
    with pytest.raises(RetryableError, match=f"code {code}"):
        parse(error_envelope(code, "internal error"))


def test_retry_after_is_honoured_on_an_error_code_in_a_200_body() -> None:
    with pytest.raises(RetryableError) as info:
        parse(error_envelope(429, "busy"), headers={"Retry-After": "9"})
    assert info.value.retry_after == 9.0


@pytest.mark.parametrize("code", [400, 422, "400"])
def test_client_error_code_in_a_200_body_is_permanent(code: int | str) -> None:
    with pytest.raises(PermanentError, match="bad fileName"):
        parse({"success": False, "code": code, "msg": "bad fileName"})


def test_success_false_without_a_code_is_retryable() -> None:
    with pytest.raises(RetryableError):
        parse({"success": False, "msg": "something went wrong", "data": quickstart()["data"]})


def test_success_false_wins_over_a_200_code() -> None:
    with pytest.raises(RetryableError):
        parse({"success": False, "code": 200, "data": quickstart()["data"]})


def test_unreadable_code_is_not_success() -> None:
    with pytest.raises(RetryableError, match="unreadable code"):
        parse({**quickstart(), "code": "OK"})


def test_non_json_2xx_body_is_retryable() -> None:
    with pytest.raises(RetryableError, match="not a JSON object"):
        parse(b"<html><body>Gateway says hi</body></html>")


def test_json_that_is_not_an_object_is_retryable() -> None:
    with pytest.raises(RetryableError, match="not a JSON object"):
        parse(b"[1, 2, 3]")


def test_non_json_error_body_is_quoted_on_one_line() -> None:
    with pytest.raises(RetryableError) as info:
        parse(b"<html>\n<h1>502 Bad Gateway</h1>\n</html>", status=502)
    assert "502 Bad Gateway" in str(info.value)
    assert "\n" not in str(info.value)


def test_messages_are_truncated_to_one_short_line() -> None:
    with pytest.raises(PermanentError) as info:
        parse(error_envelope(400, "line one\nline two " + "x" * 5000), status=400)
    assert "\n" not in str(info.value)
    assert len(str(info.value)) <= 300


# -- scripted servers --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Seen:
    """One request as the server received it."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    def form(self) -> dict[str, EmailMessage]:
        """The multipart parts by name, parsed by the stdlib (not by aiohttp)."""
        head = f"Content-Type: {self.headers['Content-Type']}\r\n\r\n".encode()
        parser = email.parser.BytesParser(_class=EmailMessage, policy=email.policy.HTTP)
        message = parser.parsebytes(head + self.body)
        assert message.is_multipart()
        parts: dict[str, EmailMessage] = {}
        for part in message.iter_parts():
            assert isinstance(part, EmailMessage)
            parts[str(part.get_param("name", header="content-disposition"))] = part
        return parts


Answer = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class Server:
    base_url: str
    seen: list[Seen] = field(default_factory=list)


def reply(payload: object, status: int = 200, **headers: str) -> Answer:
    async def answer(request: web.Request) -> web.StreamResponse:
        body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        return web.Response(body=body, status=status, headers=headers)

    return answer


@asynccontextmanager
async def serve(*answers: Answer) -> AsyncIterator[Server]:
    """A server on 127.0.0.1 that reads every request whole, then gives the next answer."""
    script = list(answers)
    server = Server("")

    async def handle(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        server.seen.append(Seen(request.method, request.path, dict(request.headers), body))
        answer = script.pop(0) if len(script) > 1 else script[0]
        return await answer(request)

    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_route("*", "/{tail:.*}", handle)
    async with running(app) as base_url:
        server.base_url = base_url
        yield server


@asynccontextmanager
async def running(app: web.Application) -> AsyncIterator[str]:
    runner = web.AppRunner(app, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as http:
        yield http


@dataclass(frozen=True, slots=True)
class Source:
    """A local file to upload and what it holds."""

    path: Path
    data: bytes

    @property
    def size(self) -> int:
        return len(self.data)


def write_source(path: Path, data: bytes) -> Source:
    path.write_bytes(data)
    return Source(path, data)


@pytest.fixture
def source(tmp_path: Path) -> Source:
    return write_source(tmp_path / "photo.png", bytes(range(256)) * 40 + b"tail")


def client_for(
    session: aiohttp.ClientSession,
    base_url: str,
    *,
    read_timeout: float = 120.0,
    url_read_timeout: float = 180.0,
) -> UploadClient:
    return UploadClient(
        session, base_url, KEY, read_timeout=read_timeout, url_read_timeout=url_read_timeout
    )


async def chunks_of(data: bytes, size: int) -> AsyncIterator[bytes]:
    for start in range(0, len(data), size):
        await asyncio.sleep(0)
        yield data[start : start + size]


# -- base64 and URL uploads ----------------------------------------------------------------------


async def test_base64_upload_posts_a_data_url_with_path_and_name(
    session: aiohttp.ClientSession,
) -> None:
    async with serve(reply(quickstart(fileSize=5))) as server:
        receipt = await client_for(session, server.base_url).upload_base64(
            b"hello", upload_path="images", file_name="cat.png"
        )
    (seen,) = server.seen
    assert (seen.method, seen.path) == ("POST", "/api/file-base64-upload")
    assert seen.headers["Content-Type"].startswith("application/json")
    assert seen.json() == {
        "base64Data": "data:image/png;base64," + base64.b64encode(b"hello").decode(),
        "uploadPath": "images",
        "fileName": "cat.png",
    }
    assert receipt.download_url == LINK


async def test_base64_upload_sends_plain_base64_when_the_type_is_unknown(
    session: aiohttp.ClientSession,
) -> None:
    async with serve(reply(quickstart(fileSize=5))) as server:
        await client_for(session, server.base_url).upload_base64(
            b"hello", upload_path="raw", file_name="blob"
        )
    assert server.seen[0].json()["base64Data"] == base64.b64encode(b"hello").decode()


async def test_base64_upload_uses_the_given_mime_type(session: aiohttp.ClientSession) -> None:
    async with serve(reply(quickstart(fileSize=3))) as server:
        await client_for(session, server.base_url).upload_base64(
            b"abc", upload_path="a", file_name="x.bin", mime_type="audio/mpeg"
        )
    assert server.seen[0].json()["base64Data"].startswith("data:audio/mpeg;base64,")


async def test_every_request_carries_the_bearer_key(session: aiohttp.ClientSession) -> None:
    async with serve(reply(quickstart(fileSize=1))) as server:
        await client_for(session, server.base_url).upload_base64(
            b"a", upload_path="a", file_name="a.txt"
        )
    assert server.seen[0].headers["Authorization"] == f"Bearer {KEY}"


async def test_trailing_slash_in_base_url_is_tolerated(session: aiohttp.ClientSession) -> None:
    async with serve(reply(quickstart(fileSize=1))) as server:
        await client_for(session, server.base_url + "/").upload_base64(
            b"a", upload_path="a", file_name="a.txt"
        )
    assert server.seen[0].path == "/api/file-base64-upload"


async def test_url_upload_posts_the_url_path_and_name(session: aiohttp.ClientSession) -> None:
    async with serve(reply(endpoint_page())) as server:
        receipt = await client_for(session, server.base_url).upload_url(
            "https://origin.example.test/a b.jpg", upload_path="images", file_name="a b.jpg"
        )
    (seen,) = server.seen
    assert seen.path == "/api/file-url-upload"
    assert seen.json() == {
        "fileUrl": "https://origin.example.test/a b.jpg",
        "uploadPath": "images",
        "fileName": "a b.jpg",
    }
    assert receipt.expires_at is None


async def test_url_upload_does_not_check_the_stored_size(session: aiohttp.ClientSession) -> None:
    async with serve(reply(endpoint_page(fileSize=123_456))) as server:
        receipt = await client_for(session, server.base_url).upload_url(
            "https://origin.example.test/x", upload_path="a", file_name="x"
        )
    assert receipt.file_size == 123_456


async def test_url_upload_waits_longer_than_other_uploads(session: aiohttp.ClientSession) -> None:
    async def fetch_first(request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(0.6)  # the service downloads the file before it answers
        return await reply(endpoint_page())(request)

    async with serve(fetch_first) as server:
        client = client_for(session, server.base_url, read_timeout=0.2, url_read_timeout=5.0)
        receipt = await client.upload_url(
            "https://origin.example.test/x", upload_path="a", file_name="x"
        )
    assert receipt.download_url.startswith("https://")


async def test_base64_upload_with_a_different_stored_size_is_retryable(
    session: aiohttp.ClientSession,
) -> None:
    async with serve(reply(quickstart(fileSize=3))) as server:
        with pytest.raises(RetryableError, match="service stored 3 bytes, sent 10"):
            await client_for(session, server.base_url).upload_base64(
                b"0123456789", upload_path="a", file_name="a.txt"
            )


# -- stream uploads from disk ---------------------------------------------------------------------


async def test_file_upload_sends_a_multipart_form_with_fields_and_file(
    session: aiohttp.ClientSession, source: Source
) -> None:
    data = source.data
    async with serve(reply(quickstart(fileSize=len(data)))) as server:
        receipt = await client_for(session, server.base_url).upload_file(
            source.path, upload_path="images/2025", file_name="cat.png", size=len(data)
        )
    (seen,) = server.seen
    assert seen.path == "/api/file-stream-upload"
    parts = seen.form()
    assert parts["uploadPath"].get_content() == "images/2025"
    assert parts["fileName"].get_content() == "cat.png"
    assert parts["file"].get_filename() == "cat.png"
    assert parts["file"].get_content_type() == "image/png"
    assert parts["file"].get_payload(decode=True) == data
    assert receipt.download_url == LINK


async def test_file_upload_has_an_exact_content_length_and_no_chunking(
    session: aiohttp.ClientSession, source: Source
) -> None:
    size = source.size
    async with serve(reply(quickstart(fileSize=size))) as server:
        await client_for(session, server.base_url).upload_file(
            source.path, upload_path="a", file_name="cat.png", size=size, chunk_size=1000
        )
    (seen,) = server.seen
    assert int(seen.headers["Content-Length"]) == len(seen.body)
    assert "Transfer-Encoding" not in seen.headers


async def test_file_part_of_an_unknown_type_is_octet_stream(
    session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    path = write_source(tmp_path / "data", b"\x00\x01").path
    async with serve(reply(quickstart(fileSize=2))) as server:
        await client_for(session, server.base_url).upload_file(
            path, upload_path="a", file_name="data.unknownext", size=2
        )
    assert server.seen[0].form()["file"].get_content_type() == "application/octet-stream"


async def test_non_ascii_file_name_reaches_an_aiohttp_multipart_reader(
    session: aiohttp.ClientSession, source: Source
) -> None:
    received: dict[str, str | bytes | None] = {}

    async def read_form(request: web.Request) -> web.Response:
        reader = await request.multipart()
        while (part := await reader.next()) is not None:
            assert isinstance(part, aiohttp.BodyPartReader)
            received[str(part.name)] = await part.read()
            if part.name == "file":
                received["filename"] = part.filename
        return web.json_response(quickstart(fileSize=len(received["file"] or b"")))

    app = web.Application()
    app.router.add_post("/api/file-stream-upload", read_form)
    name = 'Übersicht "final" 2025.png'
    async with running(app) as base_url:
        await client_for(session, base_url).upload_file(
            source.path, upload_path="docs/größe", file_name=name, size=source.size
        )
    assert received["filename"] == name  # from filename*, which aiohttp prefers
    assert received["fileName"] == name.encode()
    assert received["uploadPath"] == "docs/größe".encode()
    assert received["file"] == source.data


async def test_non_ascii_file_name_carries_an_rfc5987_filename(
    session: aiohttp.ClientSession, source: Source
) -> None:
    size = source.size
    async with serve(reply(quickstart(fileSize=size))) as server:
        await client_for(session, server.base_url).upload_file(
            source.path, upload_path="a", file_name="café.png", size=size
        )
    assert b"filename*=UTF-8''caf%C3%A9.png" in server.seen[0].body


async def test_every_chunk_is_reported_in_order_as_it_is_sent(
    session: aiohttp.ClientSession, source: Source
) -> None:
    data = source.data
    reported: list[bytes] = []
    async with serve(reply(quickstart(fileSize=len(data)))) as server:
        await client_for(session, server.base_url).upload_file(
            source.path,
            upload_path="a",
            file_name="cat.png",
            size=len(data),
            on_chunk=collect(reported),
            chunk_size=1000,
        )
    assert len(reported) == 11
    assert b"".join(reported) == data


async def test_a_large_file_arrives_intact(session: aiohttp.ClientSession, tmp_path: Path) -> None:
    data = hashlib.sha256(b"seed").digest() * (3 * 1024 * 1024 // 32 + 7)
    path = write_source(tmp_path / "big.bin", data).path
    digests: list[str] = []

    async def check(request: web.Request) -> web.StreamResponse:
        reader = await request.multipart()
        sha = hashlib.sha256()
        while (part := await reader.next()) is not None:
            assert isinstance(part, aiohttp.BodyPartReader)
            while chunk := await part.read_chunk(64 * 1024):
                if part.name == "file":
                    sha.update(chunk)
        digests.append(sha.hexdigest())
        return web.json_response(quickstart(fileSize=len(data)))

    app = web.Application()
    app.router.add_post("/api/file-stream-upload", check)
    async with running(app) as base_url:
        await client_for(session, base_url).upload_file(
            path, upload_path="a", file_name="big.bin", size=len(data), chunk_size=64 * 1024
        )
    assert digests == [hashlib.sha256(data).hexdigest()]


def several_reads(tmp_path: Path) -> Source:
    """A file the client, sending it alone, reads in three trips to a thread, the last
    one short."""
    data = hashlib.sha256(b"reads").digest() * ((2 * READ_BUDGET + 12_345) // 32)
    return write_source(tmp_path / "reads.bin", data)


class NotedReads:
    """A sha256 that notes the size of each read it is given."""

    def __init__(self) -> None:
        self.sha256 = hashlib.sha256()
        self.sizes: list[int] = []

    def update(self, data: bytes, /) -> None:
        self.sizes.append(len(data))
        self.sha256.update(data)


async def test_a_file_sent_alone_is_read_the_whole_read_budget_a_trip(
    session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    source = several_reads(tmp_path)
    reads = NotedReads()
    async with serve(reply(quickstart(fileSize=source.size))) as server:
        await client_for(session, server.base_url).upload_file(
            source.path, upload_path="a", file_name="reads.bin", size=source.size, digest=reads
        )
    rest = source.size - 2 * READ_BUDGET
    assert reads.sizes == [READ_BUDGET, READ_BUDGET, rest, 0]  # the last: the end, seen
    assert reads.sha256.hexdigest() == hashlib.sha256(source.data).hexdigest()


def test_files_sent_at_once_share_the_read_budget_down_to_the_read_size() -> None:
    chunk = 256 * 1024
    shares = [read_size(chunk, readers) for readers in (1, 2, 4, 16)]
    assert shares == [READ_BUDGET, READ_BUDGET // 2, READ_SIZE, READ_SIZE]


def test_a_read_is_whole_chunks_and_at_least_one() -> None:
    assert read_size(100_000, 1) == 41 * 100_000  # 4 MiB holds 41 whole chunks
    assert read_size(8 * READ_BUDGET, 1) == 8 * READ_BUDGET


async def test_a_file_of_several_reads_is_hashed_whole_and_in_order(
    session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    source = several_reads(tmp_path)
    digest = hashlib.sha256()
    async with serve(reply(quickstart(fileSize=source.size))) as server:
        await client_for(session, server.base_url).upload_file(
            source.path, upload_path="a", file_name="reads.bin", size=source.size, digest=digest
        )
    assert digest.hexdigest() == hashlib.sha256(source.data).hexdigest()
    assert server.seen[0].form()["file"].get_payload(decode=True) == source.data


async def test_a_file_of_several_reads_is_reported_in_chunks_of_the_size_asked(
    session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    source = several_reads(tmp_path)
    reported: list[bytes] = []
    async with serve(reply(quickstart(fileSize=source.size))) as server:
        await client_for(session, server.base_url).upload_file(
            source.path,
            upload_path="a",
            file_name="reads.bin",
            size=source.size,
            on_chunk=collect(reported),
            chunk_size=100_000,
        )
    assert b"".join(reported) == source.data
    assert {len(chunk) for chunk in reported[:-1]} == {100_000}


async def test_a_file_that_grew_past_its_first_read_is_a_change_to_send_again(
    session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    source = several_reads(tmp_path)
    async with serve(reply(quickstart(fileSize=source.size))) as server:
        with pytest.raises(SourceChangedError, match="more than the expected"):
            await client_for(session, server.base_url).upload_file(
                source.path, upload_path="a", file_name="reads.bin", size=READ_SIZE + 10
            )


async def test_each_call_reads_the_file_afresh(
    session: aiohttp.ClientSession, source: Source
) -> None:
    size = source.size
    async with serve(reply(quickstart(fileSize=size))) as server:
        client = client_for(session, server.base_url)
        for _ in range(2):
            await client.upload_file(source.path, upload_path="a", file_name="cat.png", size=size)
    first, second = (seen.form()["file"].get_payload(decode=True) for seen in server.seen)
    assert first == second == source.data


async def test_a_file_larger_than_planned_is_a_change_to_send_again(
    session: aiohttp.ClientSession, source: Source
) -> None:
    size = source.size
    async with serve(reply(quickstart(fileSize=size))) as server:
        with pytest.raises(SourceChangedError, match="source changed while uploading"):
            await client_for(session, server.base_url).upload_file(
                source.path, upload_path="a", file_name="cat.png", size=size - 100
            )


async def test_a_file_smaller_than_planned_is_a_change_to_send_again(
    session: aiohttp.ClientSession, source: Source
) -> None:
    size = source.size
    async with serve(reply(quickstart(fileSize=size))) as server:
        with pytest.raises(SourceChangedError, match="source changed while uploading"):
            await client_for(session, server.base_url).upload_file(
                source.path, upload_path="a", file_name="cat.png", size=size + 100
            )


async def test_a_missing_file_fails_permanently_without_a_request(
    session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    async with serve(reply(quickstart())) as server:
        with pytest.raises(PermanentError, match="cannot read"):
            await client_for(session, server.base_url).upload_file(
                tmp_path / "gone.png", upload_path="a", file_name="gone.png", size=10
            )
    assert server.seen == []


async def test_file_upload_with_a_different_stored_size_is_retryable(
    session: aiohttp.ClientSession, source: Source
) -> None:
    size = source.size
    async with serve(reply(quickstart(fileSize=size - 1))) as server:
        with pytest.raises(RetryableError, match=f"service stored {size - 1} bytes, sent {size}"):
            await client_for(session, server.base_url).upload_file(
                source.path, upload_path="a", file_name="cat.png", size=size
            )


# -- stream uploads from an async source ----------------------------------------------------------


async def test_stream_upload_of_known_size_has_an_exact_content_length(
    session: aiohttp.ClientSession,
) -> None:
    data = b"stream-me " * 1000
    reported: list[bytes] = []
    async with serve(reply(quickstart(fileSize=len(data)))) as server:
        await client_for(session, server.base_url).upload_stream(
            chunks_of(data, 4096),
            upload_path="remote",
            file_name="notes.txt",
            size=len(data),
            on_chunk=collect(reported),
        )
    (seen,) = server.seen
    assert int(seen.headers["Content-Length"]) == len(seen.body)
    assert seen.form()["file"].get_payload(decode=True) == data
    assert seen.form()["file"].get_content_type() == "text/plain"
    assert b"".join(reported) == data


async def test_stream_upload_of_unknown_size_is_chunked(session: aiohttp.ClientSession) -> None:
    data = b"abc" * 5000
    async with serve(reply(quickstart(fileSize=len(data)))) as server:
        await client_for(session, server.base_url).upload_stream(
            chunks_of(data, 1000),
            upload_path="remote",
            file_name="x.bin",
            size=None,
            mime_type="video/mp4",
        )
    (seen,) = server.seen
    assert seen.headers.get("Transfer-Encoding") == "chunked"
    assert "Content-Length" not in seen.headers
    assert seen.form()["file"].get_payload(decode=True) == data
    assert seen.form()["file"].get_content_type() == "video/mp4"


async def test_stream_source_shorter_than_its_size_is_a_change_to_send_again(
    session: aiohttp.ClientSession,
) -> None:
    async with serve(reply(quickstart())) as server:
        with pytest.raises(SourceChangedError, match="source changed while uploading"):
            await client_for(session, server.base_url).upload_stream(
                chunks_of(b"x" * 100, 10), upload_path="a", file_name="a.bin", size=150
            )


async def test_stream_source_that_breaks_is_retryable(session: aiohttp.ClientSession) -> None:
    async def broken_origin() -> AsyncIterator[bytes]:
        yield b"x" * 100
        raise aiohttp.ClientPayloadError("origin went away")

    async with serve(reply(quickstart())) as server:
        with pytest.raises(RetryableError, match="reading the source failed"):
            await client_for(session, server.base_url).upload_stream(
                broken_origin(), upload_path="a", file_name="a.bin", size=1000
            )


async def test_stream_upload_with_a_different_stored_size_is_retryable(
    session: aiohttp.ClientSession,
) -> None:
    async with serve(reply(quickstart(fileSize=1))) as server:
        with pytest.raises(RetryableError, match="service stored 1 bytes, sent 30"):
            await client_for(session, server.base_url).upload_stream(
                chunks_of(b"y" * 30, 7), upload_path="a", file_name="a.bin", size=None
            )


# -- failures over HTTP ---------------------------------------------------------------------------


async def upload_small(
    base_url: str, session: aiohttp.ClientSession, read_timeout: float = 120.0
) -> Any:
    return await client_for(session, base_url, read_timeout=read_timeout).upload_base64(
        b"0123456789", upload_path="a", file_name="a.txt"
    )


async def test_401_stops_with_auth_rejected(session: aiohttp.ClientSession) -> None:
    async with serve(reply(error_envelope(401, "Invalid API key"), status=401)) as server:
        with pytest.raises(AuthRejectedError, match="Invalid API key"):
            await upload_small(server.base_url, session)


async def test_a_service_echoing_the_key_never_puts_it_in_the_message(
    session: aiohttp.ClientSession,
) -> None:
    async def echo(request: web.Request) -> web.StreamResponse:
        told = f"bad header {request.headers['Authorization']}"
        return web.json_response(error_envelope(400, told), status=400)

    async with serve(echo) as server:
        with pytest.raises(PermanentError) as info:
            await upload_small(server.base_url, session)
    assert KEY not in str(info.value)
    assert "***" in str(info.value)


@pytest.mark.parametrize("status", [404, 405])
async def test_404_and_405_name_the_endpoint(session: aiohttp.ClientSession, status: int) -> None:
    async with serve(reply(b"nope", status=status)) as server:
        with pytest.raises(EndpointError, match=f"{status} for /api/file-base64-upload"):
            await upload_small(server.base_url, session)


async def test_429_carries_retry_after(session: aiohttp.ClientSession) -> None:
    answer = reply(error_envelope(429, "Too many requests"), status=429, **{"Retry-After": "4"})
    async with serve(answer) as server:
        with pytest.raises(RetryableError) as info:
            await upload_small(server.base_url, session)
    assert (info.value.status, info.value.retry_after) == (429, 4.0)


async def test_500_is_retryable(session: aiohttp.ClientSession) -> None:
    async with serve(reply(error_envelope(500, "Server error"), status=500)) as server:
        with pytest.raises(RetryableError, match="HTTP 500"):
            await upload_small(server.base_url, session)


async def test_error_code_in_a_200_answer_is_retryable(session: aiohttp.ClientSession) -> None:
    async with serve(reply(error_envelope(500, "internal error"))) as server:
        with pytest.raises(RetryableError, match="code 500"):
            await upload_small(server.base_url, session)


async def test_400_is_permanent_with_the_service_message(session: aiohttp.ClientSession) -> None:
    async with serve(reply(error_envelope(400, "fileName too long"), status=400)) as server:
        with pytest.raises(PermanentError, match="fileName too long"):
            await upload_small(server.base_url, session)


async def test_html_from_a_proxy_on_200_is_retryable(session: aiohttp.ClientSession) -> None:
    async with serve(reply(b"<html>captive portal</html>")) as server:
        with pytest.raises(RetryableError, match="not a JSON object"):
            await upload_small(server.base_url, session)


async def test_redirects_are_not_followed(session: aiohttp.ClientSession) -> None:
    async with serve(
        reply(b"", status=302, Location="/elsewhere"), reply(quickstart(fileSize=10))
    ) as server:
        with pytest.raises(EndpointError, match="redirected"):
            await upload_small(server.base_url, session)
    assert [seen.path for seen in server.seen] == ["/api/file-base64-upload"]


async def test_a_retry_after_a_failure_succeeds_on_the_same_client(
    session: aiohttp.ClientSession,
) -> None:
    async with serve(reply(error_envelope(503, "busy"), status=503), reply(quickstart())) as server:
        client = client_for(session, server.base_url)
        with pytest.raises(RetryableError):
            await client.upload_base64(b"0123456789", upload_path="a", file_name="a.txt")
        receipt = await client.upload_base64(b"0123456789", upload_path="a", file_name="a.txt")
    assert receipt.download_url == LINK


# -- failures below HTTP ------------------------------------------------------------------------


@asynccontextmanager
async def raw_server(
    on_connect: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
) -> AsyncIterator[str]:
    """A bare TCP server for answers no HTTP framework would give."""
    writers: list[asyncio.StreamWriter] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        await on_connect(reader, writer)

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.close()
        for writer in writers:
            writer.close()
        await server.wait_closed()


async def test_connection_refused_is_retryable_and_says_so(
    session: aiohttp.ClientSession,
) -> None:
    base_url = f"http://127.0.0.1:{closed_port()}"
    with pytest.raises(RetryableError, match=f"connection refused to {base_url}") as info:
        await upload_small(base_url, session)
    assert info.value.status is None


async def test_a_server_closing_the_connection_is_retryable(
    session: aiohttp.ClientSession,
) -> None:
    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.close()

    async with raw_server(hang_up) as base_url:
        with pytest.raises(RetryableError, match="closed the connection") as info:
            await upload_small(base_url, session)
    assert info.value.status is None


async def test_an_answer_cut_short_is_retryable(session: aiohttp.ClientSession) -> None:
    async def cut_short(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b'HTTP/1.1 200 OK\r\nContent-Length: 500\r\n\r\n{"success": tr')
        await writer.drain()
        writer.close()

    async with raw_server(cut_short) as base_url:
        with pytest.raises(RetryableError, match="cut off") as info:
            await upload_small(base_url, session)
    assert info.value.status is None


async def test_a_silent_server_times_out_as_retryable(session: aiohttp.ClientSession) -> None:
    release = asyncio.Event()

    async def silent(request: web.Request) -> web.StreamResponse:
        await release.wait()
        return await reply(quickstart())(request)

    async with serve(silent) as server:
        try:
            with pytest.raises(RetryableError, match="timed out waiting for the service"):
                await upload_small(server.base_url, session, read_timeout=0.2)
        finally:
            release.set()


async def test_a_file_upload_to_a_silent_server_times_out(
    session: aiohttp.ClientSession, source: Source
) -> None:
    async def read_then_hang(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await reader.read(65536):
            pass

    async with raw_server(read_then_hang) as base_url:
        with pytest.raises(RetryableError, match="timed out"):
            await client_for(session, base_url, read_timeout=0.3).upload_file(
                source.path, upload_path="a", file_name="cat.png", size=source.size
            )


# -- round trips through the emulator ------------------------------------------------------------


async def download(session: aiohttp.ClientSession, url: str) -> bytes:
    async with session.get(url) as response:
        assert response.status == 200
        return await response.read()


@pytest.fixture
def emulator_client(
    emulator: Emulator, api_key: str, session: aiohttp.ClientSession
) -> Iterator[UploadClient]:
    yield UploadClient(session, emulator.base_url, api_key)


async def test_emulator_round_trip_by_base64(
    emulator_client: UploadClient, session: aiohttp.ClientSession
) -> None:
    receipt = await emulator_client.upload_base64(
        b"\x89PNG tiny", upload_path="it/base64", file_name="tiny.png"
    )
    assert receipt.file_size == 9
    assert await download(session, receipt.download_url) == b"\x89PNG tiny"


async def test_emulator_round_trip_by_stream(
    emulator_client: UploadClient, session: aiohttp.ClientSession, source: Source
) -> None:
    receipt = await emulator_client.upload_file(
        source.path, upload_path="it/stream", file_name="Größe 1.png", size=source.size
    )
    assert receipt.file_name == "Größe 1.png"
    assert await download(session, receipt.download_url) == source.data


async def test_emulator_round_trip_by_chunked_stream(
    emulator_client: UploadClient, session: aiohttp.ClientSession
) -> None:
    data = b"z" * 70_000
    receipt = await emulator_client.upload_stream(
        chunks_of(data, 8192), upload_path="it/chunked", file_name="z.bin", size=None
    )
    assert await download(session, receipt.download_url) == data


async def test_emulator_round_trip_by_url(
    emulator_client: UploadClient, session: aiohttp.ClientSession
) -> None:
    data = b"from the origin " * 100

    async def origin_file(request: web.Request) -> web.Response:
        return web.Response(body=data, content_type="text/plain")

    origin = web.Application()
    origin.router.add_get("/files/origin.txt", origin_file)
    async with running(origin) as origin_url:
        receipt = await emulator_client.upload_url(
            f"{origin_url}/files/origin.txt", upload_path="it/url", file_name="origin.txt"
        )
    assert receipt.expires_at is not None
    assert await download(session, receipt.download_url) == data


async def test_emulator_rejects_a_wrong_key(
    emulator: Emulator, session: aiohttp.ClientSession
) -> None:
    client = UploadClient(session, emulator.base_url, "wrong-key-123456")
    with pytest.raises(AuthRejectedError, match="HTTP 401"):
        await client.upload_base64(b"x", upload_path="a", file_name="x.txt")


# -- stalls in the middle of a streamed body ------------------------------------------------


async def endless(chunk: bytes) -> AsyncIterator[bytes]:
    while True:
        yield chunk


async def test_a_service_that_stops_reading_the_body_times_out_as_retryable(
    session: aiohttp.ClientSession,
) -> None:
    stalled = asyncio.Event()

    async def never_reads(request: web.Request) -> web.StreamResponse:
        stalled.set()
        await asyncio.sleep(30)  # holds the connection, reads nothing
        return web.Response()

    app = web.Application()
    app.router.add_post("/api/file-stream-upload", never_reads)
    async with running(app) as base_url:
        client = client_for(session, base_url, read_timeout=0.5)
        with pytest.raises(RetryableError, match="timed out"):
            await asyncio.wait_for(
                client.upload_stream(
                    endless(b"x" * 256 * 1024), upload_path="u", file_name="f.bin", size=None
                ),
                timeout=20,
            )
    assert stalled.is_set()


async def test_an_origin_that_stalls_mid_body_is_retryable_not_permanent(
    session: aiohttp.ClientSession,
) -> None:
    async def origin_times_out() -> AsyncIterator[bytes]:
        yield b"first part"
        raise aiohttp.ServerTimeoutError("Timeout on reading data from socket")

    async with serve(reply(quickstart(fileSize=10))) as server:
        client = client_for(session, server.base_url)
        with pytest.raises(RetryableError, match="reading the source failed"):
            await client.upload_stream(
                origin_times_out(), upload_path="u", file_name="f.bin", size=None
            )
