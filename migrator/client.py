"""The client of the kie.ai File Upload API: three upload calls, one answer parser.

`parse_response` is the pure heart: it turns (status, body, headers) into an
`UploadReceipt` or one of the `UploadError`s of `migrator.errors`, tolerating both
documented shapes of the success envelope. `UploadClient` only speaks HTTP: it
builds the bodies (JSON for base64 and URL uploads, a hand-built streamed
multipart body for stream uploads), maps transport failures to `RetryableError`,
and checks that the service stored as many bytes as were sent. It never records,
never retries (the runner does both) and never shares code with the emulator.

Every error message is one line, at most ~300 characters, and never contains the
API key or any request header.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import email.utils
import errno
import functools
import json
import math
import mimetypes
import os
import re
import secrets
import socket
import stat
import threading
import time
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Protocol
from urllib.parse import quote

from migrator.errors import (
    AuthRejectedError,
    EndpointError,
    NoServiceError,
    NotTheApiError,
    PermanentError,
    RetryableError,
    SourceChangedError,
    UntrustedCertificateError,
    UploadError,
)
from migrator.model import UploadReceipt
from migrator.naming import file_type, printable
from migrator.units import parse_iso

if TYPE_CHECKING:  # aiohttp is imported where a request is made: a run with nothing to
    import aiohttp  # send never loads it

BASE64_ENDPOINT = "/api/file-base64-upload"
STREAM_ENDPOINT = "/api/file-stream-upload"
URL_ENDPOINT = "/api/file-url-upload"

DEFAULT_CHUNK_SIZE = 256 * 1024
READ_SIZE = 1024 * 1024  # of a local file, read (and hashed) per trip to a thread, at least
# Read ahead shared by the local files being sent at once: a file alone is read 4 MiB a
# trip (a quarter of the trips, and 10 % less CPU a GiB on two busy cores, than 1 MiB),
# sixteen at once 1 MiB each; each holds two reads, so at most max(8 MiB, 2 MiB a file).
READ_BUDGET = 4 * READ_SIZE

Chunk = bytes | memoryview  # a piece of a body; a view when it is part of a larger read


class Digest(Protocol):
    """What `upload_file` updates with the bytes it reads: a hashlib hash."""

    def update(self, data: bytes, /) -> None: ...


GATEWAY_STATUSES = frozenset({502, 504})  # a proxy's answer: the service may have acted
MAX_MESSAGE = 300
MAX_ANSWER_BYTES = 1024 * 1024  # the service answers a small JSON envelope
_MILLIS_THRESHOLD = 1e11  # epoch numbers above this are milliseconds (year 5138 in seconds)
_LINK_KEYS = ("downloadUrl", "fileUrl", "url")
_NUMBER_RE = re.compile(r"\d+(?:\.\d+)?")

OnChunk = Callable[[Chunk], Awaitable[None]]  # told of (and may pace) every chunk


# -- parsing the service's answer -------------------------------------------------------------


def parse_response(
    status: int,
    body: bytes,
    headers: Mapping[str, str],
    *,
    now: float,
    endpoint: str | None = None,
) -> UploadReceipt:
    """Classify one answer of the File Upload API; return the receipt on success.

    Success is HTTP 2xx AND a JSON object body AND `success` is not false AND
    `code`, when present, is 200. Raises AuthRejectedError (401/403),
    EndpointError (404/405, redirects), RetryableError (408, 429, 5xx, an error
    code in a 2xx body, a non-JSON 2xx body) or PermanentError (other 4xx, a
    success without a download link). `now` (POSIX seconds) resolves an
    HTTP-date `Retry-After`; `endpoint` only names the endpoint in messages.
    """
    envelope = _json_object(body)
    message = _service_message(envelope, body)
    body_code = _body_code(envelope)
    where = endpoint or "the upload endpoint"

    if status in (401, 403) or body_code in (401, 403):
        shown = status if status in (401, 403) else body_code
        raise AuthRejectedError(
            _one_line(f"the service rejected the API key (HTTP {shown}): {message}"),
            status=status,
        )
    if status in (404, 405):
        raise EndpointError(
            _one_line(f"the service answered {status} for {where}: is target.base_url right?"),
            status=status,
        )
    if 300 <= status < 400:
        location = _header(headers, "location") or "elsewhere"
        raise EndpointError(
            _one_line(
                f"the service redirected {where} (HTTP {status}) to {location}: "
                "is target.base_url right (http vs https, host)?"
            ),
            status=status,
        )
    if not 200 <= status < 300:
        raise _error_for_status(status, message, headers, now=now)
    if envelope is None:
        raise NotTheApiError(
            f"the service answered HTTP {status} with a body that is not a JSON object "
            "(a proxy or gateway in the way?)",
            status=status,
            retry_after=retry_after_seconds(headers, now=now),
        )
    if envelope.get("success") is False or (body_code is not None and body_code != 200):
        raise _error_for_body_code(status, body_code, message, headers, now=now)
    if "code" in envelope and body_code is None:
        raise RetryableError(
            _one_line(f"the service answered an unreadable code {envelope['code']!r}: {message}"),
            status=status,
        )
    return _receipt(envelope.get("data"))


def _error_for_status(
    status: int, message: str, headers: Mapping[str, str], *, now: float
) -> UploadError:
    if status in (408, 429) or status >= 500:
        return RetryableError(
            _one_line(f"the service answered HTTP {status}: {message}"),
            status=status,
            retry_after=retry_after_seconds(headers, now=now),
            uncertain=status in GATEWAY_STATUSES,
        )
    return PermanentError(
        _one_line(f"the service refused the upload (HTTP {status}): {message}"), status=status
    )


def _error_for_body_code(
    status: int, code: int | None, message: str, headers: Mapping[str, str], *, now: float
) -> UploadError:
    shown = "no code" if code is None else f"code {code}"
    if code is not None and 400 <= code < 500 and code not in (408, 429):
        return PermanentError(
            _one_line(f"the service refused the upload (HTTP {status}, {shown}): {message}"),
            status=status,
        )
    return RetryableError(
        _one_line(f"the service answered HTTP {status} with an error ({shown}): {message}"),
        status=status,
        retry_after=retry_after_seconds(headers, now=now),
    )


def _receipt(data: object) -> UploadReceipt:
    fields: Mapping[str, Any] = data if isinstance(data, dict) else {}
    link = next((v for k in _LINK_KEYS if _is_link(v := fields.get(k))), None)
    if not isinstance(link, str):
        raise PermanentError("service answered success without a download link")
    return UploadReceipt(
        download_url=link,
        file_name=_text(fields.get("fileName")),
        upload_path=_text(fields.get("uploadPath")),
        file_id=_text(fields.get("fileId")),
        file_size=_size(fields.get("fileSize")),
        mime_type=_text(fields.get("mimeType")),
        uploaded_at=_moment(_first_present(fields, "uploadTime", "uploadedAt")),
        expires_at=_moment(fields.get("expiresAt")),
    )


def _first_present(fields: Mapping[str, Any], *keys: str) -> object:
    return next((fields[k] for k in keys if fields.get(k) is not None), None)


def _json_object(body: bytes) -> dict[str, Any] | None:
    try:
        # An answer that starts with "{" has no byte order mark to look for.
        value = json.loads(body.decode() if body[:1] == b"{" else body.decode("utf-8-sig"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


def _service_message(envelope: Mapping[str, Any] | None, body: bytes) -> str:
    if envelope is not None:
        for key in ("msg", "message", "error"):
            value = envelope.get(key)
            if isinstance(value, str) and value.strip():
                return value
        return "(no message)"
    text = body[: MAX_MESSAGE * 2].decode("utf-8", errors="replace")
    return text if text.strip() else "(empty body)"


def _body_code(envelope: Mapping[str, Any] | None) -> int | None:
    if envelope is None:
        return None
    code = envelope.get("code")
    if isinstance(code, bool):
        return None
    if isinstance(code, int):
        return code
    if isinstance(code, float) and code.is_integer():
        return int(code)
    if isinstance(code, str) and code.strip().isdigit():
        return int(code.strip())
    return None


def retry_after_seconds(headers: Mapping[str, str], *, now: float) -> float | None:
    """`Retry-After` as seconds from `now`: delta-seconds or an HTTP-date; None if absent/bad."""
    value = _header(headers, "retry-after")
    if value is None:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if math.isfinite(seconds):
        return max(seconds, 0.0)
    try:
        moment = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if moment.tzinfo is None:
        return None
    return max(moment.timestamp() - now, 0.0)


def _header(headers: Mapping[str, str], name: str) -> str | None:
    value = headers.get(name)
    if value is not None:
        return value
    return next((v for k, v in headers.items() if k.lower() == name), None)


def _is_link(value: object) -> bool:
    return isinstance(value, str) and value.strip().lower().startswith(("http://", "https://"))


def _text(value: object) -> str | None:
    if isinstance(value, str) and value:
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return None


def _size(value: object) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if value >= 0 else None
    if isinstance(value, float) and value.is_integer() and value >= 0:
        return int(value)
    if isinstance(value, str) and value.strip().isdigit():
        return int(value.strip())
    return None


def _moment(value: object) -> float | None:
    """ISO-8601 text, or epoch seconds/milliseconds (number or digits) -> POSIX seconds."""
    if isinstance(value, bool) or value is None:
        return None
    number: float | None = None
    if isinstance(value, int | float):
        number = float(value)
    elif isinstance(value, str):
        text = value.strip()
        if _NUMBER_RE.fullmatch(text):
            number = float(text)
        else:
            try:
                return parse_iso(text)
            except (ValueError, OverflowError):
                return None
    if number is None or not math.isfinite(number) or number <= 0:
        return None
    return number / 1000.0 if number > _MILLIS_THRESHOLD else number


def _one_line(text: str) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= MAX_MESSAGE else flat[: MAX_MESSAGE - 1] + "…"


# -- the multipart body --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Multipart:
    """The fixed parts of one multipart/form-data body around the file bytes."""

    boundary: str
    preamble: bytes
    epilogue: bytes

    @property
    def content_type(self) -> str:
        return f"multipart/form-data; boundary={self.boundary}"

    def length(self, size: int) -> int:
        return len(self.preamble) + size + len(self.epilogue)


def build_multipart(*, upload_path: str, file_name: str, mime_type: str) -> _Multipart:
    """The part headers for uploadPath, fileName and the `file` part, and the closing line."""
    boundary = "----migrator" + secrets.token_hex(16)
    dash = f"--{boundary}\r\n".encode()
    preamble = b"".join(
        (
            dash,
            b'Content-Disposition: form-data; name="uploadPath"\r\n\r\n',
            upload_path.encode(),
            b"\r\n",
            dash,
            b'Content-Disposition: form-data; name="fileName"\r\n\r\n',
            file_name.encode(),
            b"\r\n",
            dash,
            b'Content-Disposition: form-data; name="file"; ',
            _filename_params(file_name).encode(),
            b"\r\n",
            f"Content-Type: {mime_type}\r\n\r\n".encode(),
        )
    )
    return _Multipart(boundary, preamble, f"\r\n--{boundary}--\r\n".encode())


def _filename_params(file_name: str) -> str:
    # As browsers do (WHATWG): raw UTF-8 with '"', CR and LF percent-encoded; plus the
    # RFC 5987 form for non-ASCII names, which many servers prefer when present.
    quoted = file_name.replace('"', "%22").replace("\r", "%0D").replace("\n", "%0A")
    params = f'filename="{quoted}"'
    if not file_name.isascii():
        params += f"; filename*=UTF-8''{quote(file_name, safe='')}"
    return params


def guess_mime_type(file_name: str) -> str | None:
    """The MIME type a file name suggests, or None."""
    parts = file_name.rsplit(".", 2)
    if len(parts) == 1 or not parts[0].strip(".") or ":" in file_name:
        # No suffix, a name of leading dots (`.png` has none), or what may read as a URL.
        return mimetypes.guess_type(file_name, strict=False)[0]
    return _mime_type_of_suffixes(".".join(["file", *parts[1:]]))


@functools.lru_cache(maxsize=256)
def _mime_type_of_suffixes(name: str) -> str | None:
    # The type depends on the last two suffixes only (`.tar.gz`), and a job's files
    # share a handful of them: each is looked up once.
    return mimetypes.guess_type(name, strict=False)[0]


def base64_json(data: bytes, mime: str | None, upload_path: str, file_name: str) -> bytes:
    """The JSON body of a base64 upload (pure): `base64Data` is a data URL when the type
    is known, else plain base64. Put together as bytes: base64 text needs no escaping,
    and a JSON encoder would scan and copy all of it twice."""
    prefix = json.dumps(f"data:{mime};base64," if mime else "", ensure_ascii=False)
    return b"".join(
        (
            b'{"base64Data": ',
            prefix[:-1].encode(),
            base64.b64encode(data),
            b'", "uploadPath": ',
            json.dumps(upload_path, ensure_ascii=False).encode(),
            b', "fileName": ',
            json.dumps(file_name, ensure_ascii=False).encode(),
            b"}",
        )
    )


# -- the client ---------------------------------------------------------------------------------


class _SourceTrouble:
    """What went wrong on our side of a streamed body (aiohttp wraps it on the way out),
    and the watchdog on its progress."""

    def __init__(self) -> None:
        self.error: BaseException | None = None
        self.sent = 0
        self._deadline: asyncio.Timeout | None = None
        self._stall_limit = 0.0

    def watch_progress(self, deadline: asyncio.Timeout, stall_limit: float) -> None:
        """aiohttp's read timeout starts only once the body is written: a service that
        stops reading mid-body would hold the upload for ever. This deadline moves on
        with every chunk that leaves, and is lifted when the body is complete."""
        self._deadline, self._stall_limit = deadline, stall_limit
        self.progressed()

    def progressed(self) -> None:
        if self._deadline is not None:
            self._deadline.reschedule(asyncio.get_running_loop().time() + self._stall_limit)

    def body_sent(self) -> None:
        if self._deadline is not None:
            self._deadline.reschedule(None)


class UploadClient:
    """Uploads one file per call to the File Upload API at `base_url`."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        base_url: str,
        api_key: str,
        *,
        connect_timeout: float = 15.0,
        read_timeout: float = 120.0,
        url_read_timeout: float = 180.0,
        clock: Callable[[], float] = time.time,
        on_answer: Callable[[Mapping[str, str]], None] | None = None,
    ) -> None:
        self._session = session
        self._base_url = base_url.rstrip("/")
        self._api_key = api_key
        self._connect_timeout = connect_timeout
        self._read_timeout = read_timeout
        # The service fetches the file itself before answering (its own download
        # times out after 30 s), so URL uploads get a longer wait.
        self._url_read_timeout = max(url_read_timeout, read_timeout)
        self._clock = clock
        self._on_answer = on_answer  # sees every answer's headers (the service's Date)
        # Built once, not per request: thousands of small uploads a minute share them.
        self._read_timeouts = self._timeouts(read_timeout)
        self._url_read_timeouts = self._timeouts(self._url_read_timeout)
        self._headers = {"Authorization": f"Bearer {api_key}", "Accept": "application/json"}
        self._json = {**self._headers, "Content-Type": "application/json"}

    def _timeouts(self, read_timeout: float) -> aiohttp.ClientTimeout:
        import aiohttp

        return aiohttp.ClientTimeout(
            total=None, sock_connect=self._connect_timeout, sock_read=read_timeout
        )

    @property
    def base_url(self) -> str:
        return self._base_url

    async def upload_base64(
        self, data: bytes, *, upload_path: str, file_name: str, mime_type: str | None = None
    ) -> UploadReceipt:
        """Upload `data` as JSON `base64Data`: a data URL when the type is known, else plain."""
        body = base64_json(data, mime_type or guess_mime_type(file_name), upload_path, file_name)
        receipt = await self._post(BASE64_ENDPOINT, body, self._json, self._read_timeouts)
        return _check_size(receipt, len(data))

    async def upload_url(self, file_url: str, *, upload_path: str, file_name: str) -> UploadReceipt:
        """Ask the service to fetch `file_url` itself."""
        payload = {"fileUrl": file_url, "uploadPath": upload_path, "fileName": file_name}
        body = json.dumps(payload, ensure_ascii=False).encode()
        return await self._post(URL_ENDPOINT, body, self._json, self._url_read_timeouts)

    async def upload_file(
        self,
        path: Path,
        *,
        upload_path: str,
        file_name: str,
        size: int,
        on_chunk: OnChunk | None = None,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        digest: Digest | None = None,
    ) -> UploadReceipt:
        """Stream a local file as multipart/form-data with an exact Content-Length.

        Opens a fresh handle on every call (the runner retries by calling again);
        raises PermanentError if the file's size differs from `size` while reading.
        `digest` sees every chunk in the thread that reads it, so hashing a large file
        runs beside the sending of it rather than on the event loop.
        """
        mime = guess_mime_type(file_name) or guess_mime_type(path.name)
        form = build_multipart(
            upload_path=upload_path,
            file_name=file_name,
            mime_type=mime or "application/octet-stream",
        )
        handle = await _open_source(path)
        trouble = _SourceTrouble()
        chunks = _file_chunks(handle, size, max(chunk_size, 1), digest)
        try:
            body = _multipart_body(form, _watch(chunks, trouble, on_chunk, size))
            receipt = await self._post_multipart(form, body, form.length(size), trouble)
        finally:
            await _close_quietly(chunks)  # no read of the handle is started after this
            await asyncio.to_thread(handle.close)
        return _check_size(receipt, trouble.sent)

    async def upload_stream(
        self,
        chunks: AsyncIterable[Chunk],
        *,
        upload_path: str,
        file_name: str,
        size: int | None,
        mime_type: str | None = None,
        on_chunk: OnChunk | None = None,
        limit: int | None = None,
    ) -> UploadReceipt:
        """Stream `chunks` (e.g. an origin's GET) as multipart/form-data.

        Content-Length is exact when `size` is known (a source that yields another
        number of bytes raises PermanentError), chunked transfer otherwise, when no
        more than `limit` bytes are taken (a body that never ends is refused).
        """
        form = build_multipart(
            upload_path=upload_path,
            file_name=file_name,
            mime_type=mime_type or guess_mime_type(file_name) or "application/octet-stream",
        )
        trouble = _SourceTrouble()
        body = _multipart_body(form, _watch(chunks, trouble, on_chunk, size, limit))
        length = None if size is None else form.length(size)
        receipt = await self._post_multipart(form, body, length, trouble)
        return _check_size(receipt, trouble.sent)

    # -- the requests --------------------------------------------------------------------

    async def _post_multipart(
        self,
        form: _Multipart,
        body: AsyncIterator[Chunk],
        length: int | None,
        trouble: _SourceTrouble,
    ) -> UploadReceipt:
        headers = {**self._headers, "Content-Type": form.content_type}
        if length is not None:
            headers["Content-Length"] = str(length)
        try:
            return await self._post(STREAM_ENDPOINT, body, headers, self._read_timeouts, trouble)
        finally:
            await _close_quietly(body)

    async def _post(
        self,
        endpoint: str,
        body: bytes | AsyncIterator[Chunk],
        headers: Mapping[str, str],
        timeouts: aiohttp.ClientTimeout,
        trouble: _SourceTrouble | None = None,
    ) -> UploadReceipt:
        import aiohttp

        url = self._base_url + endpoint
        read_timeout = timeouts.sock_read or 0.0
        try:
            try:
                async with _progress_deadline(trouble) as stalled:
                    if trouble is not None and stalled is not None:
                        trouble.watch_progress(stalled, read_timeout)
                    async with self._session.post(
                        url,
                        data=body,
                        headers=headers,
                        timeout=timeouts,
                        allow_redirects=False,
                        raise_for_status=False,
                    ) as response:
                        answer = await _read_answer(response)
                        status, answer_headers = response.status, response.headers
                        if self._on_answer is not None:
                            self._on_answer(answer_headers)
            except (TimeoutError, aiohttp.ClientError) as err:
                if trouble is not None and trouble.error is not None:
                    raise _source_error(trouble.error) from None
                raise _transport_error(err, self._base_url, read_timeout) from None
            if trouble is not None and trouble.error is not None:
                raise _source_error(trouble.error)
            where = f"{endpoint} (base URL {self._base_url})"
            return parse_response(status, answer, answer_headers, now=self._clock(), endpoint=where)
        except UploadError as err:
            raise self._scrubbed(err) from None

    def _scrubbed(self, err: UploadError) -> UploadError:
        # Defence in depth: a service echoing our headers must not carry the key into a message.
        text = str(err)
        if len(self._api_key) >= 4 and self._api_key in text:
            err.args = (text.replace(self._api_key, "***"),)
        return err


_NO_DEADLINE: contextlib.nullcontext[None] = contextlib.nullcontext()


def _progress_deadline(
    trouble: _SourceTrouble | None,
) -> contextlib.AbstractAsyncContextManager[asyncio.Timeout | None]:
    """A deadline for a streamed body to move by (see `watch_progress`); a body in
    memory has none to watch."""
    return _NO_DEADLINE if trouble is None else asyncio.timeout(None)


# -- streaming helpers --------------------------------------------------------------------------


async def _open_source(path: Path) -> BinaryIO:
    try:
        return await asyncio.to_thread(open_regular, path)
    except OSError as err:
        raise local_read_error(path, err) from None


class NotRegularFileError(OSError):
    """A local source that is not a regular file (a FIFO, a device, a socket, a folder)."""


def open_regular(path: Path, *, follow_symlinks: bool = False) -> BinaryIO:
    """Open a local file to read it, with care for what may have taken its place since
    it was planned (blocking: run it in a thread).

    `O_NONBLOCK`: a FIFO cannot hang the open (nor a device wait for a carrier);
    `O_NOFOLLOW` unless `follow_symlinks`: a symbolic link is refused (ELOOP), since
    the plan hands over real files only; then fstat of what was opened, so anything
    but a regular file raises NotRegularFileError. Raises OSError.
    """
    fd, _info = open_regular_fd(path, follow_symlinks=follow_symlinks)
    try:
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def open_regular_fd(
    path: str | os.PathLike[str], *, follow_symlinks: bool = False
) -> tuple[int, os.stat_result]:
    """`open_regular` as a bare descriptor, with the fstat of what was opened; the
    caller closes it. Raises OSError."""
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
    if not follow_symlinks:
        flags |= os.O_NOFOLLOW
    fd = os.open(path, flags)
    try:
        info = os.fstat(fd)
        check_regular(info.st_mode, path)
    except BaseException:
        os.close(fd)
        raise
    return fd, info


def check_regular(mode: int, path: str | os.PathLike[str]) -> None:
    """Raise NotRegularFileError unless `mode` (from a stat) is a regular file's."""
    if not stat.S_ISREG(mode):
        raise NotRegularFileError(errno.EINVAL, f"{file_type(mode)}, not a regular file", path)


def local_read_error(path: Path, err: OSError) -> UploadError:
    """The error an item fails with when its local source cannot be read (one line);
    too many open files (EMFILE, ENFILE) is this machine's moment, not the file's."""
    shown = printable(str(path))
    if err.errno in (errno.EMFILE, errno.ENFILE):
        return RetryableError(f"cannot open {shown} now: too many open files")
    if isinstance(err, NotRegularFileError):
        return PermanentError(f"{shown} is now {err.strerror}: refused")
    if err.errno == errno.ELOOP:
        return PermanentError(f"{shown} is now a symbolic link: refused, links are not followed")
    return PermanentError(_one_line(f"cannot read {shown}: {err.strerror or err}"))


async def _file_chunks(
    handle: BinaryIO, size: int, chunk_size: int, digest: Digest | None = None
) -> AsyncIterator[Chunk]:
    """The file in pieces of `chunk_size`, read `read_size` at a time in a thread (and
    hashed there), the next read running while the pieces of the last one are sent:
    the sending waits for the disk and the hash only when it outruns them, and a trip
    to a thread (a wake-up of a worker and of the loop) is paid once per read."""
    loop = asyncio.get_running_loop()
    done = 0

    def read_next() -> asyncio.Future[bytes]:
        # One byte more than expected is asked for, so a grown file shows up at once.
        wanted = min(read_size(chunk_size, _READERS.count), max(size - done, 0) + 1)
        return loop.run_in_executor(None, _read_chunk, handle, wanted, digest)

    with _READERS.one():
        reading = read_next()
        try:
            while block := await reading:
                done += len(block)
                reading = read_next()
                if len(block) <= chunk_size:
                    yield block
                    continue
                view = memoryview(block)
                for start in range(0, len(block), chunk_size):
                    yield view[start : start + chunk_size]
        finally:
            # A read still running ends before the handle closes (a buffered file closes
            # under its lock); what it read is not wanted.
            reading.add_done_callback(_unwanted)


def read_size(chunk_size: int, readers: int) -> int:
    """Bytes a trip to a thread reads of one of `readers` local files sent at once:
    its share of READ_BUDGET, at least READ_SIZE, in whole chunks (pure)."""
    share = max(READ_BUDGET // max(readers, 1), READ_SIZE)
    return chunk_size * max(share // chunk_size, 1)


class _Readers:
    """How many local files this process is reading to send (from any event loop)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.count = 0

    @contextlib.contextmanager
    def one(self) -> Iterator[None]:
        with self._lock:
            self.count += 1
        try:
            yield
        finally:
            with self._lock:
                self.count -= 1


_READERS = _Readers()


def _unwanted(read: asyncio.Future[bytes]) -> None:
    if not read.cancelled():
        read.exception()  # retrieved: its failure, if any, is of no interest


def _read_chunk(handle: BinaryIO, wanted: int, digest: Digest | None) -> bytes:
    chunk = handle.read(wanted)
    if digest is not None:
        digest.update(chunk)  # hashlib lets go of the GIL: the loop sends meanwhile
    return chunk


async def _watch(
    chunks: AsyncIterable[Chunk],
    trouble: _SourceTrouble,
    on_chunk: OnChunk | None,
    size: int | None,
    limit: int | None = None,
) -> AsyncIterator[Chunk]:
    """Count, check and report every chunk; remember any failure for the caller."""
    try:
        async for given in chunks:
            if not given:
                continue
            chunk = _unchangeable(given)
            if size is not None and trouble.sent + len(chunk) > size:
                raise SourceChangedError(
                    f"source changed while uploading: more than the expected {size} bytes"
                )
            if limit is not None and trouble.sent + len(chunk) > limit:
                raise PermanentError(f"the source sent more than {limit} bytes: refused")
            trouble.sent += len(chunk)
            if on_chunk is not None:
                await on_chunk(chunk)
            yield chunk
            trouble.progressed()
        trouble.body_sent()
        if size is not None and trouble.sent != size:
            raise SourceChangedError(
                f"source changed while uploading: {trouble.sent} bytes, expected {size}"
            )
    except Exception as err:
        trouble.error = err
        raise


def _unchangeable(chunk: Chunk) -> Chunk:
    """`chunk`, or a copy of it when its source could change it: the transport may hold
    on to what it was given after the write returns."""
    if isinstance(chunk, bytes) or (isinstance(chunk, memoryview) and chunk.readonly):
        return chunk
    return bytes(chunk)


async def _multipart_body(form: _Multipart, chunks: AsyncIterator[Chunk]) -> AsyncIterator[Chunk]:
    yield form.preamble
    try:
        async for chunk in chunks:
            yield chunk
    finally:
        await _close_quietly(chunks)
    yield form.epilogue


async def _close_quietly(generator: AsyncIterator[Chunk]) -> None:
    aclose = getattr(generator, "aclose", None)
    if aclose is None:
        return
    # RuntimeError: still running inside aiohttp's writer task, which ends it itself.
    with contextlib.suppress(RuntimeError):
        await aclose()


async def _read_answer(response: aiohttp.ClientResponse) -> bytes:
    """The whole answer (an answer cut short raises), at most MAX_ANSWER_BYTES of it."""
    answer = bytearray()
    while chunk := await response.content.read(64 * 1024):
        answer += chunk
        if len(answer) >= MAX_ANSWER_BYTES:
            break
    return bytes(answer[:MAX_ANSWER_BYTES])


def _source_error(error: BaseException) -> UploadError:
    import aiohttp

    if isinstance(error, UploadError):
        return error
    if isinstance(error, aiohttp.ClientError | TimeoutError):
        # An origin that stalls or resets mid-body (stream-through): worth another try.
        what = str(error) or type(error).__name__
        return RetryableError(_one_line(f"reading the source failed: {what}"))
    if isinstance(error, OSError):
        return PermanentError(_one_line(f"reading the source failed: {error.strerror or error}"))
    return RetryableError(_one_line(f"reading the source failed: {type(error).__name__}: {error}"))


def _check_size(receipt: UploadReceipt, sent: int) -> UploadReceipt:
    if receipt.file_size is not None and receipt.file_size != sent:
        raise RetryableError(f"service stored {receipt.file_size} bytes, sent {sent}")
    return receipt


def _transport_error(err: BaseException, base_url: str, read_timeout: float) -> UploadError:
    """A one-line RetryableError (status None) for a failure below HTTP."""
    import aiohttp

    if isinstance(err, aiohttp.InvalidURL):
        return EndpointError(_one_line(f"target.base_url {base_url} is not a valid URL"))
    if isinstance(err, aiohttp.ConnectionTimeoutError):
        return NoServiceError(f"timed out connecting to {base_url}")
    if isinstance(err, TimeoutError):
        waited = f"no answer within {read_timeout:g} s"
        return RetryableError(
            f"timed out waiting for the service at {base_url} ({waited})", uncertain=True
        )
    if isinstance(err, aiohttp.ClientConnectorCertificateError):
        return UntrustedCertificateError(_untrusted_message(err, base_url))
    if isinstance(err, aiohttp.ClientConnectorError):
        return NoServiceError(_connector_message(err, base_url))
    if isinstance(err, aiohttp.ServerDisconnectedError):
        return RetryableError(
            f"the service at {base_url} closed the connection before answering", uncertain=True
        )
    if isinstance(err, aiohttp.ClientPayloadError):
        return RetryableError(
            f"the answer of the service at {base_url} was cut off", uncertain=True
        )
    if isinstance(err, aiohttp.ClientOSError):
        reason = err.strerror or "connection error"
        return RetryableError(
            _one_line(f"connection to {base_url} failed: {reason}"), uncertain=True
        )
    if isinstance(err, aiohttp.ClientResponseError):
        return RetryableError(_one_line(f"the service at {base_url} sent a malformed answer"))
    return RetryableError(_one_line(f"request to {base_url} failed: {type(err).__name__}"))


def _untrusted_message(err: aiohttp.ClientConnectorCertificateError, base_url: str) -> str:
    """`TLS certificate of URL is not trusted: self-signed certificate; set ...`."""
    cause = err.certificate_error
    reason = getattr(cause, "verify_message", None) or getattr(cause, "reason", None) or cause
    return _one_line(
        f"TLS certificate of {base_url} is not trusted: {reason}; set target.ca_bundle "
        "(or MIGRATOR_CA_BUNDLE) to a PEM file of the CA that signed it"
    )


def _connector_message(err: aiohttp.ClientConnectorError, base_url: str) -> str:
    import aiohttp

    code = err.os_error.errno
    if code == errno.ECONNREFUSED:
        return f"connection refused to {base_url}"
    if isinstance(err.os_error, socket.gaierror):
        return f"cannot resolve the host of {base_url}"
    if isinstance(err, aiohttp.ClientSSLError):
        return _one_line(f"TLS handshake with {base_url} failed")
    reason = err.os_error.strerror or type(err.os_error).__name__
    return _one_line(f"cannot connect to {base_url}: {reason}")
