"""The command core: one scaffolding for every command that works item by item.

`run`, `refresh`, `download` and `verify` are *operations*: each says which items it
works on and what it does with one. Everything else is here, once:

- the checks before anything is written (the operation's `prepare`, the API key);
- the run lock, the ledger and its run row;
- the connection, and the pacer every worker shares;
- the worker pool under SIGINT/SIGTERM, with the grace period and what it waits for;
- the stop decision (a rejected key, a wrong base URL, no service before anything
  worked, a failing destination disk, a signal): `errors.stop_reason_for`;
- typed counts of outcomes, the summary (line, dict, exit code), the run row's end,
  and the outputs (mapping files, metrics) rewritten afterwards;
- `--dry-run`: the same decisions, read-only, without a lock or a request to the service.

Progress reaches the caller through an `Observer` (the CLI's bar or periodic line);
nothing here prints.
"""

from __future__ import annotations

import contextlib
import random
import resource
import signal
import time
from collections import Counter
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, NoReturn, Protocol, TypeVar, cast

from migrator.claims import DEFAULT_LEASE, ClaimedOperation
from migrator.clock import OFFSET_FACT, SKEW_WARNING, ServiceClock
from migrator.connect import check_ca_bundle, connect, key_source, read_api_key
from migrator.errors import (
    ExitCode,
    MigratorError,
    StopReason,
    UploadError,
    exit_code_of,
    stop_message,
    stop_reason_for,
)
from migrator.ledger import BaseLedger, locked, open_ledger
from migrator.logs import get_logger
from migrator.model import ItemUpdate, LedgerItem, Manifest, Method, Settings
from migrator.model import Outcome as Outcome  # public here too: what counts mean
from migrator.outputs import check_writable
from migrator.pacer import Pacer, plain_sleep
from migrator.pool import WorkPool, stop_on_signals
from migrator.report import CommandResult, as_seen_now, output_paths, publish_outputs
from migrator.retry import RetryPolicy
from migrator.settle import settle_uncertain
from migrator.transfer import AttemptReport, Attempts, Connection, read_service_clock
from migrator.units import format_duration, format_size, number_or_none

T = TypeVar("T")
log = get_logger("migrator.command")


_DRY_RUN_VERBS = {"run": "upload", "verify": "probe"}
UPLOAD_ACTIONS = frozenset(
    str(method) for method in (Method.BASE64, Method.STREAM, Method.URL, Method.COPY)
)


@dataclass(frozen=True, slots=True)
class CommandOptions:
    """What every command takes; each operation's options extend it."""

    concurrency: int | None = None  # None: the manifest's settings.concurrency
    dry_run: bool = False  # decide and count, write nothing, send nothing to the service
    grace_period: float = 30.0  # how long in-flight items may finish after a signal
    handle_signals: bool = False  # the CLI sets it; a library caller owns its signals
    seed: int | None = None  # for the backoff jitter; None: unpredictable
    metrics_file: Path | None = None  # besides the manifest's outputs.metrics
    metrics_push: str | None = None  # a Pushgateway URL; wins over outputs.metrics_push
    tps_limit: float | None = None  # None: the manifest's settings.tps_limit
    bwlimit: int | None = None  # None: the manifest's settings.bwlimit
    lease: float = DEFAULT_LEASE  # a shared (PostgreSQL) ledger: how long a claim holds
    launched_at: float | None = None  # a shared ledger: when asked for (wall clock); None: now

    def workers(self, settings: Settings) -> int:
        """The effective concurrency: this option, else the manifest's, within what the
        open-file limit allows (a worker holds up to FILES_PER_WORKER descriptors)."""
        return min(self.concurrency or settings.concurrency, workers_the_fd_limit_allows())

    def pacer(self, settings: Settings) -> Pacer:
        return Pacer(
            tps_limit=self.tps_limit if self.tps_limit is not None else settings.tps_limit,
            bwlimit=self.bwlimit if self.bwlimit is not None else settings.bwlimit,
            outage_limit=settings.outage_limit,
        )


FILES_PER_WORKER = 4  # a connection to the service, one to an origin, a file, a temp file
FILES_KEPT_BACK = 32  # the ledger, the log, the lock, the loop, the interpreter's own


def workers_the_fd_limit_allows(soft_limit: int | None = None) -> int:
    """How many workers fit in the open-file limit (`ulimit -n`), at least one."""
    if soft_limit is None:
        soft_limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft_limit == resource.RLIM_INFINITY:
        return 1 << 20
    return max(1, (soft_limit - FILES_KEPT_BACK) // FILES_PER_WORKER)


QUIET_RETRIES = 2
"""Failed attempts of one item logged as info; from the next retry on, each is a warning
that reaches the console: a service that keeps failing must not look like silence."""


def retrying_for_long(report: AttemptReport) -> bool:
    """A retry after more than QUIET_RETRIES failed attempts of the same item (pure)."""
    return report.outcome == "retry" and report.number > QUIET_RETRIES


class Observer:
    """Progress hooks; the CLI subclasses this for its display. Default: do nothing."""

    def on_totals(self, items: int, local_bytes: int) -> None:
        """How many items the command will look at, and how many local bytes at most."""

    def on_item_start(self, label: str) -> None:
        """A worker took the item."""

    def on_bytes(self, count: int) -> None:
        """Bytes moved; negative when a failed attempt takes them back."""

    def on_item_done(self, label: str, outcome: Outcome, error: str | None) -> None:
        """The item reached its outcome for this command."""

    def on_stopping(self, in_flight: int, grace_period: float, *, now: bool) -> None:
        """A stop was asked for: `in_flight` items may finish within `grace_period`
        seconds (`now`: a second request, they are cut short)."""


@dataclass(frozen=True, slots=True)
class Problem:
    """One item with a bad outcome, for the operator's report."""

    label: str
    outcome: Outcome
    error: str | None


PROBLEMS_KEPT = 50


@dataclass(frozen=True, slots=True)
class Totals:
    items: int
    local_bytes: int = 0


@dataclass(frozen=True, slots=True)
class CommandSummary:
    """How a command ended. `counts` holds the outcomes of the items it reached."""

    command: str
    counts: Mapping[Outcome, int]
    planned: int  # items the command meant to look at
    duration: float
    bytes_moved: int = 0
    run_id: int | None = None
    stop_reason: StopReason | None = None
    message: str | None = None  # why it stopped early, one line
    dry_run: bool = False
    would: Mapping[str, int] = field(default_factory=dict)  # dry run: decision -> items
    notes: tuple[str, ...] = ()  # what the command learnt that the operator should read
    problems: tuple[Problem, ...] = ()  # the first items with a bad outcome
    outputs_failed: ExitCode | None = None  # writing the outputs afterwards failed so

    @property
    def exit_code(self) -> ExitCode:
        if self.stop_reason is not None:
            return self.stop_reason.exit_code
        if self.outputs_failed is not None:
            return self.outputs_failed
        bad = any(outcome.is_bad and n for outcome, n in self.counts.items())
        return ExitCode.ITEMS_FAILED if bad else ExitCode.OK

    @property
    def not_started(self) -> int:
        """Items the command meant to reach and did not (a stop, a signal)."""
        return max(0, self.planned - sum(self.counts.values()) - sum(self.would.values()))

    def count(self, outcome: Outcome) -> int:
        return self.counts.get(outcome, 0)

    def as_dict(self) -> dict[str, Any]:
        return {
            **{str(outcome): n for outcome, n in sorted(self.counts.items())},
            "planned": self.planned,
            "not_started": self.not_started,
            "bytes": self.bytes_moved,
            "duration": round(self.duration, 3),
            "stop_reason": self.stop_reason,
            "exit_code": int(self.exit_code),
            **({"would": dict(self.would)} if self.dry_run else {}),
        }

    def line(self) -> str:
        """The summary line a person reads (the CLI prints it)."""
        if self.dry_run:
            would = ", ".join(f"{n} {d}" for d, n in sorted(self.would.items())) or "nothing"
            skipped = self.count(Outcome.SKIPPED)
            verb = _DRY_RUN_VERBS.get(self.command, self.command)
            return f"dry run: {self.planned} items, would {verb}: {would}; {skipped} skipped"
        size, took = format_size(self.bytes_moved), format_duration(self.duration)
        rate = format_size(self.bytes_moved / self.duration if self.duration > 0 else 0.0)
        if self.command == "run":  # the form scripts have always read
            text = f"run: {self._counts_text()}; {size} in {took} ({rate}/s)"
        else:
            text = f"{self.command}: {self._counts_text()} in {took}"
            text += f" ({size}, {rate}/s)" if self.bytes_moved else ""
        if self.not_started and self.stop_reason is not None:
            text += f"; {self.not_started} not started: run again to resume"
        return text

    def _counts_text(self) -> str:
        if self.command == "run":  # the four counts scripts have always read
            shown = (Outcome.UPLOADED, Outcome.SKIPPED, Outcome.FAILED, Outcome.INTERRUPTED)
            return ", ".join(f"{self.count(o)} {o}" for o in shown)
        done = [f"{n} {outcome}" for outcome, n in sorted(self.counts.items()) if n]
        if done:
            return ", ".join(done)
        return "nothing finished" if self.stop_reason is not None else "nothing to do"


class _Stopped(Exception):
    def __init__(self, reason: StopReason, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class CommandSession:
    """One command's moving parts, as its operation sees them."""

    def __init__(
        self,
        name: str,
        manifest: Manifest,
        options: CommandOptions,
        ledger: BaseLedger,
        run_id: int,
        conn: Connection,
        observer: Observer,
    ) -> None:
        self.name = name
        self.manifest = manifest
        self.options = options
        self.ledger = ledger
        self.run_id = run_id
        self.conn = conn
        self.observer = observer
        self.target_id = manifest.target.base_url
        self.policy = RetryPolicy(retries=manifest.settings.retries)
        self.rng = random.Random(options.seed)
        self.counts: Counter[Outcome] = Counter()
        self.bytes_moved = 0
        self.anything_worked = False  # a request to the service succeeded
        self.stop_reason: StopReason | None = None
        self.message: str | None = None
        self.notes: tuple[str, ...] = ()
        self.problems: list[Problem] = []
        self.pool: WorkPool[Any] | None = None
        self.after_a_kill = False  # the previous command on this ledger was killed

    # -- what operations call -----------------------------------------------------------------

    def attempts(
        self, upload_path: str, file_name: str, label: str, *, done_logged: bool = False
    ) -> Attempts:
        """The retry path for one item: the shared pacer, attempts recorded and logged.
        `done_logged`: the caller logs the success itself, so a successful attempt is
        not logged twice (its ledger row is written all the same)."""

        def on_attempt(report: AttemptReport) -> None:
            self.anything_worked = self.anything_worked or report.outcome == "ok"
            self.ledger.put_attempt(report.record(run_id=self.run_id, target=self.target_id))
            if self._uncertain(report):
                update = ItemUpdate.uncertain(
                    self.target_id, upload_path, file_name, self.clock.now()
                )
                self.ledger.put_item(update)
            if done_logged and report.outcome == "ok":
                return
            event = log.warning if retrying_for_long(report) else log.info
            event(f"{self.name}.attempt", item=label, **report.log_fields())

        return Attempts(
            upload_path=upload_path,
            file_name=file_name,
            policy=self.policy,
            rng=self.rng,
            pacer=self.conn.pacer,
            sleep=self.sleep,
            on_bytes=self._on_bytes,
            on_attempt=on_attempt,
            limits=self.conn.limits,
        )

    def _uncertain(self, report: AttemptReport) -> bool:
        """An upload that may land later than its answer: none came, a kill cut it, or
        the previous command was killed with uploads in flight."""
        if report.action not in UPLOAD_ACTIONS:
            return False
        if report.outcome == "interrupted":
            return True
        if isinstance(report.error, UploadError) and report.error.uncertain:
            return True
        return self.after_a_kill and report.outcome == "ok"

    def finish(self, label: str, outcome: Outcome, error: str | None = None) -> None:
        """Count the item's outcome and tell the observer."""
        self.counts[outcome] += 1
        if outcome.is_bad and len(self.problems) < PROBLEMS_KEPT:
            self.problems.append(Problem(label, outcome, error))
        self.observer.on_item_done(label, outcome, error)

    def is_fatal(self, error: BaseException) -> bool:
        """Whether `error` stops the whole command (no other item would escape it)."""
        return stop_reason_for(error, anything_worked=self.anything_worked) is not None

    def stop_for(self, error: BaseException) -> NoReturn:
        """Stop the whole command because of `error` (one `is_fatal` said yes to)."""
        reason = stop_reason_for(error, anything_worked=self.anything_worked)
        assert reason is not None, f"{type(error).__name__} does not stop a command"
        raise _Stopped(reason, stop_message(reason, error))

    async def sleep(self, delay: float) -> bool:
        """Sleep unless a stop is asked for meanwhile; True when the sleep was whole."""
        assert self.pool is not None, "sleep is for workers of the pool"
        return await self.pool.sleep(delay)

    @property
    def workers(self) -> int:
        return self.options.workers(self.manifest.settings)

    @property
    def clock(self) -> ServiceClock:
        """The service's clock: judge expiry by `clock.now()`, never by ours."""
        return self.conn.clock

    # -- what the core does -------------------------------------------------------------------

    async def drive(self, operation: Operation[T]) -> None:
        """The operation's items through the pool; an uploading command first and last
        settles the uploads whose answer was uncertain."""
        self.pool = WorkPool(self.workers, self._handler(operation), grace_period=self._grace)
        notes: list[str] = []
        with stop_on_signals(self._signalled, enabled=self.options.handle_signals):
            try:
                if operation.uses_api:
                    notes += filter(None, [await settle_uncertain(self)])
                await self.pool.run(operation.items(self))
                if operation.uses_api and self.stop_reason is None:
                    notes += filter(None, [await settle_uncertain(self)])
            except _Stopped as stopped:
                self.stop_reason = self.stop_reason or stopped.reason
                self.message = self.message or str(stopped)
        self.notes = tuple(notes + await operation.conclude(self))

    def summary(self, planned: int, duration: float) -> CommandSummary:
        return CommandSummary(
            command=self.name,
            counts=dict(self.counts),
            planned=planned,
            duration=duration,
            bytes_moved=self.bytes_moved,
            run_id=self.run_id,
            stop_reason=self.stop_reason,
            message=self.message,
            notes=self.notes,
            problems=tuple(self.problems),
        )

    @property
    def _grace(self) -> float:
        return self.options.grace_period

    def _handler(self, operation: Operation[T]) -> Callable[[T], Awaitable[None]]:
        async def handle(item: T) -> None:
            await operation.handle(self, item)

        return handle

    def _on_bytes(self, count: int) -> None:
        self.bytes_moved += count
        self.observer.on_bytes(count)

    def _signalled(self, signum: signal.Signals) -> None:
        reason = StopReason.SIGINT if signum == signal.SIGINT else StopReason.SIGTERM
        assert self.pool is not None
        again = self.pool.stopping.is_set()
        self.stop_reason = self.stop_reason or reason
        self.message = self.message or f"stopped by {signum.name}"
        self.pool.request_stop()
        log.info(f"{self.name}.stopping", signal=signum.name, in_flight=self.pool.in_flight)
        self.observer.on_stopping(self.pool.in_flight, self._grace, now=again)


class Operation(Protocol[T]):
    """A command's own part: which items, and what to do with one."""

    name: str  # run, refresh, download, verify: names the run row, events and summary
    uses_api: bool  # needs the API key (it uploads); False: it only reads links
    needs_clock: bool  # judges expiry: read the service's clock before starting

    async def prepare(self) -> None:
        """Every check that can fail before anything is written (ManifestError,
        UsageError, ...)."""
        ...

    async def totals(self, ledger: BaseLedger, clock: ServiceClock) -> Totals:
        """How many items the command will look at (for progress and "not started")."""
        ...

    def items(self, session: CommandSession) -> AsyncIterator[T]:
        """The items to hand to the workers, in order."""
        ...

    async def handle(self, session: CommandSession, item: T) -> None:
        """Do the work of one item: record it in the ledger and `session.finish` it."""
        ...

    def preview(self, clock: ServiceClock) -> AsyncGenerator[tuple[str, str | None], None]:
        """--dry-run: (label, what would be done) per item, None for nothing; read-only."""
        ...

    async def conclude(self, session: CommandSession) -> list[str]:
        """After the last item: remember what was learnt; notes for the operator."""
        ...


async def execute(
    operation: Operation[T],
    manifest: Manifest,
    options: CommandOptions,
    observer: Observer | None = None,
    *,
    environ: Mapping[str, str] | None = None,
) -> CommandSummary:
    """Run `operation` over its items, on the command core. The library's door."""
    watcher = observer or Observer()
    await operation.prepare()
    if options.dry_run:
        return await _dry_run(operation, manifest, watcher)
    for path in output_paths(manifest, options.metrics_file):
        check_writable(path)  # ConfigError (exit 2) or DiskError before anything is sent
    check_ca_bundle(
        manifest.target
    )  # a CA bundle that cannot be read: exit 2, the ledger untouched
    api_key = None
    if operation.uses_api and not manifest.target.is_embedded:
        api_key = read_api_key(manifest.target, environ)  # ConfigError before any write
    # A shared (PostgreSQL) ledger is for many processes at once: leases, not a lock.
    lock = contextlib.nullcontext() if manifest.ledger_url else locked(manifest.ledger)
    with lock:
        async with await open_ledger(manifest) as ledger:
            shared = _claimed_if_shared(operation, ledger, options)
            summary = await _with_ledger(shared, manifest, options, watcher, ledger, api_key)
    if summary.stop_reason is StopReason.AUTH and api_key is not None:
        where = key_source(manifest.target, environ)
        summary = replace(summary, message=f"{summary.message} (the key came from {where})")
    return summary


def _claimed_if_shared(
    operation: Operation[T], ledger: BaseLedger, options: CommandOptions
) -> Operation[Any]:
    """On a shared ledger, the processes of one command share its work by claims:
    `run` claims by itself, any other command through `ClaimedOperation`."""
    if ledger.shared and operation.name != "run":
        claimed = cast("Operation[LedgerItem]", operation)
        return ClaimedOperation(claimed, options.lease, options.launched_at)
    return operation


async def _with_ledger(
    operation: Operation[T],
    manifest: Manifest,
    options: CommandOptions,
    observer: Observer,
    ledger: BaseLedger,
    api_key: str | None,
) -> CommandSummary:
    name = operation.name
    after_a_kill = await _previous_was_killed(ledger)
    run_id = await ledger.start_run(name, str(manifest.path))
    workers = options.workers(manifest.settings)
    wanted = options.concurrency or manifest.settings.concurrency
    if workers < wanted:
        log.warning(f"{name}.concurrency_capped", wanted=wanted, workers=workers, why="ulimit -n")
    log.info(f"{name}.start", job=manifest.name, run_id=run_id, concurrency=workers)
    started, started_wall = time.monotonic(), time.time()
    clock = await stored_clock(ledger)
    known_offset = clock.offset
    session: CommandSession | None = None
    totals = Totals(0)
    error: BaseException | None = None
    try:
        pacer = options.pacer(manifest.settings)
        async with connect(
            manifest, concurrency=workers, api_key=api_key, pacer=pacer, clock=clock
        ) as conn:
            if operation.needs_clock:
                await read_service_clock(conn, plain_sleep)
            totals = await operation.totals(ledger, clock)
            observer.on_totals(totals.items, totals.local_bytes)
            session = CommandSession(name, manifest, options, ledger, run_id, conn, observer)
            session.after_a_kill = after_a_kill
            await session.drive(operation)
    except BaseException as err:
        error = err  # recorded as what it is, not as a clean run
        raise
    finally:
        duration = time.monotonic() - started
        if session is not None:
            summary = session.summary(totals.items, duration)
        else:
            summary = CommandSummary(name, {}, totals.items, duration, run_id=run_id)
        await _remember_clock(ledger, clock, known_offset)
        await ledger.finish_run(run_id, _run_status(summary, error), summary.as_dict())
        log.info(f"{name}.summary", job=manifest.name, run_id=run_id, **summary.as_dict())
        code = summary.exit_code if error is None else exit_code_of(error)
        result = CommandResult(name, started_wall, int(code))
        failure = await _published(manifest, ledger, result, options)
    if failure is None:
        return summary
    message = "; ".join(filter(None, [summary.message, str(failure)]))
    return replace(summary, message=message, outputs_failed=failure.exit_code)


async def _published(
    manifest: Manifest, ledger: BaseLedger, result: CommandResult, options: CommandOptions
) -> MigratorError | None:
    """Rewrite the outputs; an output that cannot be written now (a disk filled during
    the run) is the command's failure, told after its summary, not a lost summary."""
    try:
        await publish_outputs(
            manifest,
            ledger,
            result,
            metrics_file=options.metrics_file,
            metrics_push=options.metrics_push,
        )
    except MigratorError as err:
        log.error("outputs.failed", error=str(err))
        return err
    return None


async def _previous_was_killed(ledger: BaseLedger) -> bool:
    """The last command on this ledger never finished (kill -9, power loss). On a shared
    ledger other processes run meanwhile, and a dead one's items come back by lease."""
    if ledger.shared:
        return False
    runs = await ledger.runs(limit=1)
    return bool(runs) and as_seen_now(runs[0]).status == "did not finish"


async def stored_clock(ledger: BaseLedger) -> ServiceClock:
    """The service's clock as the ledger last knew it (its offset from ours)."""
    offset = await ledger.fact(OFFSET_FACT)
    return ServiceClock(number_or_none(offset))


async def _remember_clock(ledger: BaseLedger, clock: ServiceClock, known: float | None) -> None:
    """Keep the offset this command measured; warn when a skew shows up or moves (a
    skew that stays put was said once: cron mail need not repeat it every night)."""
    if not clock.measured or clock.offset is None:
        return
    await ledger.set_fact(OFFSET_FACT, round(clock.offset, 3))
    moved = known is None or abs(clock.offset - known) > SKEW_WARNING
    event = log.warning if clock.skewed and moved else log.info
    event(
        "service.clock",
        offset=round(clock.offset, 1),
        note="expiry is judged on the service's clock",
    )


def _run_status(summary: CommandSummary, error: BaseException | None) -> str:
    if error is not None:
        return "error"
    if summary.stop_reason is not None:
        return f"stopped:{summary.stop_reason}"
    return "failed" if summary.exit_code else "done"


async def _dry_run(
    operation: Operation[T], manifest: Manifest, observer: Observer
) -> CommandSummary:
    """Decide as the command would, without a lock, a write or a request to the service."""
    started = time.monotonic()
    async with await open_ledger(manifest, readonly=True) as ledger:
        clock = await stored_clock(ledger)
        totals = await operation.totals(ledger, clock)
    observer.on_totals(totals.items, totals.local_bytes)
    counts: Counter[Outcome] = Counter()
    would: Counter[str] = Counter()
    planned = 0
    async with contextlib.aclosing(operation.preview(clock)) as decisions:
        async for label, decision in decisions:
            planned += 1
            if decision is None:
                counts[Outcome.SKIPPED] += 1
                observer.on_item_done(label, Outcome.SKIPPED, None)
            else:
                would[decision] += 1
    duration = time.monotonic() - started
    return CommandSummary(
        operation.name, dict(counts), planned, duration, dry_run=True, would=dict(would)
    )
