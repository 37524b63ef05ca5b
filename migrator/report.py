"""What the ledger says, summed up: `status`, and the files downstream systems read.

After every run, refresh and download the manifest's `outputs:` (mapping files and
metrics) are rewritten atomically from the ledger, so a consumer always reads a
complete mapping from each source to its current download URL.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from migrator.clock import OFFSET_FACT
from migrator.ledger import BAD_STATES, Ledger, RunRow
from migrator.lifetimes import DEATHS_FACT, Deaths
from migrator.model import HOUR, ItemState, LedgerItem, Manifest
from migrator.outputs import (
    MetricsSnapshot,
    atomic_write_text,
    atomic_writer,
    export_record,
    render_metrics,
    write_export,
)
from migrator.units import iso_utc, number_or_none

EXPIRY_HORIZONS = (6 * HOUR, 12 * HOUR, 24 * HOUR, 72 * HOUR)
LIFECYCLE_COMMANDS = ("refresh", "download", "verify")


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

    @property
    def total(self) -> int:
        return sum(count for count, _ in self.by_state.values())

    def as_dict(self) -> dict[str, Any]:
        return {
            "job": self.job,
            "ledger": str(self.ledger),
            "target": self.target,
            "items": self.total,
            "by_state": {
                state.value: {"items": count, "bytes": size}
                for state, (count, size) in sorted(self.by_state.items())
            },
            "next_expiry": iso_utc(self.next_expiry),
            "expiring_within": {f"{int(h // HOUR)}h": n for h, n in self.expiring},
            "downloaded": {"items": self.downloaded, "last_at": iso_utc(self.last_download)},
            "failures": [export_record(item) for item in self.failures],
            "last_run": None if self.last_run is None else _run_dict(self.last_run),
            "last_by_command": {run.command: _run_dict(run) for run in self.last_by_command},
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


async def build_status(manifest: Manifest, *, now: float | None = None) -> StatusReport:
    """Read the manifest's ledger (never writing it) and sum it up. Expiry is told on
    the service's clock, as the ledger last measured it."""
    target = manifest.target.base_url
    async with await Ledger.open(manifest.ledger, readonly=True) as ledger:
        offset = number_or_none(await ledger.fact(OFFSET_FACT))
        moment = (time.time() + (offset or 0.0)) if now is None else now
        counts = await ledger.state_counts(target)
        histogram = await ledger.expiry_histogram(target, moment, EXPIRY_HORIZONS)
        runs = await ledger.runs(limit=1)
        downloaded, last_download = await ledger.downloads(target)
        deaths = Deaths.from_dict(await ledger.fact(DEATHS_FACT))
        return StatusReport(
            job=manifest.name,
            ledger=manifest.ledger,
            target=target,
            now=moment,
            by_state=counts,
            next_expiry=await ledger.next_expiry(target),
            expiring=tuple(zip(EXPIRY_HORIZONS, histogram, strict=True)),
            failures=tuple(await ledger.recent_failures(target, limit=20)),
            last_run=as_seen_now(runs[0]) if runs else None,
            downloaded=downloaded,
            last_download=last_download,
            clock_offset=offset,
            last_by_command=tuple(
                as_seen_now(run) for run in await ledger.last_runs(LIFECYCLE_COMMANDS)
            ),
            deaths_note=deaths.note(manifest.settings.refresh_within),
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


async def export_to(manifest: Manifest, ledger: Ledger, fmt: str, path: Path) -> int:
    """Write the mapping of every item of the manifest's target to `path`, atomically."""
    with atomic_writer(path) as out:
        return await write_export(ledger.iter_items(manifest.target.base_url), fmt, out)


@dataclass(frozen=True, slots=True)
class CommandResult:
    """How a command ended, for the metrics file."""

    command: str
    started_at: float
    exit_code: int


async def publish_outputs(
    manifest: Manifest,
    ledger: Ledger,
    result: CommandResult,
    *,
    metrics_file: Path | None = None,
) -> list[Path]:
    """Rewrite every output the manifest names (and --metrics-file); returns the paths."""
    await ledger.flush()
    written: list[Path] = []
    outputs = manifest.outputs
    for fmt, path in (("jsonl", outputs.jsonl), ("csv", outputs.csv), ("json", outputs.json)):
        if path is not None:
            await export_to(manifest, ledger, fmt, path)
            written.append(path)
    for path in {p for p in (outputs.metrics, metrics_file) if p is not None}:
        snapshot = await metrics_snapshot(manifest, ledger, result)
        atomic_write_text(path, render_metrics(snapshot))
        written.append(path)
    return written


async def metrics_snapshot(
    manifest: Manifest, ledger: Ledger, result: CommandResult
) -> MetricsSnapshot:
    target = manifest.target.base_url
    counts = await ledger.state_counts(target)
    now = time.time()
    next_expiry = await ledger.next_expiry(target)
    return MetricsSnapshot(
        job=manifest.name,
        command=result.command,
        items_by_state={state.value: counts.get(state, (0, 0))[0] for state in ItemState},
        bytes_by_state={state.value: counts.get(state, (0, 0))[1] for state in ItemState},
        last_success_timestamp=await ledger.last_success_at(target),
        next_expiry_seconds=None if next_expiry is None else next_expiry - now,
        failures=sum(counts.get(state, (0, 0))[0] for state in BAD_STATES),
        duration_seconds=now - result.started_at,
        finished_at=now,
        exit_code=result.exit_code,
    )
