"""Exports, the metrics file and the atomic writes behind both."""

from __future__ import annotations

import csv
import io
import json
import stat
from collections.abc import AsyncIterator, Iterable
from datetime import UTC, datetime
from pathlib import Path

import pytest
from hypothesis import example, given
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from migrator.errors import UsageError
from migrator.model import ItemState, LedgerItem, Method, SourceKind
from migrator.outputs import (
    EXPORT_FIELDS,
    MetricsSnapshot,
    atomic_write_text,
    atomic_writer,
    export_record,
    render_metrics,
    write_export,
)
from migrator.units import iso_utc

UPLOADED = 1_737_196_200.0  # 2025-01-18T10:30:00Z


def test_export_shows_a_source_url_without_its_credentials() -> None:
    row = item(
        "a.png",
        source="https://user:hunter2@origin.example/a.png",
        kind=SourceKind.URL,
        last_error="origin https://user:hunter2@origin.example/a.png answered HTTP 500",
    )

    record = export_record(row)

    assert record["source"] == "https://origin.example/a.png"
    assert record["last_error"] == "origin https://origin.example/a.png answered HTTP 500"
    assert row.source == "https://user:hunter2@origin.example/a.png"  # the ledger keeps it


def item(name: str, **fields: object) -> LedgerItem:
    values: dict[str, object] = {
        "id": 1,
        "target": "http://127.0.0.1:9/api",
        "upload_path": "batch/2025",
        "file_name": name,
        "source": f"/data/{name}",
        "kind": SourceKind.FILE,
        "size": 1234,
        "mtime_ns": 1,
        "etag": None,
        "last_modified": None,
        "sha256": "ab" * 32,
        "method": Method.STREAM,
        "state": ItemState.DONE,
        "download_url": f"https://files.example/{name}",
        "file_id": "f-1",
        "uploaded_at": UPLOADED,
        "expires_at": UPLOADED + 72 * 3600,
        "attempts": 1,
        "last_error": None,
    }
    values.update(fields)
    return LedgerItem(**values)  # type: ignore[arg-type]


SAMPLE = [
    item("a.txt"),
    item(
        'odd, "name"\n.txt',
        state=ItemState.FAILED,
        method=None,
        size=None,
        sha256=None,
        download_url=None,
        file_id=None,
        uploaded_at=None,
        expires_at=None,
        attempts=5,
        last_error="HTTP 413: too large",
    ),
]


async def stream(items: Iterable[LedgerItem]) -> AsyncIterator[LedgerItem]:
    for one in items:
        yield one


async def export(fmt: str, items: Iterable[LedgerItem] = SAMPLE) -> tuple[int, str]:
    out = io.StringIO()
    count = await write_export(stream(items), fmt, out)
    return count, out.getvalue()


# -- exports --------------------------------------------------------------------------------


def test_export_record_has_the_contract_keys_in_order() -> None:
    record = export_record(SAMPLE[0])
    assert tuple(record) == EXPORT_FIELDS
    assert record["status"] == "done"
    assert record["method"] == "stream"
    assert record["uploaded_at"] == "2025-01-18T10:30:00Z"
    assert record["expires_at"] == "2025-01-21T10:30:00Z"
    assert record["downloaded_at"] is None


def test_export_record_of_a_failed_item_has_nulls() -> None:
    record = export_record(SAMPLE[1])
    assert record["status"] == "failed"
    assert record["download_url"] is None and record["uploaded_at"] is None
    assert record["last_error"] == "HTTP 413: too large"


async def test_jsonl_export_is_one_record_per_line() -> None:
    count, text = await export("jsonl")
    lines = text.splitlines()
    assert count == 2 and len(lines) == 2
    assert [json.loads(line) for line in lines] == [export_record(i) for i in SAMPLE]


async def test_json_export_is_one_array() -> None:
    count, text = await export("json")
    assert count == 2
    assert json.loads(text) == [export_record(i) for i in SAMPLE]


async def test_json_export_of_nothing_is_an_empty_array() -> None:
    count, text = await export("json", [])
    assert count == 0
    assert json.loads(text) == []


async def test_csv_export_has_the_header_and_empty_cells_for_null() -> None:
    count, text = await export("csv")
    rows = list(csv.DictReader(io.StringIO(text, newline="")))
    assert count == 2
    assert tuple(rows[0]) == EXPORT_FIELDS
    assert rows[0]["download_url"] == "https://files.example/a.txt"
    assert rows[0]["size"] == "1234"
    assert rows[1]["file_name"] == 'odd, "name"\n.txt'
    assert rows[1]["download_url"] == ""
    assert rows[1]["attempts"] == "5"


async def test_unknown_export_format_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match="xml"):
        await export("xml")


# -- atomic writes --------------------------------------------------------------------------


def test_atomic_write_creates_folders_and_a_readable_file(tmp_path: Path) -> None:
    path = tmp_path / "out" / "deep" / "links.jsonl"
    atomic_write_text(path, "hello\n")
    assert path.read_text() == "hello\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert [p.name for p in path.parent.iterdir()] == ["links.jsonl"]


def test_atomic_write_keeps_the_mode_of_the_file_it_replaces(tmp_path: Path) -> None:
    path = tmp_path / "links.csv"
    path.write_text("old")
    path.chmod(0o600)
    atomic_write_text(path, "new")
    assert path.read_text() == "new"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_a_failing_writer_leaves_the_old_file_and_no_temp_file(tmp_path: Path) -> None:
    path = tmp_path / "links.json"
    path.write_text("old content")
    with pytest.raises(RuntimeError, match="midway"), atomic_writer(path) as handle:
        handle.write("half of the new")
        raise RuntimeError("midway")
    assert path.read_text() == "old content"
    assert [p.name for p in tmp_path.iterdir()] == ["links.json"]


async def test_an_export_streams_into_an_atomic_writer(tmp_path: Path) -> None:
    path = tmp_path / "links.jsonl"
    with atomic_writer(path) as handle:
        await write_export(stream(SAMPLE), "jsonl", handle)
    assert len(path.read_text().splitlines()) == 2


# -- metrics --------------------------------------------------------------------------------


def snapshot(**fields: object) -> MetricsSnapshot:
    values: dict[str, object] = {
        "migration": "nightly",
        "command": "run",
        "items_by_state": {"done": 3, "failed": 1},
        "bytes_by_state": {"done": 3000, "failed": 10},
        "last_success_timestamp": UPLOADED,
        "next_expiry_seconds": 3600.5,
        "failures": 1,
        "duration_seconds": 12.25,
        "finished_at": UPLOADED + 12.25,
        "exit_code": 1,
    }
    values.update(fields)
    return MetricsSnapshot(**values)  # type: ignore[arg-type]


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    found: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(text):
        assert family.type == "gauge"
        for sample in family.samples:
            found[sample.name, tuple(sorted(sample.labels.items()))] = sample.value
    return found


def test_metrics_parse_as_prometheus_text() -> None:
    values = samples(render_metrics(snapshot()))
    job = run = (("command", "run"), ("migration", "nightly"))
    assert values["migrator_items", (*job, ("state", "done"))] == 3
    assert values["migrator_items", (*job, ("state", "failed"))] == 1
    assert values["migrator_bytes", (*job, ("state", "done"))] == 3000
    assert values["migrator_last_success_timestamp_seconds", job] == UPLOADED
    assert values["migrator_next_expiry_seconds", job] == 3600.5
    assert values["migrator_failures", job] == 1
    assert values["migrator_last_run_duration_seconds", run] == 12.25
    assert values["migrator_last_run_timestamp_seconds", run] == UPLOADED + 12.25
    assert values["migrator_last_run_exit_code", run] == 1


def test_the_metrics_of_two_commands_share_no_series() -> None:
    """The node exporter fails on a series found in two files of its textfile folder."""
    run = samples(render_metrics(snapshot(command="run")))
    refresh = samples(render_metrics(snapshot(command="refresh")))
    assert run.keys().isdisjoint(refresh.keys())


def test_metrics_have_help_and_type_lines() -> None:
    text = render_metrics(snapshot())
    assert "# HELP migrator_items " in text
    assert "# TYPE migrator_items gauge" in text
    assert text.endswith("\n")


def test_metrics_leave_out_unknown_values() -> None:
    names = {
        name
        for name, _ in samples(
            render_metrics(snapshot(last_success_timestamp=None, next_expiry_seconds=None))
        )
    }
    assert "migrator_last_success_timestamp_seconds" not in names
    assert "migrator_next_expiry_seconds" not in names
    assert "migrator_failures" in names


def test_metrics_escape_label_values() -> None:
    job = 'back\\slash "quoted"\nnewline'
    values = samples(render_metrics(snapshot(migration=job)))
    assert values["migrator_failures", (("command", "run"), ("migration", job))] == 1


def _datetime_text(timestamp: float) -> str | None:
    """What datetime itself makes of a timestamp, as iso_utc promises to."""
    try:
        moment = datetime.fromtimestamp(timestamp, tz=UTC)
    except (OverflowError, OSError, ValueError):
        return None
    fraction = f".{moment.microsecond // 1000:03d}" if moment.microsecond else ""
    return moment.strftime("%Y-%m-%dT%H:%M:%S") + fraction + "Z"


@given(
    st.one_of(
        st.floats(min_value=-1e11, max_value=3e11, allow_nan=False),
        st.integers(min_value=-(10**11), max_value=3 * 10**11),
        st.floats(min_value=1.7e9, max_value=1.8e9),  # the times a ledger holds
    )
)
@example(1796045002.582)
@example(1796045002.9999995)  # rounds up to the next second
@example(0.0000005)  # half a microsecond: to even
@example(0.0000015)
@example(253402300799.9999)  # the last second datetime knows
@example(float("inf"))
@example(float("nan"))
def test_iso_utc_writes_the_text_datetime_writes(timestamp: float) -> None:
    assert iso_utc(timestamp) == _datetime_text(timestamp)
