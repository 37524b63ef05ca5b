"""`migrator run`: upload every item of the plan that the ledger does not hold as done.

An operation over the command core: the plan, joined with the ledger a batch at a
time, feeds the workers; each worker takes one item through its ways of sending
(the planned method, and for a URL the service could not fetch, a stream-through)
on the one retry path, and records what it proved.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from migrator.claims import LeaseKeeper, SharedLimits, from_work, planned_and_claimed
from migrator.clock import ServiceClock
from migrator.command import (
    CommandOptions,
    CommandSession,
    CommandSummary,
    Observer,
    Totals,
    execute,
    stored_clock,
)
from migrator.connect import open_origins
from migrator.dedup import Claim, Contents, worth_hashing
from migrator.errors import Interrupted, UploadError
from migrator.ledger import BaseLedger, as_shared, open_ledger
from migrator.logs import get_logger
from migrator.model import (
    ItemState,
    ItemUpdate,
    LedgerItem,
    LocalItems,
    Manifest,
    Method,
    Outcome,
    PlanItem,
    Settings,
    SourceKind,
)
from migrator.naming import printable
from migrator.plan import (
    KEEP_BYTES,
    KeptEntries,
    PlanCheck,
    Remembered,
    RemoteInfo,
    Skipped,
    check_plan,
    expand_batches,
    one_at_a_time,
)
from migrator.resume import DecidedBatch, Decision, Entry, decide
from migrator.transfer import Meter, Send, Sent, Step, sha256_of, upload_step

if TYPE_CHECKING:
    from migrator.ledger_pg import Claim as QueueClaim
    from migrator.ledger_pg import PgLedger

log = get_logger("migrator.runner")


@dataclass(frozen=True, slots=True)
class RunOptions(CommandOptions):
    checksum: bool = False  # compare sha256 of local files, not only size and mtime

    def by_checksum(self, settings: Settings) -> bool:
        """--checksum, or the manifest's settings.checksum."""
        return self.checksum or settings.checksum


async def run_manifest(
    manifest: Manifest,
    options: RunOptions | None = None,
    observer: Observer | None = None,
    *,
    environ: Mapping[str, str] | None = None,
) -> CommandSummary:
    """Upload what the manifest lists and the ledger does not hold. The library door."""
    opts = options or RunOptions()
    return await execute(RunOperation(manifest, opts), manifest, opts, observer, environ=environ)


class RunOperation:
    name = "run"
    uses_api = True
    needs_clock = False  # its uploads measure the clock; a no-op re-run sends nothing

    def __init__(self, manifest: Manifest, options: RunOptions) -> None:
        self.manifest = manifest
        self.options = options
        self._totals = Totals(0)
        self._check = PlanCheck(0, 0, 0, 0)
        self._kept: KeptEntries | None = None
        self._contents: Contents | None = None
        self._keeper: LeaseKeeper | None = None  # a shared ledger: the leases it holds
        self._claims: dict[tuple[str, str], QueueClaim] = {}  # claimed, not started
        self._in_flight = 0

    async def prepare(self) -> None:
        check = await asyncio.to_thread(check_plan, self.manifest, keep=KEEP_BYTES)
        self._check = check
        self._totals = Totals(check.items + check.unreadable_count, check.local_bytes)
        self._kept = check.kept  # the plan walks the tree once

    async def totals(self, ledger: BaseLedger, clock: ServiceClock) -> Totals:
        return self._totals

    async def items(self, session: CommandSession) -> AsyncIterator[Entry]:
        """The plan joined with the ledger; what needs no upload is counted and skipped.
        A shared ledger: the items this process claims from the queue."""
        if (shared := as_shared(session.ledger)) is not None:
            async for entry in self._claimed(session, shared):
                yield entry
            return
        _fail_unreadable_folders(session, self._check)
        conn, ledger = session.conn, session.ledger
        checksum = self.options.by_checksum(self.manifest.settings)
        self._contents = Contents(ledger, session.target_id, conn.clock, self._check.shared_sizes)
        plan = expand_batches(
            self.manifest,
            session=conn.origins,
            probe_concurrency=conn.origin_connections,
            url_vars=conn.url_vars,
            remembered=remembered_in(ledger, session.target_id),
            kept=self._take_kept(),
        )
        async for entries in decide_batches(self.manifest, ledger, plan, checksum, conn.clock):
            for entry in entries:
                item, decision, _row = entry
                if decision.needs_upload or decision is Decision.VERIFY:
                    yield entry
                else:
                    session.finish(item.source, Outcome.SKIPPED)

    def _take_kept(self) -> KeptEntries | None:
        """The entries check_plan kept, once: held by nothing else, they go with the plan."""
        kept, self._kept = self._kept, None
        return kept

    async def _claimed(self, session: CommandSession, ledger: PgLedger) -> AsyncIterator[Entry]:
        """Plan once (the first process to find no open work), and claim with leases."""
        conn, lease, target = session.conn, self.options.lease, session.target_id
        self._contents = Contents(ledger, target, conn.clock, self._check.shared_sizes)
        remembered = remembered_in(ledger, target)
        plan = expand_batches(
            self.manifest,
            session=conn.origins,
            probe_concurrency=conn.origin_connections,
            url_vars=conn.url_vars,
            remembered=remembered,
            kept=self._take_kept(),
        )
        decided = decide_items(
            self.manifest,
            ledger,
            plan,
            self.options.by_checksum(self.manifest.settings),
            conn.clock,
        )
        limits = SharedLimits(conn.pacer)
        self._keeper = LeaseKeeper(ledger, self.manifest.target.base_url, lease, limits)
        await self._keeper.start()
        skipped = lambda item: session.finish(item.source, Outcome.SKIPPED)  # noqa: E731
        busy = lambda: bool(self._claims) or self._in_flight > 0  # noqa: E731
        claims = planned_and_claimed(
            self.manifest, ledger, decided, skipped, self._keeper, session.workers, busy
        )
        async for work in claims:
            item, decision = from_work(work.work)
            self._claims[item.key] = work.claim
            yield item, decision, work.row

    async def handle(self, session: CommandSession, entry: Entry) -> None:
        claim = self._claims.pop(entry[0].key, None)
        if claim is None or self._keeper is None:
            await self._upload(session, entry)
            return
        self._in_flight += 1
        try:  # a lost lease cancels the upload: another process does the item now
            await self._keeper.guard(claim, lambda: self._upload(session, entry))
        finally:
            self._in_flight -= 1

    async def _upload(self, session: CommandSession, entry: Entry) -> None:
        item, planned, row = entry
        if await verified(item, planned, row) is Decision.UNCHANGED:
            if row is not None and row.mtime_ns != item.mtime_ns:
                # Same bytes, touched: remember the new mtime, or every run hashes again.
                session.ledger.put_item(ItemUpdate.touched(row, item.mtime_ns))
            session.finish(item.source, Outcome.SKIPPED)
            return
        session.observer.on_item_start(item.source)
        assert self._contents is not None, "items() comes first"
        await _ItemUpload(session, item, row, self._contents).run()

    async def conclude(self, session: CommandSession) -> list[str]:
        notes = [] if self._contents is None else [self._contents.note()]
        if self._keeper is not None:
            await self._keeper.stop()
            if lost := self._keeper.lost:
                notes.append(f"{lost} items went to other workers after this one's leases ran out")
        return [note for note in notes if note]

    async def preview(self, clock: ServiceClock) -> AsyncGenerator[tuple[str, str | None], None]:
        decisions = preview(self.manifest, self.options, self._kept)
        async with contextlib.aclosing(decisions) as decided:
            async for item, planned, row in decided:
                decision = await verified(item, planned, row)
                yield item.source, (str(decision) if decision.needs_upload else None)


def _fail_unreadable_folders(session: CommandSession, check: PlanCheck) -> None:
    """A folder a glob could not read counts as one failed item (rsync and rclone exit
    non-zero too); what the rest of the tree holds is uploaded all the same."""
    for number in range(check.unreadable_count):
        known = number < len(check.unreadable)
        folder = check.unreadable[number] if known else Skipped("a folder", "cannot be read")
        session.finish(printable(folder.path), Outcome.FAILED, folder.reason)


async def verified(item: PlanItem, decision: Decision, row: LedgerItem | None) -> Decision:
    """--checksum: a VERIFY becomes CHANGED or UNCHANGED once the file is hashed."""
    if decision is not Decision.VERIFY or row is None:
        return decision
    same = await _same_bytes(item, row)
    return Decision.UNCHANGED if same else Decision.CHANGED


def _holds(row: LedgerItem | None, sha256: str | None) -> bool:
    """Whether the row already describes the bytes with this hash (pure)."""
    return row is not None and row.sha256 is not None and row.sha256 == sha256


async def _same_bytes(item: PlanItem, row: LedgerItem) -> bool:
    try:
        return await asyncio.to_thread(sha256_of, Path(item.source)) == row.sha256
    except OSError:
        return False  # the upload attempt will say what is wrong with the file


async def preview(
    manifest: Manifest, options: RunOptions | None = None, kept: KeptEntries | None = None
) -> AsyncGenerator[Entry, None]:
    """The plan joined with the ledger, read-only: what `plan` shows and `--dry-run` counts.
    Origins may be asked for sizes; the service is not contacted. `kept`: the entries
    `check_plan` kept, planned from instead of walking again."""
    async for entry in one_at_a_time(preview_batches(manifest, options, kept)):
        yield entry


async def preview_batches(
    manifest: Manifest, options: RunOptions | None = None, kept: KeptEntries | None = None
) -> AsyncGenerator[DecidedBatch, None]:
    """`preview`, a batch of entries at a time (a plan of 200,000 files shows each)."""
    opts = options or RunOptions()
    workers, checksum = opts.workers(manifest.settings), opts.by_checksum(manifest.settings)
    async with (
        await open_ledger(manifest, readonly=True) as ledger,
        open_origins(manifest, concurrency=workers) as origins,
    ):
        target = manifest.target.base_url
        items = expand_batches(
            manifest,
            session=origins.session,
            probe_concurrency=origins.connections,
            url_vars=origins.url_vars,
            remembered=remembered_in(ledger, target),
            kept=kept,
        )
        clock = await stored_clock(ledger)
        async for entries in decide_batches(manifest, ledger, items, checksum, clock):
            yield entries


async def decide_items(
    manifest: Manifest,
    ledger: BaseLedger,
    batches: AsyncIterator[Sequence[PlanItem]],
    checksum: bool,
    clock: ServiceClock,
) -> AsyncIterator[Entry]:
    """`decide_batches`, an entry at a time."""
    async for entry in one_at_a_time(decide_batches(manifest, ledger, batches, checksum, clock)):
        yield entry


async def decide_batches(
    manifest: Manifest,
    ledger: BaseLedger,
    batches: AsyncIterator[Sequence[PlanItem]],
    checksum: bool,
    clock: ServiceClock,
) -> AsyncGenerator[DecidedBatch, None]:
    """Join the plan (`expand_batches`) with the ledger, a batch at a time; expiry is
    judged on the service's clock. An entry's row is the ledger's item when there is
    work to do on it (None for a new item, and for one that needs nothing): deciding
    reads only what it needs of each row, and the items with work are read whole. An
    item the ledger has never seen is NEW without a look at it (a first plan of a big
    tree is all of them)."""
    target, within = manifest.target.base_url, manifest.settings.refresh_within
    unchanged, new = Decision.UNCHANGED, Decision.NEW
    async for batch in batches:
        keys = batch.keys() if isinstance(batch, LocalItems) else [item.key for item in batch]
        found = await ledger.lookup_found(target, keys)
        now = clock.now()
        decisions = [new] * len(keys)  # what the ledger has never seen
        worked: list[tuple[str, str]] = []  # keys of the rows with work
        for index, key in enumerate(keys) if found else ():
            if (row := found.get(key)) is not None:
                decision = decide(
                    batch[index], row, now=now, refresh_within=within, checksum=checksum
                )
                decisions[index] = decision
                if decision is not unchanged:
                    worked.append(key)
        rows = await ledger.lookup(target, worked) if worked else {}
        yield DecidedBatch(batch, decisions, keys, rows)


def remembered_in(ledger: BaseLedger, target: str) -> Remembered:
    """What the ledger recorded of remote files, for `immutable` sources: a row of the
    same URL that knows its size (or is done) answers as the origin would."""

    async def remembered(
        wanted: Sequence[tuple[str, str, str]],
    ) -> dict[tuple[str, str, str], RemoteInfo]:
        rows = await ledger.lookup(target, [(path, name) for path, name, _ in wanted])
        found: dict[tuple[str, str, str], RemoteInfo] = {}
        for path, name, url in wanted:
            row = rows.get((path, name))
            if row is None or row.kind is not SourceKind.URL or row.source != url:
                continue
            if row.size is not None or row.state is ItemState.DONE:
                found[(path, name, url)] = RemoteInfo(row.size, row.etag, row.last_modified)
        return found

    return remembered


class _ItemUpload:
    """Takes one item through its ways of sending, and records what each proved."""

    def __init__(
        self, session: CommandSession, item: PlanItem, row: LedgerItem | None, contents: Contents
    ) -> None:
        self.session = session
        self.item = item
        self.row = row
        self.contents = contents
        self.attempts = session.attempts(
            item.upload_path, item.file_name, item.source, done_logged=True
        )

    async def run(self) -> None:
        session, item = self.session, self.item
        if self.row is None:
            # Attempts join their item's row when the ledger writes them: a new item
            # needs one before its first attempt, or that attempt's record is lost.
            session.ledger.put_item(ItemUpdate.pending(session.target_id, item))
        if not worth_hashing(item, self.contents.shared_sizes):
            await self._upload(Claim())  # no bytes to share with others: nothing to hold
            return
        async with self.contents.claim(item) as claim:
            await self._upload(claim)

    async def _upload(self, claim: Claim) -> None:
        session = self.session
        try:
            step, sent = await self.attempts.first_that_works(self._steps(claim))
        except Interrupted as err:
            self._not_done(ItemState.INTERRUPTED, Outcome.INTERRUPTED, str(err))
        except UploadError as err:
            if session.is_fatal(err):
                self._leave_for_next_run(str(err))
                session.stop_for(err)
            self._not_done(ItemState.FAILED, Outcome.FAILED, str(err))
        except asyncio.CancelledError:
            self._not_done(ItemState.INTERRUPTED, Outcome.INTERRUPTED, "interrupted")
            raise
        else:
            self._record_done(Method(step.action), sent, claim)

    def _steps(self, claim: Claim) -> list[Step[Sent]]:
        """The planned method; for a URL the service could not fetch, a stream-through;
        for a file the service holds already, a copy of that link first."""
        item, conn = self.item, self.session.conn
        first = upload_step(conn, self._send(item.method))
        if item.method is Method.URL and item.kind is SourceKind.URL and not item.method_forced:
            return [first, upload_step(conn, self._send(Method.STREAM))]
        if claim.original is not None and claim.content is not None:
            return [self._copy_step(claim.original, claim.content.sha256), first]
        return [first]

    def _copy_step(self, link: str, sha256: str) -> Step[Sent]:
        """A server-side copy of `link`, known to serve the bytes with this sha256."""
        item = self.item
        send = Send(link, SourceKind.URL, Method.URL, item.upload_path, item.file_name, item.size)
        by_url = upload_step(self.session.conn, send)

        async def call(meter: Meter) -> Sent:
            return replace(await by_url.call(meter), sha256=sha256)

        return Step(str(Method.COPY), link, call, item.size)

    def _send(self, method: Method) -> Send:
        item = self.item
        return Send(item.source, item.kind, method, item.upload_path, item.file_name, item.size)

    def _leave_for_next_run(self, error: str) -> None:
        """Not this item's fault: a known item keeps its row as it was; a new one stays
        pending, with the reason."""
        if self.row is None:
            update = ItemUpdate.pending(self.session.target_id, self.item, error)
            self.session.ledger.put_item(update)

    def _not_done(self, state: ItemState, outcome: Outcome, error: str) -> None:
        """Failed or cut short in this run. An item done before stays done with the error
        noted: its link still serves the bytes it described, refresh keeps it alive, and
        the next run sees the same change (or expiry) and tries again."""
        session, made = self.session, self.attempts.made
        if self.row is not None and self.row.state is ItemState.DONE:
            update = ItemUpdate.noted(self.row, ItemState.DONE, error, attempts=made)
        else:
            update = ItemUpdate.tried(session.target_id, self.item, state, error, attempts=made)
        session.ledger.put_item(update)
        if outcome is Outcome.FAILED:
            log.warning("upload.failed", item=self.item.source, error=error)
        session.finish(self.item.source, outcome, error)

    def _record_done(self, method: Method, sent: Sent, claim: Claim) -> None:
        session, item = self.session, self.item
        upload = sent.uploaded(method, session.manifest.settings.ttl, item.source)
        if claim.content is not None and sent.sha256 == claim.content.sha256:
            claim.link = upload.download_url  # others with these bytes may copy it now
        if method is Method.COPY:
            self.contents.copied_one(upload.size or 0)
        update = ItemUpdate.done(
            session.target_id,
            item,
            upload,
            mtime_ns=sent.mtime_ns,
            same_bytes=_holds(self.row, sent.sha256),
            attempts=self.attempts.made,
        )
        session.ledger.put_item(update)
        log.info(
            "upload.done",
            item=item.source,
            method=method,
            url=upload.download_url,
            bytes=sent.bytes_sent,
            attempts=self.attempts.made,
        )
        session.finish(item.source, Outcome.UPLOADED)
