"""What an operator without a terminal sees while a run goes on: the tally and its line."""

from __future__ import annotations

import asyncio
import io

import pytest

from migrator.command import Outcome
from migrator.model import Method, PlanItem, SourceKind
from migrator.progress import LineProgress, Tally

ITEM = PlanItem("/data/a", SourceKind.FILE, "up", "a", 10, Method.BASE64)


def test_the_line_tells_items_failures_bytes_rate_and_eta() -> None:
    tally = Tally(started=0.0, items_total=10, items_done=4, failed=1, bytes_sent=4 * 1024 * 1024)
    assert tally.line(now=8.0) == (
        "progress: 4/10 items, 1 failed, 4.0 MiB sent, 512.0 KiB/s, ETA 12.0s"
    )


def test_there_is_no_eta_before_the_first_item_is_done() -> None:
    assert "ETA" not in Tally(started=0.0, items_total=10).line(now=5.0)


def test_bytes_of_a_failed_attempt_are_taken_back() -> None:
    progress = LineProgress(io.StringIO())
    progress.on_bytes(1000)
    progress.on_bytes(-1000)
    progress.on_bytes(300)
    assert progress.tally.bytes_sent == 300


async def test_lines_keep_coming_while_nothing_moves() -> None:
    out = io.StringIO()
    progress = LineProgress(out, interval=0.02)
    progress.on_totals(2, 20)
    progress.on_item_done(ITEM.source, Outcome.UPLOADED, None)
    ticker = asyncio.create_task(progress.ticking())
    await asyncio.sleep(0.15)
    ticker.cancel()
    with pytest.raises(asyncio.CancelledError):
        await ticker
    lines = out.getvalue().splitlines()
    assert len(lines) >= 3
    assert all(line.startswith("progress: 1/2 items, 0 failed") for line in lines)
