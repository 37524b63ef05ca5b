"""A SQLite ledger's export, written from its rows as read: a million items in seconds.

`write_export` makes each record from a LedgerItem (25 columns, enums, a dict, the JSON
encoder): some 30 µs of CPU an item, half a minute for a million. Here only the columns
the export shows are read, and each line is written from them at once, with the rules
`export_record` and `json.dumps` follow (credentials hidden, times by `iso_utc`, strings
escaped by json's own encoder, the csv module's quoting): the same text, character for
character (tests/test_export_cli.py compares the two on hostile rows).
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import csv
import gc
import json
import os
import shutil
import sqlite3
import sys
import sysconfig
import tempfile
from collections.abc import Iterator, Sequence
from json.encoder import encode_basestring as _quote  # what json.dumps quotes str with
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import quote

from migrator.ledger import BUSY_TIMEOUT_MS, PAGE_SIZE, BaseLedger, Ledger
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


async def export_ledger(
    ledger: BaseLedger, target: str, fmt: str, out: TextIO, *, scratch: Path | None = None
) -> int:
    """Write every item of `target` to `out` as `write_export` would; returns how many.

    `scratch`: a folder on the output's disk where a large export of a SQLite ledger is
    written in parts by a worker process per CPU (up to MAX_WORKERS), each over its own
    range of ids, then joined in order: Python's formatting of a row, not SQLite, is most
    of an export's time. Without one (stdout), one process writes it all.
    """
    if not isinstance(ledger, Ledger):
        return await write_export(ledger.iter_items(target), fmt, out)
    check_export_format(fmt)
    spans = [] if scratch is None or ledger.blank else await _id_spans(ledger, target)
    if fmt == "csv":
        csv.writer(out, lineterminator="\n").writerow(EXPORT_FIELDS)
    elif fmt == "json":
        out.write("[")
    if len(spans) > 1 and scratch is not None:
        count = await _write_in_parts(ledger.path, target, fmt, out, scratch, spans)
    else:
        count = 0
        with _collector_paused():
            async for page in ledger.iter_columns(target, _COLUMNS):  # a page: one write
                _write_page(out, fmt, page, first=not count)
                count += len(page)
    if fmt == "json":
        out.write("\n]\n" if count else "]\n")
    return count


def _write_page(out: TextIO, fmt: str, page: Sequence[Sequence[Any]], *, first: bool) -> None:
    """One page of rows, in one write; `first`: no row was written before it."""
    if fmt == "csv":
        csv.writer(out, lineterminator="\n").writerows(map(_csv_row, page))
    elif fmt == "json":
        out.write(("\n" if first else ",\n") + ",\n".join(map(_json_text, page)))
    else:
        out.write("\n".join(map(_json_text, page)) + "\n")


# -- a large export, in parts ---------------------------------------------------------------

PARALLEL_ROWS = 200_000  # fewer: one process is as quick (a worker takes ~0.3 s to start)
MAX_WORKERS = 4
_JOIN_BLOCK = 4 * 1024 * 1024  # characters of a part copied to the output at a time


async def _id_spans(ledger: Ledger, target: str) -> list[tuple[int, int]]:
    """Ranges of ids, one per worker, splitting the target's items about evenly; one
    range (or none) when the export is too small to be worth the processes."""
    workers = min(os.cpu_count() or 1, MAX_WORKERS)
    count, low, high = await ledger.id_span(target)
    if count < PARALLEL_ROWS or workers < 2:
        return []
    step = (high - low) // workers + 1
    return [(start, min(start + step - 1, high)) for start in range(low, high + 1, step)]


async def _write_in_parts(
    database: Path,
    target: str,
    fmt: str,
    out: TextIO,
    scratch: Path,
    spans: list[tuple[int, int]],
) -> int:
    """Each span's rows to a part file by a worker process (`python -m
    migrator.export_worker`: nothing of the caller's program runs again in it), then the
    parts to `out` in order, joined as one process would have written them."""
    with tempfile.TemporaryDirectory(prefix=".export-", dir=scratch) as folder:
        parts = [str(Path(folder) / f"part-{number}") for number in range(len(spans))]
        workers = [
            await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "migrator.export_worker",
                str(database),
                target,
                fmt,
                str(first),
                str(last),
                part,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env=_finding_this_package(),
            )
            for (first, last), part in zip(spans, parts, strict=True)
        ]
        try:
            counts = [await _rows_written(worker) for worker in workers]
        finally:
            for worker in workers:  # one failed, or a Ctrl-C: the others stop too
                if worker.returncode is None:
                    worker.kill()
                    await worker.wait()
        written = 0
        for part, count in zip(parts, counts, strict=True):
            if count and written and fmt == "json":
                out.write(",")  # a json part opens with the "\n" of its first page
            _copy_part(part, out)
            written += count
    return written


def _finding_this_package() -> dict[str, str]:
    """The environment, with this copy of migrator on the workers' path when it is not
    installed where the interpreter looks by itself (a checkout, a path a program added)."""
    home = str(Path(__file__).resolve().parent.parent)
    installed = {str(Path(sysconfig.get_path(name)).resolve()) for name in ("purelib", "platlib")}
    if home in installed:
        return dict(os.environ)
    paths = [home, *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}


async def _rows_written(worker: asyncio.subprocess.Process) -> int:
    said, trouble = await worker.communicate()
    if worker.returncode != 0:
        lines = trouble.decode(errors="replace").strip().splitlines() or ["no message"]
        raise OSError(f"an export worker failed: {lines[-1]}")
    return int(said)


def write_part(database: str, target: str, fmt: str, span: tuple[int, int], part: str) -> int:
    """The rows of `target` whose id is in `span` to the file `part`, as `export_ledger`
    writes them (in a worker); a json part has no "," before its first row."""
    uri = f"file:{quote(database)}?mode=ro"
    sql = (
        f"SELECT {_COLUMNS} FROM {Ledger.ITEMS_BY_ID} WHERE target = ? AND id BETWEEN ? AND ? "
        "ORDER BY id"
    )
    count = 0
    with (
        contextlib.closing(sqlite3.connect(uri, uri=True)) as db,
        open(part, "w", encoding="utf-8", newline="") as out,
        _collector_paused(),
    ):
        db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        cursor = db.execute(sql, (target, *span))
        while page := cursor.fetchmany(PAGE_SIZE * 5):
            _write_page(out, fmt, page, first=not count)
            count += len(page)
    return count


def _copy_part(part: str, out: TextIO) -> None:
    """A part to `out`: its bytes as they are when `out` writes UTF-8 (as the part was
    written), else as text."""
    if _writes_utf8(out):
        out.flush()  # what the text layer holds goes first
        with open(part, "rb") as data:
            shutil.copyfileobj(data, out.buffer, _JOIN_BLOCK)
        return
    with open(part, encoding="utf-8", newline="") as text:
        while block := text.read(_JOIN_BLOCK):
            out.write(block)


def _writes_utf8(out: TextIO) -> bool:
    encoding, errors = getattr(out, "encoding", None), getattr(out, "errors", None)
    if not isinstance(encoding, str) or errors != "strict" or not hasattr(out, "buffer"):
        return False
    try:
        return codecs.lookup(encoding).name == "utf-8"
    except LookupError:
        return False


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
