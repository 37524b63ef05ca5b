"""The expiry lifecycle: keep uploads alive (`refresh`) and bring them home (`download`).

Files on the service are deleted after their TTL (3 days). `refresh` re-uploads what
expires soon to the same uploadPath/fileName, from the best source still there: the
local file if it is unchanged, else the service's own copy while its link is alive
(a URL upload: no local bandwidth), else the origin of a URL source. `download`
pulls every live item to DIR/<uploadPath>/<fileName>, checked and renamed into place.
Both are driven by the ledger, safe to run unattended, and resume where they stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import os
import random
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from migrator.client import NoServiceError, no_service_message
from migrator.connect import connect, open_origins, read_api_key
from migrator.errors import (
    DISK_ERRNOS,
    AuthRejectedError,
    DiskError,
    EndpointError,
    ExitCode,
    MigratorError,
    PermanentError,
    RetryableError,
    UploadError,
    UsageError,
    exit_code_of,
)
from migrator.ledger import Ledger, locked
from migrator.logs import get_logger
from migrator.model import (
    ItemState,
    ItemUpdate,
    LedgerItem,
    Manifest,
    Method,
    Settings,
    SourceKind,
)
from migrator.plan import choose_method
from migrator.pool import WorkPool, stop_on_signals
from migrator.report import CommandResult, publish_outputs
from migrator.retry import RetryPolicy, backoff_delay, should_retry
from migrator.transfer import (
    AttemptReport,
    Attempts,
    Interrupted,
    Send,
    Sent,
    check_fetch_status,
    sha256_of,
)

log = get_logger("migrator.lifecycle")
CHUNK = 1024 * 1024


@dataclass(frozen=True, slots=True)
class LifecycleOptions:
    within: float | None = None  # refresh: default settings.refresh_within; download: all
    concurrency: int | None = None
    grace_period: float = 30.0
    handle_signals: bool = False
    seed: int | None = None
    metrics_file: Path | None = None
    only_remote: bool = False  # download: only items whose source is a URL


@dataclass(frozen=True, slots=True)
class LifecycleSummary:
    command: str
    counts: Mapping[str, int]  # e.g. refreshed, lost, failed, skipped, interrupted
    duration: float
    message: str | None = None  # why the command stopped early
    stopped_code: ExitCode | None = None

    @property
    def exit_code(self) -> ExitCode:
        if self.stopped_code is not None:
            return self.stopped_code
        bad = self.counts.get("failed", 0) + self.counts.get("lost", 0)
        return ExitCode.ITEMS_FAILED if bad else ExitCode.OK

    def as_dict(self) -> dict[str, Any]:
        return {
            **self.counts,
            "duration": round(self.duration, 3),
            "exit_code": int(self.exit_code),
        }


class _Stop(Exception):
    def __init__(self, code: ExitCode, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(slots=True)
class _Command:
    """What refresh and download share: the lock, the ledger, the pool, the counts."""

    name: str
    manifest: Manifest
    options: LifecycleOptions
    ledger: Ledger
    run_id: int
    pool: WorkPool[LedgerItem] | None = None
    counts: dict[str, int] = field(default_factory=dict)
    stop: _Stop | None = None
    summary: LifecycleSummary | None = None

    def count(self, outcome: str) -> None:
        self.counts[outcome] = self.counts.get(outcome, 0) + 1

    async def sleep(self, delay: float) -> bool:
        assert self.pool is not None
        return await self.pool.sleep(delay)

    def signalled(self, signum: signal.Signals) -> None:
        code = ExitCode.INTERRUPTED_INT if signum == signal.SIGINT else ExitCode.INTERRUPTED_TERM
        self.stop = self.stop or _Stop(code, f"stopped by {signum.name}")
        if self.pool is not None:
            self.pool.request_stop()


# -- refresh --------------------------------------------------------------------------------


async def refresh(
    manifest: Manifest,
    options: LifecycleOptions | None = None,
    *,
    environ: Mapping[str, str] | None = None,
) -> LifecycleSummary:
    """Re-upload every done item that expires within `options.within`."""
    opts = options or LifecycleOptions()
    within = manifest.settings.refresh_within if opts.within is None else opts.within
    concurrency = opts.concurrency or manifest.settings.concurrency
    if not manifest.target.is_embedded:
        read_api_key(manifest.target, environ)  # ConfigError before any write
    async with (
        _session(manifest, "refresh", opts) as command,
        connect(manifest, concurrency=concurrency, environ=environ) as conn,
    ):
        refresher = _Refresher(command, conn, within)
        await _drive(command, refresher.rows(), refresher.refresh_one)
    assert command.summary is not None
    return command.summary


def refresh_ways(
    row: LedgerItem, *, local_unchanged: bool, now: float, settings: Settings
) -> list[Send]:
    """Where a refresh can take the bytes from, best first (pure).

    Only the bytes that were uploaded, never different ones: the local file when it
    is unchanged; the service's own copy while its link lives (a URL upload, or
    streamed through this machine above url_max). Only once that link is dead, the
    origin of a URL source, streamed through here so that its size is checked before
    a byte is sent, and its sha256 after. An expired item with none of these is lost.
    """
    ways: list[Send] = []

    def way(source: str, kind: SourceKind, method: Method) -> Send:
        return Send(source, kind, method, row.upload_path, row.file_name, row.size)

    if row.kind is SourceKind.FILE and local_unchanged and row.size is not None:
        ways.append(way(row.source, SourceKind.FILE, _local_method(row.size, settings)))
    alive = row.expires_at is not None and row.expires_at > now and bool(row.download_url)
    if alive and row.download_url:
        ways.append(way(row.download_url, SourceKind.URL, _remote_method(row.size, settings)))
    elif row.kind is SourceKind.URL:
        ways.append(way(row.source, SourceKind.URL, Method.STREAM))
    return ways


def _local_method(size: int, settings: Settings) -> Method:
    return choose_method(SourceKind.FILE, size, Method.AUTO, settings)


def _remote_method(size: int | None, settings: Settings) -> Method:
    return choose_method(SourceKind.URL, size, Method.AUTO, settings)


def local_unchanged(row: LedgerItem) -> bool:
    """The local source still has the size and mtime it had when it was uploaded."""
    try:
        info = Path(row.source).stat()
    except OSError:
        return False
    return info.st_size == row.size and info.st_mtime_ns == row.mtime_ns


class _Refresher:
    def __init__(self, command: _Command, conn: Any, within: float) -> None:
        self.command = command
        self.conn = conn
        self.deadline = time.time() + within
        self.rng = random.Random(command.options.seed)
        self.policy = RetryPolicy(retries=command.manifest.settings.retries)

    async def rows(self) -> AsyncIterator[LedgerItem]:
        ledger, target = self.command.ledger, self.command.manifest.target.base_url
        async for row in ledger.iter_items(
            target, states=[ItemState.DONE], expiring_before=self.deadline
        ):
            yield row

    async def refresh_one(self, row: LedgerItem) -> None:
        now = time.time()
        unchanged = await asyncio.to_thread(local_unchanged, row)
        ways = refresh_ways(
            row, local_unchanged=unchanged, now=now, settings=self.command.manifest.settings
        )
        if not ways:
            self._lost(row, "expired on the service, and no source is left to upload it again")
            return
        attempts = Attempts(
            conn=self.conn,
            policy=self.policy,
            rng=self.rng,
            sleep=self.command.sleep,
            on_bytes=_ignore_bytes,
            on_attempt=lambda report: _record_attempt(self.command, row, report),
        )
        try:
            way, sent = await attempts.first_that_works(ways)
        except (AuthRejectedError, EndpointError) as err:
            raise _Stop(_stop_code(err), str(err)) from None
        except NoServiceError as err:
            if not self.command.counts.get("refreshed"):
                # Before anything worked, an unreachable service is not a reason to mark
                # expired items lost.
                raise _Stop(ExitCode.USAGE, no_service_message(err)) from None
            self._failed(row, now, str(err), attempts.made)
        except Interrupted:
            self.command.count("interrupted")
        except UploadError as err:
            self._failed(row, now, str(err), attempts.made)
        else:
            if row.sha256 and sent.sha256 and sent.sha256 != row.sha256:
                reason = "the origin now serves other bytes (sha256 differs); `migrator run`"
                self._lost(row, f"{reason} uploads the new version", attempts.made)
                return
            self._refreshed(row, way, sent, attempts.made)

    def _refreshed(self, row: LedgerItem, way: Send, sent: Sent, attempts: int) -> None:
        receipt = sent.receipt
        uploaded_at, expires_at = sent.lifetime(self.command.manifest.settings.ttl)
        _put(
            self.command,
            row,
            ItemState.DONE,
            None,
            attempts_added=attempts,
            method=way.method,
            download_url=receipt.download_url,
            file_id=receipt.file_id,
            uploaded_at=uploaded_at,
            expires_at=expires_at,
            sha256=sent.sha256,  # kept as it was when already known (it matched)
        )
        self.command.count("refreshed")
        log.info("refresh.done", item=row.source, via=way.source, method=way.method)

    def _failed(self, row: LedgerItem, now: float, error: str, attempts: int) -> None:
        if row.expires_at is not None and row.expires_at <= now:
            self._lost(row, f"expired, and every source failed: {error}", attempts)
            return
        # Still alive: the old link keeps working; the next refresh tries again.
        _put(self.command, row, ItemState.DONE, error, attempts_added=attempts)
        self.command.count("failed")
        log.warning("refresh.failed", item=row.source, error=error)

    def _lost(self, row: LedgerItem, reason: str, attempts: int = 0) -> None:
        _put(self.command, row, ItemState.LOST, reason, attempts_added=attempts)
        self.command.count("lost")
        log.error("refresh.lost", item=row.source, upload_path=row.upload_path, error=reason)


def _ignore_bytes(count: int) -> None:
    """Refresh shows no byte progress; counts come from the ledger."""


def _stop_code(err: UploadError) -> ExitCode:
    return ExitCode.AUTH if isinstance(err, AuthRejectedError) else ExitCode.USAGE


def _record_attempt(command: _Command, row: LedgerItem, report: AttemptReport) -> None:
    command.ledger.put_attempt(report.record(run_id=command.run_id, target=row.target))
    log.info(
        f"{command.name}.attempt", item=row.source, via=report.job.source, **report.log_fields()
    )


def _put(
    command: _Command, row: LedgerItem, state: ItemState, error: str | None, **fields: Any
) -> None:
    command.ledger.put_item(
        ItemUpdate(
            target=row.target,
            upload_path=row.upload_path,
            file_name=row.file_name,
            source=row.source,
            kind=row.kind,
            state=state,
            last_error=error,
            **fields,
        )
    )


# -- download -------------------------------------------------------------------------------


async def download(
    manifest: Manifest, dest: Path, options: LifecycleOptions | None = None
) -> LifecycleSummary:
    """Download every live item to dest/<uploadPath>/<fileName>; skip what is there."""
    opts = options or LifecycleOptions()
    concurrency = opts.concurrency or manifest.settings.concurrency
    root = dest if dest.is_absolute() else Path.cwd() / dest
    _check_dest(root)
    async with (
        _session(manifest, "download", opts) as command,
        _download_session(manifest, concurrency) as session,
    ):
        downloader = _Downloader(command, session, root)
        await _drive(command, downloader.rows(), downloader.download_one)
    assert command.summary is not None
    return command.summary


def _check_dest(root: Path) -> None:
    """--dest must be a folder, or a path whose nearest existing part is one."""
    existing = next((p for p in (root, *root.parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        where = "is" if existing == root else f"is under {existing}, which is"
        raise UsageError(f"--dest: {root} {where} not a folder")


def destination_for(root: Path, upload_path: str, file_name: str) -> Path | None:
    """root/<uploadPath>/<fileName>, or None when the name would leave root (pure)."""
    parts = [p for p in upload_path.split("/") if p] + [file_name]
    if any(p in ("", ".", "..") or "\\" in p or "/" in p or "\0" in p for p in parts):
        return None
    if upload_path.startswith("/") or Path(file_name).is_absolute():
        return None
    path = root.joinpath(*parts)
    return path if path.is_relative_to(root) else None


@contextlib.asynccontextmanager
async def _download_session(
    manifest: Manifest, concurrency: int
) -> AsyncIterator[aiohttp.ClientSession]:
    """Download links need no key; an embedded target needs its emulator up to serve them."""
    if manifest.target.is_embedded:
        async with connect(manifest, concurrency=concurrency) as conn:
            yield conn.origins
    else:
        async with open_origins(manifest, concurrency=concurrency) as origins:
            yield origins.session


class _Downloader:
    def __init__(self, command: _Command, session: aiohttp.ClientSession, root: Path) -> None:
        self.command = command
        self.session = session
        self.root = root
        self.rng = random.Random(command.options.seed)
        self.policy = RetryPolicy(retries=command.manifest.settings.retries)
        now = time.time()
        within = command.options.within
        self.deadline = None if within is None else now + within

    async def rows(self) -> AsyncIterator[LedgerItem]:
        ledger, target = self.command.ledger, self.command.manifest.target.base_url
        now = time.time()
        async for row in ledger.iter_items(
            target, states=[ItemState.DONE], expiring_before=self.deadline
        ):
            if row.expires_at is not None and row.expires_at <= now:
                continue  # already deleted by the service
            if self.command.options.only_remote and row.kind is not SourceKind.URL:
                continue
            yield row

    async def download_one(self, row: LedgerItem) -> None:
        path = destination_for(self.root, row.upload_path, row.file_name)
        if path is None:
            self._failed(row, f"refused: {row.upload_path}/{row.file_name} would leave {self.root}")
            return
        await asyncio.to_thread(_remove_stale_temp, path, row.id)
        if await asyncio.to_thread(_already_there, path, row):
            if row.downloaded_path != str(path):  # found there, e.g. after a SIGKILL
                self._record(row, path, None)
            self.command.count("skipped")
            return
        try:
            await self._fetch_with_retries(row, path)
        except _DestinationError as err:  # not the item: no other item would fare better
            raise _Stop(err.exit_code, str(err)) from None

    async def _fetch_with_retries(self, row: LedgerItem, path: Path) -> None:
        tries = 0
        while True:
            tries += 1
            try:
                digest = await self._fetch(row, path)
            except UploadError as err:
                if not should_retry(self.policy, err, tries):
                    self._failed(row, str(err))
                    return
                delay = backoff_delay(self.policy, tries, retry_after=None, rng=self.rng)
                if not await self.command.sleep(delay):
                    self.command.count("interrupted")
                    return
            else:
                self._record(row, path, digest if row.sha256 is None else None)
                self.command.count("downloaded")
                log.info("download.done", item=row.source, path=str(path))
                return

    async def _fetch(self, row: LedgerItem, path: Path) -> str:
        url = row.download_url
        if not url:
            raise PermanentError("no download link recorded")
        try:
            async with self.session.get(url) as response:
                check_fetch_status(f"download of {url}", response.status)
                return await save_download(response, path, row)
        except (aiohttp.ClientError, TimeoutError) as err:
            raise RetryableError(f"download of {url} failed: {err or type(err).__name__}") from None

    def _record(self, row: LedgerItem, path: Path, sha256: str | None) -> None:
        _put(
            self.command,
            row,
            ItemState.DONE,
            row.last_error,
            downloaded_path=str(path),
            downloaded_at=time.time(),
            sha256=sha256,
        )

    def _failed(self, row: LedgerItem, error: str) -> None:
        self.command.count("failed")
        log.warning("download.failed", item=row.source, error=error)


def _already_there(path: Path, row: LedgerItem) -> bool:
    """A file with the recorded hash (or, without one, the recorded size and place)."""
    try:
        size = path.stat().st_size
    except OSError:
        return False
    if row.size is not None and size != row.size:
        return False
    if row.sha256:
        return sha256_of(path) == row.sha256
    return row.downloaded_path == str(path)


async def save_download(response: aiohttp.ClientResponse, path: Path, row: LedgerItem) -> str:
    """Stream the body to a temporary file beside `path`, check it, rename it into place."""
    try:
        # Not in a thread: a cancellation while the thread ran would leave the file
        # behind with nobody to remove it (a mkdir and an open do not block for long).
        fd, temp = _temp_beside(path, row.id)
    except OSError as err:
        raise _destination_error(path, err) from None
    try:
        digest, size = await _stream_to(fd, response)
        _check_body(row, size, digest)
        temp.replace(path)
        return digest
    except (aiohttp.ClientError, TimeoutError) as err:
        # Before OSError: aiohttp's socket errors and timeouts are OSErrors too, but
        # a stalled or reset link is the network's failure, not the disk's.
        raise RetryableError(f"download of {response.url} failed: {_describe(err)}") from None
    except OSError as err:
        raise _destination_error(path, err) from None
    finally:
        temp.unlink(missing_ok=True)


def temp_path_for(path: Path, item_id: int) -> Path:
    """The one temporary name the download of ledger item `item_id` to `path` uses (pure).

    Fixed rather than random, so that what a killed download left behind is found and
    removed by the next one; the item id keeps two items apart, and the name is cut
    so that it stays within the 255 bytes a file name may have.
    """
    stem = path.name.encode()[:200].decode(errors="ignore")
    return path.with_name(f".{stem}.{item_id}.part")


def _remove_stale_temp(path: Path, item_id: int) -> None:
    with contextlib.suppress(OSError):
        temp_path_for(path, item_id).unlink(missing_ok=True)


def _temp_beside(path: Path, item_id: int) -> tuple[int, Path]:
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = temp_path_for(path, item_id)
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC
    return os.open(temp, flags, 0o600), temp


async def _stream_to(fd: int, response: aiohttp.ClientResponse) -> tuple[str, int]:
    """Write the body to `fd`, fsync it; returns its sha256 and size."""
    digest = hashlib.sha256()
    size = 0
    with os.fdopen(fd, "wb") as out:
        async for chunk in response.content.iter_chunked(CHUNK):
            digest.update(chunk)
            size += len(chunk)
            await asyncio.to_thread(out.write, chunk)
        await asyncio.to_thread(_sync, out)
    return digest.hexdigest(), size


def _describe(err: BaseException) -> str:
    return (str(err) or type(err).__name__).splitlines()[0][:200]


def _sync(out: Any) -> None:
    out.flush()
    os.fsync(out.fileno())


def _check_body(row: LedgerItem, size: int, sha256: str) -> None:
    if row.size is not None and size != row.size:
        raise RetryableError(f"downloaded {size} bytes, expected {row.size}")
    if row.sha256 and sha256 != row.sha256:
        raise RetryableError("downloaded bytes do not match the recorded sha256")


class _DestinationError(MigratorError):
    """The destination is in the way (a file where a folder must go, no permission):
    the download stops with exit 1. A failing disk (full, read-only) is a DiskError, 74."""

    exit_code = ExitCode.ITEMS_FAILED


class _DiskFailure(_DestinationError, DiskError):
    exit_code = ExitCode.IO


def _destination_error(path: Path, err: OSError) -> _DestinationError:
    kind = _DiskFailure if err.errno in DISK_ERRNOS else _DestinationError
    return kind(_disk_message(path, err))


def _disk_message(path: Path, err: OSError) -> str:
    if err.errno == errno.ENOSPC:
        return f"cannot write {path}: the disk is full"
    return f"cannot write {path}: {err.strerror}"


# -- what both commands share ---------------------------------------------------------------


@contextlib.asynccontextmanager
async def _session(
    manifest: Manifest, name: str, opts: LifecycleOptions
) -> AsyncIterator[_Command]:
    """Lock, ledger, run row; on the way out: finish the run, publish outputs."""
    started, started_wall = time.monotonic(), time.time()
    with locked(manifest.ledger):
        async with await Ledger.open(manifest.ledger) as ledger:
            run_id = await ledger.start_run(name, str(manifest.path))
            command = _Command(name, manifest, opts, ledger, run_id)
            log.info(f"{name}.start", job=manifest.name, run_id=run_id)
            error: BaseException | None = None
            try:
                yield command
            except BaseException as err:
                error = err  # recorded as what it is, not as a clean run
                raise
            finally:
                summary = command.summary = _summary(command, time.monotonic() - started)
                status = _status(command, summary, error)
                await ledger.finish_run(run_id, status, summary.as_dict())
                log.info(f"{name}.summary", job=manifest.name, run_id=run_id, **summary.as_dict())
                code = summary.exit_code if error is None else exit_code_of(error)
                result = CommandResult(name, started_wall, int(code))
                await publish_outputs(manifest, ledger, result, metrics_file=opts.metrics_file)


def _status(command: _Command, summary: LifecycleSummary, error: BaseException | None) -> str:
    if error is not None:
        return "error"
    if command.stop is not None:
        return "stopped"
    return "failed" if summary.exit_code else "done"


async def _drive(
    command: _Command,
    rows: AsyncIterator[LedgerItem],
    handle: Callable[[LedgerItem], Awaitable[None]],
) -> None:
    opts = command.options
    concurrency = opts.concurrency or command.manifest.settings.concurrency
    command.pool = WorkPool(concurrency, handle, grace_period=opts.grace_period)
    with stop_on_signals(command.signalled, enabled=opts.handle_signals):
        try:
            await command.pool.run(rows)
        except _Stop as stop:
            command.stop = stop


def _summary(command: _Command, duration: float) -> LifecycleSummary:
    stop = command.stop
    return LifecycleSummary(
        command=command.name,
        counts=dict(command.counts),
        duration=duration,
        message=None if stop is None else str(stop),
        stopped_code=None if stop is None else stop.code,
    )
