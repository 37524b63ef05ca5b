"""A SQLite ledger's export, written from its rows as read: a million items in seconds.

`write_export` makes each record from a LedgerItem (25 columns, enums, a dict, the JSON
encoder): some 30 µs of CPU an item, half a minute for a million. Here only the columns
the export shows are read, and each line is written from them at once, with the rules
`export_record` and `json.dumps` follow (credentials hidden, times by `iso_utc`, strings
escaped by json's own encoder, the csv module's quoting): the same text, character for
character (tests/test_export_cli.py compares the two on hostile rows).
"""

from __future__ import annotations

import contextlib
import csv
import gc
import json
from collections.abc import Iterator, Sequence
from json.encoder import encode_basestring as _quote  # what json.dumps quotes str with
from typing import Any, TextIO

from migrator.ledger import BaseLedger, Ledger
from migrator.naming import hide_credentials, without_credentials
from migrator.outputs import EXPORT_FIELDS, check_export_format, write_export
from migrator.units import iso_utc

# The columns of EXPORT_FIELDS, in their order (the item's state is its `status`).
_COLUMNS = "id, " + ", ".join("state" if f == "status" else f for f in EXPORT_FIELDS)
_JSON_LINE = "{" + ", ".join(f'"{field}": %s' for field in EXPORT_FIELDS) + "}"
assert len(EXPORT_FIELDS) == 17  # as _shown unpacks them


def _shown(row: Sequence[Any]) -> tuple[Any, ...]:
    """The 17 exported columns of one row (its id first), credentials hidden as
    `export_record` hides them; the one place both formats take their columns from."""
    (_, source, upload_path, file_name, method, size, sha256, state, url, file_id) = row[:10]
    (uploaded, expires, attempts, error, path, downloaded, checked, dead) = row[10:]
    if "@" in source:
        source = without_credentials(source)
    if error is not None and "@" in error:
        error = hide_credentials(error)
    return (
        source, upload_path, file_name, method, size, sha256, state, url, file_id,
        uploaded, expires, attempts, error, path, downloaded, checked, dead,
    )  # fmt: skip


def _csv_row(row: Sequence[Any]) -> tuple[Any, ...]:
    """The csv fields of one row, as `export_record` makes them; None is written empty
    by csv itself, as `write_export` writes it."""
    (
        source, upload_path, file_name, method, size, sha256, state, url, file_id,
        uploaded, expires, attempts, error, path, downloaded, checked, dead,
    ) = _shown(row)  # fmt: skip
    return (
        source, upload_path, file_name, method, size, sha256, state, url, file_id,
        None if uploaded is None else iso_utc(uploaded),
        None if expires is None else iso_utc(expires),
        attempts, error, path,
        None if downloaded is None else iso_utc(downloaded),
        None if checked is None else iso_utc(checked),
        None if dead is None else iso_utc(dead),
    )  # fmt: skip


def _json(value: object) -> str:
    if value is None:
        return "null"
    if type(value) is int:
        return int.__repr__(value)
    return json.dumps(value, ensure_ascii=False)


def _json_time(moment: float) -> str:
    text = iso_utc(moment)
    return "null" if text is None else f'"{text}"'


def _json_text(row: Sequence[Any]) -> str:
    """The jsonl line of one row, without a call for a column that is NULL (a million
    rows: every call a second)."""
    (
        source, upload_path, file_name, method, size, sha256, state, url, file_id,
        uploaded, expires, attempts, error, path, downloaded, checked, dead,
    ) = _shown(row)  # fmt: skip
    return _JSON_LINE % (
        _quote(source),
        _quote(upload_path),
        _quote(file_name),
        "null" if method is None else _quote(method),
        _json(size),
        "null" if sha256 is None else _quote(sha256),
        _quote(state),
        "null" if url is None else _quote(url),
        "null" if file_id is None else _quote(file_id),
        "null" if uploaded is None else _json_time(uploaded),
        "null" if expires is None else _json_time(expires),
        _json(attempts),
        "null" if error is None else _quote(error),
        "null" if path is None else _quote(path),
        "null" if downloaded is None else _json_time(downloaded),
        "null" if checked is None else _json_time(checked),
        "null" if dead is None else _json_time(dead),
    )


async def export_ledger(ledger: BaseLedger, target: str, fmt: str, out: TextIO) -> int:
    """Write every item of `target` to `out` as `write_export` would; returns how many."""
    if not isinstance(ledger, Ledger):
        return await write_export(ledger.iter_items(target), fmt, out)
    check_export_format(fmt)
    writer = csv.writer(out, lineterminator="\n")
    if fmt == "csv":
        writer.writerow(EXPORT_FIELDS)
    elif fmt == "json":
        out.write("[")
    count = 0
    with _collector_paused():
        async for page in ledger.iter_columns(target, _COLUMNS):  # a page: one write
            if fmt == "csv":
                writer.writerows(map(_csv_row, page))
            elif fmt == "json":
                out.write((",\n" if count else "\n") + ",\n".join(map(_json_text, page)))
            else:
                out.write("\n".join(map(_json_text, page)) + "\n")
            count += len(page)
    if fmt == "json":
        out.write("\n]\n" if count else "]\n")
    return count


@contextlib.contextmanager
def _collector_paused() -> Iterator[None]:
    """No garbage collection while pages of rows come and go: a page's rows outlive a
    young collection, so every few pages a full one walked every object of the process
    (a sixth of an export's CPU). Pages hold no cycles: nothing is left for it to find."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()
