"""What the ledger says, summed up: `status`, and the files downstream systems read.

After every run, refresh and download the manifest's `outputs:` (mapping files and
metrics) are rewritten atomically from the ledger, so a consumer always reads a
complete mapping from each source to its current download URL.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from migrator.clock import service_time
from migrator.ledger import BAD_STATES, BaseLedger, Ledger, RunRow, open_ledger
from migrator.ledger_merge import union_of
from migrator.lifetimes import DEATHS_FACT, Deaths
from migrator.logs import get_logger
from migrator.model import HOUR, ItemState, LedgerItem, Manifest, Outputs
from migrator.naming import hide_credentials, without_credentials
from migrator.outputs import (
    MetricsSnapshot,
    atomic_write_text,
    atomic_writer,
    export_record,
    render_metrics,
)
from migrator.pushgateway import GROUPING_LABELS, PushError, push_metrics
from migrator.units import iso_utc

EXPIRY_HORIZONS = (6 * HOUR, 12 * HOUR, 24 * HOUR, 72 * HOUR)
LIFECYCLE_COMMANDS = ("refresh", "download", "verify")
log = get_logger()
RUN_FAILURES_SHOWN = 10
EXPIRED = "expired"  # how status counts a done item past its expiry: not done any more
# Status compares the manifest with the ledger up to this many items on either side: some
# 35 µs of CPU an item (a url_list, on a busy 2-core machine), so past it a second or more,
# done only when asked (`--compare`).
COMPARE_LIMIT = 20_000


@dataclass(frozen=True, slots=True)
class JobCoverage:
    """How the manifest's items today and the ledger's items compare."""

    planned: int  # distinct items the manifest's sources name
    not_started: int  # named by the manifest, never seen by the ledger
    not_in_manifest: int  # in the ledger, no longer named by the manifest

    def as_dict(self) -> dict[str, int]:
        return {
            "in_manifest": self.planned,
            "not_started": self.not_started,
            "not_in_manifest": self.not_in_manifest,
        }


@dataclass(frozen=True, slots=True)
class RunFailure:
    """One item whose last attempt in a run failed: what, and why (credentials hidden)."""

    upload_path: str
    file_name: str
    source: str
    error: str | None
    at: float | None

    def as_dict(self) -> dict[str, Any]:
        return {
            "upload_path": self.upload_path,
            "file_name": self.file_name,
            "source": self.source,
            "error": self.error,
            "at": iso_utc(self.at),
        }


@dataclass(frozen=True, slots=True)
class StatusReport:
    job: str
    ledger: Path
    target: str
    now: float
    by_state: dict[ItemState, tuple[int, int]]  # state -> (items, bytes)
    next_expiry: float | None
    expiring: tuple[tuple[float, int], ...]  # (horizon seconds, items expiring within it)
    failures: tuple[LedgerItem, ...]
    last_run: RunRow | None
    downloaded: int = 0  # items with a recorded download
    last_download: float | None = None
    clock_offset: float | None = None  # the service's clock minus ours, when measured
    last_by_command: tuple[RunRow, ...] = ()  # the latest refresh, download and verify
    deaths_note: str | None = None  # links that died before their stated expiry
    expired: tuple[int, int] = (0, 0)  # done items past their expiry: (items, bytes)
    first_expired: float | None = None  # the earliest expiry of those, when any
    coverage: JobCoverage | None = None  # None: the manifest was not compared
    not_compared: str | None = None  # why not, when it was too big to compare unasked
    run_failures: dict[int, tuple[RunFailure, ...]] = field(default_factory=dict)  # run id ->
    ledgers: tuple[Path, ...] = ()  # all the ledgers read, when several (their union)

    @property
    def total(self) -> int:
        return sum(count for count, _ in self.by_state.values())

    def states(self) -> list[tuple[str, int, int]]:
        """(state, items, bytes) as status shows them: expired items apart from done."""
        shown: list[tuple[str, int, int]] = []
        for state, (count, size) in sorted(self.by_state.items()):
            if state is ItemState.DONE:
                shown.append((state.value, count - self.expired[0], size - self.expired[1]))
                shown.append((EXPIRED, *self.expired))
            else:
                shown.append((state.value, count, size))
        return shown

    def as_dict(self) -> dict[str, Any]:
        return {
            "job": self.job,
            "ledger": str(self.ledger),
            "ledgers": [str(path) for path in self.ledgers or (self.ledger,)],
            "target": self.target,
            "items": self.total,
            "by_state": {
                state: {"items": count, "bytes": size} for state, count, size in self.states()
            },
            "manifest": None if self.coverage is None else self.coverage.as_dict(),
            "manifest_not_compared": self.not_compared,
            "next_expiry": iso_utc(self.next_expiry),
            "first_expired_at": iso_utc(self.first_expired),
            "expiring_within": {f"{int(h // HOUR)}h": n for h, n in self.expiring},
            "downloaded": {"items": self.downloaded, "last_at": iso_utc(self.last_download)},
            "failures": [export_record(item) for item in self.failures],
            "last_run": None if self.last_run is None else _run_dict(self.last_run),
            "last_by_command": {
                run.command: {
                    **_run_dict(run),
                    "failures": [f.as_dict() for f in self.run_failures.get(run.id, ())],
                }
                for run in self.last_by_command
            },
            "service_clock_offset": self.clock_offset,
            "link_deaths": self.deaths_note,
        }


def _run_dict(run: RunRow) -> dict[str, Any]:
    return {
        "id": run.id,
        "command": run.command,
        "started_at": iso_utc(run.started_at),
        "finished_at": iso_utc(run.finished_at),
        "status": run.status,
        "summary": run.summary,
    }


@contextlib.asynccontextmanager
async def reading_ledger(
    manifest: Manifest, ledgers: Sequence[Path] = ()
) -> AsyncIterator[BaseLedger]:
    """What status and export read, never writing it: the manifest's PostgreSQL ledger,
    or its ledger file, or the union of several `ledgers` (as `ledger merge` makes it)."""
    if manifest.ledger_url is not None:
        async with await open_ledger(manifest, readonly=True) as ledger:
            yield ledger
        return
    read = tuple(ledgers) if len(ledgers) > 1 else ()
    async with (
        union_of(read or (manifest.ledger,)) as path,
        await Ledger.open(path, readonly=True) as ledger,
    ):
        yield ledger


async def build_status(
    manifest: Manifest,
    *,
    now: float | None = None,
    compare_manifest: bool = True,
    compare_limit: int | None = COMPARE_LIMIT,
    ledgers: Sequence[Path] = (),
) -> StatusReport:
    """Read the manifest's ledger (never writing it) and sum it up; with several
    `ledgers`, their union (as `ledger merge` would make it). Expiry is told on the
    service's clock, as the ledger last measured it. `compare_manifest`: also expand
    the manifest's sources (offline: no origin or service is asked anything) to count
    the items not started and those no longer in the manifest, unless the ledger or the
    manifest holds more than `compare_limit` items (None: however many)."""
    target = manifest.target.base_url
    read = tuple(ledgers) if len(ledgers) > 1 else ()
    async with reading_ledger(manifest, ledgers) as ledger:
        offset, service_now = await service_time(ledger)
        moment = service_now if now is None else now
        expired = await ledger.count_items(target, states=[ItemState.DONE], expiring_before=moment)
        by_state, histogram = await ledger.counts_and_expiry(target, moment, EXPIRY_HORIZONS)
        runs = await ledger.runs(limit=1)
        downloaded, last_download = await ledger.downloads(target)
        deaths = Deaths.from_dict(await ledger.fact(DEATHS_FACT))
        lifecycle = [as_seen_now(run) for run in await ledger.last_runs(LIFECYCLE_COMMANDS)]
        coverage: JobCoverage | str | None = None
        if compare_manifest:
            in_ledger = sum(count for count, _ in by_state.values())
            coverage = await job_coverage(manifest, ledger, in_ledger, limit=compare_limit)
        return StatusReport(
            job=manifest.name,
            ledger=manifest.ledger,
            target=target,
            now=moment,
            by_state=by_state,
            next_expiry=await ledger.next_expiry(target, after=moment),
            # the expired are in every bucket: the buckets count what is still to expire
            expiring=tuple(
                (horizon, count - expired[0])
                for horizon, count in zip(EXPIRY_HORIZONS, histogram, strict=True)
            ),
            failures=tuple(await ledger.recent_failures(target, limit=20)),
            last_run=as_seen_now(runs[0]) if runs else None,
            downloaded=downloaded,
            last_download=last_download,
            clock_offset=offset,
            last_by_command=tuple(lifecycle),
            deaths_note=deaths.note(manifest.settings.refresh_within),
            expired=expired,
            first_expired=await ledger.next_expiry(target) if expired[0] else None,
            coverage=coverage if isinstance(coverage, JobCoverage) else None,
            not_compared=coverage if isinstance(coverage, str) else None,
            run_failures={run.id: await run_failures(ledger, run) for run in lifecycle},
            ledgers=read,
        )


async def job_coverage(
    manifest: Manifest, ledger: BaseLedger, in_ledger: int, *, limit: int | None = None
) -> JobCoverage | str:
    """Compare the items the manifest names today with the `in_ledger` items the ledger
    holds for its target; or, when either side holds more than `limit` items, say why
    not. Memory: one hash per planned item (a million items, some tens of MB), none per
    ledger row."""
    if limit is not None and in_ledger > limit:
        return _ask(f"the ledger holds {in_ledger:,} items, more than {limit:,}")
    planned = await asyncio.to_thread(_planned_hashes, manifest, limit)
    if planned is None:
        return _ask(f"the manifest names more than {limit:,} items")
    matched = 0
    async for key in ledger.iter_keys(manifest.target.base_url):
        matched += hash(key) in planned
    return JobCoverage(len(planned), len(planned) - matched, in_ledger - matched)


def _ask(why: str) -> str:
    return f"not compared: {why}; `migrator status --compare` compares them"


def _planned_hashes(manifest: Manifest, limit: int | None) -> set[int] | None:
    """A hash of every key the manifest names, or None past `limit` keys."""
    from migrator.plan import planned_keys  # not before: it brings aiohttp

    planned: set[int] = set()
    for key in planned_keys(manifest):
        planned.add(hash(key))
        if limit is not None and len(planned) > limit:
            return None
    return planned


async def run_failures(ledger: BaseLedger, run: RunRow) -> tuple[RunFailure, ...]:
    """The first items whose last attempt in the run failed, credentials hidden. A probe
    is the work of `verify` only; elsewhere it checks a link on the side (a refresh whose
    copy failed, an uncertain upload), and the item's fate is its last other attempt."""
    besides = () if run.command == "verify" else ("probe",)
    failed = await ledger.failed_in_run(run.id, limit=RUN_FAILURES_SHOWN, besides=besides)
    return tuple(
        RunFailure(
            upload_path=item.upload_path,
            file_name=item.file_name,
            source=without_credentials(item.source),
            error=None if attempt.error is None else hide_credentials(attempt.error),
            at=attempt.started_at,
        )
        for item, attempt in failed
    )


def as_seen_now(run: RunRow) -> RunRow:
    """A run still marked running whose process is gone was killed (kill -9, power loss):
    say so rather than "running". A pid in use again (or on another host) is believed."""
    if run.status != "running" or run.pid is None or run.pid <= 0 or _alive(run.pid):
        return run
    return replace(run, status="did not finish")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # it exists, but is not ours to signal
    return True


async def export_to(
    manifest: Manifest, ledger: BaseLedger, fmt: str, path: Path, *, make_parents: bool = True
) -> int:
    """Write the mapping of every item of the manifest's target to `path`, atomically
    (its folders made first, unless `make_parents` is False)."""
    from migrator.export_lines import export_ledger

    with atomic_writer(path, make_parents=make_parents) as out:
        return await export_ledger(ledger, manifest.target.base_url, fmt, out, scratch=path.parent)


@dataclass(frozen=True, slots=True)
class CommandResult:
    """How a command ended, for the metrics file."""

    command: str
    started_at: float
    exit_code: int


async def publish_outputs(
    manifest: Manifest,
    ledger: BaseLedger,
    result: CommandResult,
    *,
    metrics_file: Path | None = None,
    metrics_push: str | None = None,
) -> list[Path]:
    """Rewrite every output the manifest names (and --metrics-file), push the metrics to
    `metrics_push` or outputs.metrics_push (a failed push is a warning); returns the paths."""
    await ledger.flush()
    written: list[Path] = []
    outputs = manifest.outputs
    for fmt, path in _exports(outputs):
        await export_to(manifest, ledger, fmt, path)
        written.append(path)
    for path in _metrics_files(outputs, metrics_file):
        snapshot = await metrics_snapshot(manifest, ledger, result)
        atomic_write_text(path, render_metrics(snapshot))
        written.append(path)
    gateway = metrics_push or outputs.metrics_push
    if gateway is not None:
        await _push(gateway, await metrics_snapshot(manifest, ledger, result), manifest)
    return written


async def _push(gateway: str, snapshot: MetricsSnapshot, manifest: Manifest) -> None:
    from migrator.connect import trust  # here: status and export never load aiohttp

    text = render_metrics(snapshot, without=GROUPING_LABELS)
    try:
        await push_metrics(
            gateway, snapshot.migration, snapshot.command, text, trust=trust(manifest.target)
        )
    except PushError as err:
        log.warning("metrics.push_failed", error=str(err))


def output_paths(manifest: Manifest, metrics_file: Path | None = None) -> list[Path]:
    """Every file `publish_outputs` writes for this manifest (pure)."""
    outputs = manifest.outputs
    return [path for _, path in _exports(outputs)] + _metrics_files(outputs, metrics_file)


def _exports(outputs: Outputs) -> list[tuple[str, Path]]:
    named = (("jsonl", outputs.jsonl), ("csv", outputs.csv), ("json", outputs.json))
    return [(fmt, path) for fmt, path in named if path is not None]


def _metrics_files(outputs: Outputs, metrics_file: Path | None) -> list[Path]:
    return list(dict.fromkeys(p for p in (outputs.metrics, metrics_file) if p is not None))


async def metrics_snapshot(
    manifest: Manifest, ledger: BaseLedger, result: CommandResult
) -> MetricsSnapshot:
    target = manifest.target.base_url
    counts = await ledger.state_counts(target)
    now = time.time()
    # expiry on the service's clock, as status tells it: a done item past it is expired
    _offset, moment = await service_time(ledger)
    expired = await ledger.count_items(target, states=[ItemState.DONE], expiring_before=moment)
    next_expiry = await ledger.next_expiry(target, after=moment)
    by_state = {state.value: counts.get(state, (0, 0)) for state in ItemState}
    done = by_state[ItemState.DONE.value]
    by_state[ItemState.DONE.value] = (done[0] - expired[0], done[1] - expired[1])
    by_state[EXPIRED] = expired
    return MetricsSnapshot(
        migration=manifest.name,
        command=result.command,
        items_by_state={state: items for state, (items, _) in by_state.items()},
        bytes_by_state={state: size for state, (_, size) in by_state.items()},
        last_success_timestamp=await ledger.last_success_at(target),
        next_expiry_seconds=None if next_expiry is None else next_expiry - moment,
        failures=sum(counts.get(state, (0, 0))[0] for state in BAD_STATES),
        duration_seconds=now - result.started_at,
        finished_at=now,
        exit_code=result.exit_code,
        shard=None if manifest.shard is None else str(manifest.shard),
    )
