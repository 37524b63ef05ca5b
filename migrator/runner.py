"""The main job: upload every item of the plan that is not already done.

A fixed set of workers pulls from a bounded queue that one feeder fills from the
plan, so memory stays flat however long the manifest is. Each worker takes one
item through its attempts (transfer -> retry policy -> ledger record), and the
run stops early only for what no item can fix: a rejected key, a wrong base URL,
or a signal.
"""

from __future__ import annotations

import asyncio
import random
import signal
import time
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, NoReturn

from migrator import transfer
from migrator.client import NoServiceError, no_service_message
from migrator.connect import Connection, connect, open_origins, read_api_key
from migrator.errors import (
    AuthRejectedError,
    EndpointError,
    ExitCode,
    UploadError,
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
    PlanItem,
    SourceKind,
)
from migrator.plan import check_plan, expand
from migrator.pool import WorkPool, stop_on_signals
from migrator.report import CommandResult, publish_outputs
from migrator.resume import Decision, decide
from migrator.retry import RetryPolicy
from migrator.transfer import AttemptReport, Attempts, Interrupted

LOOKUP_BATCH = 256
log = get_logger("migrator.runner")


class Outcome(StrEnum):
    UPLOADED = "uploaded"
    SKIPPED = "skipped"
    FAILED = "failed"
    INTERRUPTED = "interrupted"


class StopReason(StrEnum):
    AUTH = "auth"  # the service rejected the key
    ENDPOINT = "endpoint"  # the base URL does not serve the API
    SIGINT = "sigint"
    SIGTERM = "sigterm"


@dataclass(frozen=True, slots=True)
class RunOptions:
    concurrency: int | None = None  # None: the manifest's settings.concurrency
    dry_run: bool = False
    checksum: bool = False  # compare sha256 of local files, not only size and mtime
    grace_period: float = 30.0  # how long in-flight uploads may finish after a signal
    handle_signals: bool = False  # the CLI sets it; a library caller owns its signals
    seed: int | None = None  # for the backoff jitter; None: unpredictable
    metrics_file: Path | None = None  # besides the manifest's outputs.metrics


class RunObserver:
    """Progress hooks; the CLI subclasses this for its bar. Default: do nothing."""

    def on_totals(self, items: int, local_bytes: int) -> None:
        """The plan was checked: how many items, how many local bytes at most."""

    def on_item_start(self, item: PlanItem) -> None:
        """A worker took the item."""

    def on_bytes(self, count: int) -> None:
        """Bytes left this machine; negative when a failed attempt takes them back."""

    def on_item_done(self, item: PlanItem, outcome: Outcome, error: str | None) -> None:
        """The item reached its outcome for this run."""


@dataclass(slots=True)
class RunCounts:
    planned: int = 0
    uploaded: int = 0
    skipped: int = 0
    failed: int = 0
    interrupted: int = 0
    bytes_sent: int = 0
    would_upload: dict[str, int] = field(default_factory=dict)  # dry run: decision -> count


@dataclass(frozen=True, slots=True)
class RunSummary:
    run_id: int | None
    counts: RunCounts
    duration: float
    stop_reason: StopReason | None
    message: str | None  # why the run stopped early, one line
    dry_run: bool

    @property
    def exit_code(self) -> ExitCode:
        return exit_code_for(self.stop_reason, self.counts.failed)

    def as_dict(self) -> dict[str, Any]:
        counts = self.counts
        return {
            "planned": counts.planned,
            "uploaded": counts.uploaded,
            "skipped": counts.skipped,
            "failed": counts.failed,
            "interrupted": counts.interrupted,
            "bytes": counts.bytes_sent,
            "duration": round(self.duration, 3),
            "stop_reason": self.stop_reason,
            "exit_code": int(self.exit_code),
            **({"would_upload": dict(counts.would_upload)} if self.dry_run else {}),
        }


def exit_code_for(stop: StopReason | None, failed: int) -> ExitCode:
    """The documented exit status of a run (pure)."""
    by_stop = {
        StopReason.AUTH: ExitCode.AUTH,
        StopReason.ENDPOINT: ExitCode.USAGE,
        StopReason.SIGINT: ExitCode.INTERRUPTED_INT,
        StopReason.SIGTERM: ExitCode.INTERRUPTED_TERM,
    }
    if stop is not None:
        return by_stop[stop]
    return ExitCode.ITEMS_FAILED if failed else ExitCode.OK


async def run_manifest(
    manifest: Manifest,
    options: RunOptions | None = None,
    observer: RunObserver | None = None,
    *,
    environ: Mapping[str, str] | None = None,
) -> RunSummary:
    """Upload what the manifest lists and the ledger does not hold. The library door."""
    opts = options or RunOptions()
    check = await asyncio.to_thread(check_plan, manifest)  # ManifestError before any write
    watcher = observer or RunObserver()
    watcher.on_totals(check.items, check.local_bytes)
    if opts.dry_run:
        return await _dry_run(manifest, opts, watcher)
    if not manifest.target.is_embedded:
        read_api_key(manifest.target, environ)  # ConfigError before any write, too
    with locked(manifest.ledger):
        async with await Ledger.open(manifest.ledger) as ledger:
            return await _run_with_ledger(manifest, opts, watcher, ledger, environ)


async def _run_with_ledger(
    manifest: Manifest,
    opts: RunOptions,
    observer: RunObserver,
    ledger: Ledger,
    environ: Mapping[str, str] | None,
) -> RunSummary:
    concurrency = opts.concurrency or manifest.settings.concurrency
    run_id = await ledger.start_run("run", str(manifest.path))
    log.info("run.start", job=manifest.name, run_id=run_id, concurrency=concurrency)
    started, started_wall = time.monotonic(), time.time()
    job = _Job(manifest, opts, observer, ledger, run_id, concurrency)
    error: BaseException | None = None
    try:
        async with connect(manifest, concurrency=concurrency, environ=environ) as conn:
            job.conn = conn
            with stop_on_signals(job.signalled, enabled=opts.handle_signals):
                await job.run_pool()
    except BaseException as err:
        error = err  # recorded as what it is, not as a clean run
        raise
    finally:
        summary = job.summary(time.monotonic() - started)
        status = "error" if error is not None else _run_status(summary)
        await ledger.finish_run(run_id, status, summary.as_dict())
        log.info("run.summary", job=manifest.name, run_id=run_id, **summary.as_dict())
        code = summary.exit_code if error is None else exit_code_of(error)
        result = CommandResult("run", started_wall, int(code))
        await publish_outputs(manifest, ledger, result, metrics_file=opts.metrics_file)
    return summary


def _run_status(summary: RunSummary) -> str:
    if summary.stop_reason is not None:
        return f"stopped:{summary.stop_reason}"
    return "failed" if summary.counts.failed else "done"


async def _dry_run(manifest: Manifest, opts: RunOptions, observer: RunObserver) -> RunSummary:
    """Decide exactly as a run would, without a lock, a write or a request to the service."""
    started = time.monotonic()
    counts = RunCounts()
    entries = preview(manifest, concurrency=opts.concurrency, checksum=opts.checksum)
    async for item, planned, row in entries:
        counts.planned += 1
        decision = await _verified(item, planned, row)
        if decision.needs_upload:
            counts.would_upload[decision] = counts.would_upload.get(decision, 0) + 1
        else:
            counts.skipped += 1
            observer.on_item_done(item, Outcome.SKIPPED, None)
    return RunSummary(None, counts, time.monotonic() - started, None, None, dry_run=True)


async def _verified(item: PlanItem, decision: Decision, row: LedgerItem | None) -> Decision:
    """--checksum: a VERIFY becomes CHANGED or UNCHANGED once the file is hashed."""
    if decision is not Decision.VERIFY or row is None:
        return decision
    same = await _same_bytes(item, row)
    return Decision.UNCHANGED if same else Decision.CHANGED


async def _same_bytes(item: PlanItem, row: LedgerItem) -> bool:
    try:
        return await asyncio.to_thread(transfer.sha256_of, Path(item.source)) == row.sha256
    except OSError:
        return False  # the upload attempt will say what is wrong with the file


async def preview(
    manifest: Manifest, *, concurrency: int | None = None, checksum: bool = False
) -> AsyncGenerator[tuple[PlanItem, Decision, LedgerItem | None], None]:
    """The plan joined with the ledger, read-only: what `plan` shows and `--dry-run` counts.
    Origins may be asked for sizes; the service is not contacted."""
    workers = concurrency or manifest.settings.concurrency
    async with (
        await Ledger.open(manifest.ledger, readonly=True) as ledger,
        open_origins(manifest, concurrency=workers) as origins,
    ):
        items = expand(manifest, session=origins.session, url_vars=origins.url_vars)
        async for entry in decide_items(manifest, ledger, items, checksum):
            yield entry


@dataclass(slots=True)
class PlanTotals:
    """Counts and bytes by method, and counts by ledger decision."""

    by_method: dict[str, tuple[int, int]] = field(default_factory=dict)
    by_decision: dict[str, int] = field(default_factory=dict)

    def add(self, item: PlanItem, decision: Decision) -> None:
        count, size = self.by_method.get(item.method, (0, 0))
        self.by_method[item.method] = (count + 1, size + (item.size or 0))
        self.by_decision[decision] = self.by_decision.get(decision, 0) + 1


async def decide_items(
    manifest: Manifest, ledger: Ledger, items: AsyncIterator[PlanItem], checksum: bool
) -> AsyncIterator[tuple[PlanItem, Decision, LedgerItem | None]]:
    """Join the plan with the ledger, a batch of lookups at a time."""
    settings = manifest.settings
    async for batch in _batched(items, LOOKUP_BATCH):
        rows = await ledger.lookup(manifest.target.base_url, [item.key for item in batch])
        now = time.time()
        for item in batch:
            row = rows.get(item.key)
            decision = decide(
                item, row, now=now, refresh_within=settings.refresh_within, checksum=checksum
            )
            yield item, decision, row


async def _batched(items: AsyncIterator[PlanItem], size: int) -> AsyncIterator[list[PlanItem]]:
    batch: list[PlanItem] = []
    async for item in items:
        batch.append(item)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


class _StopRun(Exception):
    def __init__(self, reason: StopReason, message: str) -> None:
        super().__init__(message)
        self.reason = reason


_Entry = tuple[PlanItem, Decision, LedgerItem | None]


class _Job:
    """One run's moving parts: the queue, the workers, the counts."""

    def __init__(
        self,
        manifest: Manifest,
        opts: RunOptions,
        observer: RunObserver,
        ledger: Ledger,
        run_id: int,
        concurrency: int,
    ) -> None:
        self.manifest = manifest
        self.target_id = manifest.target.base_url
        self.opts = opts
        self.observer = observer
        self.ledger = ledger
        self.run_id = run_id
        self.concurrency = concurrency
        self.policy = RetryPolicy(retries=manifest.settings.retries)
        self.rng = random.Random(opts.seed)
        self.pool: WorkPool[_Entry] = WorkPool(
            concurrency, self._process_entry, grace_period=opts.grace_period
        )
        self.counts = RunCounts()
        self.stop_reason: StopReason | None = None
        self.message: str | None = None
        self.conn: Connection | None = None

    # -- the pool -------------------------------------------------------------------------

    async def run_pool(self) -> None:
        try:
            await self.pool.run(self._uploads())
        except _StopRun as stop:
            self.stop_reason, self.message = stop.reason, str(stop)

    def signalled(self, signum: signal.Signals) -> None:
        self.request_stop(StopReason.SIGINT if signum == signal.SIGINT else StopReason.SIGTERM)

    def request_stop(self, reason: StopReason) -> None:
        self.stop_reason = self.stop_reason or reason
        self.message = self.message or f"stopped by {reason.upper()}"
        self.pool.request_stop()

    async def _uploads(self) -> AsyncIterator[_Entry]:
        """The plan joined with the ledger; what needs no upload is counted and skipped."""
        assert self.conn is not None
        items = expand(self.manifest, session=self.conn.origins, url_vars=self.conn.url_vars)
        async for entry in decide_items(self.manifest, self.ledger, items, self.opts.checksum):
            item, decision, _row = entry
            self.counts.planned += 1
            if decision.needs_upload or decision is Decision.VERIFY:
                yield entry
            else:
                self._skip(item)

    # -- one item -------------------------------------------------------------------------

    async def _process_entry(self, entry: _Entry) -> None:
        item, planned, row = entry
        if await _verified(item, planned, row) is Decision.UNCHANGED:
            self._skip(item)
            return
        self.observer.on_item_start(item)
        await _ItemUpload(self, item, row).run()

    def _skip(self, item: PlanItem) -> None:
        self.counts.skipped += 1
        self.observer.on_item_done(item, Outcome.SKIPPED, None)

    def summary(self, duration: float) -> RunSummary:
        return RunSummary(
            self.run_id, self.counts, duration, self.stop_reason, self.message, dry_run=False
        )


class _ItemUpload:
    """Takes one item through its attempts, and records each of them."""

    def __init__(self, job: _Job, item: PlanItem, row: LedgerItem | None) -> None:
        self.job = job
        self.item = item
        self.row = row
        assert job.conn is not None
        self.attempts = Attempts(
            conn=job.conn,
            policy=job.policy,
            rng=job.rng,
            sleep=job.pool.sleep,
            on_bytes=job.observer.on_bytes,
            on_attempt=self._record_attempt,
        )
        self.method = item.method

    async def run(self) -> None:
        if self.row is None:
            # Attempts join their item's row when the ledger writes them: a new item
            # needs one before its first attempt, or that attempt's record is lost.
            self.job.ledger.put_item(self._update(ItemState.PENDING, None))
        try:
            way, result = await self.attempts.first_that_works(self._ways())
        except (AuthRejectedError, EndpointError) as err:
            self._stop_run(err, str(err))
        except Interrupted as err:
            self._interrupted(str(err))
        except NoServiceError as err:
            if not self.job.counts.uploaded:
                self._stop_run(err, no_service_message(err))
            self._failed(str(err))
        except UploadError as err:
            self._failed(str(err))
        except asyncio.CancelledError:
            self._interrupted("interrupted")
            raise
        else:
            self.method = way.method
            self._record_done(result)

    def _stop_run(self, err: UploadError, message: str) -> NoReturn:
        """Not this item's fault: a known item keeps its row as it was (state and last
        error); a new one stays pending, with the reason."""
        if self.row is None:
            self.job.ledger.put_item(self._update(ItemState.PENDING, str(err)))
        reason = StopReason.AUTH if isinstance(err, AuthRejectedError) else StopReason.ENDPOINT
        raise _StopRun(reason, message) from None

    def _ways(self) -> list[transfer.Send]:
        """The planned method; for a URL the service could not fetch, a stream-through."""
        item = self.item
        first = self._send(item.method)
        if item.method is Method.URL and item.kind is SourceKind.URL and not item.method_forced:
            return [first, self._send(Method.STREAM)]
        return [first]

    def _send(self, method: Method) -> transfer.Send:
        item = self.item
        return transfer.Send(
            source=item.source,
            kind=item.kind,
            method=method,
            upload_path=item.upload_path,
            file_name=item.file_name,
            size=item.size,
        )

    def _failed(self, error: str) -> None:
        """Failed for this run. An item done before stays done with the error noted: its
        link still serves the bytes it described, refresh keeps it alive, and the next
        run sees the same change (or expiry) and tries again."""
        self._finish(self._kept_state(ItemState.FAILED), Outcome.FAILED, error)

    def _interrupted(self, error: str) -> None:
        self._finish(self._kept_state(ItemState.INTERRUPTED), Outcome.INTERRUPTED, error)

    def _kept_state(self, otherwise: ItemState) -> ItemState:
        """An item done before keeps its still-valid link when this run is cut short."""
        if self.row is not None and self.row.state is ItemState.DONE:
            return ItemState.DONE
        return otherwise

    # -- recording ------------------------------------------------------------------------

    def _record_attempt(self, report: AttemptReport) -> None:
        job = self.job
        job.ledger.put_attempt(report.record(run_id=job.run_id, target=job.target_id))
        log.info("upload.attempt", item=self.item.source, **report.log_fields())

    def _record_done(self, result: transfer.Sent) -> None:
        job, item, receipt = self.job, self.item, result.receipt
        uploaded_at, expires_at = result.lifetime(job.manifest.settings.ttl)
        size = item.size if item.size is not None else receipt.file_size
        job.ledger.put_item(
            self._update(
                ItemState.DONE,
                None,
                size=size,
                sha256=result.sha256,
                download_url=receipt.download_url,
                file_id=receipt.file_id,
                uploaded_at=uploaded_at,
                expires_at=expires_at,
            )
        )
        job.counts.uploaded += 1
        job.counts.bytes_sent += result.bytes_sent
        log.info("upload.done", item=item.source, method=self.method, url=receipt.download_url)
        job.observer.on_item_done(item, Outcome.UPLOADED, None)

    def _finish(self, state: ItemState, outcome: Outcome, error: str | None) -> None:
        job = self.job
        job.ledger.put_item(self._update(state, error, size=self.item.size))
        if outcome is Outcome.FAILED:
            job.counts.failed += 1
            log.warning("upload.failed", item=self.item.source, error=error)
        else:
            job.counts.interrupted += 1
        job.observer.on_item_done(self.item, outcome, error)

    def _update(self, state: ItemState, error: str | None, **fields: Any) -> ItemUpdate:
        item = self.item
        return ItemUpdate(
            target=self.job.target_id,
            upload_path=item.upload_path,
            file_name=item.file_name,
            state=state,
            last_error=error,
            attempts_added=self.attempts.made,
            **{**fields, **self._identity(state, uploaded="download_url" in fields)},
        )

    def _identity(self, state: ItemState, *, uploaded: bool) -> dict[str, Any]:
        """The source the row describes. A done row whose new upload did not happen keeps
        describing the bytes its link serves: written with the new source's size and
        mtime, it would make the next run skip a changed file for good."""
        row = self.row
        if state is ItemState.DONE and not uploaded and row is not None:
            return {
                "source": row.source,
                "kind": row.kind,
                "size": row.size,
                "mtime_ns": row.mtime_ns,
                "etag": row.etag,
                "last_modified": row.last_modified,
                "method": row.method,
            }
        item = self.item
        return {
            "source": item.source,
            "kind": item.kind,
            "mtime_ns": item.mtime_ns,
            "etag": item.etag,
            "last_modified": item.last_modified,
            "method": self.method,
        }
