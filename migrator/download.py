"""`migrator download`: bring every live upload home before the service deletes it.

An operation over the command core. Each item goes to DEST/<uploadPath>/<fileName>:
streamed to a temporary file beside its place, checked (size, and sha256 when the
ledger knows it), then renamed into place; a file already there with the right
bytes is skipped. The GET takes the one retry path and the shared pacer (request
rate and bandwidth) like every other request. A destination in the way fails that
item alone; a failing disk (full, read-only) stops the download (exit 74).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import os
import time
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import aiohttp

from migrator.client import OnChunk
from migrator.clock import ServiceClock
from migrator.command import (
    CommandOptions,
    CommandSession,
    CommandSummary,
    Observer,
    Totals,
    execute,
)
from migrator.errors import (
    DISK_ERRNOS,
    DestinationDiskError,
    DestinationError,
    Interrupted,
    LinkGoneError,
    MigratorError,
    PermanentError,
    RetryableError,
    UploadError,
    UsageError,
)
from migrator.ledger import BaseLedger, open_ledger
from migrator.logs import get_logger
from migrator.model import ItemState, ItemUpdate, LedgerItem, Manifest, Outcome, SourceKind
from migrator.transfer import Meter, Step, body_chunks, check_link_status, describe, sha256_of

log = get_logger("migrator.download")
CHUNK = 1024 * 1024


@dataclass(frozen=True, slots=True)
class DownloadOptions(CommandOptions):
    within: float | None = None  # only items that expire within this; None: all
    only_remote: bool = False  # only items whose source is a URL


async def download(
    manifest: Manifest,
    dest: Path,
    options: DownloadOptions | None = None,
    observer: Observer | None = None,
    *,
    environ: Mapping[str, str] | None = None,
) -> CommandSummary:
    """Download every live item to dest/<uploadPath>/<fileName>; skip what is there."""
    opts = options or DownloadOptions()
    operation = DownloadOperation(manifest, dest, opts)
    return await execute(operation, manifest, opts, observer, environ=environ)


def destination_for(root: Path, upload_path: str, file_name: str) -> Path | None:
    """root/<uploadPath>/<fileName>, or None when the name would leave root (pure)."""
    parts = [p for p in upload_path.split("/") if p] + [file_name]
    if any(p in ("", ".", "..") or "\\" in p or "/" in p or "\0" in p for p in parts):
        return None
    if upload_path.startswith("/") or Path(file_name).is_absolute():
        return None
    path = root.joinpath(*parts)
    return path if path.is_relative_to(root) else None


def temp_path_for(path: Path, item_id: int) -> Path:
    """The one temporary name the download of ledger item `item_id` to `path` uses (pure).

    Fixed rather than random, so that what a killed download left behind is found and
    removed by the next one; the item id keeps two items apart, and the name is cut
    so that it stays within the 255 bytes a file name may have.
    """
    stem = path.name.encode()[:200].decode(errors="ignore")
    return path.with_name(f".{stem}.{item_id}.part")


class DownloadOperation:
    name = "download"
    uses_api = False
    needs_clock = True

    def __init__(self, manifest: Manifest, dest: Path, options: DownloadOptions) -> None:
        self.manifest = manifest
        self.options = options
        self.root = dest if dest.is_absolute() else Path.cwd() / dest

    async def prepare(self) -> None:
        _check_dest(self.root)

    async def totals(self, ledger: BaseLedger, clock: ServiceClock) -> Totals:
        target = self.manifest.target.base_url
        count, size = await ledger.count_items(target, **self._filter(clock))
        return Totals(count, size)

    def items(self, session: CommandSession) -> AsyncIterator[LedgerItem]:
        return self._rows(session.ledger, session.clock)

    async def handle(self, session: CommandSession, row: LedgerItem) -> None:
        path = destination_for(self.root, row.upload_path, row.file_name)
        if path is None:
            where = f"{row.upload_path}/{row.file_name}"
            self._failed(session, row, f"refused: {where} would leave {self.root}")
            return
        await asyncio.to_thread(_remove_stale_temp, path, row.id)
        if await asyncio.to_thread(_already_there, path, row):
            if row.downloaded_path != str(path):  # found there, e.g. after a SIGKILL
                session.ledger.put_item(ItemUpdate.downloaded(row, str(path), time.time(), None))
            session.finish(row.source, Outcome.SKIPPED)
            return
        session.observer.on_item_start(row.source)
        await self._fetch(session, row, path)

    async def conclude(self, session: CommandSession) -> list[str]:
        return []

    async def preview(self, clock: ServiceClock) -> AsyncGenerator[tuple[str, str | None], None]:
        async with (
            await open_ledger(self.manifest, readonly=True) as ledger,
            contextlib.aclosing(self._rows(ledger, clock)) as rows,
        ):
            async for row in rows:
                path = destination_for(self.root, row.upload_path, row.file_name)
                there = path is not None and await asyncio.to_thread(_already_there, path, row)
                yield row.source, None if there else "download"

    async def _rows(
        self, ledger: BaseLedger, clock: ServiceClock
    ) -> AsyncGenerator[LedgerItem, None]:
        target = self.manifest.target.base_url
        async for row in ledger.iter_items(target, **self._filter(clock)):
            yield row

    def _filter(self, clock: ServiceClock) -> dict[str, Any]:
        """Done items the service has not deleted yet (on its clock), expiring within
        the window, of URL sources only when asked."""
        now = clock.now()
        within = self.options.within
        return {
            "states": [ItemState.DONE],
            "expiring_before": None if within is None else now + within,
            "alive_at": now,
            "kind": SourceKind.URL if self.options.only_remote else None,
        }

    async def _fetch(self, session: CommandSession, row: LedgerItem, path: Path) -> None:
        attempts = session.attempts(row.upload_path, row.file_name, row.source)
        step = Step(
            "download",
            row.download_url or "",
            lambda meter: fetch_to(session, row, path, meter),
            row.size,
        )
        try:
            digest = await attempts.one(step)
        except Interrupted:
            session.finish(row.source, Outcome.INTERRUPTED)
        except LinkGoneError as err:
            update = ItemUpdate.link_dead(row, ItemState.DEAD, str(err), time.time())
            session.ledger.put_item(update)
            log.warning("link.dead", item=row.source, url=row.download_url, found_by="download")
            session.finish(row.source, Outcome.DEAD, str(err))
        except (UploadError, DestinationError) as err:
            if session.is_fatal(err):
                session.stop_for(err)
            self._failed(session, row, str(err))
        else:
            sha256 = digest if row.sha256 is None else None
            update = ItemUpdate.downloaded(row, str(path), time.time(), sha256)
            session.ledger.put_item(update)
            log.info("download.done", item=row.source, path=str(path))
            session.finish(row.source, Outcome.DOWNLOADED)

    def _failed(self, session: CommandSession, row: LedgerItem, error: str) -> None:
        log.warning("download.failed", item=row.source, error=error)
        session.finish(row.source, Outcome.FAILED, error)


async def fetch_to(session: CommandSession, row: LedgerItem, path: Path, meter: Meter) -> str:
    """GET the row's link into `path`; returns the sha256 of what arrived."""
    url = row.download_url
    if not url:
        raise PermanentError("no download link recorded")
    try:
        origins = await session.conn.origins()
        async with origins.get(url) as response:
            session.clock.observe(response.headers)
            check_link_status(f"download of {url}", response.status, response.headers)
            limit = session.conn.limits.body_limit(row.size)
            return await save_download(response, path, row, meter, meter.chunk_size(CHUNK), limit)
    except (aiohttp.ClientError, TimeoutError) as err:
        raise RetryableError(f"download of {url} failed: {describe(err)}") from None


def _check_dest(root: Path) -> None:
    """--dest must be a folder, or a path whose nearest existing part is one."""
    existing = next((p for p in (root, *root.parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        where = "is" if existing == root else f"is under {existing}, which is"
        raise UsageError(f"--dest: {root} {where} not a folder")


def _already_there(path: Path, row: LedgerItem) -> bool:
    """A file with the recorded hash (or, without one, the recorded size and place)."""
    try:
        size = path.stat().st_size
    except OSError:
        return False
    if row.size is not None and size != row.size:
        return False
    if row.sha256:
        try:
            return sha256_of(path) == row.sha256
        except OSError:  # a FIFO or a device in its place: not the item, replaced below
            return False
    return row.downloaded_path == str(path)


async def save_download(
    response: aiohttp.ClientResponse,
    path: Path,
    row: LedgerItem,
    on_chunk: OnChunk | None = None,
    chunk_size: int = CHUNK,
    limit: int | None = None,
) -> str:
    """Stream the body to a temporary file beside `path`, check it, rename it into place.
    `on_chunk` sees (and may pace) every chunk as it arrives; more than `limit` bytes
    (the recorded size, by default) is refused: a body that never ends fills no disk."""
    try:
        # Not in a thread: a cancellation while the thread ran would leave the file
        # behind with nobody to remove it (a mkdir and an open do not block for long).
        fd, temp = _temp_beside(path, row.id)
    except OSError as err:
        raise destination_error(path, err) from None
    try:
        most = limit if limit is not None else row.size
        digest, size = await _stream_to(fd, response, on_chunk, chunk_size, most)
        _check_body(row, size, digest)
        temp.replace(path)
        return digest
    except (aiohttp.ClientError, TimeoutError) as err:
        # Before OSError: aiohttp's socket errors and timeouts are OSErrors too, but
        # a stalled or reset link is the network's failure, not the disk's.
        raise RetryableError(f"download of {response.url} failed: {describe(err)}") from None
    except OSError as err:
        raise destination_error(path, err) from None
    finally:
        temp.unlink(missing_ok=True)


def _remove_stale_temp(path: Path, item_id: int) -> None:
    with contextlib.suppress(OSError):
        temp_path_for(path, item_id).unlink(missing_ok=True)


def _temp_beside(path: Path, item_id: int) -> tuple[int, Path]:
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = temp_path_for(path, item_id)
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC
    return os.open(temp, flags, 0o600), temp


async def _stream_to(
    fd: int,
    response: aiohttp.ClientResponse,
    on_chunk: OnChunk | None,
    chunk_size: int,
    limit: int | None,
) -> tuple[str, int]:
    """Write the body to `fd`, fsync it; returns its sha256 and size."""
    digest = hashlib.sha256()
    size = 0
    with os.fdopen(fd, "wb") as out:
        async for chunk in body_chunks(response, chunk_size):
            if limit is not None and size + len(chunk) > limit:
                raise PermanentError(f"the link sent more than the {limit} bytes expected")
            digest.update(chunk)
            size += len(chunk)
            if on_chunk is not None:
                await on_chunk(chunk)
            await asyncio.to_thread(out.write, chunk)
        await asyncio.to_thread(_sync, out)
    return digest.hexdigest(), size


def _sync(out: BinaryIO) -> None:
    out.flush()
    os.fsync(out.fileno())


def _check_body(row: LedgerItem, size: int, sha256: str) -> None:
    if row.size is not None and size != row.size:
        raise RetryableError(f"downloaded {size} bytes, expected {row.size}")
    if row.sha256 and sha256 != row.sha256:
        raise RetryableError("downloaded bytes do not match the recorded sha256")


def destination_error(path: Path, err: OSError) -> MigratorError:
    """The error for a destination that cannot be written: a failing disk stops the
    download (exit 74), anything else (a file in the way, no permission) fails the item."""
    kind = DestinationDiskError if err.errno in DISK_ERRNOS else DestinationError
    if err.errno == errno.ENOSPC:
        return kind(f"cannot write {path}: the disk is full")
    return kind(f"cannot write {path}: {err.strerror}")
