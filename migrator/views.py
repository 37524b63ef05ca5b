"""How reports look on a terminal (rich); the JSON forms come from the reports themselves."""

from __future__ import annotations

import json
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from json.encoder import encode_basestring
from typing import TYPE_CHECKING, Any

from rich.console import Console, JustifyMethod
from rich.markup import escape
from rich.table import Table

from migrator.history import ItemHistory
from migrator.ledger import RunRow
from migrator.model import HOUR, LocalItems, Outcome, PlanItem, SourceKind
from migrator.naming import hide_credentials, printable, without_credentials
from migrator.report import JobCoverage, RunFailure, StatusReport
from migrator.resume import DecidedBatch, Decision
from migrator.units import format_duration, format_size, iso_utc, relative_time

if TYPE_CHECKING:  # not at run time: `status` must not load the HTTP stack
    from migrator.command import CommandSummary

BAR_WIDTH = 30
_OUTCOME_KEYS = frozenset(str(outcome) for outcome in Outcome)


def summary_dict(summary: CommandSummary) -> dict[str, object]:
    """A command's summary as JSON: its counts, notes, and the items that went wrong."""
    return {
        "command": summary.command,
        "summary": summary.as_dict(),
        "line": summary.line(),
        "notes": list(summary.notes),
        "problems": [
            {
                "item": without_credentials(p.label),
                "outcome": str(p.outcome),
                "error": None if p.error is None else hide_credentials(p.error),
            }
            for p in summary.problems
        ],
    }


def expiry_bars(report: StatusReport, width: int = BAR_WIDTH) -> list[str]:
    """`next 6h   ####....  3` lines for the expiry timeline (pure)."""
    done = max((n for _, n in report.expiring), default=0)
    lines = []
    for horizon, count in report.expiring:
        filled = round(width * count / done) if done else 0
        label = f"next {int(horizon // HOUR)}h"
        lines.append(f"{label:<9} {'#' * filled}{'.' * (width - filled)} {count}")
    return lines


def print_status(console: Console, report: StatusReport) -> None:
    ledgers = " + ".join(str(path) for path in report.ledgers or (report.ledger,))
    console.print(f"[bold]{report.job}[/bold]  ledger {ledgers}  target {report.target}")
    table = Table(show_edge=False)
    table.add_column("state")
    table.add_column("items", justify="right")
    table.add_column("bytes", justify="right")
    for state, count, size in report.states():
        table.add_row(state, f"{count:,}", format_size(size))
    table.add_row("total", f"{report.total:,}", "")
    console.print(table)
    if report.coverage is not None:
        console.print(coverage_line(report.coverage), markup=False)
    elif report.not_compared is not None:
        console.print(f"manifest: {report.not_compared}", markup=False)
    if report.first_expired is not None:
        ago = relative_time(report.first_expired, report.now)
        count = report.expired[0]
        console.print(
            f"[yellow]expired: {count:,} item{'' if count == 1 else 's'}, the first {ago}"
            "[/yellow]; `migrator refresh` uploads them again"
        )
    if report.next_expiry is not None:
        when = relative_time(report.next_expiry, report.now)
        console.print(f"next expiry: {iso_utc(report.next_expiry)} ({when})")
    console.print("expiring (done items):")
    for line in expiry_bars(report):
        console.print("  " + line, markup=False)
    if report.downloaded:
        console.print(
            f"downloaded: {report.downloaded} items, the latest at {iso_utc(report.last_download)}"
        )
    if report.failures:
        console.print("[red]failures:[/red]")
        for item in report.failures:
            console.print(
                printable(
                    f"  {item.state.value} {item.upload_path}/{item.file_name} <- "
                    f"{without_credentials(item.source)}: {hide_credentials(item.last_error or '')}"
                ),
                markup=False,
            )
    if report.last_run is not None:
        run = report.last_run
        console.print(
            f"last run: #{run.id} {run.command} {run.status} at {iso_utc(run.started_at)}"
        )
    for run in report.last_by_command:
        console.print(f"last {run.command}: {run_outcomes(run)}", markup=False)
        for failure in report.run_failures.get(run.id, ()):
            console.print(printable(f"  failed {run_failure_text(failure)}"), markup=False)
    if report.clock_offset is not None:
        console.print(f"service clock: {clock_text(report.clock_offset)}", markup=False)
    if report.deaths_note:
        console.print(f"[yellow]{escape(report.deaths_note)}[/yellow]")


def coverage_line(coverage: JobCoverage) -> str:
    """`manifest: 5,000 items, 1,733 not started, 12 no longer in the manifest` (pure)."""
    gone = coverage.not_in_manifest
    return f"manifest: {coverage.planned:,} items, {coverage.not_started:,} not started" + (
        f", {gone:,} in the ledger no longer in the manifest" if gone else ""
    )


def run_failure_text(failure: RunFailure) -> str:
    """`mig/a.txt <- /data/a.txt: HTTP 500 ...` (pure; the failure's text is already safe)."""
    return f"{failure.upload_path}/{failure.file_name} <- {failure.source}: {failure.error or ''}"


def run_outcomes(run: RunRow) -> str:
    """`done at T: 40 refreshed, 2 lost` from a run's recorded summary (pure)."""
    shown = ", ".join(
        f"{value} {key}"
        for key, value in sorted(run.summary.items())
        if key in _OUTCOME_KEYS and isinstance(value, int) and value
    )
    return f"{run.status} at {iso_utc(run.started_at)}" + (f": {shown}" if shown else "")


def clock_text(offset: float) -> str:
    """How far the service's clock is from ours, in words (pure)."""
    if abs(offset) < 2:
        return "in step with ours (within 2s)"
    direction = "ahead of" if offset > 0 else "behind"
    shown = round(abs(offset)) if abs(offset) < 60 else round(abs(offset) / 60) * 60
    return f"{format_duration(shown)} {direction} ours; expiry is judged on it"


# -- show ----------------------------------------------------------------------------------


def print_history(console: Console, history: ItemHistory) -> None:
    """An item's current row, then a table of every attempt; credentials hidden."""
    record = history.as_dict()
    item = history.item
    console.print(f"[bold]{escape(printable(f'{item.upload_path}/{item.file_name}'))}[/bold]")
    for label, value in _row_lines(record, history):
        console.print(printable(f"  {label:<11} {value}"), markup=False, highlight=False)
    count = len(history.attempts)
    title = f"{count} attempt{'' if count == 1 else 's'}"
    table = Table(show_edge=False, title=title, title_justify="left")
    for column in ("when", "run", "method", "status", "took", "bytes"):
        justify: JustifyMethod = "right" if column in ("took", "bytes") else "left"
        table.add_column(column, justify=justify, no_wrap=True)
    table.add_column("error / link", overflow="fold", min_width=20)
    for attempt in record["history"]:
        table.add_row(
            (attempt["at"] or "?")[:19] + "Z",  # to the second: the JSON form has the rest
            f"#{attempt['run']} {attempt['command'] or '?'}",
            attempt["method"] or "",
            _status_text(attempt["outcome"], attempt["http_status"]),
            "" if attempt["duration"] is None else f"{attempt['duration']:.1f}s",
            format_size(attempt["bytes"] or 0),
            escape(printable(_error_or_link(attempt))),
        )
    console.print(table)


def _error_or_link(attempt: dict[str, Any]) -> str:
    """The attempt's error; for the upload that made the current link, says so."""
    if attempt["link"] is not None:
        return "made the current link"
    return str(attempt["error"] or "")


def _row_lines(record: dict[str, Any], history: ItemHistory) -> list[tuple[str, str]]:
    item = history.item
    expiry = "" if item.expires_at is None else f" ({_expiry_words(item.expires_at, history.now)})"
    lines = [
        ("source", str(record["source"])),
        ("state", str(record["status"])),
        ("method", str(record["method"] or "")),
        ("size", format_size(item.size) if item.size is not None else "?"),
        ("link", str(record["download_url"] or "none")),
        ("uploaded", str(record["uploaded_at"] or "never")),
        ("expires", f"{record['expires_at'] or 'never'}{expiry}"),
        ("attempts", str(record["attempts"])),
    ]
    optional = {
        "last error": record["last_error"],
        "downloaded": record["downloaded_path"]
        and (f"{record['downloaded_path']} at {record['downloaded_at']}"),
        "checked": record["checked_at"],
        "found dead": record["dead_at"],
    }
    return lines + [(label, str(value)) for label, value in optional.items() if value]


def _expiry_words(expires_at: float, now: float) -> str:
    when = relative_time(expires_at, now)
    return f"expired {when}" if expires_at < now else when


def _status_text(outcome: object, http_status: object) -> str:
    return f"{outcome or '?'}" + (f" ({http_status})" if http_status else "")


# -- plan ----------------------------------------------------------------------------------


@dataclass(slots=True)
class PlanTotals:
    """Counts and bytes by method, and counts by ledger decision."""

    by_method: dict[str, tuple[int, int]] = field(default_factory=dict)
    by_decision: dict[str, int] = field(default_factory=dict)
    skipped: int = 0  # files globs matched but did not take (check_plan's count)
    unreadable: int = 0  # folders globs could not read

    def add(self, batch: DecidedBatch) -> None:
        """Count each entry of the batch (a folder's files from their columns)."""
        items = batch.items
        if isinstance(items, LocalItems):
            if len(set(items.methods)) == 1:  # a folder of small files, or of big ones
                self._add_method(items.methods[0], len(items), sum(items.sizes))
            else:
                for method, size in zip(items.methods, items.sizes, strict=True):
                    self._add_method(method, 1, size)
        else:
            for item in items:
                self._add_method(item.method, 1, item.size or 0)
        for decision, count in Counter(batch.decisions).items():  # in the order first seen
            self.by_decision[decision] = self.by_decision.get(decision, 0) + count

    def _add_method(self, method: str, count: int, size: int) -> None:
        counted, total = self.by_method.get(method, (0, 0))
        self.by_method[method] = (counted + count, total + size)


def skipped_line(count: int) -> str:
    """What `plan` says of the files globs matched but did not take (pure)."""
    files = "file" if count == 1 else "files"
    return (
        f"skipped: {count} {files} matched but not taken (symbolic links, FIFOs, devices, "
        "sockets); each is a plan.skipped warning"
    )


def unreadable_line(count: int) -> str:
    """What `plan` says of the folders globs could not read (pure)."""
    folders = "folder" if count == 1 else "folders"
    return (
        f"unreadable: {count} {folders} could not be read; each is a plan.unreadable "
        "warning, and a run counts each as failed"
    )


class _HeldRows:
    """Rows printed as they come (a million-item plan must not be held in memory), but
    ROWS_A_WRITE at a time: a batch may be a folder of one file."""

    ROWS_A_WRITE = 1000

    def __init__(self) -> None:
        self._texts: list[str] = []
        self._rows = 0

    def add(self, text: str, rows: int) -> None:
        self._texts.append(text)
        self._rows += rows
        if self._rows >= self.ROWS_A_WRITE:
            self.write()

    def write(self) -> None:
        """Write the rows held so far."""
        texts, self._texts, self._rows = self._texts, [], 0
        if texts:
            sys.stdout.write("".join(texts))


class PlanTablePrinter:
    """A row a planned item, printed as they come."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.console.print(
            f"[bold]{'method':<7} {'size':>10}  {'ledger':<9} target <- source[/bold]"
        )
        self._held = _HeldRows()

    def batch(self, batch: DecidedBatch) -> None:
        # Plain text: rich's rendering costs ~0.1 ms a row, too much for 200,000 rows.
        rows = _rows_of(batch, _folder_rows, _table_row)
        self._held.add("".join(rows), len(rows))

    def flush(self) -> None:
        self._held.write()

    def totals(self, totals: PlanTotals) -> None:
        self.flush()
        table = Table(title="totals", show_edge=False)
        table.add_column("method")
        table.add_column("items", justify="right")
        table.add_column("bytes", justify="right")
        for method, (count, size) in sorted(totals.by_method.items()):
            table.add_row(method, str(count), format_size(size))
        self.console.print(table)
        ledger = ", ".join(f"{n} {d}" for d, n in sorted(totals.by_decision.items()))
        self.console.print(f"ledger: {ledger or 'no items'}")
        if totals.skipped:
            self.console.print(skipped_line(totals.skipped), markup=False)
        if totals.unreadable:
            self.console.print(unreadable_line(totals.unreadable), markup=False)


def _rows_of(
    batch: DecidedBatch,
    folder_rows: Callable[[LocalItems, Sequence[Decision]], list[str]],
    row: Callable[[PlanItem, Decision], str],
) -> list[str]:
    """A batch's printed rows: a folder's at once from its columns, others item by item."""
    if isinstance(batch.items, LocalItems):
        return folder_rows(batch.items, batch.decisions)
    return [
        row(item, decision) for item, decision in zip(batch.items, batch.decisions, strict=True)
    ]


def _table_row(item: PlanItem, decision: Decision) -> str:
    source = printable(without_credentials(item.source))
    return (
        f"{item.method:<7} {format_size(item.size):>10}  {decision:<9} "
        f"{item.upload_path}/{item.file_name} <- {source}\n"
    )


def _folder_rows(items: LocalItems, decisions: Sequence[Decision]) -> list[str]:
    """`_table_row` of each of a folder's files, with what they share written once: the
    folder, and the text of each method, size and decision."""
    folder = items.folder + "/"
    names = "".join(items.names)
    if not (shown_as_is := folder + names).isprintable() or "@" in shown_as_is:
        return [_table_row(item, decision) for item, decision in zip(items, decisions, strict=True)]
    methods = {method: f"{method:<7}" for method in set(items.methods)}
    sizes = {size: f"{format_size(size):>10}" for size in set(items.sizes)}
    decided = {decision: f"{decision:<9}" for decision in set(decisions)}
    target = items.upload_path + "/"
    return [
        f"{methods[method]} {sizes[size]}  {decided[decision]} {target}{name} <- {folder}{name}\n"
        for method, size, decision, name in zip(
            items.methods, items.sizes, decisions, items.names, strict=True
        )
    ]


class PlanJsonPrinter:
    """One JSON document, streamed: {"items": [...], "totals": {...}, "ledger": {...}}."""

    def __init__(self) -> None:
        self.first = True
        sys.stdout.write('{"items": [')
        self._held = _HeldRows()

    def batch(self, batch: DecidedBatch) -> None:
        rows = _rows_of(batch, _folder_json_rows, _json_row)
        if rows:
            self._held.add(("\n  " if self.first else ",\n  ") + ",\n  ".join(rows), len(rows))
            self.first = False

    def flush(self) -> None:
        self._held.write()
        sys.stdout.flush()

    def totals(self, totals: PlanTotals) -> None:
        self._held.write()
        by_method = {m: {"items": n, "bytes": b} for m, (n, b) in totals.by_method.items()}
        sys.stdout.write(
            "\n],\n"
            f'"totals": {json.dumps(by_method)},\n'
            f'"ledger": {json.dumps(totals.by_decision)},\n'
            f'"skipped": {totals.skipped},\n'
            f'"unreadable": {totals.unreadable}}}\n'
        )


def _json_row(item: PlanItem, decision: Decision) -> str:
    row = {
        "source": without_credentials(item.source),
        "kind": item.kind,
        "upload_path": item.upload_path,
        "file_name": item.file_name,
        "size": item.size,
        "method": item.method,
        "ledger": decision,
    }
    return json.dumps(row, ensure_ascii=False)


def _folder_json_rows(items: LocalItems, decisions: Sequence[Decision]) -> list[str]:
    """`_json_row` of each of a folder's files, what they share encoded once (each string
    as `json.dumps` encodes it: `encode_basestring`)."""
    folder = items.folder + "/"
    if "@" in folder + "".join(items.names):  # maybe a URL's credentials: `_json_row` decides
        return [_json_row(item, decision) for item, decision in zip(items, decisions, strict=True)]
    quoted = {value: encode_basestring(value) for value in {*items.methods, *decisions}}
    shared = f'"kind": {encode_basestring(SourceKind.FILE)}, '
    shared += f'"upload_path": {encode_basestring(items.upload_path)}'
    return [
        f'{{"source": {encode_basestring(folder + name)}, {shared}, '
        f'"file_name": {encode_basestring(name)}, "size": {size}, '
        f'"method": {quoted[method]}, "ledger": {quoted[decision]}}}'
        for name, size, method, decision in zip(
            items.names, items.sizes, items.methods, decisions, strict=True
        )
    ]
