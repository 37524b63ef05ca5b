"""Work claiming: how `migrator run` processes share one PostgreSQL ledger.

The first process to find no open work in the queue plans (under the planning lock):
it joins the plan with the ledger as a single-machine run would, and queues what needs
an upload, a batch at a time, claiming from the queue meanwhile; the others join once
there is work queued. Every process claims small batches, lowest ids first, each item
with a lease on the database's clock, and renews the leases of what it holds. A process
whose lease ran out (it was stopped, or cut off) loses the item: its work on it is
cancelled and whatever it still writes about it is refused. A process that finds nothing to claim
while others hold leases waits for them, so the last one standing finishes the work of
one that died.

`refresh`, `download` and `verify` share a ledger the same way, each from a queue of
its own: the first process queues the items it would work on, and every process claims
from that queue (`ClaimedOperation`). A round is the queue filled once and worked to the
end; a process launched before the last round ended joins it rather than doing it again.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from migrator.errors import LedgerError
from migrator.ledger import as_shared
from migrator.logs import get_logger
from migrator.model import ItemUpdate, LedgerItem, Manifest, Method, PlanItem, SourceKind
from migrator.pacer import Pacer
from migrator.plan import expand_batches
from migrator.resume import Decision, Entry

if TYPE_CHECKING:
    from migrator.clock import ServiceClock
    from migrator.command import CommandSession, Operation, Totals
    from migrator.ledger import BaseLedger
    from migrator.ledger_pg import Claim, ClaimedWork, PgLedger

DEFAULT_LEASE = 60.0  # seconds; --lease
RENEWALS_PER_LEASE = 3  # a lease is renewed this often within its length
IDLE_POLL = 1.0  # the longest wait between looks at a queue others still hold
ENQUEUE_BATCH = 500
FIRST_ENQUEUE = 50  # a plan's first batch: small, for the workers to start on
PLAN_WATCH = 1.0  # seconds between looks at a plan another process is making

log = get_logger("migrator.claims")


# -- the plan as queued work (pure) ---------------------------------------------------------


def as_work(item: PlanItem, decision: Decision) -> dict[str, Any]:
    """A planned item and its decision, as the queue keeps them (JSON)."""
    return {
        "source": item.source,
        "kind": item.kind.value,
        "upload_path": item.upload_path,
        "file_name": item.file_name,
        "size": item.size,
        "method": item.method.value,
        "method_forced": item.method_forced,
        "mtime_ns": item.mtime_ns,
        "etag": item.etag,
        "last_modified": item.last_modified,
        "decision": decision.value,
    }


def from_work(work: Mapping[str, Any]) -> tuple[PlanItem, Decision]:
    """The planned item and decision `as_work` queued."""
    item = PlanItem(
        source=work["source"],
        kind=SourceKind(work["kind"]),
        upload_path=work["upload_path"],
        file_name=work["file_name"],
        size=work["size"],
        method=Method(work["method"]),
        method_forced=bool(work["method_forced"]),
        mtime_ns=work["mtime_ns"],
        etag=work["etag"],
        last_modified=work["last_modified"],
    )
    return item, Decision(work["decision"])


def idle_wait(first_lease_ends_in: float | None) -> float:
    """How long to wait before looking at the queue again when others hold all of it."""
    if first_lease_ends_in is None:
        return IDLE_POLL / 4  # open items, none leased: their release is being written
    return min(IDLE_POLL, max(0.05, first_lease_ends_in + 0.05))


# -- planning once --------------------------------------------------------------------------


async def plan_once(
    manifest: Manifest,
    ledger: PgLedger,
    decided: AsyncIterator[Entry],
    on_skipped: Callable[[PlanItem], None] = lambda item: None,
    on_queued: Callable[[], None] = lambda: None,
) -> int | None:
    """Queue what the plan needs uploaded, if no other process has open work queued;
    returns how many items were queued, or None when another plan is being worked.
    `on_skipped` hears of each item that needs nothing, `on_queued` of each batch
    queued (the first one small: workers may start on it while the plan goes on)."""
    target = manifest.target.base_url
    async with ledger.planning(target) as must_plan:
        if not must_plan:
            return None
        await ledger.set_fact(_plan_fact(target), {"complete": False})
        queued = 0
        batch: list[tuple[str, str, Mapping[str, Any]]] = []
        new: list[ItemUpdate] = []  # the queue refers to an item's row: a new one needs one
        async for item, decision, row in decided:
            if not (decision.needs_upload or decision is Decision.VERIFY):
                on_skipped(item)
                continue
            if row is None:
                new.append(ItemUpdate.pending(target, item))
            batch.append((item.upload_path, item.file_name, as_work(item, decision)))
            if len(batch) >= (ENQUEUE_BATCH if queued else FIRST_ENQUEUE):
                queued += await ledger.enqueue(target, batch, new=new)
                on_queued()
                batch, new = [], []
        if batch:
            queued += await ledger.enqueue(target, batch, new=new)
            on_queued()
        await ledger.set_fact(_plan_fact(target), {"complete": True})
        return queued


def _plan_fact(target: str) -> str:
    return f"plan:{target}"


async def plan_complete(ledger: PgLedger, target: str) -> bool:
    """Whether the last plan of `target` queued all it had to (one whose process died
    midway did not); a queue planned before this was recorded counts as complete."""
    fact = await ledger.fact(_plan_fact(target))
    return not isinstance(fact, dict) or fact.get("complete") is not False


async def planned_and_claimed(
    manifest: Manifest,
    ledger: PgLedger,
    decided: AsyncIterator[Entry],
    on_skipped: Callable[[PlanItem], None],
    keeper: LeaseKeeper,
    batch: int,
    busy: Callable[[], bool],
) -> AsyncIterator[ClaimedWork]:
    """`run` on a shared ledger: `plan_once` in the background, and the items this
    process claims meanwhile (`claimed`): the process that plans uploads what it has
    queued while it plans the rest, as a single-machine run uploads while it plans."""

    async def plan() -> None:
        # Another process plans: wait until its plan is complete. If it died midway, plan
        # here once the queue is empty (its rest would otherwise wait for the next run).
        target = manifest.target.base_url
        while (
            queued := await plan_once(manifest, ledger, decided, on_skipped, keeper.wake.set)
        ) is None:
            if await plan_complete(ledger, target):
                break
            await asyncio.sleep(PLAN_WATCH)
        log.info("run.queue", planned_here=queued is not None, queued=queued, owner=ledger.owner)
        keeper.wake.set()

    planner = asyncio.create_task(plan(), name="planner")
    keeper.stops_with(planner)  # a run told to stop plans no further

    def planning_or_busy() -> bool:
        if planner.done():
            planner.result()  # a plan that failed fails the run here
            return busy()
        return True

    try:
        target = manifest.target.base_url
        async for work in claimed(ledger, target, batch, keeper, planning_or_busy):
            yield work
        await planner
    finally:
        planner.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await planner


async def commit_plan(manifest: Manifest, *, checksum: bool = False) -> int | None:
    """`migrator plan --commit`: queue the plan in the manifest's PostgreSQL ledger (as
    the first worker would), unless workers are still on a queued plan."""
    from migrator.command import stored_clock
    from migrator.connect import open_origins
    from migrator.ledger_pg import PgLedger
    from migrator.runner import decide_items

    assert manifest.ledger_url is not None
    async with (
        await PgLedger.open(manifest.ledger_url) as ledger,
        open_origins(manifest, concurrency=manifest.settings.concurrency) as origins,
    ):
        plan = expand_batches(
            manifest,
            session=origins.session,
            probe_concurrency=origins.connections,
            url_vars=origins.url_vars,
        )
        clock = await stored_clock(ledger)
        return await plan_once(
            manifest, ledger, decide_items(manifest, ledger, plan, checksum, clock)
        )


# -- claiming -------------------------------------------------------------------------------


async def claimed(
    ledger: PgLedger, queue: str, batch: int, keeper: LeaseKeeper, busy: Callable[[], bool]
) -> AsyncIterator[ClaimedWork]:
    """Items claimed from `queue`, `batch` at a time, their leases kept by `keeper`,
    until no open work is left and this process is not `busy` (its results may yet
    reopen an item); when others hold the rest, wait for their leases to run out or
    their results to land, and when this process holds some, for them to be done."""
    while True:
        keeper.wake.clear()  # what changes from now on wakes the wait below
        found = await ledger.claim(queue, batch, keeper.lease)
        for work in found:
            if work.taken_from is not None:
                log.warning(
                    "lease.reclaimed",
                    item=work.work["source"],
                    previous_owner=work.taken_from,
                    attempt=work.claim.attempt,
                )
            yield work
        if found:
            continue
        open_items, first_lease_ends_in = await ledger.open_work(queue)
        if open_items == 0 and not busy() and not await ledger.being_planned(queue):
            if (await ledger.open_work(queue))[0] == 0:  # nor did a plan end meanwhile
                return
            continue
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(keeper.wake.wait(), idle_wait(first_lease_ends_in))


def share_of(limit: float | None, live_workers: int) -> float | None:
    """One worker's share of a limit all workers of a shared ledger keep together (pure)."""
    return None if limit is None else limit / max(1, live_workers)


class SharedLimits:
    """--tps-limit and --bwlimit as totals for all workers of a shared ledger: each live
    worker paces itself to its share, and the shares follow workers that come and go."""

    def __init__(self, pacer: Pacer) -> None:
        self.pacer = pacer
        self.tps_limit = pacer.tps_limit
        self.bwlimit = pacer.bwlimit
        self.live = 1

    def divide(self, live_workers: int) -> None:
        if live_workers == self.live:
            return
        self.live = live_workers
        self.pacer.tps_limit = share_of(self.tps_limit, live_workers)
        self.pacer.bwlimit = share_of(self.bwlimit, live_workers)
        if self.tps_limit is not None or self.bwlimit is not None:
            log.info("limits.shared", workers=live_workers, tps_limit=self.pacer.tps_limit,
                     bwlimit=self.pacer.bwlimit)  # fmt: skip


class LeaseKeeper:
    """Renews this process's leases while it works, and cancels the work on an item
    whose lease was lost (another process holds it now). Its heartbeat also tells the
    shared limits how many workers are alive."""

    def __init__(
        self, ledger: PgLedger, target: str, lease: float, limits: SharedLimits | None = None
    ) -> None:
        self.ledger = ledger
        self.target = target
        self.lease = lease
        self.limits = limits
        self.lost = 0
        self.wake = asyncio.Event()  # set when there may be more to claim, or less to wait for
        self._working: dict[int, asyncio.Task[None]] = {}
        self._task: asyncio.Task[None] | None = None
        self._alongside: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        await self._beat()
        if self._task is None:
            self._task = asyncio.create_task(self._renew_forever(), name="lease-keeper")

    def stops_with(self, task: asyncio.Task[None]) -> None:
        """Cancel `task` (work that feeds the claims) when this keeper stops."""
        self._alongside.append(task)

    async def stop(self) -> None:
        """Stop renewing, and what feeds the claims; hand back what this process holds
        and did not start."""
        for task in [*self._alongside, self._task]:
            if task is not None and not task.done():  # a failed one told the claims
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._task, self._alongside = None, []
        with contextlib.suppress(LedgerError):
            await self.ledger.release_held()
            await self.ledger.sign_off()

    async def guard(self, claim: Claim, work: Callable[[], Awaitable[None]]) -> bool:
        """Do `work` while the lease of `claim` holds; False when it was lost first (the
        work was then cancelled, or never started). A lease that ran out by our clock
        (this process was stopped, or starved) is renewed first, or the item is left:
        an upload started after another worker took the item would replace its file."""
        if not self.ledger.holds(claim):
            if not self.ledger.claimed(claim):
                return False
            await self._renew()
            if not self.ledger.holds(claim):
                return False
        task = asyncio.ensure_future(work())
        self._working[claim.item_id] = task
        try:
            await asyncio.wait({task})
        except asyncio.CancelledError:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            raise
        finally:
            self._working.pop(claim.item_id, None)
            self.wake.set()
        if task.cancelled():
            return False
        task.result()
        return True

    async def _renew_forever(self) -> None:
        while True:
            await asyncio.sleep(self.lease / RENEWALS_PER_LEASE)
            try:
                await self._renew()
                await self._beat()
            except LedgerError as err:
                log.warning("lease.renew_failed", error=str(err))

    async def _renew(self) -> None:
        for claim in await self.ledger.renew(self.lease):
            self._lose(claim)

    async def _beat(self) -> None:
        live = await self.ledger.heartbeat(self.target, self.lease)
        if self.limits is not None:
            self.limits.divide(live)

    def _lose(self, claim: Claim) -> None:
        self.lost += 1
        log.warning(
            "lease.lost",
            item=f"{claim.key[1]}/{claim.key[2]}",
            attempt=claim.attempt,
            why="the lease ran out and another worker took the item: work on it stops",
        )
        task = self._working.get(claim.item_id)
        if task is not None:
            task.cancel()


def process_started() -> float | None:
    """When this process started, on the wall clock (Linux, from /proc; None elsewhere):
    the CLI's commands count as launched then, not when they got to the ledger."""
    try:
        stat = Path("/proc/self/stat").read_text(encoding="ascii")
        ticks = int(stat.rsplit(")", 1)[1].split()[19])  # field 22, starttime since boot
        since_boot = time.clock_gettime(time.CLOCK_BOOTTIME)
        return time.time() - (since_boot - ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError, AttributeError):
        return None


def queue_of(command: str, target: str) -> str:
    """The queue the processes of `command` share (pure): `run`'s is named after the
    target, each other command's after itself and the target."""
    return target if command == "run" else f"{command} {target}"


class ClaimedOperation:
    """`refresh`, `download` or `verify` on a shared ledger, as many processes run it at
    once: the first to find its queue empty queues the rows the operation would work
    on; then each process claims rows from the queue with leases, works on the row as
    the claim read it, and finishes the claim after the item's results are written."""

    def __init__(
        self,
        operation: Operation[LedgerItem],
        lease: float = DEFAULT_LEASE,
        launched_at: float | None = None,
    ) -> None:
        self.operation = operation
        # A process launched before a round ended joins it, however long it took to
        # look at the queue (a busy machine, a slow start): it does not start another.
        self.launched_at = time.time() if launched_at is None else launched_at
        self.name = operation.name
        self.uses_api = operation.uses_api
        self.needs_clock = operation.needs_clock
        self.lease = lease
        self._keeper: LeaseKeeper | None = None
        self._waiting = 0  # claimed, not yet done with
        self.queued: int | None = None  # what this process queued; None: another did

    async def prepare(self) -> None:
        await self.operation.prepare()

    async def totals(self, ledger: BaseLedger, clock: ServiceClock) -> Totals:
        return await self.operation.totals(ledger, clock)

    def preview(self, clock: ServiceClock) -> AsyncGenerator[tuple[str, str | None], None]:
        return self.operation.preview(clock)

    async def items(self, session: CommandSession) -> AsyncIterator[ClaimedWork]:
        ledger, target = as_shared(session.ledger), session.target_id
        assert ledger is not None, "a claimed operation needs a shared ledger"
        ledger.settles_by_state = False  # a claim ends when its item is done with
        queue = queue_of(self.name, target)
        async with ledger.planning(queue, self.launched_at) as must_plan:
            if must_plan:
                self.queued = await self._enqueue(
                    ledger, target, queue, self.operation.items(session)
                )
        log.info(f"{self.name}.queue", queued=self.queued, owner=ledger.owner)
        self._keeper = LeaseKeeper(ledger, target, self.lease, SharedLimits(session.conn.pacer))
        await self._keeper.start()
        busy = lambda: self._waiting > 0  # noqa: E731
        async for work in claimed(ledger, queue, session.workers, self._keeper, busy):
            self._waiting += 1
            yield work

    async def handle(self, session: CommandSession, work: ClaimedWork) -> None:
        ledger = as_shared(session.ledger)
        assert self._keeper is not None and ledger is not None
        try:
            row = work.row
            if row is None or await self._keeper.guard(
                work.claim, lambda: self.operation.handle(session, row)
            ):
                await ledger.finish(work.claim)
        finally:
            self._waiting -= 1
            self._keeper.wake.set()

    async def conclude(self, session: CommandSession) -> list[str]:
        notes = await self.operation.conclude(session)
        if self._keeper is not None:
            await self._keeper.stop()
            if lost := self._keeper.lost:
                notes.append(f"{lost} items went to other workers after this one's leases ran out")
        return notes

    @staticmethod
    async def _enqueue(
        ledger: PgLedger, target: str, queue: str, rows: AsyncIterator[LedgerItem]
    ) -> int:
        queued = 0
        batch: list[tuple[str, str, Mapping[str, Any]]] = []
        async for row in rows:
            work = {"target": target, "upload_path": row.upload_path, "file_name": row.file_name}
            batch.append((row.upload_path, row.file_name, work))
            if len(batch) >= ENQUEUE_BATCH:
                queued += await ledger.enqueue(target, batch, queue)
                batch = []
        if batch:
            queued += await ledger.enqueue(target, batch, queue)
        return queued


__all__ = [
    "DEFAULT_LEASE",
    "ClaimedOperation",
    "LeaseKeeper",
    "SharedLimits",
    "as_work",
    "claimed",
    "from_work",
    "idle_wait",
    "plan_once",
    "planned_and_claimed",
    "process_started",
    "queue_of",
    "share_of",
]
