"""`migrator refresh`: keep uploads alive by uploading them again before they expire.

Files on the service are deleted after their TTL (3 days). An operation over the
command core: every done item that expires within the window is uploaded again to
the same uploadPath/fileName, from the best source still there: the local file if
it is unchanged, else the service's own copy while its link is alive (a URL upload:
no local bandwidth), else the origin of a URL source, checked against what was
uploaded before. An item with none of these left is `lost`.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from migrator.command import (
    CommandOptions,
    CommandSession,
    CommandSummary,
    Observer,
    Outcome,
    Totals,
    execute,
)
from migrator.errors import Interrupted, UploadError
from migrator.ledger import Ledger
from migrator.logs import get_logger
from migrator.methods import automatic_method
from migrator.model import (
    ItemState,
    ItemUpdate,
    LedgerItem,
    Manifest,
    Method,
    Settings,
    SourceKind,
    Uploaded,
)
from migrator.transfer import Send, Sent, upload_step

log = get_logger("migrator.refresh")


@dataclass(frozen=True, slots=True)
class RefreshOptions(CommandOptions):
    within: float | None = None  # refresh what expires within this; None: refresh_within


async def refresh(
    manifest: Manifest,
    options: RefreshOptions | None = None,
    observer: Observer | None = None,
    *,
    environ: Mapping[str, str] | None = None,
) -> CommandSummary:
    """Upload again every done item that expires within `options.within`."""
    opts = options or RefreshOptions()
    operation = RefreshOperation(manifest, opts)
    return await execute(operation, manifest, opts, observer, environ=environ)


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
        method = automatic_method(SourceKind.FILE, row.size, settings)
        ways.append(way(row.source, SourceKind.FILE, method))
    alive = row.expires_at is not None and row.expires_at > now and bool(row.download_url)
    if alive and row.download_url:
        method = automatic_method(SourceKind.URL, row.size, settings)
        ways.append(way(row.download_url, SourceKind.URL, method))
    elif row.kind is SourceKind.URL:
        ways.append(way(row.source, SourceKind.URL, Method.STREAM))
    return ways


def way_name(row: LedgerItem, way: Send | None) -> str:
    """How a refresh takes the bytes, in a word: local, copy, origin, or lost (pure)."""
    if way is None:
        return "lost"
    if way.kind is SourceKind.FILE:
        return "local"
    return "copy" if way.source == row.download_url else "origin"


def local_unchanged(row: LedgerItem) -> bool:
    """The local source still has the size and mtime it had when it was uploaded."""
    try:
        info = Path(row.source).stat()
    except OSError:
        return False
    return info.st_size == row.size and info.st_mtime_ns == row.mtime_ns


class RefreshOperation:
    name = "refresh"
    uses_api = True

    def __init__(self, manifest: Manifest, options: RefreshOptions) -> None:
        self.manifest = manifest
        self.options = options
        settings = manifest.settings
        within = settings.refresh_within if options.within is None else options.within
        self.deadline = time.time() + within

    async def prepare(self) -> None:
        """Nothing to check before the ledger opens: refresh works from the ledger."""

    async def totals(self, ledger: Ledger) -> Totals:
        count, size = await ledger.count_items(
            self.manifest.target.base_url, states=[ItemState.DONE], expiring_before=self.deadline
        )
        return Totals(count, size)

    def items(self, session: CommandSession) -> AsyncIterator[LedgerItem]:
        return self._rows(session.ledger)

    async def handle(self, session: CommandSession, row: LedgerItem) -> None:
        now = time.time()
        ways = await self._ways(row, now)
        if not ways:
            reason = "expired on the service, and no source is left to upload it again"
            self._lost(session, row, reason, 0)
            return
        session.observer.on_item_start(row.source)
        attempts = session.attempts(row.upload_path, row.file_name, row.source)
        steps = [upload_step(session.conn, way) for way in ways]
        try:
            step, sent = await attempts.first_that_works(steps)
        except Interrupted:
            session.finish(row.source, Outcome.INTERRUPTED)
        except UploadError as err:
            if session.is_fatal(err):
                session.stop_for(err)
            self._failed(session, row, now, str(err), attempts.made)
        else:
            way = ways[steps.index(step)]
            self._refreshed(session, row, way, sent, attempts.made)

    async def preview(self) -> AsyncGenerator[tuple[str, str | None], None]:
        async with (
            await Ledger.open(self.manifest.ledger, readonly=True) as ledger,
            contextlib.aclosing(self._rows(ledger)) as rows,
        ):
            async for row in rows:
                ways = await self._ways(row, time.time())
                yield row.source, way_name(row, ways[0] if ways else None)

    async def _rows(self, ledger: Ledger) -> AsyncGenerator[LedgerItem, None]:
        target = self.manifest.target.base_url
        async for row in ledger.iter_items(
            target, states=[ItemState.DONE], expiring_before=self.deadline
        ):
            yield row

    async def _ways(self, row: LedgerItem, now: float) -> list[Send]:
        unchanged = await asyncio.to_thread(local_unchanged, row)
        settings = self.manifest.settings
        return refresh_ways(row, local_unchanged=unchanged, now=now, settings=settings)

    def _refreshed(
        self, session: CommandSession, row: LedgerItem, way: Send, sent: Sent, attempts: int
    ) -> None:
        if row.sha256 and sent.sha256 and sent.sha256 != row.sha256:
            reason = "the origin now serves other bytes (sha256 differs); `migrator run`"
            self._lost(session, row, f"{reason} uploads the new version", attempts)
            return
        receipt = sent.receipt
        uploaded_at, expires_at = sent.lifetime(self.manifest.settings.ttl)
        upload = Uploaded(
            method=way.method,
            download_url=receipt.download_url,
            file_id=receipt.file_id,
            uploaded_at=uploaded_at,
            expires_at=expires_at,
            size=sent.size,
            sha256=sent.sha256,
        )
        session.ledger.put_item(ItemUpdate.refreshed(row, upload, attempts=attempts))
        log.info("refresh.done", item=row.source, via=way.source, method=way.method)
        session.finish(row.source, Outcome.REFRESHED)

    def _failed(
        self, session: CommandSession, row: LedgerItem, now: float, error: str, attempts: int
    ) -> None:
        if row.expires_at is not None and row.expires_at <= now:
            self._lost(session, row, f"expired, and every source failed: {error}", attempts)
            return
        # Still alive: the old link keeps working; the next refresh tries again.
        session.ledger.put_item(ItemUpdate.noted(row, ItemState.DONE, error, attempts=attempts))
        log.warning("refresh.failed", item=row.source, error=error)
        session.finish(row.source, Outcome.FAILED, error)

    def _lost(self, session: CommandSession, row: LedgerItem, reason: str, attempts: int) -> None:
        session.ledger.put_item(ItemUpdate.noted(row, ItemState.LOST, reason, attempts=attempts))
        log.error("refresh.lost", item=row.source, upload_path=row.upload_path, error=reason)
        session.finish(row.source, Outcome.LOST, reason)
