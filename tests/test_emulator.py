"""The emulator behaves as the public docs describe the File Upload API."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import io
import json
import mimetypes
import os
import re
import shutil
import sqlite3
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import aiohttp
import pytest
from aiohttp import web
from conftest import (
    REPO_ROOT,
    EmulatorProcess,
    closed_port,
    migrator_env,
    start_cli,
    start_emulator_process,
    stop_emulator_process,
)
from hypothesis import given
from hypothesis import strategies as st

from migrator import emulator as emulator_module
from migrator.cli import main
from migrator.emulator import (
    Emulator,
    EmulatorRequest,
    StoredFile,
    decode_base64_data,
    download_path,
    iso_ms,
    pick_mime_type,
    success_body,
)

PNG_1X1 = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="
)
ISO_MS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
IMF_FIXDATE = re.compile(
    r"^(Mon|Tue|Wed|Thu|Fri|Sat|Sun), \d\d "
    r"(Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec) \d{4} \d\d:\d\d:\d\d GMT$"
)
HOUR = 3600.0
DAY = 86400.0

Json = dict[str, Any]


# -- helpers --------------------------------------------------------------------------------


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def post_json(url: str, body: object, headers: dict[str, str]) -> tuple[int, Json]:
    async with (
        aiohttp.ClientSession() as session,
        session.post(url, json=body, headers=headers) as r,
    ):
        return r.status, await r.json(content_type=None)


async def post_form(url: str, form: aiohttp.FormData, headers: dict[str, str]) -> tuple[int, Json]:
    async with (
        aiohttp.ClientSession() as session,
        session.post(url, data=form, headers=headers) as r,
    ):
        return r.status, await r.json(content_type=None)


async def get(
    url: str, method: str = "GET", headers: dict[str, str] | None = None
) -> tuple[int, bytes, dict[str, str]]:
    async with (
        aiohttp.ClientSession() as session,
        session.request(method, url, headers=headers) as resp,
    ):
        return resp.status, await resp.read(), dict(resp.headers)


async def upload_base64(
    emu: Emulator, key: str, data: str, upload_path: str = "images", file_name: str | None = None
) -> tuple[int, Json]:
    body: Json = {"base64Data": data, "uploadPath": upload_path}
    if file_name is not None:
        body["fileName"] = file_name
    return await post_json(f"{emu.base_url}/api/file-base64-upload", body, auth(key))


def assert_error_envelope(status: int, body: Json, expected: int) -> None:
    assert status == expected
    assert body["success"] is False
    assert body["code"] == expected
    assert isinstance(body["msg"], str) and body["msg"]
    assert body["data"] is None


def assert_link_gone(status: int, data: bytes, method: str) -> None:
    """A 404 for a link: the error envelope to GET, no body at all to HEAD."""
    if method == "HEAD":
        assert (status, data) == (404, b"")
    else:
        assert_error_envelope(status, json.loads(data), 404)


async def start_origin(
    routes: dict[str, Callable[[web.Request], Awaitable[web.StreamResponse]]],
) -> tuple[web.AppRunner, str]:
    """A small origin server on 127.0.0.1 that URL uploads fetch from."""
    app = web.Application()
    for path, handler in routes.items():
        app.router.add_get(path, handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, f"http://127.0.0.1:{runner.addresses[0][1]}"


def bytes_handler(
    data: bytes, content_type: str = "image/jpeg"
) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    async def handle(request: web.Request) -> web.StreamResponse:
        return web.Response(body=data, content_type=content_type)

    return handle


# -- the documented curl examples against the CLI emulator ---------------------------------


async def run_curl(*args: str) -> tuple[int, Json]:
    proc = await asyncio.create_subprocess_exec(
        "curl",
        "-sS",
        "--max-time",
        "30",
        "-w",
        "\n%{http_code}",
        *args,
        stdout=asyncio.subprocess.PIPE,
    )
    out, _ = await proc.communicate()
    body, _, code = out.decode().rpartition("\n")
    return int(code), json.loads(body)


async def documented_examples_with_curl(
    base: str, key: str, jpg: Path, png_data_url: str, origin_url: str
) -> list[tuple[int, Json]]:
    h = ["-H", f"Authorization: Bearer {key}"]
    js = ["-H", "Content-Type: application/json"]
    return [
        await run_curl(
            "-X",
            "POST",
            f"{base}/api/file-stream-upload",
            *h,
            "-F",
            f"file=@{jpg}",
            "-F",
            "uploadPath=images/user-uploads",
            "-F",
            "fileName=custom-name.jpg",
        ),
        await run_curl(
            "-X",
            "POST",
            f"{base}/api/file-base64-upload",
            *h,
            *js,
            "-d",
            json.dumps(
                {"base64Data": png_data_url, "uploadPath": "images", "fileName": "base64-image.png"}
            ),
        ),
        await run_curl(
            "-X",
            "POST",
            f"{base}/api/file-url-upload",
            *h,
            *js,
            "-d",
            json.dumps({"fileUrl": origin_url, "uploadPath": "images", "fileName": "my-image.jpg"}),
        ),
    ]


async def documented_examples_with_aiohttp(
    base: str, key: str, jpg: Path, png_data_url: str, origin_url: str
) -> list[tuple[int, Json]]:
    form = aiohttp.FormData()
    jpg_bytes = await asyncio.to_thread(jpg.read_bytes)
    form.add_field("file", jpg_bytes, filename=jpg.name, content_type="image/jpeg")
    form.add_field("uploadPath", "images/user-uploads")
    form.add_field("fileName", "custom-name.jpg")
    return [
        await post_form(f"{base}/api/file-stream-upload", form, auth(key)),
        await post_json(
            f"{base}/api/file-base64-upload",
            {"base64Data": png_data_url, "uploadPath": "images", "fileName": "base64-image.png"},
            auth(key),
        ),
        await post_json(
            f"{base}/api/file-url-upload",
            {"fileUrl": origin_url, "uploadPath": "images", "fileName": "my-image.jpg"},
            auth(key),
        ),
    ]


@pytest.mark.parametrize("client", ["curl", "aiohttp"])
async def test_documented_examples_succeed_against_the_cli_emulator_and_links_serve_the_bytes(
    client: str, emulator_process: EmulatorProcess, api_key: str, tmp_path: Path
) -> None:
    jpg = tmp_path / "your-file.jpg"
    jpg.write_bytes(b"\xff\xd8\xff\xe0 a jpeg " + os.urandom(5000))
    remote = b"\xff\xd8\xff remote jpeg " + os.urandom(7000)
    png_data_url = "data:image/png;base64," + base64.b64encode(PNG_1X1).decode()
    origin, origin_base = await start_origin({"/sample-image.jpg": bytes_handler(remote)})
    send = (
        documented_examples_with_curl
        if client == "curl" and shutil.which("curl")
        else documented_examples_with_aiohttp
    )
    try:
        results = await send(
            emulator_process.base_url, api_key, jpg, png_data_url, f"{origin_base}/sample-image.jpg"
        )
    finally:
        await origin.cleanup()
    expected = [
        (jpg.read_bytes(), "custom-name.jpg", "images/user-uploads"),
        (PNG_1X1, "base64-image.png", "images"),
        (remote, "my-image.jpg", "images"),
    ]
    for (status, body), (data, name, upload_path) in zip(results, expected, strict=True):
        assert (status, body["success"], body["code"]) == (200, True, 200), body
        assert (body["data"]["fileName"], body["data"]["uploadPath"]) == (name, upload_path)
        assert body["data"]["fileSize"] == len(data)
        dl_status, dl_bytes, _ = await get(body["data"]["downloadUrl"])
        assert (dl_status, dl_bytes) == (200, data)


# -- auth and bad requests ------------------------------------------------------------------


async def test_a_wrong_key_is_answered_401_in_the_envelope(emulator: Emulator) -> None:
    status, body = await upload_base64(emulator, "not-the-key", "aGVsbG8=", file_name="a.txt")
    assert_error_envelope(status, body, 401)


async def test_a_missing_key_is_answered_401_in_the_envelope(emulator: Emulator) -> None:
    status, body = await post_json(
        f"{emulator.base_url}/api/file-base64-upload",
        {"base64Data": "aGVsbG8=", "uploadPath": "x"},
        {},
    )
    assert_error_envelope(status, body, 401)


async def test_a_stream_upload_without_a_file_part_is_answered_400(
    emulator: Emulator, api_key: str
) -> None:
    form = aiohttp.FormData(default_to_multipart=True)
    form.add_field("uploadPath", "images")
    form.add_field("fileName", "a.jpg")
    status, body = await post_form(
        f"{emulator.base_url}/api/file-stream-upload", form, auth(api_key)
    )
    assert_error_envelope(status, body, 400)
    assert "file" in body["msg"]


async def test_a_base64_upload_without_base64data_is_answered_400(
    emulator: Emulator, api_key: str
) -> None:
    status, body = await post_json(
        f"{emulator.base_url}/api/file-base64-upload",
        {"uploadPath": "images", "fileName": "a.png"},
        auth(api_key),
    )
    assert_error_envelope(status, body, 400)
    assert "base64Data" in body["msg"]


async def test_invalid_base64_is_answered_400(emulator: Emulator, api_key: str) -> None:
    status, body = await upload_base64(emulator, api_key, "not base64 at all!!", file_name="a")
    assert_error_envelope(status, body, 400)


async def test_a_body_that_is_not_json_is_answered_400(emulator: Emulator, api_key: str) -> None:
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"{emulator.base_url}/api/file-base64-upload", data=b"{not json", headers=auth(api_key)
        ) as resp,
    ):
        assert_error_envelope(resp.status, await resp.json(), 400)


@pytest.mark.parametrize(
    ("upload_path", "file_name"),
    [
        ("images/../secrets", "a.png"),
        ("/etc", "a.png"),
        ("images", "../a.png"),
        ("images\x07", "a.png"),
        ("images", "a\nb.png"),
    ],
)
async def test_unsafe_upload_paths_and_file_names_are_answered_400(
    emulator: Emulator, api_key: str, upload_path: str, file_name: str
) -> None:
    status, body = await upload_base64(emulator, api_key, "aGVsbG8=", upload_path, file_name)
    assert_error_envelope(status, body, 400)


@pytest.mark.parametrize(
    "path", ["/api/file-base64-upload", "/api/file-stream-upload", "/api/file-url-upload"]
)
async def test_get_on_an_upload_endpoint_is_answered_405_in_the_envelope(
    emulator: Emulator, path: str
) -> None:
    async with aiohttp.ClientSession() as session, session.get(emulator.base_url + path) as resp:
        assert_error_envelope(resp.status, await resp.json(), 405)


async def test_an_unknown_path_is_answered_404_in_the_envelope(emulator: Emulator) -> None:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{emulator.base_url}/api/v1/file-upload") as resp,
    ):
        assert_error_envelope(resp.status, await resp.json(), 404)


async def test_a_file_url_that_does_not_answer_is_answered_400_naming_the_cause(
    emulator: Emulator, api_key: str
) -> None:
    status, body = await post_json(
        f"{emulator.base_url}/api/file-url-upload",
        {"fileUrl": f"http://127.0.0.1:{closed_port()}/a.jpg", "uploadPath": "images"},
        auth(api_key),
    )
    assert_error_envelope(status, body, 400)
    assert body["msg"] == "failed to fetch fileUrl: connection refused"


async def test_a_file_url_whose_origin_answers_404_is_answered_400(
    emulator: Emulator, api_key: str
) -> None:
    origin, base = await start_origin({"/other": bytes_handler(b"x")})
    try:
        status, body = await post_json(
            f"{emulator.base_url}/api/file-url-upload",
            {"fileUrl": f"{base}/missing.jpg", "uploadPath": "i"},
            auth(api_key),
        )
    finally:
        await origin.cleanup()
    assert_error_envelope(status, body, 400)
    assert "404" in body["msg"]


async def test_a_file_url_that_is_not_http_is_answered_400(
    emulator: Emulator, api_key: str
) -> None:
    status, body = await post_json(
        f"{emulator.base_url}/api/file-url-upload",
        {"fileUrl": "ftp://127.0.0.1/a.jpg", "uploadPath": "images"},
        auth(api_key),
    )
    assert_error_envelope(status, body, 400)
    assert "http" in body["msg"]


async def test_a_file_url_over_url_max_by_content_length_is_refused_before_its_body(
    tmp_path: Path, api_key: str
) -> None:
    release = asyncio.Event()

    async def announces_4096_sends_512(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Length": "4096"})
        await resp.prepare(request)
        await resp.write(b"x" * 512)
        await asyncio.wait_for(release.wait(), 10)  # the rest only once the test is done
        await resp.write(b"x" * 3584)
        return resp

    origin, base = await start_origin({"/big.bin": announces_4096_sends_512})
    try:
        async with Emulator(tmp_path / "d", api_key, url_max=1024, url_fetch_timeout=5) as emu:
            status, body = await post_json(
                f"{emu.base_url}/api/file-url-upload",
                {"fileUrl": f"{base}/big.bin", "uploadPath": "i"},
                auth(api_key),
            )
    finally:
        release.set()
        await origin.cleanup()
    assert_error_envelope(status, body, 400)
    assert "1024" in body["msg"]


async def test_a_file_url_over_url_max_without_content_length_is_refused_while_streaming(
    tmp_path: Path, api_key: str
) -> None:
    async def chunked(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        for _ in range(8):
            await resp.write(b"y" * 512)
        await resp.write_eof()
        return resp

    origin, base = await start_origin({"/big.bin": chunked})
    try:
        async with Emulator(tmp_path / "d", api_key, url_max=1024) as emu:
            status, body = await post_json(
                f"{emu.base_url}/api/file-url-upload",
                {"fileUrl": f"{base}/big.bin", "uploadPath": "i"},
                auth(api_key),
            )
            assert not list((tmp_path / "d" / "blobs").iterdir())
    finally:
        await origin.cleanup()
    assert_error_envelope(status, body, 400)


# -- uploads and naming ---------------------------------------------------------------------


async def test_a_data_url_is_decoded_and_its_type_kept(emulator: Emulator, api_key: str) -> None:
    data_url = "data:image/png;base64," + base64.b64encode(PNG_1X1).decode()
    status, body = await upload_base64(emulator, api_key, data_url, "images")
    assert status == 200
    assert body["data"]["mimeType"] == "image/png"
    assert body["data"]["fileName"].endswith(".png")
    assert (await get(body["data"]["downloadUrl"]))[1] == PNG_1X1


async def test_plain_base64_is_decoded(emulator: Emulator, api_key: str) -> None:
    status, body = await upload_base64(emulator, api_key, "aGVsbG8gd29ybGQ=", "docs", "hi.txt")
    assert status == 200
    assert body["data"]["fileSize"] == 11
    assert (await get(body["data"]["downloadUrl"]))[1] == b"hello world"


async def test_omitting_file_name_gives_a_random_name_and_a_second_copy(
    emulator: Emulator, api_key: str
) -> None:
    first = (await upload_base64(emulator, api_key, "aGVsbG8=", "docs"))[1]["data"]
    second = (await upload_base64(emulator, api_key, "aGVsbG8=", "docs"))[1]["data"]
    assert first["fileName"] != second["fileName"]
    assert first["downloadUrl"] != second["downloadUrl"]
    assert (await get(first["downloadUrl"]))[0] == 200
    assert (await get(second["downloadUrl"]))[0] == 200


async def test_a_random_name_keeps_the_extension_of_the_uploaded_file(
    emulator: Emulator, api_key: str
) -> None:
    form = aiohttp.FormData()
    form.add_field("file", b"%PDF-1.4", filename="report.pdf")
    form.add_field("uploadPath", "docs")
    status, body = await post_form(
        f"{emulator.base_url}/api/file-stream-upload", form, auth(api_key)
    )
    assert status == 200
    assert body["data"]["fileName"].endswith(".pdf")
    assert body["data"]["fileName"] != "report.pdf"
    assert body["data"]["originalName"] == "report.pdf"


async def test_the_same_upload_path_and_file_name_overwrites_and_the_old_link_answers_404(
    emulator: Emulator, api_key: str
) -> None:
    old = (await upload_base64(emulator, api_key, "b2xk", "docs", "same.txt"))[1]["data"]
    new = (await upload_base64(emulator, api_key, "bmV3", "docs", "same.txt"))[1]["data"]
    assert new["fileId"] != old["fileId"]
    assert (await get(new["downloadUrl"]))[:2] == (200, b"new")
    assert (await get(old["downloadUrl"]))[0] == 404


async def test_a_multipart_file_name_in_rfc5987_form_without_part_type_is_kept(
    emulator: Emulator, api_key: str
) -> None:
    boundary = "b0undary"
    body = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; '
        "filename=\"fallback.txt\"; filename*=UTF-8''r%C3%A9sum%C3%A9%20final.txt\r\n\r\n"
        f'contents\r\n--{boundary}\r\nContent-Disposition: form-data; name="uploadPath"\r\n\r\n'
        f"cv\r\n--{boundary}--\r\n"
    ).encode()
    headers = {**auth(api_key), "Content-Type": f"multipart/form-data; boundary={boundary}"}
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"{emulator.base_url}/api/file-stream-upload", data=body, headers=headers
        ) as resp,
    ):
        data = (await resp.json())["data"]
    assert data["originalName"] == "résumé final.txt"
    assert data["mimeType"] == "text/plain"
    assert data["uploadPath"] == "cv"


async def test_a_non_ascii_file_name_percent_encoded_by_aiohttp_is_decoded(
    emulator: Emulator, api_key: str
) -> None:
    form = aiohttp.FormData()
    form.add_field("file", b"xyz", filename="naïve file ü.png")
    form.add_field("uploadPath", "p")
    status, body = await post_form(
        f"{emulator.base_url}/api/file-stream-upload", form, auth(api_key)
    )
    assert status == 200
    assert body["data"]["originalName"] == "naïve file ü.png"


async def test_a_file_name_with_spaces_and_non_ascii_is_served_at_its_quoted_link(
    emulator: Emulator, api_key: str
) -> None:
    status, body = await upload_base64(emulator, api_key, "aGVsbG8=", "a b/ç", "ü x.txt")
    assert status == 200
    assert "/a%20b/%C3%A7/%C3%BC%20x.txt" in body["data"]["downloadUrl"]
    assert (await get(body["data"]["downloadUrl"]))[:2] == (200, b"hello")


async def test_a_64_mib_chunked_multipart_upload_is_stored_byte_exact(
    emulator: Emulator, api_key: str
) -> None:
    boundary = "big-boundary"
    block = os.urandom(1024 * 1024)
    digest = hashlib.sha256()

    async def body() -> AsyncIterator[bytes]:
        # The file part comes first: the names arrive after the bytes.
        yield (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; '
            'filename="big.bin"\r\nContent-Type: application/octet-stream\r\n\r\n'
        ).encode()
        for i in range(64):
            piece = bytes([i]) + block[1:]
            digest.update(piece)
            yield piece
        yield (
            f'\r\n--{boundary}\r\nContent-Disposition: form-data; name="uploadPath"\r\n\r\n'
            f'big\r\n--{boundary}\r\nContent-Disposition: form-data; name="fileName"\r\n\r\n'
            f"big.bin\r\n--{boundary}--\r\n"
        ).encode()

    headers = {**auth(api_key), "Content-Type": f"multipart/form-data; boundary={boundary}"}
    async with aiohttp.ClientSession() as session:
        async with session.post(
            f"{emulator.base_url}/api/file-stream-upload", data=body(), headers=headers
        ) as resp:
            assert resp.request_info.headers.get("Transfer-Encoding") == "chunked"
            data = (await resp.json())["data"]
        assert (data["fileSize"], data["fileName"]) == (64 * 1024 * 1024, "big.bin")
        received = hashlib.sha256()
        async with session.get(data["downloadUrl"]) as download:
            async for chunk in download.content.iter_chunked(1024 * 1024):
                received.update(chunk)
    assert received.hexdigest() == digest.hexdigest()


# -- response shapes ------------------------------------------------------------------------


async def test_the_quickstart_shape_has_every_documented_field(
    emulator: Emulator, api_key: str
) -> None:
    status, body = await upload_base64(emulator, api_key, "aGVsbG8=", "docs", "a.txt")
    assert (status, body["success"], body["code"]) == (200, True, 200)
    assert body["msg"] == "File uploaded successfully"
    data = body["data"]
    assert set(data) == {
        "fileId",
        "fileName",
        "originalName",
        "fileSize",
        "mimeType",
        "uploadPath",
        "fileUrl",
        "downloadUrl",
        "uploadTime",
        "expiresAt",
    }
    assert ISO_MS.match(data["uploadTime"]) and ISO_MS.match(data["expiresAt"])


async def test_the_endpoint_shape_has_file_path_and_uploaded_at_and_no_expires_at(
    tmp_path: Path, api_key: str
) -> None:
    async with Emulator(tmp_path / "d", api_key, response_shape="endpoint") as emu:
        status, body = await upload_base64(emu, api_key, "aGVsbG8=", "docs", "a.txt")
    assert status == 200
    data = body["data"]
    assert set(data) == {
        "fileName",
        "filePath",
        "downloadUrl",
        "fileSize",
        "mimeType",
        "uploadedAt",
    }
    assert data["filePath"] == "docs/a.txt"
    assert ISO_MS.match(data["uploadedAt"])


# -- downloads and expiry -------------------------------------------------------------------


async def test_before_expiry_the_link_serves_the_bytes_with_length_and_type(
    emulator: Emulator, api_key: str
) -> None:
    data_url = "data:image/png;base64," + base64.b64encode(PNG_1X1).decode()
    url = (await upload_base64(emulator, api_key, data_url, "img", "dot.png"))[1]["data"][
        "downloadUrl"
    ]
    emulator.advance_clock(3 * DAY - 60)
    status, data, headers = await get(url)
    assert (status, data) == (200, PNG_1X1)
    assert headers["Content-Length"] == str(len(PNG_1X1))
    assert headers["Content-Type"] == "image/png"


async def test_head_on_a_link_answers_length_without_a_body(
    emulator: Emulator, api_key: str
) -> None:
    url = (await upload_base64(emulator, api_key, "aGVsbG8=", "d", "a.txt"))[1]["data"][
        "downloadUrl"
    ]
    status, data, headers = await get(url, "HEAD")
    assert (status, data, headers["Content-Length"]) == (200, b"", "5")


async def test_after_the_clock_passes_expires_at_the_link_answers_404(
    emulator: Emulator, api_key: str
) -> None:
    url = (await upload_base64(emulator, api_key, "aGVsbG8=", "d", "a.txt"))[1]["data"][
        "downloadUrl"
    ]
    emulator.advance_clock(3 * DAY + 1)
    assert (await get(url))[0] == 404


async def test_a_range_of_the_first_byte_is_answered_206_with_content_range(
    emulator: Emulator, api_key: str
) -> None:
    url = (await upload_base64(emulator, api_key, "aGVsbG8=", "d", "a.txt"))[1]["data"][
        "downloadUrl"
    ]
    status, data, headers = await get(url, headers={"Range": "bytes=0-0"})
    assert (status, data) == (206, b"h")
    assert headers["Content-Range"] == "bytes 0-0/5"
    assert headers["Content-Length"] == "1"


@pytest.mark.parametrize("method", ["GET", "HEAD"])
async def test_an_expired_link_answers_404_to_get_and_head(
    emulator: Emulator, api_key: str, method: str
) -> None:
    url = (await upload_base64(emulator, api_key, "aGVsbG8=", "d", "a.txt"))[1]["data"][
        "downloadUrl"
    ]
    emulator.advance_clock(3 * DAY + 1)
    status, data, _ = await get(url, method)
    assert_link_gone(status, data, method)


@pytest.mark.parametrize("method", ["GET", "HEAD"])
@pytest.mark.parametrize("path", ["/files/0123456789abcdef01234567/d/a.txt", "/files/x"])
async def test_a_missing_link_answers_404_to_get_and_head(
    emulator: Emulator, method: str, path: str
) -> None:
    status, data, _ = await get(emulator.base_url + path, method)
    assert_link_gone(status, data, method)


# -- a lifetime shorter than expiresAt -------------------------------------------------------


@pytest.mark.parametrize("method", ["GET", "HEAD"])
async def test_past_its_lifetime_a_file_vanishes_though_expires_at_is_later(
    tmp_path: Path, api_key: str, method: str
) -> None:
    async with Emulator(tmp_path / "d", api_key, lifetime=HOUR) as emu:
        url = (await upload_base64(emu, api_key, "aGVsbG8=", "d", "a.txt"))[1]["data"][
            "downloadUrl"
        ]
        emu.advance_clock(HOUR + 1)
        status, data, _ = await get(url, method)
        assert_link_gone(status, data, method)


async def test_within_its_lifetime_a_file_is_served(tmp_path: Path, api_key: str) -> None:
    async with Emulator(tmp_path / "d", api_key, lifetime=HOUR) as emu:
        url = (await upload_base64(emu, api_key, "aGVsbG8=", "d", "a.txt"))[1]["data"][
            "downloadUrl"
        ]
        emu.advance_clock(HOUR - 60)
        assert (await get(url))[:2] == (200, b"hello")


async def test_a_lifetime_leaves_expires_at_at_upload_time_plus_ttl(
    tmp_path: Path, api_key: str
) -> None:
    async with Emulator(tmp_path / "d", api_key, lifetime=HOUR) as emu:
        data = (await upload_base64(emu, api_key, "aGVsbG8=", "d", "a.txt"))[1]["data"]
    stated = datetime.fromisoformat(data["expiresAt"]) - datetime.fromisoformat(data["uploadTime"])
    assert stated.total_seconds() == 3 * DAY


async def test_a_restart_sweeps_away_files_past_their_lifetime(
    tmp_path: Path, api_key: str
) -> None:
    async with Emulator(tmp_path / "d", api_key, lifetime=HOUR) as first:
        file_id = (await upload_base64(first, api_key, "aGVsbG8=", "d", "a.txt"))[1]["data"][
            "fileId"
        ]
        first.advance_clock(HOUR + 1)
    async with Emulator(tmp_path / "d", api_key, lifetime=HOUR) as second:
        assert second.stored_file(file_id) is None


async def test_the_admin_clock_endpoint_moves_the_clock_forward(
    emulator: Emulator, api_key: str
) -> None:
    status, body = await post_json(
        f"{emulator.base_url}/_emulator/clock", {"advance": 7200}, auth(api_key)
    )
    assert status == 200
    assert body["offset"] == 7200
    assert emulator.clock_offset == 7200


async def test_the_admin_endpoints_need_the_key(emulator: Emulator) -> None:
    status, body = await post_json(f"{emulator.base_url}/_emulator/clock", {"advance": 1}, {})
    assert_error_envelope(status, body, 401)
    assert emulator.clock_offset == 0


async def answer_of_kind(emu: Emulator, key: str, kind: str) -> tuple[int, dict[str, str]]:
    """Status and headers of one answer of the given kind."""
    if kind in ("upload", "error"):
        body = {"base64Data": "aGVsbG8=", "uploadPath": "d", "fileName": "a.txt"}
        headers = auth(key if kind == "upload" else "wrong-key")
        url = f"{emu.base_url}/api/file-base64-upload"
        async with (
            aiohttp.ClientSession() as session,
            session.post(url, json=body, headers=headers) as r,
        ):
            return r.status, dict(r.headers)
    if kind == "link":
        link = (await upload_base64(emu, key, "aGVsbG8=", "d", "a.txt"))[1]["data"]["downloadUrl"]
        status, _, headers = await get(link)
        return status, headers
    path = {"missing link": "/files/nope/d/a.txt", "admin": "/_emulator/clock"}.get(
        kind, "/nowhere"
    )
    status, _, headers = await get(emu.base_url + path, headers=auth(key))
    return status, headers


@pytest.mark.parametrize(
    ("kind", "expected_status"),
    [
        ("upload", 200),
        ("error", 401),
        ("link", 200),
        ("missing link", 404),
        ("admin", 200),
        ("unknown path", 404),
    ],
)
async def test_every_answer_carries_a_date_header_on_the_emulator_clock(
    emulator: Emulator, api_key: str, kind: str, expected_status: int
) -> None:
    emulator.advance_clock(DAY)
    status, headers = await answer_of_kind(emulator, api_key, kind)
    assert status == expected_status
    assert IMF_FIXDATE.match(headers["Date"]), headers["Date"]
    stated = parsedate_to_datetime(headers["Date"]).timestamp()
    assert abs(stated - (time.time() + DAY)) < 60


# -- persistence ----------------------------------------------------------------------------


async def test_stored_files_survive_a_restart_on_the_same_data_dir(
    tmp_path: Path, api_key: str
) -> None:
    async with Emulator(tmp_path / "d", api_key) as first:
        url = (await upload_base64(first, api_key, "aGVsbG8=", "keep", "me.txt"))[1]["data"][
            "downloadUrl"
        ]
    path = url.split("/", 3)[3]
    async with Emulator(tmp_path / "d", api_key) as second:
        assert (await get(f"{second.base_url}/{path}"))[:2] == (200, b"hello")


async def upload_stream(emu: Emulator, key: str, data: bytes, name: str) -> str:
    form = aiohttp.FormData()
    form.add_field("uploadPath", "big")
    form.add_field("fileName", name)
    form.add_field("file", data, filename=name)
    status, body = await post_form(f"{emu.base_url}/api/file-stream-upload", form, auth(key))
    assert status == 200, body
    return str(body["data"]["downloadUrl"]).split("/", 3)[3]


async def test_small_and_large_files_serve_their_exact_bytes_after_a_restart(
    tmp_path: Path, api_key: str
) -> None:
    # Small blobs live in the metadata store, large ones in files of their own.
    sizes = {"one.bin": 1, "edge.bin": 64 * 1024, "past.bin": 64 * 1024 + 1, "big.bin": 300_000}
    contents = {name: os.urandom(size) for name, size in sizes.items()}
    async with Emulator(tmp_path / "d", api_key) as first:
        paths = {
            name: await upload_stream(first, api_key, data, name) for name, data in contents.items()
        }
        for name, path in paths.items():  # the first download of each, before the restart
            assert (await get(f"{first.base_url}/{path}"))[:2] == (200, contents[name])
    async with Emulator(tmp_path / "d", api_key) as second:
        for name, path in paths.items():
            assert (await get(f"{second.base_url}/{path}"))[:2] == (200, contents[name])


async def test_a_restart_moves_the_live_blobs_out_of_a_mostly_overwritten_pack(
    tmp_path: Path, api_key: str
) -> None:
    versions = [bytes([i]) * 100 for i in range(4)]
    async with Emulator(tmp_path / "d", api_key) as first:
        kept = await upload_stream(first, api_key, b"kept", "kept.bin")
        for data in versions:  # one live blob of five in this start's pack
            latest = await upload_stream(first, api_key, data, "over.bin")
    (first_pack,) = (tmp_path / "d" / "packs").iterdir()
    async with Emulator(tmp_path / "d", api_key) as second:
        assert not first_pack.exists()
        assert (await get(f"{second.base_url}/{kept}"))[:2] == (200, b"kept")
        assert (await get(f"{second.base_url}/{latest}"))[:2] == (200, versions[-1])


async def test_overwriting_a_downloaded_small_file_removes_the_blob_its_download_wrote(
    tmp_path: Path, api_key: str
) -> None:
    async with Emulator(tmp_path / "d", api_key) as emu:
        first = await upload_stream(emu, api_key, b"first", "a.bin")
        assert (await get(f"{emu.base_url}/{first}"))[:2] == (200, b"first")
        assert len(list((tmp_path / "d" / "blobs").iterdir())) == 1
        await upload_stream(emu, api_key, b"second", "a.bin")
        assert not list((tmp_path / "d" / "blobs").iterdir())


async def test_an_upload_cancelled_while_its_batch_commits_cancels_no_other(
    tmp_path: Path,
) -> None:
    store = emulator_module._Store(tmp_path / "d")
    now = time.time()
    one, other = (
        StoredFile(file_id, "p", f"{file_id}.bin", None, 1, "text/plain", now, now + DAY)
        for file_id in ("0a", "0b")
    )
    try:
        cancelled = store.put(one, b"1", store.new_tmp())
        waiting = store.put(other, b"2", store.new_tmp())
        cancelled.cancel()
        await waiting
        assert store.get("0b") == other
    finally:
        store.close()


async def test_concurrent_uploads_of_one_name_leave_exactly_one_link(
    emulator: Emulator, api_key: str
) -> None:
    datas = [base64.b64encode(bytes([i]) * 10).decode() for i in range(8)]
    answers = await asyncio.gather(
        *(upload_base64(emulator, api_key, data, "same", "name.bin") for data in datas)
    )
    statuses = [(await get(body["data"]["downloadUrl"]))[0] for _, body in answers]
    assert sorted(statuses) == [200] + [404] * 7


async def test_files_past_the_metadata_kept_in_memory_still_serve_their_bytes(
    tmp_path: Path, api_key: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(emulator_module, "KNOWN_KEPT", 2)
    async with Emulator(tmp_path / "d", api_key) as emu:
        urls = [
            (await upload_base64(emu, api_key, base64.b64encode(bytes([i])).decode(), "k"))[1]
            for i in range(4)
        ]
        for i, body in enumerate(urls):
            assert (await get(body["data"]["downloadUrl"]))[:2] == (200, bytes([i]))


async def test_a_data_dir_from_before_small_blobs_lived_in_rows_still_serves_its_files(
    tmp_path: Path, api_key: str
) -> None:
    data_dir = tmp_path / "d"
    (data_dir / "blobs").mkdir(parents=True)
    (data_dir / "blobs" / "0123abcd").write_bytes(b"old bytes")
    with contextlib.closing(sqlite3.connect(data_dir / "emulator.sqlite3")) as db, db:
        db.execute(
            "CREATE TABLE files (file_id TEXT PRIMARY KEY, upload_path TEXT NOT NULL,"
            " file_name TEXT NOT NULL, original_name TEXT, size INTEGER NOT NULL,"
            " mime_type TEXT NOT NULL, uploaded_at REAL NOT NULL, expires_at REAL NOT NULL,"
            " UNIQUE (upload_path, file_name))"
        )
        now = time.time()
        db.execute(
            "INSERT INTO files VALUES ('0123abcd', 'old', 'a.bin', NULL, 9,"
            " 'application/octet-stream', ?, ?)",
            (now, now + DAY),
        )
    async with Emulator(data_dir, api_key) as emu:
        assert (await get(f"{emu.base_url}/files/0123abcd/old/a.bin"))[:2] == (200, b"old bytes")
        await upload_base64(emu, api_key, "aGVsbG8=", "old", "a.bin")
        assert (await get(f"{emu.base_url}/files/0123abcd/old/a.bin"))[0] == 404


async def test_the_clock_offset_survives_a_restart(tmp_path: Path, api_key: str) -> None:
    async with Emulator(tmp_path / "d", api_key) as first:
        first.advance_clock(DAY)
    async with Emulator(tmp_path / "d", api_key) as second:
        assert second.clock_offset == DAY


async def test_the_access_log_has_one_line_per_request_and_never_the_key(
    tmp_path: Path, api_key: str
) -> None:
    log = io.StringIO()
    async with Emulator(tmp_path / "d", api_key, access_log=log) as emu:
        await upload_base64(emu, api_key, "aGVsbG8=", "docs", "a.txt")
        await upload_base64(emu, "wrong-key", "aGVsbG8=", "docs", "a.txt")
    lines = log.getvalue().splitlines()
    assert len(lines) == 2
    assert "status=200" in lines[0] and "status=401" in lines[1]
    assert api_key not in log.getvalue() and "wrong-key" not in log.getvalue()


# -- request log and faults -----------------------------------------------------------------


async def test_every_upload_request_is_logged_failed_ones_included(
    emulator: Emulator, api_key: str
) -> None:
    await upload_base64(emulator, api_key, "aGVsbG8=", "docs", "a.txt")
    await upload_base64(emulator, api_key, "!!", "docs", "b.txt")
    await get(f"{emulator.base_url}/api/file-stream-upload")
    assert emulator.requests == [
        EmulatorRequest("base64", "docs", "a.txt", None, 200, 5),
        EmulatorRequest("base64", "docs", "b.txt", None, 400, None),
        EmulatorRequest("stream", None, None, None, 405, None),
    ]
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{emulator.base_url}/_emulator/requests", headers=auth(api_key)) as resp,
    ):
        assert [r["status"] for r in await resp.json()] == [200, 400, 405]


async def test_a_logged_upload_carries_when_it_arrived_and_when_it_was_answered(
    emulator: Emulator, api_key: str
) -> None:
    async def slow(request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(0.3)
        return web.Response(body=b"late", content_type="text/plain")

    origin, origin_base = await start_origin({"/slow.txt": slow})
    before = time.time()
    try:
        status, _ = await post_json(
            f"{emulator.base_url}/api/file-url-upload",
            {"fileUrl": f"{origin_base}/slow.txt", "uploadPath": "d"},
            auth(api_key),
        )
    finally:
        await origin.cleanup()
    after = time.time()
    (logged,) = emulator.requests
    assert status == 200
    assert before <= logged.received_at < logged.answered_at <= after
    assert logged.answered_at - logged.received_at >= 0.25  # the origin took 0.3 s


async def test_download_requests_go_to_the_link_log_not_the_upload_log(
    emulator: Emulator, api_key: str
) -> None:
    url = (await upload_base64(emulator, api_key, "aGVsbG8=", "d", "a.txt"))[1]["data"][
        "downloadUrl"
    ]
    await get(url)
    await get(url, "HEAD")
    assert [r.endpoint for r in emulator.requests] == ["base64"]
    assert [r.method for r in emulator.link_requests] == ["GET", "HEAD"]


async def test_the_link_log_records_status_bytes_sent_and_range(
    emulator: Emulator, api_key: str
) -> None:
    url = (await upload_base64(emulator, api_key, "aGVsbG8=", "d", "a b.txt"))[1]["data"][
        "downloadUrl"
    ]
    path = urlsplit(url).path
    before = time.time()
    await get(url)
    await get(url, "HEAD")
    await get(url, headers={"Range": "bytes=0-0"})
    await get(f"{emulator.base_url}/files/nope/d/a.txt")
    after = time.time()
    assert [
        (r.method, r.path, r.status, r.bytes_sent, r.range) for r in emulator.link_requests
    ] == [
        ("GET", path, 200, 5, None),
        ("HEAD", path, 200, 0, None),
        ("GET", path, 206, 1, "bytes=0-0"),
        ("GET", "/files/nope/d/a.txt", 404, 0, None),
    ]
    times = [r.received_at for r in emulator.link_requests]
    assert before <= times[0] <= times[1] <= times[2] <= times[3] <= after


async def test_an_injected_503_with_retry_after_is_answered_then_service_resumes(
    emulator: Emulator, api_key: str
) -> None:
    emulator.inject_faults(503, 1, endpoint="base64", retry_after=2)
    async with aiohttp.ClientSession() as session:
        url = f"{emulator.base_url}/api/file-base64-upload"
        body = {"base64Data": "aGVsbG8=", "uploadPath": "d", "fileName": "a.txt"}
        async with session.post(url, json=body, headers=auth(api_key)) as first:
            assert first.headers["Retry-After"] == "2"
            assert_error_envelope(first.status, await first.json(), 503)
        async with session.post(url, json=body, headers=auth(api_key)) as second:
            assert second.status == 200


async def test_an_injected_body_code_answers_http_200_with_the_error_in_the_body(
    emulator: Emulator, api_key: str
) -> None:
    emulator.inject_faults(500, 1, body_code=500)
    status, body = await upload_base64(emulator, api_key, "aGVsbG8=", "d", "a.txt")
    assert status == 200
    assert (body["success"], body["code"], body["data"]) == (False, 500, None)


async def test_faults_injected_over_http_apply_only_to_their_endpoint(
    emulator: Emulator, api_key: str
) -> None:
    status, _ = await post_json(
        f"{emulator.base_url}/_emulator/faults",
        {"status": 429, "count": 1, "endpoint": "url"},
        auth(api_key),
    )
    assert status == 200
    assert (await upload_base64(emulator, api_key, "aGVsbG8=", "d", "a.txt"))[0] == 200
    status, body = await post_json(
        f"{emulator.base_url}/api/file-url-upload",
        {"fileUrl": "http://127.0.0.1:1/a", "uploadPath": "d"},
        auth(api_key),
    )
    assert_error_envelope(status, body, 429)


# -- rate limit ----------------------------------------------------------------------------


async def upload_hello(emu: Emulator, key: str) -> tuple[int, Json, dict[str, str]]:
    """A small base64 upload; its status, body and headers."""
    body = {"base64Data": "aGVsbG8=", "uploadPath": "d", "fileName": "a.txt"}
    url = f"{emu.base_url}/api/file-base64-upload"
    async with (
        aiohttp.ClientSession() as session,
        session.post(url, json=body, headers=auth(key)) as resp,
    ):
        return resp.status, await resp.json(), dict(resp.headers)


async def test_requests_beyond_the_rate_limit_are_answered_429_with_retry_after(
    tmp_path: Path, api_key: str
) -> None:
    async with Emulator(tmp_path / "d", api_key, rate_limit=2) as emu:
        answers = [await upload_hello(emu, api_key) for _ in range(3)]
    assert [status for status, _, _ in answers] == [200, 200, 429]
    status, body, headers = answers[2]
    assert_error_envelope(status, body, 429)
    assert headers["Retry-After"] == "1"


async def test_rate_limited_uploads_appear_in_the_request_log_as_429(
    tmp_path: Path, api_key: str
) -> None:
    async with Emulator(tmp_path / "d", api_key, rate_limit=1) as emu:
        await upload_hello(emu, api_key)
        await upload_hello(emu, api_key)
    assert [r.status for r in emu.requests] == [200, 429]
    assert emu.requests[1].received_at <= emu.requests[1].answered_at


async def test_download_link_requests_count_toward_the_rate_limit(
    tmp_path: Path, api_key: str
) -> None:
    async with Emulator(tmp_path / "d", api_key, rate_limit=2) as emu:
        url = (await upload_hello(emu, api_key))[1]["data"]["downloadUrl"]
        assert (await get(url))[0] == 200
        status, data, headers = await get(url, "HEAD")
    assert (status, data, headers["Retry-After"]) == (429, b"", "1")
    assert [r.status for r in emu.link_requests] == [200, 429]


async def test_admin_routes_are_never_rate_limited(tmp_path: Path, api_key: str) -> None:
    async with Emulator(tmp_path / "d", api_key, rate_limit=1) as emu:
        assert (await upload_hello(emu, api_key))[0] == 200
        clock = f"{emu.base_url}/_emulator/clock"
        assert (await post_json(clock, {"advance": 1}, auth(api_key)))[0] == 200
        assert (await get(clock, headers=auth(api_key)))[0] == 200
        assert (await get(f"{emu.base_url}/_emulator/requests", headers=auth(api_key)))[0] == 200


async def test_the_rate_limit_answers_before_the_key_is_checked(
    tmp_path: Path, api_key: str
) -> None:
    async with Emulator(tmp_path / "d", api_key, rate_limit=1) as emu:
        assert (await upload_hello(emu, api_key))[0] == 200
        assert (await upload_hello(emu, "wrong-key"))[0] == 429


async def test_after_retry_after_seconds_the_rate_limit_accepts_again(
    tmp_path: Path, api_key: str
) -> None:
    async with Emulator(tmp_path / "d", api_key, rate_limit=1) as emu:
        assert (await upload_hello(emu, api_key))[0] == 200
        status, _, headers = await upload_hello(emu, api_key)
        assert status == 429
        await asyncio.sleep(float(headers["Retry-After"]))
        assert (await upload_hello(emu, api_key))[0] == 200


async def test_refused_requests_do_not_count_toward_the_rate_limit(
    tmp_path: Path, api_key: str
) -> None:
    async with Emulator(tmp_path / "d", api_key, rate_limit=1) as emu:
        assert (await upload_hello(emu, api_key))[0] == 200
        accepted_by = time.monotonic()
        await asyncio.sleep(0.5)
        assert (await upload_hello(emu, api_key))[0] == 429
        # The first one has left the window; the refused one, 0.5 s younger, would not have.
        await asyncio.sleep(max(0.0, accepted_by + 1.2 - time.monotonic()))
        assert (await upload_hello(emu, api_key))[0] == 200


# -- the command line -----------------------------------------------------------------------


def test_the_cli_refuses_to_start_without_a_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("KIE_API_KEY", raising=False)
    assert main(["emulator", "--port", "0", "--data-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "KIE_API_KEY" in err


def test_the_cli_answers_a_bad_duration_with_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["emulator", "--data-dir", str(tmp_path), "--api-key", "k", "--ttl", "soon"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("migrator: --ttl:")


@pytest.mark.parametrize("value", ["soon", "0s"])
def test_the_cli_answers_a_bad_lifetime_with_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], value: str
) -> None:
    code = main(["emulator", "--data-dir", str(tmp_path), "--api-key", "k", "--lifetime", value])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("migrator: --lifetime:")


async def test_the_cli_lifetime_deletes_files_before_their_expires_at(
    tmp_path: Path, api_key: str
) -> None:
    emu = await start_emulator_process(tmp_path / "data", api_key, "--lifetime", "1h")
    try:
        status, body = await post_json(
            f"{emu.base_url}/api/file-base64-upload",
            {"base64Data": "aGVsbG8=", "uploadPath": "d", "fileName": "a.txt"},
            auth(api_key),
        )
        assert status == 200
        await post_json(f"{emu.base_url}/_emulator/clock", {"advance": HOUR + 1}, auth(api_key))
        assert (await get(body["data"]["downloadUrl"]))[0] == 404
    finally:
        await stop_emulator_process(emu)


@pytest.mark.parametrize("value", ["fast", "0.5", "inf"])
def test_the_cli_answers_a_bad_rate_limit_with_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], value: str
) -> None:
    code = main(["emulator", "--data-dir", str(tmp_path), "--api-key", "k", "--rate-limit", value])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("migrator: --rate-limit:")


async def test_the_cli_rate_limit_answers_429_beyond_n_requests_a_second(
    tmp_path: Path, api_key: str
) -> None:
    emu = await start_emulator_process(tmp_path / "data", api_key, "--rate-limit", "1")
    try:
        link = f"{emu.base_url}/files/0123456789abcdef01234567/d/a.txt"
        assert [(await get(link))[0] for _ in range(2)] == [404, 429]
    finally:
        await stop_emulator_process(emu)


async def test_the_cli_takes_the_key_from_kie_api_key(tmp_path: Path, api_key: str) -> None:
    args = ["--port", "0", "--data-dir", str(tmp_path), "--clock-offset", "70h"]
    proc = await start_cli("emulator", *args, key=api_key, cwd=REPO_ROOT, stderr=None)
    assert proc.stdout is not None
    try:
        base = (await asyncio.wait_for(proc.stdout.readline(), 15)).decode().split()[-1]
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"{base}/_emulator/clock", headers=auth(api_key)) as resp,
        ):
            assert (await resp.json())["offset"] == 70 * 3600
    finally:
        proc.terminate()
        assert await asyncio.wait_for(proc.wait(), 10) == 0


# -- memory ---------------------------------------------------------------------------------


async def test_a_256_mib_stream_upload_keeps_the_emulator_peak_rss_under_150_mb() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(REPO_ROOT / "benchmarks" / "emulator_rss.py"),
        "--size",
        "256MiB",
        "--limit",
        "150MB",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=migrator_env(),
    )
    out, err = await asyncio.wait_for(proc.communicate(), 90)
    match = re.search(rb"VmHWM\): ([\d.]+) MB", out)
    assert match, f"no peak RSS reported: {out!r} {err!r}"
    assert float(match.group(1)) < 150
    assert proc.returncode == 0


async def test_a_bounded_request_log_keeps_only_the_latest_requests(
    tmp_path: Path, api_key: str
) -> None:
    async with Emulator(tmp_path / "data", api_key, keep_requests=2) as emu:
        for name in ("a.txt", "b.txt", "c.txt"):
            status, _ = await upload_base64(emu, api_key, "aGk=", file_name=name)
            assert status == 200
        assert [r.file_name for r in emu.requests] == ["b.txt", "c.txt"]


async def test_a_bounded_link_log_keeps_only_the_latest_link_requests(
    tmp_path: Path, api_key: str
) -> None:
    async with Emulator(tmp_path / "data", api_key, keep_requests=2) as emu:
        url = (await upload_base64(emu, api_key, "aGk=", file_name="a.txt"))[1]["data"][
            "downloadUrl"
        ]
        for method in ("GET", "HEAD", "GET"):
            await get(url, method)
        assert [(r.method, r.bytes_sent) for r in emu.link_requests] == [("HEAD", 0), ("GET", 2)]


@given(st.floats(min_value=-1e10, max_value=1e10))
def test_iso_ms_writes_a_timestamp_as_datetime_does(timestamp: float) -> None:
    moment = datetime.fromtimestamp(timestamp, tz=UTC).replace(tzinfo=None)
    assert iso_ms(timestamp) == moment.isoformat(timespec="milliseconds") + "Z"


SEGMENT = st.text(st.characters(blacklist_categories=["Cs"], blacklist_characters="/"), min_size=1)


@given(st.lists(SEGMENT, min_size=1, max_size=4))
def test_download_path_quotes_each_segment_whole(segments: list[str]) -> None:
    *folders, name = segments
    stored = StoredFile("0a1b", "/".join(folders), name, None, 1, "text/plain", 0.0, 1.0)
    expected = "/".join(quote(segment, safe="") for segment in ["0a1b", *segments])
    assert download_path(stored) == "/files/" + expected


STORED_FILES = st.builds(
    StoredFile,
    file_id=st.text(),
    upload_path=st.text(st.characters(blacklist_categories=["Cs"])),
    file_name=SEGMENT,
    original_name=st.none() | SEGMENT,
    size=st.integers(min_value=0),
    mime_type=st.text(st.characters(blacklist_categories=["Cs"])),
    uploaded_at=st.floats(min_value=0, max_value=4e9),
    expires_at=st.floats(min_value=0, max_value=4e9),
)


@given(STORED_FILES, st.sampled_from(["http://127.0.0.1:1", 'http://"x":2']))
def test_a_success_answer_is_json_dumps_of_the_quickstart_shape(
    stored: StoredFile, base_url: str
) -> None:
    url = base_url + download_path(stored)
    data = {
        "fileId": stored.file_id,
        "fileName": stored.file_name,
        "originalName": stored.original_name or stored.file_name,
        "fileSize": stored.size,
        "mimeType": stored.mime_type,
        "uploadPath": stored.upload_path,
        "fileUrl": url,
        "downloadUrl": url,
        "uploadTime": iso_ms(stored.uploaded_at),
        "expiresAt": iso_ms(stored.expires_at),
    }
    envelope = {"success": True, "code": 200, "msg": "File uploaded successfully", "data": data}
    assert success_body(stored, base_url, "quickstart") == json.dumps(envelope).encode()


@given(STORED_FILES)
def test_a_success_answer_is_json_dumps_of_the_endpoint_shape(stored: StoredFile) -> None:
    base_url = "http://127.0.0.1:1"
    data = {
        "fileName": stored.file_name,
        "filePath": stored.remote_path,
        "downloadUrl": base_url + download_path(stored),
        "fileSize": stored.size,
        "mimeType": stored.mime_type,
        "uploadedAt": iso_ms(stored.uploaded_at),
    }
    envelope = {"success": True, "code": 200, "msg": "File uploaded successfully", "data": data}
    assert success_body(stored, base_url, "endpoint") == json.dumps(envelope).encode()


def stdlib_base64(payload: str) -> bytes | str:
    """What the service makes of a plain `base64Data`, by the standard library's strict
    decoder (whitespace dropped when it refuses it), or "refused"."""
    try:
        try:
            data = base64.b64decode(payload, validate=True)
        except ValueError:
            data = base64.b64decode("".join(payload.split()), validate=True)
    except ValueError:
        return "refused"
    return data if data and payload.strip() else "refused"


def emulator_base64(payload: str) -> bytes | str:
    try:
        return decode_base64_data(payload)[0]
    except Exception:  # the emulator's 400
        return "refused"


BASE64_PAYLOADS = st.binary(max_size=64).map(
    lambda data: base64.b64encode(data).decode()
) | st.text(alphabet="QUJDYWJj+/=09 \n\té", max_size=24)


@given(BASE64_PAYLOADS)
def test_base64_data_decodes_as_the_standard_library_strictly_does(payload: str) -> None:
    assert emulator_base64(payload) == stdlib_base64(payload)


@given(st.text(max_size=16) | st.from_regex(r"[a-z]{1,4}(\.[A-Za-z0-9]{0,4}){0,3}", fullmatch=True))
def test_a_stored_name_gets_the_type_mimetypes_guesses_for_it(name: str) -> None:
    guessed = mimetypes.guess_type(name, strict=False)[0]
    assert pick_mime_type(name, None) == (guessed or "application/octet-stream")
