"""A local emulator of the kie.ai File Upload API: the service's side, for tests and dry runs.

It answers the three documented upload endpoints the way the public docs describe the
real service (bearer auth, the `{success, code, msg, data}` envelope, 400/401/405/404),
stores what it receives under a data directory so that it survives a restart, serves
every file at its `downloadUrl` until `expiresAt` (or, with `lifetime` / `--lifetime`,
until that long after its upload, whichever comes first), and keeps its own clock (real
time plus an offset that only moves forward) so that expiry can be tested without
waiting 3 days. Every answer's HTTP `Date` header tells that clock, as a real service's
tells its own.

Nothing here is shared with `migrator.client`: the emulator writes its envelopes by hand,
so a drift between what the client expects and what the service says shows up in tests.

Overwrite rule: uploading the same `uploadPath` + `fileName` again stores the new bytes
under a new `fileId`; the old `downloadUrl` then answers 404.

Rate limit (`rate_limit=N`, `--rate-limit N`; off by default): at most N requests (the
integer part of N) are accepted in any sliding second of real time, counting the three
upload endpoints (any method) and GET/HEAD of download links; the admin routes are never
limited. One more is answered 429 in the error envelope with `Retry-After` (whole
seconds until the window has room, at least 1). The limit is checked at the door, before
the key and before the body: a request with a wrong key counts, and a refused one never
learns whether its key was good. Refused requests do not count; refused uploads appear
in `requests` as 429.

Two request logs, for tests: `requests` (upload endpoints, failures included, as
`EmulatorRequest`) and `link_requests` (GET and HEAD of download links, as `LinkRequest`).
Each entry carries the real time its request arrived.

Admin endpoints (same bearer key as the API):
    POST /_emulator/clock     {"advance": seconds}        -> {"offset": s, "now": iso}
    GET  /_emulator/clock                                 -> {"offset": s, "now": iso}
    GET  /_emulator/requests                              -> [EmulatorRequest as JSON, ...]
    POST /_emulator/faults    {"status", "count", "endpoint", "retry_after", "body_code"}
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import functools
import hmac
import json
import math
import mimetypes
import os
import random
import re
import secrets
import signal
import sqlite3
import ssl
import sys
import time
import unicodedata
from collections import deque
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from email.utils import formatdate
from pathlib import Path, PurePosixPath
from types import ModuleType
from typing import Any, BinaryIO, Final, Literal, TextIO, TypeGuard
from urllib.parse import quote, unquote, urlsplit

import aiohttp
from aiohttp import hdrs, web

from migrator.errors import ConfigError

Endpoint = Literal["base64", "stream", "url"]
ResponseShape = Literal["quickstart", "endpoint"]

ENDPOINTS: Final[tuple[str, ...]] = ("base64", "stream", "url")
RESPONSE_SHAPES: Final[tuple[str, ...]] = ("quickstart", "endpoint")
DEFAULT_TTL: Final = 72 * 3600.0
DEFAULT_URL_MAX: Final = 100 * 1024 * 1024
JSON_BODY_MAX: Final = 64 * 1024 * 1024  # base64 and URL routes; stream uploads have no limit
FIELD_MAX: Final = 64 * 1024  # a text part of a multipart body (uploadPath, fileName)
CHUNK: Final = 256 * 1024
SUCCESS_MSG: Final = "File uploaded successfully"

_PATHS: Final[dict[str, str]] = {
    "base64": "/api/file-base64-upload",
    "stream": "/api/file-stream-upload",
    "url": "/api/file-url-upload",
}
_ENDPOINT_BY_PATH: Final[dict[str, str]] = {path: name for name, path in _PATHS.items()}
# aiohttp runs a request's middlewares and its response's prepare hooks in one task, so
# a ContextVar carries the arrival time to both (request storage would need RequestKey,
# which aiohttp before 3.13 lacks and aiohttp 3.13+ warns about going without).
_RECEIVED_AT: ContextVar[float] = ContextVar("emulator_received_at")
_Handler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]
_STATUS_MSGS: Final[dict[int, str]] = {
    400: "bad request",
    401: "missing or invalid credentials",
    404: "not found",
    405: "method not allowed: use POST",
    413: "request body too large",
    429: "too many requests",
    500: "internal error, please retry",
    502: "bad gateway",
    503: "service unavailable, please retry",
    504: "gateway timeout",
}


# -- values -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class EmulatorRequest:
    """One request to an upload endpoint, as the emulator saw it (failed ones included).

    The times are real time (time.time()), not the emulator's clock. They take no part
    in equality, so a test can compare the log with the requests it expects.
    """

    endpoint: str  # "base64" | "stream" | "url"
    upload_path: str | None
    file_name: str | None
    file_url: str | None
    status: int  # the HTTP status answered
    size: int | None  # bytes stored, for a success
    received_at: float = field(default=0.0, compare=False)  # the request arrived
    answered_at: float = field(default=0.0, compare=False)  # the answer was ready


@dataclass(frozen=True, slots=True)
class LinkRequest:
    """One GET or HEAD of a download link (`/files/...`), as the emulator answered it."""

    method: str
    path: str  # as sent, percent-encoded, without the query
    status: int
    received_at: float  # real time, time.time()
    bytes_sent: int  # file bytes the answer carries (its Content-Length); 0 for HEAD, errors
    range: str | None  # the Range header, when sent


@dataclass(frozen=True, slots=True)
class EmulatorConfig:
    """Everything `serve()` needs; mirrors the `Emulator` constructor."""

    data_dir: Path
    api_key: str
    host: str = "127.0.0.1"
    port: int = 0
    ttl: float = DEFAULT_TTL
    response_shape: str = "quickstart"
    url_fetch_timeout: float = 30.0
    url_max: int = DEFAULT_URL_MAX
    clock_offset: float = 0.0
    lifetime: float | None = None
    rate_limit: float | None = None
    fault_rate: float = 0.0
    fault_seed: int | None = None
    fault_stall: float = 5.0


@dataclass(frozen=True, slots=True)
class StoredFile:
    """One file held by the emulator."""

    file_id: str
    upload_path: str
    file_name: str
    original_name: str | None
    size: int
    mime_type: str
    uploaded_at: float
    expires_at: float

    @property
    def remote_path(self) -> str:
        return f"{self.upload_path}/{self.file_name}" if self.upload_path else self.file_name


_COLUMNS: Final = (
    "file_id, upload_path, file_name, original_name, size, mime_type, uploaded_at, expires_at"
)


# A row whose blob is neither in it nor in a pack has it in data_dir/blobs/<fileId>.
_FIND_NAMED: Final = (
    "SELECT rowid, file_id, data IS NULL AND pack IS NULL FROM files"
    " WHERE upload_path = ? AND file_name = ?"
)
_INSERT: Final = (
    f"INSERT INTO files ({_COLUMNS}, pack, pack_offset) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
# An upload over a held name rewrites that row in place (its name and the index on
# it stay): cheaper than a DELETE ... RETURNING, which builds a table for what it returns.
_OVERWRITE: Final = (
    "UPDATE files SET file_id = ?, original_name = ?, size = ?, mime_type = ?,"
    " uploaded_at = ?, expires_at = ?, data = NULL, pack = ?, pack_offset = ? WHERE rowid = ?"
)


def _row(stored: StoredFile) -> tuple[str, str, str, str | None, int, str, float, float]:
    """A StoredFile as the values of `files`' first columns, in _COLUMNS' order."""
    return (
        stored.file_id,
        stored.upload_path,
        stored.file_name,
        stored.original_name,
        stored.size,
        stored.mime_type,
        stored.uploaded_at,
        stored.expires_at,
    )


def _changed(stored: StoredFile) -> tuple[str, str | None, int, str, float, float]:
    """What an upload over a held name changes in its row, in _OVERWRITE's order."""
    return (
        stored.file_id,
        stored.original_name,
        stored.size,
        stored.mime_type,
        stored.uploaded_at,
        stored.expires_at,
    )


@dataclass(frozen=True, slots=True)
class _Received:
    """One upload's bytes (`data`, or in its temp file when None) before they are named
    and stored."""

    data: bytes | None
    size: int
    upload_path: str
    file_name: str | None
    original_name: str | None
    declared_type: str | None


@dataclass(slots=True)
class _Seen:
    """What a request said so far; recorded in the request log even when it fails."""

    upload_path: str | None = None
    file_name: str | None = None
    file_url: str | None = None


@dataclass(slots=True)
class _Fault:
    status: int
    remaining: int
    endpoint: str | None
    retry_after: float | None
    body_code: int | None


class _SlidingWindow:
    """At most `limit` admissions in any `span` seconds (of the caller's clock)."""

    def __init__(self, limit: int, span: float = 1.0) -> None:
        self.limit = limit
        self._span = span
        self._admitted: deque[float] = deque()

    def try_admit(self, now: float) -> float | None:
        """Admit at `now` and return None, or admit nothing and return the seconds until
        the window has room."""
        while self._admitted and self._admitted[0] <= now - self._span:
            self._admitted.popleft()
        if len(self._admitted) < self.limit:
            self._admitted.append(now)
            return None
        return self._admitted[0] + self._span - now


class _ApiError(Exception):
    """Answered to the caller as the error envelope with this status."""

    def __init__(self, status: int, msg: str) -> None:
        super().__init__(msg)
        self.status = status
        self.msg = msg


# -- pure helpers -------------------------------------------------------------------------


def iso_ms(timestamp: float) -> str:
    """POSIX seconds -> `2025-01-18T10:30:00.000Z` (always with milliseconds), as
    `datetime.fromtimestamp` splits them: microseconds rounded half to even, then cut."""
    fraction, whole = math.modf(timestamp)
    second, micros = int(whole), round(fraction * 1e6)
    if micros >= 1_000_000:
        second, micros = second + 1, micros - 1_000_000
    elif micros < 0:
        second, micros = second - 1, micros + 1_000_000
    return f"{_iso_of_second(second)}.{micros // 1000:03d}Z"


@functools.lru_cache(maxsize=8)  # two seconds an upload: its time and its expiry
def _iso_of_second(second: int) -> str:
    return datetime.fromtimestamp(second, tz=UTC).replace(tzinfo=None).isoformat()


@functools.lru_cache(maxsize=4)
def _http_date_of_second(second: int) -> str:
    return formatdate(second, usegmt=True)


def http_date(timestamp: float) -> str:
    """POSIX seconds -> an RFC 7231 IMF-fixdate, `Sun, 19 Jan 2025 10:30:00 GMT`."""
    return _http_date_of_second(math.floor(timestamp))


def access_line(method: str, path: str, status: int, ms: float) -> str:
    """One access log line, `key=value` pairs (never a header, so never the key)."""
    now = time.time()
    stamp = f"{_iso_of_second(int(now))}.{int(now % 1 * 1e6):06d}Z"
    return (
        f"timestamp={stamp!r} event='emulator.request' method={method!r} path={path!r}"
        f" status={status} ms={ms}\n"
    )


def error_envelope(status: int, msg: str) -> dict[str, Any]:
    return {"success": False, "code": status, "msg": msg, "data": None}


_DRIVE: Final = re.compile(r"[A-Za-z]:")  # `C:`, a Windows drive


def _has_control_chars(text: str) -> bool:
    if text.isprintable():  # what is printable has no control character (the usual case)
        return False
    return any(unicodedata.category(ch) == "Cc" for ch in text)


def check_upload_path(value: object) -> str:
    """Validate an `uploadPath` and return it without trailing '/'. Raises _ApiError(400)."""
    if value is None:
        return ""
    if not isinstance(value, str):
        raise _ApiError(400, "uploadPath must be a string")
    if _has_control_chars(value):
        raise _ApiError(400, "uploadPath must not contain control characters")
    if value.startswith(("/", "\\")) or _DRIVE.match(value):
        raise _ApiError(400, "uploadPath must be relative, not absolute")
    if "\\" in value:
        raise _ApiError(400, "uploadPath must use '/' as separator")
    stripped = value.rstrip("/")
    segments = stripped.split("/") if stripped else []
    if any(seg in ("", ".", "..") for seg in segments):
        raise _ApiError(400, "uploadPath must not contain '..', '.' or empty segments")
    return stripped


def check_file_name(value: object) -> str | None:
    """Validate an optional `fileName`; empty means omitted. Raises _ApiError(400)."""
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise _ApiError(400, "fileName must be a string")
    if _has_control_chars(value):
        raise _ApiError(400, "fileName must not contain control characters")
    if value.startswith(("/", "\\")) or _DRIVE.match(value):
        raise _ApiError(400, "fileName must be relative, not absolute")
    if ".." in value or value == ".":
        raise _ApiError(400, "fileName must not contain '..'")
    if "/" in value or "\\" in value:
        raise _ApiError(400, "fileName must be a name, without '/' or '\\'")
    return value


def decode_base64_data(value: object) -> tuple[bytes, str | None]:
    """`base64Data` (plain base64 or a `data:` URL) -> (bytes, declared MIME type or None)."""
    if not isinstance(value, str) or not value.strip():
        raise _ApiError(400, "base64Data is required")
    declared: str | None = None
    payload = value
    head, comma, rest = value.strip().partition(",")
    if comma and head.startswith("data:"):
        params = head[len("data:") :].split(";")
        if "base64" not in (p.strip().lower() for p in params[1:]):
            raise _ApiError(400, "base64Data data URL must be base64-encoded (';base64,')")
        declared = params[0].strip() or None
        payload = rest
    try:
        data = _b64decode(payload)
    except (binascii.Error, ValueError):
        raise _ApiError(400, "base64Data is not valid base64") from None
    if not data:
        raise _ApiError(400, "base64Data decodes to no bytes")
    return data, declared


def _b64decode(payload: str) -> bytes:
    """Strict base64, whitespace (line breaks of wrapped base64) allowed anywhere."""
    canonical = _canonical_b64decode(payload)
    if canonical is not None:
        return canonical
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        if not any(ch.isspace() for ch in payload):
            raise
    return base64.b64decode("".join(payload.split()), validate=True)


def _import_pybase64() -> ModuleType | None:
    try:
        import pybase64
    except ImportError:  # the `fast` extra is optional
        return None
    return pybase64


_pybase64: Final = _import_pybase64()


def _canonical_b64decode(payload: str) -> bytes | None:
    """The bytes `payload` is the canonical base64 of, decoded by pybase64 (the `fast`
    extra), else None. Canonical base64 is what the standard library's strict decoder
    accepts and decodes alike, so this changes no answer; it is a tenth of its cost, and
    decoding was a tenth of an upload's."""
    if _pybase64 is None or not payload.isascii():
        return None
    encoded = payload.encode("ascii")
    try:
        data = _pybase64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        return None
    return data if _pybase64.b64encode(data) == encoded else None


def random_file_name(original_name: str | None, declared_type: str | None) -> str:
    """A fresh random name that keeps the original extension (or one fitting the type)."""
    suffix = PurePosixPath(original_name).suffix if original_name else ""
    if not re.fullmatch(r"\.[A-Za-z0-9]{1,10}", suffix):
        suffix = mimetypes.guess_extension(declared_type or "") or ""
    return secrets.token_hex(8) + suffix


def pick_mime_type(file_name: str, declared_type: str | None) -> str:
    """The type guessed from the stored name, else the one the client declared."""
    guessed = _guess_type(file_name)
    if guessed:
        return guessed
    if declared_type and "/" in declared_type:
        return declared_type.split(";")[0].strip() or "application/octet-stream"
    return "application/octet-stream"


def gone_reason(stored: StoredFile, now: float, lifetime: float | None) -> str | None:
    """Why a stored file is no longer served at `now`, or None while it is."""
    if stored.expires_at <= now:
        return "it expired"
    if lifetime is not None and stored.uploaded_at + lifetime <= now:
        return "it was deleted before its expiresAt"
    return None


def _guess_type(file_name: str) -> str | None:
    """mimetypes' guess; for a name with one dot inside it (the usual one) it depends on
    the extension alone, so it is asked once per extension (it was 2 % of an upload)."""
    stem, dot, extension = file_name.rpartition(".")
    if dot and stem and "." not in stem and not any(c in file_name for c in ":/"):
        return _guess_type_of_extension(extension)
    return mimetypes.guess_type(file_name, strict=False)[0]


@functools.lru_cache(maxsize=256)
def _guess_type_of_extension(extension: str) -> str | None:
    return mimetypes.guess_type(f"x.{extension}", strict=False)[0]


_UNRESERVED_PATH: Final = re.compile(r"[A-Za-z0-9_.~/-]*")  # what `quote` keeps as it is


def download_path(stored: StoredFile) -> str:
    """`/files/<fileId>/<uploadPath>/<fileName>`, each segment URL-quoted."""
    plain = f"{stored.file_id}/{stored.remote_path}"
    if _UNRESERVED_PATH.fullmatch(plain):  # nothing to quote: the usual name
        return f"/files/{plain}"
    segments = plain.split("/")
    return "/files/" + "/".join(quote(seg, safe="") for seg in segments)


_SUCCESS_HEAD: Final = (
    json.dumps({"success": True, "code": 200, "msg": SUCCESS_MSG})[:-1] + ', "data": '
)


def success_body(stored: StoredFile, base_url: str, shape: str) -> bytes:
    """The JSON of a success (the envelope, `data` in the quickstart or the endpoint
    pages' shape), byte for byte what `json.dumps` writes of it, without its walk of
    a dict: this is the answer to every upload."""
    text = _json_text
    url = text(base_url + download_path(stored))
    if shape == "endpoint":
        data = (
            f'{{"fileName": {text(stored.file_name)}, "filePath": {text(stored.remote_path)},'
            f' "downloadUrl": {url}, "fileSize": {stored.size},'
            f' "mimeType": {text(stored.mime_type)},'
            f' "uploadedAt": "{iso_ms(stored.uploaded_at)}"}}'
        )
    else:
        data = (
            f'{{"fileId": {text(stored.file_id)}, "fileName": {text(stored.file_name)},'
            f' "originalName": {text(stored.original_name or stored.file_name)},'
            f' "fileSize": {stored.size}, "mimeType": {text(stored.mime_type)},'
            f' "uploadPath": {text(stored.upload_path)}, "fileUrl": {url},'
            f' "downloadUrl": {url}, "uploadTime": "{iso_ms(stored.uploaded_at)}",'
            f' "expiresAt": "{iso_ms(stored.expires_at)}"}}'
        )
    return f"{_SUCCESS_HEAD}{data}}}".encode()


_json_text: Final[Callable[[str], str]] = json.encoder.encode_basestring_ascii  # json.dumps'


def format_retry_after(seconds: float) -> str:
    """Delta-seconds as an integer when whole, else a decimal (tests use sub-second waits)."""
    return str(int(seconds)) if float(seconds).is_integer() else f"{seconds:g}"


def bearer_ok(header: str | None, api_key: str) -> bool:
    """`Authorization: Bearer <key>` with the right key, compared in constant time."""
    if not header:
        return False
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(token.strip().encode(), api_key.encode())


def fetch_failure_reason(err: BaseException, timeout: float) -> str:
    """A short human reason for a failed origin download."""
    if isinstance(err, TimeoutError):
        return f"timed out after {timeout:g} s"
    if isinstance(err, aiohttp.ClientConnectorError):
        os_error = err.os_error
        if isinstance(os_error, ConnectionRefusedError):
            return "connection refused"
        return f"cannot connect to {err.host}:{err.port}: {os_error.strerror or os_error}"
    if isinstance(err, aiohttp.InvalidURL):
        return "invalid URL"
    return str(err) or type(err).__name__


def _ensure_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


# -- storage ------------------------------------------------------------------------------


class _Pack:
    """An append-only file of small blobs, data_dir/packs/<name>: one per emulator start,
    written before the rows that point into it commit. Overwritten and expired blobs stay
    in it as garbage until `_Store.sweep` copies a mostly dead pack's live blobs out."""

    def __init__(self, folder: Path) -> None:
        self.name = f"{secrets.token_hex(8)}.pack"
        self.path = folder / self.name
        self._fd: int | None = None
        self.size = 0

    def append(self, blobs: list[bytes]) -> int:
        """Write `blobs` one after the other; returns the offset of the first."""
        if self._fd is None:
            flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC
            self._fd = os.open(self.path, flags, 0o644)
        offset = self.size
        view = memoryview(b"".join(blobs))
        while view:
            view = view[os.write(self._fd, view) :]
        self.size += sum(len(blob) for blob in blobs)
        return offset

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _read_pack(path: Path, offset: int, size: int) -> bytes | None:
    """A blob from a pack; None when the pack is gone or too short."""
    try:
        with path.open("rb") as pack:
            pack.seek(offset)
            data = pack.read(size)
    except OSError:
        return None
    return data if len(data) == size else None


class _Store:
    """Metadata in data_dir/emulator.sqlite3 (table `files`). A blob of up to INLINE_MAX
    bytes is appended to this start's pack (`_Pack`; its row says where: `pack`,
    `pack_offset`) and written to data_dir/blobs/<fileId> only when first downloaded
    (its row then names neither: an overwrite removes only blobs in files); a larger
    one is renamed there from data_dir/tmp before its row commits, so a crash leaves at
    most an orphan blob, which the next start removes. Rows of older data dirs
    may hold their blob in `data`.

    Uploads are group-committed: `put` queues the row and hands back a future that is
    done once the transaction holding it has committed, at the end of the event loop's
    current turn. An upload is still answered only once it is stored, and a burst of
    them costs one commit (a file and a commit per upload were most of the emulator's
    time). Without a sync per commit the store survives the emulator's own crash, which
    is all an emulator needs.
    """

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = _ensure_dir(data_dir)
        self.blobs = _ensure_dir(data_dir / "blobs")
        self.tmp = _ensure_dir(data_dir / "tmp")
        self.packs = _ensure_dir(data_dir / "packs")
        self._pack = _Pack(self.packs)
        self._clock_file = data_dir / "clock.json"
        self._db = sqlite3.connect(data_dir / "emulator.sqlite3", isolation_level=None)
        self._db.execute("PRAGMA journal_mode = WAL")
        self._db.execute("PRAGMA synchronous = OFF")
        # file_id -> metadata, read through; the latest KNOWN_KEPT only, or a long-lived
        # emulator's memory would grow with every upload.
        self._known: dict[str, StoredFile] = {}
        self._pending: list[tuple[StoredFile, bytes | None]] = []
        self._waiting: list[asyncio.Future[None]] = []  # one per upload in _pending
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS files ("
            " file_id TEXT PRIMARY KEY, upload_path TEXT NOT NULL, file_name TEXT NOT NULL,"
            " original_name TEXT, size INTEGER NOT NULL, mime_type TEXT NOT NULL,"
            " uploaded_at REAL NOT NULL, expires_at REAL NOT NULL, data BLOB,"
            " UNIQUE (upload_path, file_name))"
        )
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(files)")}
        if "data" not in columns:  # a data dir from before blobs lived in rows
            self._db.execute("ALTER TABLE files ADD COLUMN data BLOB")
        if "pack" not in columns:  # nor in packs
            self._db.execute("ALTER TABLE files ADD COLUMN pack TEXT")
            self._db.execute("ALTER TABLE files ADD COLUMN pack_offset INTEGER")

    def close(self) -> None:
        self._commit()
        self._db.close()
        self._pack.close()

    def new_tmp(self) -> _TempFile:
        return _TempFile(self.tmp)

    def blob_path(self, file_id: str) -> Path:
        return self.blobs / file_id

    def put(self, stored: StoredFile, data: bytes | None, tmp: _TempFile) -> asyncio.Future[None]:
        """Store `data` (or, when None, the temp file) under `stored`, replacing a
        same-named file; the future, this upload's own (cancelling it cancels no other's),
        is done once that is committed."""
        if data is None:
            tmp.path.replace(self.blob_path(stored.file_id))
        self._pending.append((stored, data))
        self._remember(stored)
        loop = asyncio.get_running_loop()
        if not self._waiting:
            loop.call_soon(self._commit)
        committed = loop.create_future()
        self._waiting.append(committed)
        return committed

    def _commit(self) -> None:
        """Write every queued row in one transaction and wake the uploads that wait."""
        pending, self._pending = self._pending, []
        waiting, self._waiting = self._waiting, []
        replaced: list[tuple[str, bool]] = []  # (fileId, its blob is a file of its own)
        try:
            if pending:
                self._write_rows(pending, replaced)
        except Exception as err:  # every upload waiting for this commit answers 500
            for stored, _ in pending:
                self._known.pop(stored.file_id, None)
            for committed in waiting:
                if not committed.done():
                    committed.set_exception(err)
            return
        for file_id, in_file in replaced:
            self._known.pop(file_id, None)
            if in_file:
                self.blob_path(file_id).unlink(missing_ok=True)
        for committed in waiting:
            if not committed.done():
                committed.set_result(None)

    def _write_rows(
        self, pending: list[tuple[StoredFile, bytes | None]], replaced: list[tuple[str, bool]]
    ) -> None:
        small = [data for _, data in pending if data is not None]
        offset = self._pack.append(small) if small else 0
        db = self._db
        db.execute("BEGIN")
        try:
            for stored, data in pending:
                place = (None, None) if data is None else (self._pack.name, offset)
                old = db.execute(_FIND_NAMED, (stored.upload_path, stored.file_name)).fetchone()
                if old is None:
                    db.execute(_INSERT, (*_row(stored), *place))
                else:
                    rowid, old_id, in_file = old
                    replaced.append((old_id, bool(in_file)))
                    db.execute(_OVERWRITE, (*_changed(stored), *place, rowid))
                offset += 0 if data is None else len(data)
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def get(self, file_id: str) -> StoredFile | None:
        known = self._known.get(file_id)
        if known is not None:
            return known
        row = self._db.execute(
            f"SELECT {_COLUMNS} FROM files WHERE file_id = ?", (file_id,)
        ).fetchone()
        if row is None:
            return None
        stored = StoredFile(*row)
        self._remember(stored)
        return stored

    def _remember(self, stored: StoredFile) -> None:
        if len(self._known) >= KNOWN_KEPT:
            del self._known[next(iter(self._known))]  # the oldest remembered
        self._known[stored.file_id] = stored

    def blob_file(self, file_id: str) -> Path:
        """The blob's file, written from its row the first time a small one is asked for."""
        path = self.blob_path(file_id)
        if not path.exists():
            row = self._db.execute(
                "SELECT data, pack, pack_offset, size FROM files WHERE file_id = ?", (file_id,)
            ).fetchone()
            data = None if row is None else row[0]
            if row is not None and data is None and row[1] is not None:
                data = _read_pack(self.packs / row[1], row[2], row[3])
            if data is not None:
                tmp = self.new_tmp().path
                tmp.write_bytes(data)
                tmp.replace(path)
                self._db.execute(  # in a file now: an overwrite removes that file
                    "UPDATE files SET data = NULL, pack = NULL WHERE file_id = ?", (file_id,)
                )
        return path

    def delete(self, file_id: str) -> None:
        self._db.execute("DELETE FROM files WHERE file_id = ?", (file_id,))
        self._known.pop(file_id, None)
        self.blob_path(file_id).unlink(missing_ok=True)

    def sweep(self, now: float, lifetime: float | None) -> None:
        """Drop temp files, files gone by `now`, orphan blobs and rows whose blob is gone."""
        for leftover in self.tmp.iterdir():
            leftover.unlink(missing_ok=True)
        pack_sizes = {pack.name: pack.stat().st_size for pack in self.packs.iterdir()}
        rows = self._db.execute(
            f"SELECT {_COLUMNS}, data IS NOT NULL, pack, pack_offset FROM files"
        ).fetchall()
        live: dict[str, list[tuple[str, int, int]]] = {}  # pack -> its live blobs
        for *fields, inline, pack, offset in rows:
            one = StoredFile(*fields)
            in_pack = pack is not None and offset + one.size <= pack_sizes.get(pack, -1)
            gone = gone_reason(one, now, lifetime) is not None
            if gone or not (inline or in_pack or self.blob_path(one.file_id).exists()):
                self.delete(one.file_id)
            elif in_pack:
                live.setdefault(pack, []).append((one.file_id, offset, one.size))
        known = {row[0] for row in rows}
        for blob in self.blobs.iterdir():
            if blob.name not in known:
                blob.unlink(missing_ok=True)
        for name, size in pack_sizes.items():
            blobs = live.get(name, [])
            if 2 * sum(blob_size for _, _, blob_size in blobs) < size:
                self._move_out_of(name, blobs)

    def _move_out_of(self, name: str, blobs: list[tuple[str, int, int]]) -> None:
        """Copy a mostly dead pack's live blobs to this start's pack, then remove it."""
        path = self.packs / name
        for file_id, offset, size in blobs:
            data = _read_pack(path, offset, size)
            if data is not None:
                moved_to = self._pack.append([data])
                self._db.execute(
                    "UPDATE files SET pack = ?, pack_offset = ? WHERE file_id = ?",
                    (self._pack.name, moved_to, file_id),
                )
        path.unlink(missing_ok=True)

    def load_offset(self) -> float:
        try:
            return float(json.loads(self._clock_file.read_text())["offset"])
        except (OSError, ValueError, KeyError, TypeError):
            return 0.0

    def save_offset(self, offset: float) -> None:
        tmp = self._clock_file.with_suffix(".tmp")
        tmp.write_text(json.dumps({"offset": offset}))
        tmp.replace(self._clock_file)


# -- the server ---------------------------------------------------------------------------


SERVED_REQUESTS_KEPT = 10_000  # request log of a long-lived emulator
KNOWN_KEPT = 100_000  # files whose metadata the store keeps in memory
INLINE_MAX = 64 * 1024  # a blob this small is kept in its metadata row, not in a file of its own


class _TempFile:
    """A temp file in data_dir/tmp, named only when first used: most uploads need none."""

    def __init__(self, folder: Path) -> None:
        self._folder = folder
        self._path: Path | None = None

    @property
    def path(self) -> Path:
        if self._path is None:
            self._path = self._folder / f"{secrets.token_hex(12)}.part"
        return self._path

    def remove(self) -> None:
        if self._path is not None:
            self._path.unlink(missing_ok=True)


class _Sink:
    """One upload's bytes as they arrive: in memory up to INLINE_MAX, past that spilled
    to its temp file. Use as a context manager, then `data()`."""

    def __init__(self, tmp: _TempFile) -> None:
        self._tmp = tmp
        self._buffer = bytearray()
        self._file: BinaryIO | None = None
        self.size = 0

    def __enter__(self) -> _Sink:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._file is not None:
            self._file.close()

    def write(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if self._file is not None:
            self._file.write(chunk)
            return
        self._buffer += chunk
        if len(self._buffer) > INLINE_MAX:
            self._file = self._tmp.path.open("wb")
            self._file.write(self._buffer)
            self._buffer = bytearray()

    def data(self) -> bytes | None:
        """The bytes, or None when they are in the temp file."""
        return None if self._file is not None else bytes(self._buffer)


class Emulator:
    """The emulated service. Use as `async with Emulator(dir, key) as emu:`.

    `lifetime`, when given, deletes each file that long after its upload on the
    emulator's clock, even before its `expiresAt` (which answers still state as upload
    time + `ttl`): a service that keeps files for less time than it says.

    `rate_limit`, when given, accepts at most that many requests (its integer part) in
    any second of real time; see the module's docstring for what counts.

    `access_log`, when given, receives one structlog line per request (method, path,
    status; never a header). `keep_requests` bounds each request log (`requests` for
    uploads, `link_requests` for downloads); None keeps them all, as tests want.
    """

    def __init__(
        self,
        data_dir: Path,
        api_key: str,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        ttl: float = DEFAULT_TTL,
        response_shape: str = "quickstart",
        url_fetch_timeout: float = 30.0,
        url_max: int = DEFAULT_URL_MAX,
        clock_offset: float = 0.0,
        lifetime: float | None = None,
        rate_limit: float | None = None,
        access_log: TextIO | None = None,
        keep_requests: int | None = None,
        fault_rate: float = 0.0,
        fault_seed: int | None = None,
        fault_stall: float = 5.0,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        if not api_key:
            raise ValueError("the emulator needs an API key")
        if response_shape not in RESPONSE_SHAPES:
            raise ValueError(f"response_shape must be one of {', '.join(RESPONSE_SHAPES)}")
        if ttl <= 0 or url_fetch_timeout <= 0 or url_max < 0 or clock_offset < 0:
            raise ValueError("ttl and url_fetch_timeout must be > 0; url_max, clock_offset >= 0")
        if lifetime is not None and not lifetime > 0:
            raise ValueError("lifetime must be > 0 seconds (or None: files live until expiresAt)")
        if rate_limit is not None and not 1 <= rate_limit < math.inf:
            raise ValueError("rate_limit must be at least 1 request per second (or None)")
        self.data_dir = Path(data_dir)
        self._api_key = api_key
        self._host = host
        self._port = port
        self._ssl_context = ssl_context  # serve HTTPS with this certificate
        self.ttl = float(ttl)
        self.response_shape = response_shape
        self.url_fetch_timeout = float(url_fetch_timeout)
        self.url_max = int(url_max)
        self.lifetime = None if lifetime is None else float(lifetime)
        self.rate_limit = None if rate_limit is None else float(rate_limit)
        # Real time, not the emulator's clock: advancing that clock must not empty the window.
        self._window = None if rate_limit is None else _SlidingWindow(int(rate_limit))
        self._initial_offset = float(clock_offset)
        self._offset = float(clock_offset)
        # Tests read every request; a long-lived emulator (the CLI's, the embedded one)
        # keeps only the latest `keep_requests`, or its memory would grow per upload.
        self._requests: deque[EmulatorRequest] = deque(maxlen=keep_requests)
        self._link_requests: deque[LinkRequest] = deque(maxlen=keep_requests)
        self._faults: list[_Fault] = []
        self._delays: list[list[Any]] = []  # [seconds, count, endpoint] of delay_stores
        self._chaos = _Chaos(fault_rate, fault_seed, fault_stall)
        self._store: _Store | None = None
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None
        self._bound_port: int | None = None
        self._access_log = access_log

    def __repr__(self) -> str:  # never shows the key
        return f"Emulator(data_dir={str(self.data_dir)!r}, host={self._host!r}, port={self.port})"

    # -- lifecycle

    async def __aenter__(self) -> Emulator:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self) -> None:
        """Open the data dir, sweep what expired, and listen (port 0: a free one)."""
        try:
            self._store = _Store(self.data_dir)
        except (OSError, sqlite3.Error) as err:
            raise ConfigError(f"cannot use emulator data dir {self.data_dir}: {err}") from None
        # The clock never moves back: a restart keeps the larger of the two offsets.
        self._offset = max(self._store.load_offset(), self._initial_offset)
        self._store.save_offset(self._offset)
        self._store.sweep(self.now(), self.lifetime)
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self.url_fetch_timeout), trust_env=False
        )
        self._runner = web.AppRunner(
            self._build_app(), access_log=None, handle_signals=False, shutdown_timeout=2.0
        )
        await self._runner.setup()
        server = self._runner.server
        assert server is not None  # set by setup()
        server.request_handler = self._upload_door(server.request_handler)
        site = web.TCPSite(self._runner, self._host, self._port, ssl_context=self._ssl_context)
        try:
            await site.start()
        except OSError as err:
            await self.stop()
            raise ConfigError(
                f"cannot listen on {self._host}:{self._port}: {err.strerror or err}"
            ) from None
        self._bound_port = int(self._runner.addresses[0][1])

    async def stop(self) -> None:
        """Stop listening and close the store; safe to call twice."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._session is not None:
            await self._session.close()
            self._session = None
        if self._store is not None:
            self._store.close()
            self._store = None

    # -- public surface for tests and the runner

    @property
    def port(self) -> int | None:
        return self._bound_port

    @property
    def base_url(self) -> str:
        if self._bound_port is None:
            raise RuntimeError("the emulator is not started")
        host = f"[{self._host}]" if ":" in self._host else self._host
        scheme = "http" if self._ssl_context is None else "https"
        return f"{scheme}://{host}:{self._bound_port}"

    @property
    def clock_offset(self) -> float:
        return self._offset

    def now(self) -> float:
        """The emulator's clock: real time plus the offset, POSIX seconds."""
        return time.time() + self._offset

    def advance_clock(self, seconds: float) -> float:
        """Move the clock forward (persisted in the data dir); returns the new offset."""
        if seconds < 0:
            raise ValueError("the emulator's clock only moves forward")
        self._offset += float(seconds)
        if self._store is not None:
            self._store.save_offset(self._offset)
        return self._offset

    @property
    def requests(self) -> list[EmulatorRequest]:
        """Requests to the upload endpoints, oldest first."""
        return list(self._requests)

    @property
    def link_requests(self) -> list[LinkRequest]:
        """GET and HEAD requests of download links, oldest first."""
        return list(self._link_requests)

    def inject_faults(
        self,
        status: int,
        count: int,
        *,
        endpoint: str | None = None,
        retry_after: float | None = None,
        body_code: int | None = None,
    ) -> None:
        """Answer the next `count` upload requests (to `endpoint`, or any) with `status`.

        With `body_code`, answer HTTP 200 carrying `{"success": false, "code": body_code}`.
        """
        if not 100 <= status <= 599 or count < 1:
            raise ValueError("status must be an HTTP status and count >= 1")
        if endpoint is not None and endpoint not in ENDPOINTS:
            raise ValueError(f"endpoint must be one of {', '.join(ENDPOINTS)}")
        if retry_after is not None and retry_after < 0:
            raise ValueError("retry_after cannot be negative")
        self._faults.append(_Fault(status, count, endpoint, retry_after, body_code))

    def clear_faults(self) -> None:
        """Forget every fault and delay still waiting to be answered."""
        self._faults.clear()
        self._delays.clear()

    def delay_stores(self, seconds: float, count: int = 1, *, endpoint: str | None = None) -> None:
        """Store the next `count` uploads (to `endpoint`, or any) `seconds` after their body
        arrived, and answer only then: a client that gave up meanwhile sees no answer,
        though the upload lands (and replaces whatever a retry stored under that name)."""
        if seconds <= 0 or count < 1:
            raise ValueError("seconds must be > 0 and count >= 1")
        if endpoint is not None and endpoint not in ENDPOINTS:
            raise ValueError(f"endpoint must be one of {', '.join(ENDPOINTS)}")
        self._delays.append([seconds, count, endpoint])

    def _take_delay(self, endpoint: str) -> float | None:
        for delay in self._delays:
            seconds, count, wanted = delay
            if wanted in (None, endpoint):
                if count <= 1:
                    self._delays.remove(delay)
                else:
                    delay[1] = count - 1
                return float(seconds)
        return None

    def stored_file(self, file_id: str) -> StoredFile | None:
        """The metadata the emulator holds for a fileId (expired ones included)."""
        return self._require_store().get(file_id)

    # -- app

    def _build_app(self) -> web.Application:
        app = web.Application(
            client_max_size=JSON_BODY_MAX,
            middlewares=[_stamp_arrival, self._log_middleware, self._envelope, self._rate_limit],
        )
        app.router.add_post(_PATHS["base64"], self._endpoint_handler("base64"))
        app.router.add_post(_PATHS["stream"], self._endpoint_handler("stream"))
        app.router.add_post(_PATHS["url"], self._endpoint_handler("url"))
        app.router.add_get("/files/{file_id}/{tail:.+}", self._download)
        app.router.add_get("/_emulator/clock", self._admin_get_clock)
        app.router.add_post("/_emulator/clock", self._admin_advance_clock)
        app.router.add_get("/_emulator/requests", self._admin_requests)
        app.router.add_post("/_emulator/faults", self._admin_faults)
        app.on_response_prepare.append(self._date_on_own_clock)
        app.on_response_prepare.append(self._log_link_request)
        return app

    def _upload_door(self, app_handler: _Handler) -> _Handler:
        """A POST to an upload endpoint goes straight to `_serve_upload`; every other
        request takes the app's router and middlewares. The router and four middlewares
        cost an upload as much as its storing did; what they do for it is done here."""

        async def handle(request: web.BaseRequest) -> web.StreamResponse:
            endpoint = _ENDPOINT_BY_PATH.get(request.path)
            if (
                endpoint is None
                or request.method != hdrs.METH_POST
                or hdrs.EXPECT in request.headers
            ):
                return await app_handler(request)
            return await self._serve_upload(request, endpoint)

        return handle

    async def _serve_upload(self, request: web.BaseRequest, endpoint: str) -> web.StreamResponse:
        """What the middlewares and the prepare hooks do for an upload, in their order:
        stamp its arrival, rate-limit it, answer it, date the answer, log it."""
        _RECEIVED_AT.set(time.time())
        started = time.monotonic()
        response = self._refused_by_rate(request, endpoint)
        if response is None:
            response = await self._upload(request, endpoint)
        if not response.prepared:
            response.headers[hdrs.DATE] = http_date(self.now())
        self._log_access(request, response.status, started)
        return response

    def _require_store(self) -> _Store:
        if self._store is None:
            raise RuntimeError("the emulator is not started")
        return self._store

    async def _date_on_own_clock(self, request: web.Request, response: web.StreamResponse) -> None:
        """Every answer's `Date` tells the emulator's clock, so a client can measure the
        offset to its own; it replaces the one aiohttp takes from the real clock."""
        response.headers[hdrs.DATE] = http_date(self.now())

    async def _log_link_request(self, request: web.Request, response: web.StreamResponse) -> None:
        """Logged as the headers leave: only then does a ranged answer know its length."""
        if not _is_link_request(request):
            return
        carries_file = request.method == "GET" and response.status in (200, 206)
        self._link_requests.append(
            LinkRequest(
                method=request.method,
                path=request.rel_url.raw_path,
                status=response.status,
                received_at=_received_at(),
                bytes_sent=(response.content_length or 0) if carries_file else 0,
                range=request.headers.get(hdrs.RANGE),
            )
        )

    @web.middleware
    async def _envelope(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        """Every error leaves in the envelope, with the HTTP status equal to `code`."""
        try:
            return await handler(request)
        except _ApiError as err:
            return _error_response(err.status, err.msg)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
            msg = _STATUS_MSGS.get(exc.status, exc.reason.lower())
            endpoint = _ENDPOINT_BY_PATH.get(request.path)
            if endpoint is not None:  # e.g. a GET on an upload endpoint
                self._log_upload(endpoint, exc.status)
            return _error_response(exc.status, msg, headers)
        except Exception as exc:
            return _error_response(500, f"internal error, please retry ({type(exc).__name__})")

    @web.middleware
    async def _log_middleware(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        if self._access_log is None:
            return await handler(request)
        started = time.monotonic()
        response = await handler(request)
        self._log_access(request, response.status, started)
        return response

    def _log_access(self, request: web.BaseRequest, status: int, started: float) -> None:
        """One write, before the answer leaves (benchmarks count the lines once answered)."""
        if self._access_log is None:
            return
        ms = round((time.monotonic() - started) * 1000, 1)
        self._access_log.write(access_line(request.method, request.path, status, ms))
        self._access_log.flush()

    @web.middleware
    async def _rate_limit(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        """Over the limit, answer 429 at the door: before the key or the body is read."""
        if not _counts_toward_rate(request):
            return await handler(request)
        refused = self._refused_by_rate(request, _ENDPOINT_BY_PATH.get(request.path))
        return refused if refused is not None else await handler(request)

    def _refused_by_rate(
        self, request: web.BaseRequest, endpoint: str | None
    ) -> web.StreamResponse | None:
        """Admit the request (None), or its 429 when the window is full."""
        if self._window is None:
            return None
        wait = self._window.try_admit(time.monotonic())
        if wait is None:
            return None
        if endpoint is not None:
            self._log_upload(endpoint, 429)
        msg = f"too many requests: at most {self._window.limit} a second"
        return _error_response(429, msg, {"Retry-After": str(max(1, math.ceil(wait)))})

    def _log_upload(
        self, endpoint: str, status: int, seen: _Seen | None = None, size: int | None = None
    ) -> None:
        said = seen or _Seen()
        self._requests.append(
            EmulatorRequest(
                endpoint,
                said.upload_path,
                said.file_name,
                said.file_url,
                status,
                size,
                received_at=_received_at(),
                answered_at=time.time(),
            )
        )

    def _check_auth(self, request: web.BaseRequest) -> None:
        if not bearer_ok(request.headers.get("Authorization"), self._api_key):
            raise _ApiError(401, "missing or invalid credentials: send Authorization: Bearer <key>")

    # -- upload endpoints

    def _endpoint_handler(
        self, endpoint: str
    ) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def handle(request: web.Request) -> web.StreamResponse:
            return await self._upload(request, endpoint)

        return handle

    async def _upload(self, request: web.BaseRequest, endpoint: str) -> web.StreamResponse:
        seen = _Seen()
        size: int | None = None
        response: web.StreamResponse
        try:
            self._check_auth(request)
            fault = self._take_fault(endpoint)
            chaos = self._chaos.draw()
            if fault is not None:
                response = _fault_response(fault)
            elif chaos is not None and chaos in CHAOS_BEFORE_STORING:
                response = await _chaos_before_storing(request, chaos)
            else:
                if chaos == "stall":  # answers (and stores) after the client gave up
                    await asyncio.sleep(self._chaos.stall)
                stored = await self._receive_and_store(request, endpoint, seen)
                if chaos is not None and chaos != "stall":
                    date = http_date(self.now())
                    response = await _chaos_after_storing(request, chaos, date)
                    self._log_upload(endpoint, response.status, seen, stored.size)
                    return response
                size = stored.size
                base_url = self._public_base_url(request)
                body = success_body(stored, base_url, self.response_shape)
                response = web.Response(body=body, headers=_JSON_HEADERS)
        except _ApiError as err:
            response = _error_response(err.status, err.msg)
        except web.HTTPException as exc:  # e.g. 413 from the JSON body limit
            response = _error_response(exc.status, _STATUS_MSGS.get(exc.status, exc.reason))
        except Exception as exc:  # the service's 500: the caller may retry
            response = _error_response(500, f"internal error, please retry ({type(exc).__name__})")
        self._log_upload(endpoint, response.status, seen, size)
        return response

    def _take_fault(self, endpoint: str) -> _Fault | None:
        for fault in self._faults:
            if fault.endpoint in (None, endpoint):
                fault.remaining -= 1
                if fault.remaining <= 0:
                    self._faults.remove(fault)
                return fault
        return None

    def _public_base_url(self, request: web.BaseRequest) -> str:
        if self._host in ("0.0.0.0", "::", ""):
            return f"{request.scheme}://{request.host}"
        return self.base_url

    async def _receive_and_store(
        self, request: web.BaseRequest, endpoint: str, seen: _Seen
    ) -> StoredFile:
        store = self._require_store()
        tmp = store.new_tmp()
        try:
            if endpoint == "base64":
                received = await self._receive_base64(request, seen, tmp)
            elif endpoint == "stream":
                received = await _receive_stream(request, seen, tmp)
            else:
                received = await self._receive_url(request, seen, tmp)
            name = received.file_name or random_file_name(
                received.original_name, received.declared_type
            )
            delay = self._take_delay(endpoint)
            if delay is not None:
                await asyncio.sleep(delay)
            now = self.now()
            stored = StoredFile(
                file_id=secrets.token_hex(12),
                upload_path=received.upload_path,
                file_name=name,
                original_name=received.original_name or received.file_name,
                size=received.size,
                mime_type=pick_mime_type(name, received.declared_type),
                uploaded_at=now,
                expires_at=now + self.ttl,
            )
            await store.put(stored, received.data, tmp)
            return stored
        except BaseException:
            tmp.remove()  # once stored, it was moved into place: nothing to remove
            raise

    async def _receive_base64(
        self, request: web.BaseRequest, seen: _Seen, tmp: _TempFile
    ) -> _Received:
        body = await _read_json_object(request)
        upload_path, file_name = _naming_fields(body, seen)
        data, declared = decode_base64_data(body.get("base64Data"))
        if len(data) <= INLINE_MAX:
            return _Received(data, len(data), upload_path, file_name, file_name, declared)
        await asyncio.to_thread(tmp.path.write_bytes, data)
        return _Received(None, len(data), upload_path, file_name, file_name, declared)

    async def _receive_url(
        self, request: web.BaseRequest, seen: _Seen, tmp: _TempFile
    ) -> _Received:
        body = await _read_json_object(request)
        file_url = body.get("fileUrl")
        seen.file_url = file_url if isinstance(file_url, str) else None
        upload_path, file_name = _naming_fields(body, seen)
        if not isinstance(file_url, str) or not file_url.strip():
            raise _ApiError(400, "fileUrl is required")
        parts = urlsplit(file_url.strip())
        if parts.scheme.lower() not in ("http", "https") or not parts.netloc:
            raise _ApiError(400, "fileUrl must be an http or https URL")
        with _Sink(tmp) as sink:
            declared = await self._fetch_to(file_url.strip(), sink)
        original = unquote(PurePosixPath(parts.path).name) or None
        return _Received(sink.data(), sink.size, upload_path, file_name, original, declared)

    async def _fetch_to(self, url: str, sink: _Sink) -> str | None:
        """Download `url` into `tmp`, refusing more than url_max bytes."""
        assert self._session is not None
        limit = self.url_max
        try:
            async with self._session.get(url) as resp:
                if not 200 <= resp.status < 300:
                    raise _ApiError(400, f"failed to fetch fileUrl: origin answered {resp.status}")
                if resp.content_length is not None and resp.content_length > limit:
                    raise _ApiError(400, _too_big_msg(limit))
                async for chunk in resp.content.iter_chunked(CHUNK):
                    if sink.size + len(chunk) > limit:
                        raise _ApiError(400, _too_big_msg(limit))
                    sink.write(chunk)
                return resp.headers.get("Content-Type")
        except (TimeoutError, aiohttp.ClientError) as err:
            reason = fetch_failure_reason(err, self.url_fetch_timeout)
            raise _ApiError(400, f"failed to fetch fileUrl: {reason}") from None

    # -- downloads

    async def _download(self, request: web.Request) -> web.StreamResponse:
        store = self._require_store()
        stored = store.get(request.match_info["file_id"])
        if stored is None or request.match_info["tail"] != stored.remote_path:
            raise _ApiError(404, "file not found")
        reason = gone_reason(stored, self.now(), self.lifetime)
        if reason is not None:
            store.delete(stored.file_id)
            raise _ApiError(404, f"file not found: {reason}")
        if request.method == "HEAD":  # from the metadata: no file to open for a HEAD
            return web.Response(
                headers={
                    "Content-Type": stored.mime_type,
                    "Content-Length": str(stored.size),
                    "Accept-Ranges": "bytes",
                }
            )
        return web.FileResponse(
            store.blob_file(stored.file_id),
            chunk_size=CHUNK,
            headers={"Content-Type": stored.mime_type},
        )

    # -- admin

    async def _admin_get_clock(self, request: web.Request) -> web.StreamResponse:
        self._check_auth(request)
        return web.json_response(self._clock_state())

    async def _admin_advance_clock(self, request: web.Request) -> web.StreamResponse:
        self._check_auth(request)
        body = await _read_json_object(request)
        advance = body.get("advance")
        if not _is_number(advance) or advance < 0:
            raise _ApiError(400, "advance must be a number of seconds >= 0")
        self.advance_clock(float(advance))
        return web.json_response(self._clock_state())

    def _clock_state(self) -> dict[str, Any]:
        now = self.now()
        return {"offset": self._offset, "now": iso_ms(now), "nowTimestamp": now}

    async def _admin_requests(self, request: web.Request) -> web.StreamResponse:
        self._check_auth(request)
        return web.json_response([asdict(r) for r in self._requests])

    async def _admin_faults(self, request: web.Request) -> web.StreamResponse:
        self._check_auth(request)
        body = await _read_json_object(request)
        status, count = body.get("status"), body.get("count", 1)
        retry_after, body_code = body.get("retry_after"), body.get("body_code")
        endpoint = body.get("endpoint")
        if not isinstance(status, int) or not isinstance(count, int):
            raise _ApiError(400, "status and count must be integers")
        if retry_after is not None and not _is_number(retry_after):
            raise _ApiError(400, "retry_after must be a number of seconds")
        if body_code is not None and not isinstance(body_code, int):
            raise _ApiError(400, "body_code must be an integer")
        if endpoint is not None and not isinstance(endpoint, str):
            raise _ApiError(400, "endpoint must be a string")
        try:
            self.inject_faults(
                status, count, endpoint=endpoint, retry_after=retry_after, body_code=body_code
            )
        except ValueError as err:
            raise _ApiError(400, str(err)) from None
        return web.json_response({"queued": sum(f.remaining for f in self._faults)})


# -- request reading (module level: no emulator state) -----------------------------------


@web.middleware
async def _stamp_arrival(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    _RECEIVED_AT.set(time.time())
    return await handler(request)


def _received_at() -> float:
    """When the request being answered arrived (now, outside of a request)."""
    return _RECEIVED_AT.get(time.time())


def _is_link_request(request: web.BaseRequest) -> bool:
    return request.method in (hdrs.METH_GET, hdrs.METH_HEAD) and request.path.startswith("/files/")


def _counts_toward_rate(request: web.BaseRequest) -> bool:
    return request.path in _ENDPOINT_BY_PATH or _is_link_request(request)


def _is_number(value: object) -> TypeGuard[int | float]:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _too_big_msg(limit: int) -> str:
    return f"fileUrl is larger than the {limit} byte limit for URL uploads"


_JSON_HEADERS: Final = {hdrs.CONTENT_TYPE: "application/json; charset=utf-8"}  # json_response's


def _error_response(status: int, msg: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response(error_envelope(status, msg), status=status, headers=headers)


CHAOS_BEFORE_STORING: Final = (
    "500",
    "body_code",
    "429",
    "reset_before",
    "html_504",
    "html_413",
    "not_json",
)
CHAOS_AFTER_STORING: Final = ("reset_after", "truncated", "html_502", "stall")
CHAOS_KINDS: Final = CHAOS_BEFORE_STORING + CHAOS_AFTER_STORING
NO_ANSWER: Final = 0  # the request log's status of a request whose connection was cut


@dataclass(slots=True)
class _Chaos:
    """Random faults: each upload request, with probability `rate`, gets one of
    CHAOS_KINDS (seeded, so a failing test replays)."""

    rate: float = 0.0
    seed: int | None = None
    stall: float = 5.0  # seconds a stalled answer waits (longer than the client does)
    rng: random.Random = field(default_factory=random.Random)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)

    def draw(self) -> str | None:
        if self.rate <= 0 or self.rng.random() >= self.rate:
            return None
        return self.rng.choice(CHAOS_KINDS)


def _html(status: int, title: str) -> web.Response:
    """What a proxy in front of the service answers: not the envelope, not JSON."""
    page = f"<html><head><title>{status} {title}</title></head><body>{title}</body></html>"
    return web.Response(status=status, text=page, content_type="text/html")


async def _chaos_before_storing(request: web.BaseRequest, kind: str) -> web.StreamResponse:
    if kind == "500":
        return _error_response(500, "internal error, please retry (injected)")
    if kind == "body_code":
        return web.json_response(error_envelope(500, "injected failure in a 200"))
    if kind == "429":
        return _error_response(429, "too many requests", {"Retry-After": "1"})
    if kind == "html_504":
        return _html(504, "Gateway Timeout")
    if kind == "html_413":
        return _html(413, "Request Entity Too Large")
    if kind == "not_json":
        return web.Response(text="<html>Welcome to our proxy</html>", content_type="text/html")
    return _cut(request)  # reset_before


async def _chaos_after_storing(
    request: web.BaseRequest, kind: str, date: str
) -> web.StreamResponse:
    """`date`: the emulator's clock for the answer sent before it is returned."""
    if kind == "html_502":
        return _html(502, "Bad Gateway")
    if kind == "truncated":
        body = json.dumps({"success": True, "code": 200, "msg": SUCCESS_MSG}).encode()
        headers = {"Content-Type": "application/json", hdrs.DATE: date}
        response = web.StreamResponse(headers=headers)
        response.content_length = len(body)
        await response.prepare(request)
        await response.write(body[: len(body) // 2])
        if request.transport is not None:
            request.transport.close()
        return response
    return _cut(request)  # reset_after


def _cut(request: web.BaseRequest) -> web.StreamResponse:
    """Close the connection without an answer."""
    if request.transport is not None:
        request.transport.close()
    return web.Response(status=NO_ANSWER)  # never sent: the request log's record


def _fault_response(fault: _Fault) -> web.Response:
    headers = (
        {"Retry-After": format_retry_after(fault.retry_after)}
        if fault.retry_after is not None
        else None
    )
    if fault.body_code is not None:
        msg = _STATUS_MSGS.get(fault.body_code, "injected failure")
        return web.json_response(error_envelope(fault.body_code, msg), headers=headers)
    msg = _STATUS_MSGS.get(fault.status, "injected failure")
    return _error_response(fault.status, msg, headers)


async def _read_json_object(request: web.BaseRequest) -> dict[str, Any]:
    raw = await request.read()  # bounded by the app's client_max_size
    try:
        body = json.loads(_json_text_of(raw))
    except (ValueError, UnicodeDecodeError):
        raise _ApiError(400, "request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise _ApiError(400, "request body must be a JSON object")
    return body


def _json_text_of(raw: bytes) -> bytes | str:
    """A body opening with `{` and no NUL is what `json.loads` would decode as UTF-8
    (its `detect_encoding`): decoded here, without that function's Python."""
    if raw[:1] == b"{" and raw[1:2] != b"\x00":
        return raw.decode("utf-8", "surrogatepass")
    return raw


def _naming_fields(body: dict[str, Any], seen: _Seen) -> tuple[str, str | None]:
    raw_path, raw_name = body.get("uploadPath"), body.get("fileName")
    seen.upload_path = raw_path if isinstance(raw_path, str) else None
    seen.file_name = raw_name if isinstance(raw_name, str) else None
    return check_upload_path(raw_path), check_file_name(raw_name)


async def _receive_stream(request: web.BaseRequest, seen: _Seen, tmp: _TempFile) -> _Received:
    """Read a multipart body part by part; the `file` part goes to disk chunk by chunk."""
    try:
        reader = await request.multipart()
    except (ValueError, KeyError, AssertionError):
        raise _ApiError(
            400, "file is required: send multipart/form-data with the file in a part named 'file'"
        ) from None
    fields: dict[str, str] = {}
    got_file: tuple[bytes | None, int, str | None, str | None] | None = None
    try:
        while True:
            part = await reader.next()
            if part is None:
                break
            if not isinstance(part, aiohttp.BodyPartReader):
                raise _ApiError(400, "nested multipart bodies are not supported")
            if part.name == "file" and got_file is None:
                with _Sink(tmp) as sink:
                    await _part_to(part, sink)
                declared = part.headers.get("Content-Type")
                got_file = (sink.data(), sink.size, _part_file_name(part), declared)
            elif part.name in ("uploadPath", "fileName"):
                fields[part.name] = await _read_field(part)
            else:
                await _drain(part)
    except ValueError as err:  # aiohttp's word for a malformed multipart body
        raise _ApiError(400, f"malformed multipart body: {err}") from None
    seen.upload_path = fields.get("uploadPath")
    seen.file_name = fields.get("fileName")
    upload_path = check_upload_path(fields.get("uploadPath"))
    file_name = check_file_name(fields.get("fileName"))
    if got_file is None:
        raise _ApiError(400, "file is required: send it as the multipart part named 'file'")
    data, size, original, declared = got_file
    return _Received(data, size, upload_path, file_name, original, declared)


def _part_file_name(part: aiohttp.BodyPartReader) -> str | None:
    """The part's filename; aiohttp's client percent-encodes it, browsers send raw UTF-8."""
    name = part.filename
    if name and re.search(r"%[0-9A-Fa-f]{2}", name):
        with contextlib.suppress(UnicodeDecodeError):
            return unquote(name, errors="strict")
    return name


async def _part_to(part: aiohttp.BodyPartReader, sink: _Sink) -> None:
    while chunk := await part.read_chunk(CHUNK):
        sink.write(chunk)


async def _read_field(part: aiohttp.BodyPartReader) -> str:
    data = bytearray()
    while chunk := await part.read_chunk(CHUNK):
        data.extend(chunk)
        if len(data) > FIELD_MAX:
            raise _ApiError(400, f"multipart field {part.name!r} is too long")
    charset = part.get_charset(default="utf-8")
    try:
        return data.decode(charset)
    except (UnicodeDecodeError, LookupError):
        raise _ApiError(400, f"multipart field {part.name!r} is not valid {charset}") from None


async def _drain(part: aiohttp.BodyPartReader) -> None:
    while await part.read_chunk(CHUNK):
        pass


# -- blocking entry for the CLI -----------------------------------------------------------


def run_emulator(config: EmulatorConfig, on_listening: Callable[[str], None]) -> None:
    """`serve` on uvloop's event loop when it is installed (the `fast` extra), else on
    asyncio's own: a benchmark's server must not be its ceiling."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(serve(config, on_listening))
    else:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(serve(config, on_listening))


async def serve(config: EmulatorConfig, on_listening: Callable[[str], None]) -> None:
    """Run the emulator until SIGINT or SIGTERM; `on_listening(base_url)` once it
    listens (the CLI prints it, so a parent learns the port it asked 0 for). The
    access log goes to stderr."""
    emulator = Emulator(
        config.data_dir,
        config.api_key,
        host=config.host,
        port=config.port,
        ttl=config.ttl,
        response_shape=config.response_shape,
        url_fetch_timeout=config.url_fetch_timeout,
        url_max=config.url_max,
        clock_offset=config.clock_offset,
        lifetime=config.lifetime,
        rate_limit=config.rate_limit,
        fault_rate=config.fault_rate,
        fault_seed=config.fault_seed,
        fault_stall=config.fault_stall,
        access_log=sys.stderr,
        keep_requests=SERVED_REQUESTS_KEPT,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        async with emulator:
            on_listening(emulator.base_url)
            await stop.wait()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(ValueError, RuntimeError):
                loop.remove_signal_handler(sig)


__all__ = [
    "ENDPOINTS",
    "RESPONSE_SHAPES",
    "Emulator",
    "EmulatorConfig",
    "EmulatorRequest",
    "LinkRequest",
    "StoredFile",
    "run_emulator",
    "serve",
]
