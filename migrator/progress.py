"""What the operator sees while a command runs: the CLI's side of the command core's hooks.

On a terminal, a rich progress bar: items, items/s, failures and ETA, then bytes and
bytes/s, both rates over the last 30 s. Without one (cron, systemd, Kubernetes), one
plain line every few seconds, in the spirit of rclone's `--stats-one-line`: logs are
read by people who were not watching. Either way, the first Ctrl-C says at once what
the command is waiting for.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
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

from migrator.command import Observer
from migrator.model import Outcome
from migrator.naming import hide_credentials
from migrator.units import format_duration, format_size

SPEED_WINDOW = 30.0  # seconds of samples behind the bar's rates (rich's speed estimate)


@dataclass(slots=True)
class Tally:
    """Running totals, from which rate and ETA are derived (pure arithmetic)."""

    started: float
    items_total: int = 0
    items_done: int = 0
    failed: int = 0
    bytes_sent: int = 0
    outcomes: dict[str, int] = field(default_factory=dict)

    def rate(self, now: float) -> float:
        elapsed = now - self.started
        return self.bytes_sent / elapsed if elapsed > 0 else 0.0

    def eta(self, now: float) -> float | None:
        """Seconds left, from the pace of items so far; None before the first one."""
        if self.items_done == 0 or self.items_total <= self.items_done:
            return None
        per_item = (now - self.started) / self.items_done
        return per_item * (self.items_total - self.items_done)

    def line(self, now: float) -> str:
        eta = self.eta(now)
        return (
            f"progress: {self.items_done}/{self.items_total} items, {self.failed} failed, "
            f"{format_size(self.bytes_sent)} sent, {format_size(self.rate(now))}/s"
            + (f", ETA {format_duration(eta)}" if eta is not None else "")
        )


def stopping_notice(in_flight: int, grace_period: float, noun: str, *, now: bool) -> str:
    """What the first (or second) Ctrl-C is answered with at once (pure)."""
    if now:
        return f"stopping now: {in_flight} {noun} in flight are cut short"
    if in_flight == 0:
        return "stopping: nothing in flight"
    return (
        f"finishing {in_flight} {noun} in flight, up to {format_duration(grace_period)}; "
        "Ctrl-C again to stop now"
    )


class StopNotice(Observer):
    """Shows no progress, but says at once what a stop waits for (on `stream`)."""

    def __init__(self, stream: TextIO, noun: str = "items") -> None:
        self.stream = stream
        self.noun = noun

    def on_stopping(self, in_flight: int, grace_period: float, *, now: bool) -> None:
        notice = stopping_notice(in_flight, grace_period, self.noun, now=now)
        print(f"migrator: {notice}", file=self.stream, flush=True)


class _TallyObserver(StopNotice):
    def __init__(
        self, stream: TextIO, noun: str = "items", clock: Callable[[], float] = time.monotonic
    ) -> None:
        super().__init__(stream, noun)
        self.clock = clock
        self.tally = Tally(started=clock())

    def on_totals(self, items: int, local_bytes: int) -> None:
        self.tally.items_total = items

    def on_bytes(self, count: int) -> None:
        self.tally.bytes_sent += count

    def on_item_done(self, label: str, outcome: Outcome, error: str | None) -> None:
        self.tally.items_done += 1
        self.tally.failed += outcome.is_bad
        self.tally.outcomes[outcome] = self.tally.outcomes.get(outcome, 0) + 1


class LineProgress(_TallyObserver):
    """One line on `stream` every `interval` seconds while `ticking()` runs, also when
    nothing moved (a stalled transfer shows as a line that stays the same)."""

    def __init__(self, stream: TextIO, interval: float = 10.0, noun: str = "items") -> None:
        super().__init__(stream, noun)
        self.interval = interval

    async def ticking(self) -> None:
        """Print every interval until cancelled; run it beside the command."""
        while True:
            await asyncio.sleep(self.interval)
            print(self.tally.line(self.clock()), file=self.stream, flush=True)


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


class BarProgress(_TallyObserver):
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
