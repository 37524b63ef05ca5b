"""How reports look on a terminal (rich); the JSON forms come from the reports themselves."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from migrator.model import HOUR
from migrator.report import StatusReport
from migrator.units import format_duration, format_size, iso_utc

BAR_WIDTH = 30


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
    console.print(f"[bold]{report.job}[/bold]  ledger {report.ledger}  target {report.target}")
    table = Table(show_edge=False)
    table.add_column("state")
    table.add_column("items", justify="right")
    table.add_column("bytes", justify="right")
    for state, (count, size) in sorted(report.by_state.items()):
        table.add_row(state.value, str(count), format_size(size))
    table.add_row("total", str(report.total), "")
    console.print(table)
    if report.next_expiry is not None:
        left = format_duration(report.next_expiry - report.now)
        console.print(f"next expiry: {iso_utc(report.next_expiry)} (in {left})")
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
                f"  {item.state.value} {item.upload_path}/{item.file_name} <- {item.source}: "
                f"{item.last_error}",
                markup=False,
            )
    if report.last_run is not None:
        run = report.last_run
        console.print(
            f"last run: #{run.id} {run.command} {run.status} at {iso_utc(run.started_at)}"
        )
