"""How `plan` prints what it decided: a folder's files, held as columns, print and count
as the same items one by one would."""

from __future__ import annotations

import io
import json

import pytest
from rich.console import Console

from migrator.model import LocalItems, Method
from migrator.resume import DecidedBatch, Decision
from migrator.views import PlanJsonPrinter, PlanTablePrinter, PlanTotals

NAMES = ["a.bin", "b@c.bin", "nbsp\u00a0name.bin", "é.bin", "e.bin", "f.bin"]
PLAIN_NAMES = ["a.bin", "b.bin", "c.bin", "é.bin", "e.bin", "f.bin"]
SIZES = [0, 10, 2_000_000, 10, 5 * 1024 * 1024 * 1024, 10]
METHODS = [Method.STREAM, Method.BASE64, Method.STREAM, Method.BASE64, Method.STREAM, Method.BASE64]
DECISIONS = [
    Decision.NEW,
    Decision.CHANGED,
    Decision.NEW,
    Decision.UNCHANGED,
    Decision.EXPIRING,
    Decision.NEW,
]


def folder_batch(folder: str, names: list[str] = NAMES) -> DecidedBatch:
    count = len(names)
    items = LocalItems(
        folder,
        "up/load",
        names,
        SIZES[:count],
        list(range(count)),
        METHODS[:count],
        forced=False,
    )
    return DecidedBatch(items, DECISIONS[:count], items.keys(), {})


def one_by_one(batch: DecidedBatch) -> DecidedBatch:
    """The same entries, the items made one by one (as a batch of remote files holds them)."""
    return DecidedBatch(list(batch.items), batch.decisions, batch.keys, batch.rows)


def printed_json(batches: list[DecidedBatch], capsys: pytest.CaptureFixture[str]) -> str:
    capsys.readouterr()
    printer = PlanJsonPrinter()
    for batch in batches:
        printer.batch(batch)
    printer.totals(PlanTotals())
    return capsys.readouterr().out


def printed_rows(batch: DecidedBatch, capsys: pytest.CaptureFixture[str]) -> str:
    printer = PlanTablePrinter(Console(file=io.StringIO()))
    capsys.readouterr()
    printer.batch(batch)
    printer.flush()
    return capsys.readouterr().out


@pytest.mark.parametrize(
    "folder", ["/data/photos", "/data/user@host", "/data/tab\there", "", "/data/caf\u00e9"]
)
@pytest.mark.parametrize("names", [PLAIN_NAMES, NAMES], ids=["plain names", "odd names"])
def test_a_folders_rows_are_those_its_items_print_one_by_one(
    folder: str, names: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    batch = folder_batch(folder, names)

    rows = printed_rows(batch, capsys)

    assert rows == printed_rows(one_by_one(batch), capsys)
    assert len(rows.splitlines()) == len(names)


def test_rows_are_written_a_thousand_at_a_time_and_at_the_flush(
    capsys: pytest.CaptureFixture[str],
) -> None:
    printer = PlanTablePrinter(Console(file=io.StringIO()))
    batch = folder_batch("/data", PLAIN_NAMES[:2])
    for _ in range(499):
        printer.batch(batch)
    held = capsys.readouterr().out
    printer.batch(batch)
    written = capsys.readouterr().out
    printer.batch(batch)
    printer.flush()

    assert (held, len(written.splitlines()), len(capsys.readouterr().out.splitlines())) == (
        "",
        1000,
        2,
    )


def test_a_folders_row_shows_its_method_size_decision_target_and_source(
    capsys: pytest.CaptureFixture[str],
) -> None:
    batch = folder_batch("/data", ["e.bin"])
    expected = "stream         0 B  new       up/load/e.bin <- /data/e.bin\n"
    assert printed_rows(batch, capsys) == expected


@pytest.mark.parametrize("folder", ["/data/photos", "/data/user@host", "/data/caf\u00e9", ""])
@pytest.mark.parametrize("names", [PLAIN_NAMES, NAMES], ids=["plain names", "odd names"])
def test_a_folders_json_rows_are_those_its_items_print_one_by_one(
    folder: str, names: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    batches = [folder_batch(folder, names), folder_batch("/data/next", PLAIN_NAMES[:2])]

    text = printed_json(batches, capsys)

    assert text == printed_json([one_by_one(batch) for batch in batches], capsys)
    assert len(json.loads(text)["items"]) == len(names) + 2


@pytest.mark.parametrize("count", [1, 3, len(NAMES)])
def test_a_folders_totals_are_those_of_its_items_one_by_one(count: int) -> None:
    by_columns, by_items = PlanTotals(), PlanTotals()
    batch = folder_batch("/data", NAMES[:count])

    by_columns.add(batch)
    by_items.add(one_by_one(batch))

    assert list(by_columns.by_method.items()) == list(by_items.by_method.items())
    assert list(by_columns.by_decision.items()) == list(by_items.by_decision.items())
    assert sum(n for n, _ in by_columns.by_method.values()) == count
