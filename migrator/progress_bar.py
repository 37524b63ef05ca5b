"""The progress bar on a terminal (rich): the display of `progress`'s tally.

Two rows: items (done of total, items/s, failures, elapsed, ETA) and bytes (moved,
bytes/s). Apart from `progress` so that a command without a terminal never loads rich.
"""

from __future__ import annotations

from typing import TextIO, cast

from rich.console import Console, RenderableType
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from migrator.model import Outcome
from migrator.naming import hide_credentials
from migrator.progress import TallyObserver, stopping_notice
from migrator.units import format_size

SPEED_WINDOW = 30.0  # seconds of samples behind the bar's rates (rich's speed estimate)


class _PerRow(ProgressColumn):
    """Each row its own column: the items row and the bytes row show different things."""

    def __init__(self, **by_row: ProgressColumn) -> None:
        super().__init__()
        self.by_row = by_row

    def render(self, task: Task) -> RenderableType:
        column = self.by_row.get(task.fields.get("row", ""))
        return Text("") if column is None else column.render(task)


class _Speed(ProgressColumn):
    """rich's own windowed speed (the last `speed_estimate_period` seconds), per row:
    items/s on the items row, bytes/s on the bytes row."""

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        if (task.elapsed or 0.0) < 1.0:
            speed = None  # a burst of skips in the first milliseconds is not a rate
        if task.fields.get("row") == "bytes":
            shown = "? B/s" if speed is None else f"{format_size(speed)}/s"
        else:
            shown = "? items/s" if speed is None else f"{speed:.1f} items/s"
        return Text(shown, style="progress.data.speed")


class BarProgress(TallyObserver):
    """A rich progress bar on a terminal; use as a context manager around the command.
    Two rows: items (done of total, items/s, failures, elapsed, ETA) and bytes (moved,
    bytes/s); both rates are rich's, over the last SPEED_WINDOW seconds."""

    def __init__(self, console: Console, noun: str = "items") -> None:
        super().__init__(cast(TextIO, console.file), noun)
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            _PerRow(items=BarColumn()),
            _PerRow(items=MofNCompleteColumn(), bytes=TextColumn("{task.fields[sent]}")),
            _Speed(),
            _PerRow(items=TextColumn("{task.fields[failed]} failed")),
            _PerRow(items=TimeElapsedColumn()),
            _PerRow(items=TimeRemainingColumn()),
            console=console,
            transient=False,
            speed_estimate_period=SPEED_WINDOW,
        )
        self.task: TaskID = self.progress.add_task(noun, total=None, row="items", failed=0)
        self.bytes_task: TaskID = self.progress.add_task(
            "bytes", total=None, row="bytes", sent=format_size(0)
        )

    def __enter__(self) -> BarProgress:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def on_totals(self, items: int, local_bytes: int) -> None:
        super().on_totals(items, local_bytes)
        self.progress.update(self.task, total=items)

    def on_bytes(self, count: int) -> None:
        super().on_bytes(count)
        sent = self.tally.bytes_sent
        self.progress.update(self.bytes_task, completed=sent, sent=format_size(sent))

    def on_item_done(self, label: str, outcome: Outcome, error: str | None) -> None:
        super().on_item_done(label, outcome, error)
        if outcome.is_bad:
            # Paths and messages are data: "[/draft]" in a file name is not markup.
            shown = hide_credentials(f"{label}: {error}")  # a source URL's password stays home
            self.progress.console.print(f"[red]{outcome}[/red] {escape(shown)}")
        self.progress.update(self.task, completed=self.tally.items_done, failed=self.tally.failed)

    def on_stopping(self, in_flight: int, grace_period: float, *, now: bool) -> None:
        notice = stopping_notice(in_flight, grace_period, self.noun, now=now)
        self.progress.console.print(f"[yellow]{escape(notice)}[/yellow]")
