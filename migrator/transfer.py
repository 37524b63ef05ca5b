"""Requests with their retries: the one path every request of every command takes.

`send` makes one upload attempt of one item by one method (base64, stream, URL, or a
stream-through of a remote file). `Attempts` is the retry path: it tries each way of
doing an item's work in turn (`Step`s: uploads, server-side copies, downloads, link
probes), each with full-jitter backoff and `Retry-After` honoured, waits on the
shared `Pacer` before every request to the service and tells it how the service
answered, and reports every attempt (for the ledger's attempts table and the log).

Errors are the client's family: an unreachable or failing origin is retryable, an
origin that answers 4xx or a vanished local file is permanent.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import ipaddress
import os
import random
import re
import stat
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Generic, TypeVar
from urllib.parse import urljoin, urlsplit

from migrator.client import (
    DEFAULT_CHUNK_SIZE,
    Chunk,
    Digest,
    UploadClient,
    check_regular,
    local_read_error,
    open_regular,
    open_regular_fd,
    retry_after_seconds,
)
from migrator.clock import ServiceClock
from migrator.errors import (
    Interrupted,
    LinkGoneError,
    MigratorError,
    PermanentError,
    RetryableError,
    RunStoppingError,
    SourceChangedError,
    SourceGoneError,
    UploadError,
)
from migrator.logs import get_logger
from migrator.model import AttemptRecord, Method, SourceKind, Uploaded, UploadReceipt
from migrator.naming import substitute_url
from migrator.pacer import Pacer, Sleep, Ticket, is_throttle
from migrator.retry import RetryPolicy, backoff_delay, should_retry

if TYPE_CHECKING:  # imported where a request is made: a run with nothing to send never
    import aiohttp  # loads aiohttp

T = TypeVar("T")
log = get_logger("migrator.transfer")


@dataclass(frozen=True, slots=True)
class Limits:
    """How long and how much: the bounds every request of a command works within."""

    timeout: float = 120.0  # a read that waits longer than this fails (and is retried)
    min_rate: int = 16 * 1024  # bytes/s: a whole transfer slower than this is given up
    max_size: int = 10 * 1024**3  # the most bytes read from a body of unknown size
    base64_max: int = 1024**2  # a file planned as base64 that grew past this is streamed

    def deadline(self, size: int | None) -> float:
        """Seconds one attempt may take in all: a drip-feeding peer cannot hold a worker
        for ever, however often it sends one more byte (pure)."""
        return self.timeout + (self.max_size if size is None else size) / self.min_rate

    def body_limit(self, size: int | None) -> int:
        """The most bytes to accept from a body expected to be `size` long (pure)."""
        return self.max_size if size is None else size


Whole = tuple[bytes, int]  # a small file's bytes, and its mtime when they were read
_Request = tuple[str, int, Digest, "asyncio.Future[Whole | None]"]

READ_LANES = 4  # trips to threads at once: a file on a hung mount holds up one of them
READ_BATCH = 64  # the most files one trip reads
READ_STALL = 0.1  # seconds a trip may be out before the reads waiting for it take a new lane


class WholeFiles:
    """Reads small local files whole, in worker threads, several files per trip.

    A file of a few KiB costs less to read than to hand to a thread and back (a queued
    job, a wake-up of the event loop per answer): the reads every worker asks for in
    one turn of the loop go together, and all their answers come back with one
    wake-up. Never on the loop itself: a hung mount must not freeze it (progress,
    timeouts, leases), and it holds up one lane of READ_LANES, not every read.

    One lane at a time while trips come back within `stall` seconds: the reads asked
    meanwhile wait and go together in the next trip. Two threads reading at once
    fight the loop for the GIL at every system call (a futex storm: a tenth of a
    small-file run's CPU); a trip out longer than `stall` (a hung mount) lets the
    waiting reads take another lane.
    """

    def __init__(self, lanes: int = READ_LANES, stall: float = READ_STALL) -> None:
        self.lanes = lanes
        self.stall = stall
        self._waiting: list[_Request] = []
        self._out: list[float] = []  # when each trip now in a thread left
        self._called = False  # a dispatch is due at the next turn of the loop
        self._recheck: asyncio.TimerHandle | None = None
        self.trips = 0  # trips to a thread so far, for tests and stats

    async def read(self, source: str, limit: int, digest: Digest) -> Whole | None:
        """The file and its mtime (see `_read_whole`), `digest` updated with its bytes
        in the thread that read them; None when it is now larger than `limit`."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Whole | None] = loop.create_future()
        self._waiting.append((source, limit, digest, future))
        self._call_dispatch(loop)
        return await future

    def _call_dispatch(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._called:
            return
        if self._lane_free(loop.time()):
            self._called = True  # the other reads asked for in this turn join the trip
            loop.call_soon(self._dispatch, loop)
        elif len(self._out) < self.lanes and self._recheck is None:
            self._recheck = loop.call_later(self.stall, self._stalled, loop)

    def _lane_free(self, now: float) -> bool:
        """No trip out, or every trip out has taken `stall` seconds (and a lane is left)."""
        out = self._out
        return not out or (len(out) < self.lanes and now - max(out) >= self.stall)

    def _stalled(self, loop: asyncio.AbstractEventLoop) -> None:
        self._recheck = None
        if self._waiting:
            self._call_dispatch(loop)

    def _dispatch(self, loop: asyncio.AbstractEventLoop) -> None:
        self._called = False
        self._waiting = [request for request in self._waiting if not request[3].done()]
        now = loop.time()
        if not self._waiting:
            return
        if not self._lane_free(now):
            self._call_dispatch(loop)  # when the trip out comes back, or stalls
            return
        batch, self._waiting = self._waiting[:READ_BATCH], self._waiting[READ_BATCH:]
        self._out.append(now)
        self.trips += 1
        jobs = [(source, limit, digest) for source, limit, digest, _ in batch]
        try:
            trip = loop.run_in_executor(None, _read_each, jobs)
        except RuntimeError as err:  # the executor is shut down: say so, never hang
            trip = loop.create_future()
            trip.set_exception(err)
        trip.add_done_callback(lambda done: self._answer(loop, batch, done, now))

    def _answer(
        self,
        loop: asyncio.AbstractEventLoop,
        batch: list[_Request],
        trip: asyncio.Future[list[Whole | Exception | None]],
        left: float,
    ) -> None:
        self._out.remove(left)
        failure = trip.exception() if not trip.cancelled() else asyncio.CancelledError()
        answers = trip.result() if failure is None else [failure] * len(batch)
        for (_, _, _, future), answer in zip(batch, answers, strict=True):
            if future.done():  # its attempt was cut short meanwhile
                continue
            if isinstance(answer, BaseException):
                future.set_exception(answer)
            else:
                future.set_result(answer)
        if self._waiting:
            self._call_dispatch(loop)


def _read_each(jobs: list[tuple[str, int, Digest]]) -> list[Whole | Exception | None]:
    """`_read_whole` of each file, its failure in its place (blocking: in a thread)."""
    answers: list[Whole | Exception | None] = []
    for source, limit, digest in jobs:
        try:
            whole = _read_whole(source, limit)
        except Exception as err:  # each read's failure goes to its own attempt
            answers.append(err)
            continue
        if whole is not None:
            digest.update(whole[0])
        answers.append(whole)
    return answers


@dataclass(frozen=True, slots=True)
class Http:
    """The HTTP side of a connection."""

    origins: aiohttp.ClientSession  # remote sources, download links, stream-through
    client: UploadClient | None = None  # holds the key; None for commands that only read links


OpenHttp = Callable[[], Awaitable[Http]]
"""The HTTP side, opened at the first call (`connect()` opens it once, under a lock)."""


def already_open(http: Http) -> OpenHttp:
    """An `OpenHttp` for sessions the caller opened itself (tests, embedders)."""

    async def opened() -> Http:
        return http

    return opened


@dataclass(frozen=True, slots=True)
class Connection:
    """Live handles for one command; valid inside `connect()`'s context only. Its
    sessions open at the first request: a run with nothing to send makes none."""

    target_id: str  # what the ledger keys items by: the manifest's base_url as written
    base_url: str  # where requests to the service go
    http: OpenHttp
    url_vars: Mapping[str, str]  # substitutions for URL sources (${EMBEDDED_ORIGIN})
    pacer: Pacer = field(default_factory=Pacer)
    clock: ServiceClock = field(default_factory=ServiceClock)
    limits: Limits = field(default_factory=Limits)
    private_origins: bool = False  # may a stream-through be redirected to private addresses
    files: WholeFiles = field(default_factory=WholeFiles)  # small local files, read whole
    origin_connections: int = 0  # the origins' session's limit, for probes; 0: unknown

    async def origins(self) -> aiohttp.ClientSession:
        """The session for remote sources, download links and stream-throughs."""
        return (await self.http()).origins

    async def api(self) -> UploadClient:
        """The API client; only commands that upload open a connection with one."""
        client = (await self.http()).client
        if client is None:
            raise RuntimeError("this connection was opened without the API key")
        return client

    def resolve(self, url: str) -> str:
        """A URL source with `${NAME}` filled in (the ledger keeps the template)."""
        return substitute_url(url, self.url_vars)


# -- one upload attempt ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Send:
    """What to send and where: an item of the plan, or of the ledger on refresh."""

    source: str  # local path, or URL (template)
    kind: SourceKind
    method: Method  # BASE64, STREAM or URL; STREAM of a URL source is a stream-through
    upload_path: str
    file_name: str
    size: int | None

    @property
    def action(self) -> str:
        """How the attempt record names it."""
        return self.method.value


@dataclass(frozen=True, slots=True)
class Sent:
    """A successful upload: the receipt, and what was sent as far as we know it."""

    receipt: UploadReceipt
    bytes_sent: int  # bytes this machine sent (0 for a URL upload)
    sha256: str | None  # of the bytes sent, when they passed through here
    size: int | None  # bytes the service holds: those sent, or what it said it stored
    mtime_ns: int | None = None  # of a local source, as it was when it was read
    received_at: float = field(default_factory=time.time)  # the answer's time (service clock)
    method: Method | None = None  # how it went, when not as planned (a file that grew)

    def lifetime(self, ttl: float) -> tuple[float, float]:
        """(uploaded_at, expires_at); see `upload_lifetime`."""
        return upload_lifetime(self.receipt, self.received_at, ttl)

    def uploaded(self, planned: Method, ttl: float, label: str) -> Uploaded:
        """What this upload proved, for the ledger; answer times not believed are said."""
        method = self.method or planned
        doubt = lifetime_doubt(self.receipt, self.received_at)
        if doubt is not None:
            log.warning("upload.times_not_believed", item=label, reason=doubt, ttl=ttl)
        uploaded_at, expires_at = self.lifetime(ttl)
        return Uploaded(
            method=method,
            download_url=self.receipt.download_url,
            file_id=self.receipt.file_id,
            uploaded_at=uploaded_at,
            expires_at=expires_at,
            size=self.size,
            sha256=self.sha256,
        )


EARLIEST_TIME = 1_577_836_800.0  # 2020-01-01: no answer of this service is older
LONGEST_STATED_LIFE = 30 * 86_400.0  # an expiresAt further ahead is not believed
UPLOADED_AT_SLACK = 3_600.0  # how far an uploadedAt may stray from the answer's own time


def upload_lifetime(receipt: UploadReceipt, received_at: float, ttl: float) -> tuple[float, float]:
    """(uploaded_at, expires_at) of an upload (pure); `received_at` on the service's clock.

    The service's `expiresAt` is trusted when the answer has a believable one, as the
    docs say; the endpoint pages' shape has none, so it is `uploadedAt`/`uploadTime`
    (or, without that either, the moment the answer arrived) plus `ttl`. A time
    outside reason (before 2020, an expiry already past or more than 30 days ahead,
    an upload time far from the answer's) is not believed: one bad answer must not
    make every item look expired, or break every later command.
    """
    uploaded_at = receipt.uploaded_at
    if uploaded_at is None or abs(uploaded_at - received_at) > UPLOADED_AT_SLACK:
        uploaded_at = received_at
    expires_at = receipt.expires_at
    if expires_at is None or lifetime_doubt(receipt, received_at) is not None:
        expires_at = uploaded_at + ttl
    return uploaded_at, expires_at


def lifetime_doubt(receipt: UploadReceipt, received_at: float) -> str | None:
    """Why the answer's times are not believed, or None (pure)."""
    expires_at = receipt.expires_at
    if expires_at is not None:
        if expires_at < EARLIEST_TIME or expires_at <= received_at:
            return "expiresAt is already past"
        if expires_at > received_at + LONGEST_STATED_LIFE:
            return "expiresAt is more than 30 days ahead"
    uploaded_at = receipt.uploaded_at
    if uploaded_at is not None and abs(uploaded_at - received_at) > UPLOADED_AT_SLACK:
        return "uploadedAt is far from the time of the answer"
    return None


class Meter:
    """The bytes of one attempt: counted, hashed, shown as progress and paced."""

    def __init__(self, pacer: Pacer, sleep: Sleep, on_bytes: Callable[[int], None]) -> None:
        self.pacer = pacer
        self.sleep = sleep
        self.on_bytes = on_bytes
        self.total = 0
        self._digest = hashlib.sha256()
        self._hash_chunks = True

    async def __call__(self, chunk: Chunk) -> None:
        if self._hash_chunks:
            self._digest.update(chunk)
        self.total += len(chunk)
        self.on_bytes(len(chunk))
        await self.pacer.transfer(len(chunk), self.sleep)

    @property
    def sha256(self) -> str:
        return self._digest.hexdigest()

    def reader_digest(self) -> Digest:
        """The hash, for a reader to update as it reads each chunk (in its thread, beside
        the sending); the chunks this meter then sees are not hashed twice."""
        self._hash_chunks = False
        return self._digest

    def rewind(self) -> None:
        """A failed attempt takes its bytes back from the progress shown."""
        self.on_bytes(-self.total)

    def chunk_size(self, default: int = DEFAULT_CHUNK_SIZE) -> int:
        return self.pacer.chunk_size(default)


async def send(conn: Connection, job: Send, meter: Meter) -> Sent:
    """One upload attempt; the meter sees every chunk as it leaves. The receipt's time
    (`received_at`) is on the service's clock: its answer's Date just measured it."""
    if job.method is Method.URL:
        return await _send_by_url(conn, job)
    if job.kind is SourceKind.URL:
        return await _stream_through(conn, job, meter)
    if job.method is Method.BASE64:
        return await _send_base64(conn, job, meter)
    return await _send_file(conn, job, meter)


async def _send_base64(conn: Connection, job: Send, meter: Meter) -> Sent:
    """Read whole and sent as JSON; a file that grew past base64_max since it was
    planned goes by stream instead (never whole in memory)."""
    # The open, the read, the hash and the check after it in one trip to a thread,
    # shared with the other small files asked for at the same moment.
    whole = await conn.files.read(job.source, conn.limits.base64_max, meter.reader_digest())
    if whole is None:
        return replace(await _send_file(conn, job, meter), method=Method.STREAM)
    data, mtime_ns = whole
    await meter(data)
    api = await conn.api()
    receipt = await api.upload_base64(data, upload_path=job.upload_path, file_name=job.file_name)
    size = len(data)
    return Sent(receipt, size, meter.sha256, size, mtime_ns, conn.clock.now())


async def _send_file(conn: Connection, job: Send, meter: Meter) -> Sent:
    path = Path(job.source)
    size, mtime_ns = await asyncio.to_thread(_local_stat, path)
    api = await conn.api()
    receipt = await api.upload_file(
        path,
        upload_path=job.upload_path,
        file_name=job.file_name,
        size=size,
        on_chunk=meter,
        chunk_size=meter.chunk_size(),
        digest=meter.reader_digest(),
    )
    await _unchanged_since(path, meter.total, mtime_ns)
    return Sent(receipt, meter.total, meter.sha256, meter.total, mtime_ns, conn.clock.now())


async def _unchanged_since(path: Path, size: int, mtime_ns: int) -> None:
    await asyncio.to_thread(_check_unchanged, path, size, mtime_ns)


def _check_unchanged(path: str | os.PathLike[str], size: int, mtime_ns: int) -> None:
    """A file rewritten while it was read (same size or not) was sent as a mix of two
    versions: another attempt sends it again, whole, over what the service stored."""
    if _local_stat(path) != (size, mtime_ns):
        raise SourceChangedError(f"{path} changed while it was sent; sending it again")


async def _send_by_url(conn: Connection, job: Send) -> Sent:
    url = conn.resolve(job.source)
    api = await conn.api()
    receipt = await api.upload_url(url, upload_path=job.upload_path, file_name=job.file_name)
    if job.size is not None and receipt.file_size is not None and receipt.file_size != job.size:
        # Permanent: a retry would fetch the same changed file; the next run re-plans it.
        raise PermanentError(
            f"the service stored {receipt.file_size} bytes of {url}, "
            f"the origin announced {job.size}"
        )
    size = receipt.file_size if receipt.file_size is not None else job.size
    return Sent(receipt, 0, None, size, received_at=conn.clock.now())


async def _stream_through(conn: Connection, job: Send, meter: Meter) -> Sent:
    import aiohttp

    url = conn.resolve(job.source)
    api = await conn.api()
    try:
        async with fetch_origin(conn, url) as response:
            check_origin_status(f"origin {url}", response.status, response.headers)
            size = response.content_length
            if job.size is not None and size is not None and size != job.size:
                # Checked before a byte is sent: these are not the bytes we mean to send.
                raise SourceGoneError(
                    f"origin {url} now has {size} bytes, not the {job.size} planned: it changed"
                )
            receipt = await api.upload_stream(
                body_chunks(response, meter.chunk_size()),
                upload_path=job.upload_path,
                file_name=job.file_name,
                size=size,
                on_chunk=meter,
                limit=conn.limits.body_limit(job.size),
            )
    except (aiohttp.ClientError, TimeoutError) as err:
        raise RetryableError(f"origin {url} failed: {describe(err)}") from None
    if receipt.file_size is not None and receipt.file_size != meter.total:
        raise RetryableError(f"the service stored {receipt.file_size} bytes, sent {meter.total}")
    return Sent(receipt, meter.total, meter.sha256, meter.total, received_at=conn.clock.now())


REDIRECTS = frozenset({301, 302, 303, 307, 308})
MAX_REDIRECTS = 10


@contextlib.asynccontextmanager
async def fetch_origin(conn: Connection, url: str) -> AsyncIterator[aiohttp.ClientResponse]:
    """GET an origin for a stream-through. The service could not fetch this URL, and
    this machine may reach addresses it cannot: a redirect into loopback, link-local
    or private addresses is refused, unless the manifest's URL names such an address
    itself or `allow_private_origins` is set."""
    origins = await conn.origins()
    if conn.private_origins or await names_private_address(url):
        async with origins.get(url) as response:
            yield response
        return
    for _ in range(MAX_REDIRECTS + 1):
        async with origins.get(url, allow_redirects=False) as response:
            location = response.headers.get("Location")
            if response.status not in REDIRECTS or not location:
                yield response
                return
            target = urljoin(str(response.url), location)
        if await names_private_address(target):
            log.warning("origin.redirect_refused", url=url, to=target)
            raise PermanentError(
                f"origin {url} redirected to {target}, a private address: refused "
                "(settings.allow_private_origins: true allows it)"
            )
        url = target
    raise PermanentError(f"origin {url}: more than {MAX_REDIRECTS} redirects")


async def names_private_address(url: str) -> bool:
    """Whether `url`'s host is, or resolves to, a loopback, link-local, private or
    otherwise non-public address (an unresolvable host counts as private)."""
    host = urlsplit(url).hostname or ""
    try:
        addresses = [ipaddress.ip_address(host.strip("[]"))]
    except ValueError:
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(host, None)
        except OSError:
            return True
        addresses = [ipaddress.ip_address(info[4][0]) for info in infos]
    return any(is_private_address(address) for address in addresses)


def is_private_address(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Not an address of the public internet (pure)."""
    return (
        address.is_private
        or address.is_loopback
        or address.is_link_local
        or address.is_reserved
        or address.is_unspecified
        or address.is_multicast
    )


async def body_chunks(response: aiohttp.ClientResponse, size: int) -> AsyncIterator[bytes]:
    """The body of an answer, `size` bytes at a time."""
    async for chunk in response.content.iter_chunked(size):
        yield chunk


def check_fetch_status(what: str, status: int, headers: Mapping[str, str] | None = None) -> None:
    """A GET of an origin or a download link: 408, 429 and 5xx are worth retrying (after
    the answer's Retry-After, if any), other 4xx are not. `what` names the request."""
    if status >= 500 or status in (408, 429):
        wait = None if headers is None else retry_after_seconds(headers, now=time.time())
        raise RetryableError(f"{what} answered HTTP {status}", status=status, retry_after=wait)
    if status >= 400:
        raise PermanentError(f"{what} answered HTTP {status}", status=status)


def check_origin_status(what: str, status: int, headers: Mapping[str, str]) -> None:
    """A GET of an origin: 404 and 410 mean the source is gone (SourceGoneError);
    otherwise as `check_fetch_status`."""
    if status in (404, 410):
        raise SourceGoneError(f"{what} answered HTTP {status}: the source is gone", status=status)
    check_fetch_status(what, status, headers)


def check_link_status(what: str, status: int, headers: Mapping[str, str]) -> None:
    """A GET or HEAD of one of our links: 404 and 410 mean the service deleted the file
    (LinkGoneError); otherwise as `check_fetch_status`."""
    if status in (404, 410):
        raise LinkGoneError(f"{what} answered HTTP {status}: the file is gone", status=status)
    check_fetch_status(what, status, headers)


@dataclass(frozen=True, slots=True)
class LinkCheck:
    """What a probe of a link found: it serves `size` bytes, or it is gone."""

    gone: bool
    size: int | None = None
    status: int | None = None


_IDENTITY = {"Accept-Encoding": "identity"}
_CONTENT_RANGE_RE = re.compile(r"bytes\s+(?:\d+-\d+|\*)/(\d+)\s*$", re.IGNORECASE)


async def check_link(conn: Connection, url: str) -> LinkCheck:
    """HEAD the link, or GET its first byte where HEAD is refused (405, 501); no body
    is read. Gone (404/410) is an answer, not an error; 5xx and the like raise as
    every fetch does, to be retried."""
    import aiohttp

    what = f"check of {url}"
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=15, sock_read=60)
    try:
        origins = await conn.origins()
        async with origins.head(
            url, allow_redirects=True, headers=_IDENTITY, timeout=timeout
        ) as response:
            conn.clock.observe(response.headers)
            if response.status not in (405, 501):
                return _link_check(what, response, plain_length(response))
        ranged = {**_IDENTITY, "Range": "bytes=0-0"}
        async with origins.get(url, headers=ranged, timeout=timeout) as response:
            conn.clock.observe(response.headers)
            total = range_total(response.headers.get("Content-Range", ""))
            size = total if response.status == 206 else plain_length(response)
            check = _link_check(what, response, size)
            response.close()  # not the body: one byte, or all of it if Range was ignored
            return check
    except (aiohttp.ClientError, TimeoutError) as err:
        raise RetryableError(f"{what} failed: {describe(err)}") from None


def _link_check(what: str, response: aiohttp.ClientResponse, size: int | None) -> LinkCheck:
    try:
        check_link_status(what, response.status, response.headers)
    except LinkGoneError:
        return LinkCheck(gone=True, status=response.status)
    return LinkCheck(gone=False, size=size, status=response.status)


async def read_service_clock(conn: Connection, sleep: Sleep) -> None:
    """Ask the service anything, to read its clock from the answer's Date (and keep
    nothing else); a service that does not answer leaves the clock as it was."""
    import aiohttp

    ticket = await conn.pacer.request(sleep)
    conn.pacer.released(ticket)
    origins = await conn.origins()
    with contextlib.suppress(aiohttp.ClientError, TimeoutError, ValueError):
        async with origins.get(
            conn.base_url + "/", allow_redirects=False, timeout=aiohttp.ClientTimeout(total=10)
        ) as response:
            conn.clock.observe(response.headers)
            response.close()


def plain_length(response: aiohttp.ClientResponse) -> int | None:
    """The body's length, when Content-Length gives it for the bytes themselves."""
    encoding = response.headers.get("Content-Encoding", "identity").strip().lower()
    length = response.headers.get("Content-Length", "").strip()
    if encoding not in ("", "identity") or not length.isdigit():
        return None
    return int(length)


def range_total(content_range: str) -> int | None:
    """The whole size from a Content-Range (`bytes 0-0/1234`), or None."""
    match = _CONTENT_RANGE_RE.match(content_range.strip())
    return int(match.group(1)) if match else None


def _read_whole(source: str, limit: int) -> tuple[bytes, int] | None:
    """The whole file and its mtime (a base64 upload), opened with `open_regular`'s
    care; None when it is now larger than `limit`. A file rewritten while it was read
    raises SourceChangedError (blocking: run it in a thread)."""
    try:
        fd, opened = open_regular_fd(source)
        try:
            if opened.st_size > limit:
                return None
            data = _read_to_end(fd, opened.st_size)
        finally:
            os.close(fd)
    except FileNotFoundError:
        raise SourceGoneError(f"source file is gone: {source}") from None
    except OSError as err:
        raise local_read_error(Path(source), err) from None
    _check_unchanged(source, len(data), opened.st_mtime_ns)
    return data, opened.st_mtime_ns


def _read_to_end(fd: int, size: int) -> bytes:
    """All a descriptor has left to read, `size` (what fstat said) in one read when
    the system allows; a file that grew since is read to its end all the same."""
    parts: list[bytes] = []
    total = 0
    while total <= size:
        chunk = os.read(fd, size + 1 - total)
        if not chunk:
            return parts[0] if len(parts) == 1 else b"".join(parts)
        parts.append(chunk)
        total += len(chunk)
    while chunk := os.read(fd, 1024 * 1024):
        parts.append(chunk)
    return b"".join(parts)


def _local_stat(path: str | os.PathLike[str]) -> tuple[int, int]:
    """Size and mtime of a local source; a link or anything but a regular file in its
    place is refused, as `open_regular` would."""
    try:
        info = os.lstat(path)
        if stat.S_ISLNK(info.st_mode):
            raise OSError(errno.ELOOP, "a symbolic link", str(path))
        check_regular(info.st_mode, path)
    except FileNotFoundError:
        raise SourceGoneError(f"source file is gone: {path}") from None
    except OSError as err:
        raise local_read_error(Path(path), err) from None
    return info.st_size, info.st_mtime_ns


def sha256_of(path: Path) -> str:
    """The sha256 of a local file, read a MiB at a time (blocking: run it in a thread).
    A FIFO or a device in its place raises OSError rather than hang or never end."""
    digest = hashlib.sha256()
    with open_regular(path, follow_symlinks=True) as handle:
        while chunk := handle.read(1024 * 1024):
            digest.update(chunk)
    return digest.hexdigest()


def describe(err: BaseException) -> str:
    """An exception as a short line of text (its message, or its type's name)."""
    import aiohttp

    if isinstance(err, aiohttp.ClientConnectorCertificateError):
        reason = getattr(err.certificate_error, "verify_message", None) or "it does not verify"
        return f"its TLS certificate is not trusted: {reason} (see target.ca_bundle)"
    text = str(err) or type(err).__name__
    return text.splitlines()[0][:200]


# -- the retry path -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Step(Generic[T]):
    """One way to do an item's work: what the record calls it, and the call that does it."""

    action: str  # base64, stream, url, download, probe
    via: str  # the source or link it reads, for the log
    call: Callable[[Meter], Awaitable[T]]
    size: int | None = None  # bytes it moves, when known: sets its deadline


def upload_step(conn: Connection, job: Send) -> Step[Sent]:
    """The step that sends `job` over `conn`."""

    async def call(meter: Meter) -> Sent:
        return await send(conn, job, meter)

    return Step(job.action, job.source, call, job.size)


@dataclass(frozen=True, slots=True)
class AttemptReport:
    """One attempt's facts, for the ledger and the log."""

    upload_path: str
    file_name: str
    action: str
    via: str
    number: int  # 1-based, across all the ways tried for this item
    started_at: float
    duration: float
    bytes_sent: int
    outcome: str  # ok, retry, next (another way follows), failed, auth, endpoint, interrupted
    error: MigratorError | None = None

    @property
    def http_status(self) -> int | None:
        """The answer's status: 200 for success, None when no answer came."""
        if isinstance(self.error, UploadError):
            return self.error.status
        return 200 if self.outcome == "ok" else None

    @property
    def error_text(self) -> str | None:
        return None if self.error is None else str(self.error)

    def record(self, *, run_id: int, target: str) -> AttemptRecord:
        """The ledger's row for this attempt."""
        return AttemptRecord(
            run_id=run_id,
            target=target,
            upload_path=self.upload_path,
            file_name=self.file_name,
            method=self.action,
            attempt=self.number,
            started_at=self.started_at,
            duration=self.duration,
            outcome=self.outcome,
            http_status=self.http_status,
            bytes_sent=self.bytes_sent,
            error=self.error_text,
        )

    def log_fields(self) -> dict[str, object]:
        """The fields of this attempt's log event."""
        return {
            "upload_path": self.upload_path,
            "file_name": self.file_name,
            "method": self.action,
            "via": self.via,
            "bytes": self.bytes_sent,
            "attempt": self.number,
            "outcome": self.outcome,
            "http_status": self.http_status,
            "duration": round(self.duration, 3),
            "error": self.error_text,
        }


@dataclass(slots=True)
class Attempts:
    """Tries each step of one item in turn, each with its own retry budget.

    The first step that succeeds wins. A run-stopping error ends it at once (no other
    step can help); a permanent error or an exhausted budget moves on to the next
    step, and the last step's error is raised when none is left. Before every
    attempt the shared pacer gives the request its turn; after it, the pacer hears
    whether the service asked to slow down.
    """

    upload_path: str
    file_name: str
    policy: RetryPolicy
    rng: random.Random
    pacer: Pacer
    sleep: Sleep  # False when a stop cut the sleep short
    on_bytes: Callable[[int], None]
    on_attempt: Callable[[AttemptReport], None]
    limits: Limits = field(default_factory=Limits)
    made: int = 0
    _probed: bool = False  # the last attempt probed an open breaker

    async def first_that_works(self, steps: Sequence[Step[T]]) -> tuple[Step[T], T]:
        last_error: MigratorError | None = None
        for index, step in enumerate(steps):
            more_steps = index + 1 < len(steps)
            try:
                return step, await self._with_retries(step, more_steps)
            except RunStoppingError:
                raise
            except UploadError as err:
                last_error = err
        assert last_error is not None, "no step was given"
        raise last_error

    async def one(self, step: Step[T]) -> T:
        """The single step of an item that has only one (a download, a probe)."""
        return (await self.first_that_works([step]))[1]

    async def _with_retries(self, step: Step[T], more_steps: bool) -> T:
        tries = 0
        while True:
            tries += 1
            self.made += 1
            try:
                return await self._once(step, tries, more_steps)
            except UploadError as err:
                if self._probed:  # a probe of a service that is down costs no retry
                    tries -= 1
                if not should_retry(self.policy, err, tries):
                    raise
                retry_after = err.retry_after if isinstance(err, RetryableError) else None
                delay = backoff_delay(
                    self.policy, max(tries, 1), retry_after=retry_after, rng=self.rng
                )
                if not await self.sleep(delay):
                    raise Interrupted(str(err)) from err

    async def _once(self, step: Step[T], tries: int, more_steps: bool) -> T:
        meter = Meter(self.pacer, self.sleep, self.on_bytes)
        ticket = await self.pacer.request(self.sleep)
        self._probed = ticket.probe
        started, clock = time.time(), time.monotonic()

        def report(outcome: str, error: MigratorError | None) -> None:
            duration = time.monotonic() - clock
            self.on_attempt(
                AttemptReport(
                    self.upload_path,
                    self.file_name,
                    step.action,
                    step.via,
                    self.made,
                    started,
                    duration,
                    meter.total,
                    outcome,
                    error,
                )
            )

        try:
            result = await self._within_deadline(step, meter)
        except MigratorError as err:
            meter.rewind()
            self._tell_pacer(err, ticket)
            report(_outcome(err, self.policy, tries, more_steps), err)
            raise
        except (asyncio.CancelledError, Interrupted):
            meter.rewind()
            self.pacer.released(ticket)
            report("interrupted", None)
            raise
        self.pacer.succeeded(ticket)
        report("ok", None)
        return result

    async def _within_deadline(self, step: Step[T], meter: Meter) -> T:
        deadline = self.limits.deadline(step.size)
        try:
            async with asyncio.timeout(deadline):
                return await step.call(meter)
        except TimeoutError:
            # The request may have reached the service: it can still land.
            raise RetryableError(
                f"{step.action} of {step.via} took more than {deadline:.0f} s "
                f"({meter.total} bytes moved): too slow",
                uncertain=True,
            ) from None

    def _tell_pacer(self, err: MigratorError, ticket: Ticket) -> None:
        if isinstance(err, RetryableError) and is_throttle(err.status, err.retry_after):
            self.pacer.throttled(ticket, err.retry_after)
        elif isinstance(err, RetryableError):
            self.pacer.failed(ticket, str(err))
        elif isinstance(err, UploadError):
            self.pacer.answered(ticket)
        else:
            self.pacer.released(ticket)


def _outcome(error: MigratorError, policy: RetryPolicy, tries: int, more_steps: bool) -> str:
    """What a failed attempt leads to: `tries` counts attempts of this step only."""
    if isinstance(error, RunStoppingError):
        return error.outcome
    if should_retry(policy, error, tries):
        return "retry"
    return "next" if more_steps else "failed"
