"""What the operator sees while a command runs: the CLI's side of the command core's hooks.

On a terminal, a rich progress bar (`progress_bar`, which alone loads rich): items,
items/s, failures and ETA, then bytes and bytes/s, both rates over the last 30 s.
Without one (cron, systemd, Kubernetes), one plain line every few seconds, in the spirit
of rclone's `--stats-one-line`: logs are read by people who were not watching. Either
way, the first Ctrl-C says at once what the command is waiting for.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TextIO

from migrator.command import Observer
from migrator.model import Outcome
from migrator.units import format_duration, format_size


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


class TallyObserver(StopNotice):
    """Keeps the `Tally` a display shows."""

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


class LineProgress(TallyObserver):
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
