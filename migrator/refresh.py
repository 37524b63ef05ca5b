"""`migrator refresh`: keep uploads alive by uploading them again before they are deleted.

An operation over the command core. Every done item that expires within the window
(judged on the service's clock), and every item whose link was found dead, is
uploaded again to the same uploadPath/fileName. The bytes come from the first rung
of a ladder that works, every copy we know of, best first:

1. the local source, unchanged since it was uploaded;
2. the service's own copy, while its link is believed alive (a URL upload of it: no
   local bandwidth). If the service cannot fetch it, the link is probed, and a dead
   one is recorded at once; the ladder goes on;
3. a file that `download` brought home, if its sha256 still matches;
4. the origin of a URL source, streamed through here and checked against the
   recorded size and sha256.

Only bytes equal to those uploaded are ever sent. An item with no rung left is
`lost`; one whose rungs all failed (the service was down) is not: it keeps its
state and the error, and the next refresh tries again.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from migrator.clock import ServiceClock
from migrator.command import (
    CommandOptions,
    CommandSession,
    CommandSummary,
    Observer,
    Totals,
    execute,
)
from migrator.errors import Interrupted, PermanentError, SourceGoneError, UploadError
from migrator.ledger import BaseLedger, open_ledger
from migrator.logs import get_logger
from migrator.methods import automatic_method
from migrator.model import (
    ItemState,
    ItemUpdate,
    LedgerItem,
    Manifest,
    Method,
    Outcome,
    Settings,
    SourceKind,
)
from migrator.transfer import Send, Sent, Step, check_link, sha256_of, upload_step

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


@dataclass(frozen=True, slots=True)
class Rung:
    """One place a refresh can take an item's bytes from."""

    name: str  # local, copy, download, origin
    send: Send


def refresh_ways(
    row: LedgerItem, *, local_unchanged: bool, now: float, settings: Settings
) -> list[Rung]:
    """The ladder for `row`, best rung first (pure); `now` is the service's time.

    The downloaded copy is offered when the row says one was made; its hash is
    checked before it is used (that takes reading it, so only when it is reached).
    """
    rungs: list[Rung] = []

    def rung(name: str, source: str, kind: SourceKind, method: Method) -> None:
        send = Send(source, kind, method, row.upload_path, row.file_name, row.size)
        rungs.append(Rung(name, send))

    if row.kind is SourceKind.FILE and local_unchanged and row.size is not None:
        rung("local", row.source, SourceKind.FILE, _local_method(row.size, settings))
    if _believed_alive(row, now) and row.download_url:
        method = automatic_method(SourceKind.URL, row.size, settings)
        rung("copy", row.download_url, SourceKind.URL, method)
    if row.downloaded_path and row.sha256 and row.size is not None:
        rung("download", row.downloaded_path, SourceKind.FILE, _local_method(row.size, settings))
    if row.kind is SourceKind.URL:
        rung("origin", row.source, SourceKind.URL, Method.STREAM)
    return rungs


def _believed_alive(row: LedgerItem, now: float) -> bool:
    """No evidence says the link is dead, and the service has not passed its expiry."""
    expiry = row.expires_at
    return row.state is ItemState.DONE and expiry is not None and expiry > now


def _local_method(size: int, settings: Settings) -> Method:
    return automatic_method(SourceKind.FILE, size, settings)


def local_unchanged(row: LedgerItem) -> bool:
    """The local source still has the size and mtime it had when it was uploaded."""
    try:
        info = Path(row.source).stat()
    except OSError:
        return False
    return info.st_size == row.size and info.st_mtime_ns == row.mtime_ns


def download_intact(row: LedgerItem) -> bool:
    """The file `download` brought home still holds the item's bytes (reads it all)."""
    if not row.downloaded_path or not row.sha256:
        return False
    path = Path(row.downloaded_path)
    try:
        if path.stat().st_size != row.size:
            return False
        return sha256_of(path) == row.sha256
    except OSError:
        return False


class RefreshOperation:
    name = "refresh"
    uses_api = True
    needs_clock = True

    def __init__(self, manifest: Manifest, options: RefreshOptions) -> None:
        self.manifest = manifest
        self.options = options
        settings = manifest.settings
        self.within = settings.refresh_within if options.within is None else options.within

    async def prepare(self) -> None:
        """Nothing to check before the ledger opens: refresh works from the ledger."""

    async def totals(self, ledger: BaseLedger, clock: ServiceClock) -> Totals:
        target = self.manifest.target.base_url
        dead = await ledger.count_items(target, states=DEAD_STATES)
        deadline = clock.now() + self.within
        expiring = await ledger.count_items(
            target, states=[ItemState.DONE], expiring_before=deadline
        )
        return Totals(dead[0] + expiring[0], dead[1] + expiring[1])

    def items(self, session: CommandSession) -> AsyncIterator[LedgerItem]:
        return self._rows(session.ledger, session.clock)

    async def handle(self, session: CommandSession, row: LedgerItem) -> None:
        await _ItemRefresh(self, session, row).run()

    async def conclude(self, session: CommandSession) -> list[str]:
        return []

    async def preview(self, clock: ServiceClock) -> AsyncGenerator[tuple[str, str | None], None]:
        async with (
            await open_ledger(self.manifest, readonly=True) as ledger,
            contextlib.aclosing(self._rows(ledger, clock)) as rows,
        ):
            async for row in rows:
                yield row.source, await self._first_usable(row, clock.now())

    async def rungs(self, row: LedgerItem, now: float) -> list[Rung]:
        unchanged = await asyncio.to_thread(local_unchanged, row)
        settings = self.manifest.settings
        return refresh_ways(row, local_unchanged=unchanged, now=now, settings=settings)

    async def _first_usable(self, row: LedgerItem, now: float) -> str:
        for rung in await self.rungs(row, now):
            if rung.name != "download" or await asyncio.to_thread(download_intact, row):
                return rung.name
        return "lost"

    async def _rows(
        self, ledger: BaseLedger, clock: ServiceClock
    ) -> AsyncGenerator[LedgerItem, None]:
        """Items whose link was found dead, then those that expire within the window."""
        target = self.manifest.target.base_url
        async for row in ledger.iter_items(target, states=DEAD_STATES):
            yield row
        deadline = clock.now() + self.within
        async for row in ledger.iter_items(
            target, states=[ItemState.DONE], expiring_before=deadline
        ):
            yield row


DEAD_STATES = (ItemState.DEAD, ItemState.MISMATCH)


class _ItemRefresh:
    """One item down the ladder, and what it proved on the way."""

    def __init__(self, op: RefreshOperation, session: CommandSession, row: LedgerItem) -> None:
        self.op = op
        self.session = session
        self.row = row
        self.attempts = session.attempts(row.upload_path, row.file_name, row.source)
        self.link_dead = row.state in DEAD_STATES
        self.failed_for: str | None = None  # why the last rung that was there failed
        self.gone: list[str] = []  # rungs that turned out not to have the bytes, and why
        self.other_bytes: tuple[Rung, Sent] | None = None  # sent, but not the same bytes

    async def run(self) -> None:
        session, row = self.session, self.row
        now = session.clock.now()
        try:
            for rung in await self.op.rungs(row, now):
                if await self._usable(rung) and await self._refreshed_from(rung):
                    return
        except Interrupted:
            session.finish(row.source, Outcome.INTERRUPTED)
            return
        if self.other_bytes is not None:  # the service holds them now: say so, truly
            self._refreshed(*self.other_bytes, same_bytes=False)
        elif self.failed_for is None:
            why = "".join(f"; {reason}" for reason in self.gone)
            self._lost(f"gone from the service, and no source is left with its bytes{why}")
        else:
            self._failed(now, self.failed_for)

    async def _usable(self, rung: Rung) -> bool:
        if rung.name != "download":
            return True
        return await asyncio.to_thread(download_intact, self.row)

    async def _refreshed_from(self, rung: Rung) -> bool:
        """One rung on the retry path; True when it put the item's bytes back."""
        if self.failed_for is None and self.other_bytes is None and not self.gone:
            self.session.observer.on_item_start(self.row.source)
        step = upload_step(self.session.conn, rung.send)
        try:
            _, sent = await self.attempts.first_that_works([step])
        except SourceGoneError as err:
            self.gone.append(f"{rung.name}: {err}")  # this rung was not there after all
            return False
        except UploadError as err:
            if self.session.is_fatal(err):
                self.session.stop_for(err)
            await self._learn_from_copy(rung, err)
            self.failed_for = f"{rung.name}: {err}"
            return False
        if self.row.sha256 and sent.sha256 and sent.sha256 != self.row.sha256:
            # Sent already: a later rung may still put the right bytes back.
            self.other_bytes = (rung, sent)
            return False
        self._refreshed(rung, sent)
        return True

    async def _learn_from_copy(self, rung: Rung, err: UploadError) -> None:
        """The service could not copy our link: is it dead? Ask the link itself."""
        if rung.name != "copy" or not isinstance(err, PermanentError) or not self.row.download_url:
            return
        url = self.row.download_url
        step = Step("probe", url, lambda meter: check_link(self.session.conn, url))
        try:
            check = await self.attempts.one(step)
        except UploadError:
            return  # no evidence either way
        if check.gone:
            self.link_dead = True
            reason = f"link answered HTTP {check.status} (the service could not copy it)"
            update = ItemUpdate.link_dead(self.row, ItemState.DEAD, reason, time.time())
            self.session.ledger.put_item(update)
            log.warning("link.dead", item=self.row.source, url=url, found_by="refresh")

    def _refreshed(self, rung: Rung, sent: Sent, *, same_bytes: bool = True) -> None:
        session, row = self.session, self.row
        upload = sent.uploaded(rung.send.method, self.op.manifest.settings.ttl, row.source)
        made = self.attempts.made
        update = ItemUpdate.refreshed(row, upload, attempts=made, same_bytes=same_bytes)
        session.ledger.put_item(update)
        if same_bytes:
            log.info("refresh.done", item=row.source, via=rung.name, method=rung.send.method)
        else:
            log.warning("refresh.other_bytes", item=row.source, via=rung.name, sha256=sent.sha256)
        session.finish(row.source, Outcome.REFRESHED)

    def _failed(self, now: float, error: str) -> None:
        """Every rung there was failed: not lost (a source is there), not done either
        when the link is dead or the service has passed its expiry."""
        row, made = self.row, self.attempts.made
        gone = self.link_dead or (row.expires_at is not None and row.expires_at <= now)
        if gone:
            update = ItemUpdate.link_dead(row, ItemState.DEAD, error, time.time(), attempts=made)
        else:  # the old link still works; the next refresh tries again
            update = ItemUpdate.noted(row, row.state, error, attempts=made)
        self.session.ledger.put_item(update)
        log.warning("refresh.failed", item=row.source, error=error)
        self.session.finish(row.source, Outcome.FAILED, error)

    def _lost(self, reason: str) -> None:
        row = self.row
        update = ItemUpdate.noted(row, ItemState.LOST, reason, attempts=self.attempts.made)
        self.session.ledger.put_item(update)
        log.error("refresh.lost", item=row.source, upload_path=row.upload_path, error=reason)
        self.session.finish(row.source, Outcome.LOST, reason)
