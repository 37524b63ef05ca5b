"""Send one item's bytes to the service by one method: the single attempt.

The runner and `refresh` both come here; retries, recording and progress totals
are theirs. Errors are the client's family: an unreachable or failing origin is
retryable, an origin that answers 4xx or a vanished local file is permanent.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from migrator.connect import Connection, resolve_url
from migrator.errors import (
    AuthRejectedError,
    EndpointError,
    PermanentError,
    RetryableError,
    UploadError,
)
from migrator.model import AttemptRecord, Method, SourceKind, UploadReceipt
from migrator.retry import RetryPolicy, backoff_delay, should_retry

CHUNK = 256 * 1024


@dataclass(frozen=True, slots=True)
class Send:
    """What to send and where: an item of the plan, or of the ledger on refresh."""

    source: str  # local path, or URL (template)
    kind: SourceKind
    method: Method  # BASE64, STREAM or URL; STREAM of a URL source is a stream-through
    upload_path: str
    file_name: str
    size: int | None


@dataclass(frozen=True, slots=True)
class Sent:
    receipt: UploadReceipt
    bytes_sent: int  # bytes this machine sent (0 for a URL upload)
    sha256: str | None  # of the bytes sent, when they passed through here
    received_at: float = field(default_factory=time.time)  # local time of the answer

    def lifetime(self, ttl: float) -> tuple[float, float]:
        """(uploaded_at, expires_at); see `upload_lifetime`."""
        return upload_lifetime(self.receipt, self.received_at, ttl)


def upload_lifetime(receipt: UploadReceipt, received_at: float, ttl: float) -> tuple[float, float]:
    """(uploaded_at, expires_at) of an upload (pure).

    The service's `expiresAt` is trusted when the answer has it, as the docs say; the
    endpoint pages' shape has none, so it is `uploadedAt`/`uploadTime` (or, without
    that either, the moment the answer arrived here) plus `ttl`.
    """
    uploaded_at = receipt.uploaded_at if receipt.uploaded_at is not None else received_at
    expires_at = receipt.expires_at if receipt.expires_at is not None else uploaded_at + ttl
    return uploaded_at, expires_at


async def send(conn: Connection, job: Send, on_bytes: Callable[[int], None]) -> Sent:
    """One attempt. `on_bytes(n)` is told of every chunk as it leaves."""
    if job.method is Method.URL:
        return await _send_by_url(conn, job)
    if job.kind is SourceKind.URL:
        return await _stream_through(conn, job, on_bytes)
    if job.method is Method.BASE64:
        return await _send_base64(conn, job, on_bytes)
    return await _send_file(conn, job, on_bytes)


async def _send_base64(conn: Connection, job: Send, on_bytes: Callable[[int], None]) -> Sent:
    data = await asyncio.to_thread(_read_local, Path(job.source))
    receipt = await conn.client.upload_base64(
        data, upload_path=job.upload_path, file_name=job.file_name
    )
    on_bytes(len(data))
    return Sent(receipt, len(data), hashlib.sha256(data).hexdigest())


async def _send_file(conn: Connection, job: Send, on_bytes: Callable[[int], None]) -> Sent:
    path = Path(job.source)
    size = await asyncio.to_thread(_local_size, path)
    digest = hashlib.sha256()
    counted = _Counter(digest, on_bytes)
    receipt = await conn.client.upload_file(
        path, upload_path=job.upload_path, file_name=job.file_name, size=size, on_chunk=counted
    )
    return Sent(receipt, counted.total, digest.hexdigest())


async def _send_by_url(conn: Connection, job: Send) -> Sent:
    url = resolve_url(job.source, conn.url_vars)
    receipt = await conn.client.upload_url(
        url, upload_path=job.upload_path, file_name=job.file_name
    )
    if job.size is not None and receipt.file_size is not None and receipt.file_size != job.size:
        # Permanent: a retry would fetch the same changed file; the next run re-plans it.
        raise PermanentError(
            f"the service stored {receipt.file_size} bytes of {url}, "
            f"the origin announced {job.size}"
        )
    return Sent(receipt, 0, None)


async def _stream_through(conn: Connection, job: Send, on_bytes: Callable[[int], None]) -> Sent:
    url = resolve_url(job.source, conn.url_vars)
    digest = hashlib.sha256()
    counted = _Counter(digest, on_bytes)
    try:
        async with conn.origins.get(url) as response:
            check_fetch_status(f"origin {url}", response.status)
            size = response.content_length
            if job.size is not None and size is not None and size != job.size:
                # Checked before a byte is sent: these are not the bytes we mean to send.
                raise PermanentError(
                    f"origin {url} now has {size} bytes, not the {job.size} planned: it changed"
                )
            receipt = await conn.client.upload_stream(
                _chunks(response),
                upload_path=job.upload_path,
                file_name=job.file_name,
                size=size,
                on_chunk=counted,
            )
    except (aiohttp.ClientError, TimeoutError) as err:
        raise RetryableError(f"origin {url} failed: {_describe(err)}") from None
    if receipt.file_size is not None and receipt.file_size != counted.total:
        raise RetryableError(f"the service stored {receipt.file_size} bytes, sent {counted.total}")
    return Sent(receipt, counted.total, digest.hexdigest())


async def _chunks(response: aiohttp.ClientResponse) -> AsyncIterator[bytes]:
    async for chunk in response.content.iter_chunked(CHUNK):
        yield chunk


def check_fetch_status(what: str, status: int) -> None:
    """A GET of an origin or a download link: 408, 429 and 5xx are worth retrying,
    other 4xx are not. `what` names the request in the message."""
    if status >= 500 or status in (408, 429):
        raise RetryableError(f"{what} answered HTTP {status}", status=status)
    if status >= 400:
        raise PermanentError(f"{what} answered HTTP {status}", status=status)


class _Counter:
    """Feeds every chunk to the hash and the progress callback, and counts them."""

    def __init__(self, digest: hashlib._Hash, on_bytes: Callable[[int], None]) -> None:
        self.digest = digest
        self.on_bytes = on_bytes
        self.total = 0

    def __call__(self, chunk: bytes) -> None:
        self.digest.update(chunk)
        self.total += len(chunk)
        self.on_bytes(len(chunk))


def _read_local(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise PermanentError(f"source file is gone: {path}") from None
    except OSError as err:
        raise PermanentError(f"cannot read {path}: {err.strerror}") from None


def _local_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        raise PermanentError(f"source file is gone: {path}") from None
    except OSError as err:
        raise PermanentError(f"cannot read {path}: {err.strerror}") from None


def sha256_of(path: Path) -> str:
    """The sha256 of a local file, read a MiB at a time (blocking: run it in a thread)."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1024 * 1024):
            digest.update(chunk)
    return digest.hexdigest()


def _describe(err: BaseException) -> str:
    text = str(err) or type(err).__name__
    return text.splitlines()[0][:200]


class Interrupted(Exception):
    """A stop was requested while waiting to retry."""


@dataclass(frozen=True, slots=True)
class AttemptReport:
    """One attempt's facts, for the ledger and the log."""

    job: Send
    number: int  # 1-based, across all the ways tried for this item
    started_at: float
    duration: float
    bytes_sent: int
    outcome: str  # ok, retry, next (another way follows), failed, auth, endpoint, interrupted
    error: UploadError | None = None

    @property
    def http_status(self) -> int | None:
        """The service's status: 200 for success, None when no answer came."""
        if self.error is not None:
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
            upload_path=self.job.upload_path,
            file_name=self.job.file_name,
            method=self.job.method,
            attempt=self.number,
            started_at=self.started_at,
            duration=self.duration,
            outcome=self.outcome,
            http_status=self.http_status,
            bytes_sent=self.bytes_sent,
            error=self.error_text,
        )

    def log_fields(self) -> dict[str, object]:
        """The fields of this attempt's log event (the item is the caller's to name)."""
        return {
            "upload_path": self.job.upload_path,
            "file_name": self.job.file_name,
            "method": self.job.method,
            "bytes": self.bytes_sent,
            "attempt": self.number,
            "outcome": self.outcome,
            "http_status": self.http_status,
            "duration": round(self.duration, 3),
            "error": self.error_text,
        }


@dataclass(slots=True)
class Attempts:
    """Tries each way of sending an item in turn, each with its own retry budget.

    The first way that succeeds wins. A rejected key or a wrong endpoint ends it at
    once (no other way can help); a permanent error or an exhausted budget moves on
    to the next way, and the last way's error is raised when none is left.
    """

    conn: Connection
    policy: RetryPolicy
    rng: random.Random
    sleep: Callable[[float], Awaitable[bool]]  # False when a stop cut the sleep short
    on_bytes: Callable[[int], None]
    on_attempt: Callable[[AttemptReport], None]
    made: int = 0

    async def first_that_works(self, ways: Sequence[Send]) -> tuple[Send, Sent]:
        last_error: UploadError | None = None
        for index, way in enumerate(ways):
            more_ways = index + 1 < len(ways)
            try:
                return way, await self._with_retries(way, more_ways)
            except (AuthRejectedError, EndpointError):
                raise
            except UploadError as err:
                last_error = err
        assert last_error is not None, "no way to send was given"
        raise last_error

    async def _with_retries(self, way: Send, more_ways: bool) -> Sent:
        tries = 0
        while True:
            tries += 1
            self.made += 1
            try:
                return await self._once(way, tries, more_ways)
            except UploadError as err:
                if not should_retry(self.policy, err, tries):
                    raise
                retry_after = err.retry_after if isinstance(err, RetryableError) else None
                delay = backoff_delay(self.policy, tries, retry_after=retry_after, rng=self.rng)
                if not await self.sleep(delay):
                    raise Interrupted(str(err)) from err

    async def _once(self, way: Send, tries: int, more_ways: bool) -> Sent:
        sent = 0

        def count(n: int) -> None:
            nonlocal sent
            sent += n
            self.on_bytes(n)

        started, clock = time.time(), time.monotonic()
        try:
            result = await send(self.conn, way, count)
        except UploadError as err:
            self.on_bytes(-sent)  # progress rewinds with the failed attempt
            outcome = _outcome(err, self.policy, tries, more_ways)
            self._report(way, started, clock, sent, outcome, err)
            raise
        except asyncio.CancelledError:
            self.on_bytes(-sent)
            self._report(way, started, clock, sent, "interrupted", None)
            raise
        self._report(way, started, clock, result.bytes_sent, "ok", None)
        return result

    def _report(
        self,
        way: Send,
        started: float,
        clock: float,
        sent: int,
        outcome: str,
        error: UploadError | None,
    ) -> None:
        duration = time.monotonic() - clock
        self.on_attempt(AttemptReport(way, self.made, started, duration, sent, outcome, error))


def _outcome(error: UploadError, policy: RetryPolicy, tries: int, more_ways: bool) -> str:
    """What a failed attempt leads to: `tries` counts attempts of this way only."""
    if isinstance(error, AuthRejectedError):
        return "auth"
    if isinstance(error, EndpointError):
        return "endpoint"
    if should_retry(policy, error, tries):
        return "retry"
    return "next" if more_ways else "failed"
