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
import errno
import gc
import json
import os
import shutil
import sqlite3
import sys
import sysconfig
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from json.encoder import encode_basestring as _quote  # what json.dumps quotes str with
from pathlib import Path
from typing import Any, BinaryIO, TextIO
from urllib.parse import quote

from migrator.ledger import BUSY_TIMEOUT_MS, PAGE_SIZE, BaseLedger, Ledger
from migrator.naming import hide_credentials, without_credentials
from migrator.outputs import EXPORT_FIELDS, check_export_format, write_export
from migrator.units import iso_utc

# The columns of EXPORT_FIELDS, in their order (the item's state is its `status`).
_COLUMNS = "id, " + ", ".join("state" if f == "status" else f for f in EXPORT_FIELDS)
_JSON_LINE = "{" + ", ".join(f'"{field}": %s' for field in EXPORT_FIELDS) + "}"
assert len(EXPORT_FIELDS) == 17  # as _json_lines unpacks them


def _columns(page: Sequence[Sequence[Any]]) -> tuple[tuple[Any, ...], ...]:
    """The 17 exported columns of a page of rows (its ids dropped), credentials hidden as
    `export_record` hides them: the one place both formats take their values from. A page
    is formatted a column at a time: a million rows, and every call a value saves is a
    second of an export."""
    (_, source, *middle, error, path, downloaded, checked, dead) = zip(*page, strict=True)
    if any("@" in text for text in source):
        source = tuple(without_credentials(text) if "@" in text else text for text in source)
    if any(text is not None and "@" in text for text in error):
        error = tuple(
            hide_credentials(text) if text is not None and "@" in text else text for text in error
        )
    return (source, *middle, error, path, downloaded, checked, dead)


def _csv_rows(page: Sequence[Sequence[Any]]) -> Iterator[tuple[Any, ...]]:
    """The csv rows of a page, as `export_record` makes them; None is written empty by csv
    itself, as `write_export` writes it."""
    (*named, uploaded, expires, attempts, error, path, downloaded, checked, dead) = _columns(page)
    times = [_iso_times(column) for column in (uploaded, expires, downloaded, checked, dead)]
    return zip(*named, times[0], times[1], attempts, error, path, *times[2:], strict=True)


def _iso_times(column: Sequence[float | None]) -> list[str | None]:
    return [None if moment is None else iso_utc(moment) for moment in column]


def _json_lines(page: Sequence[Sequence[Any]]) -> Iterator[str]:
    """The jsonl lines of a page (`json.dumps` of `export_record`, character for character)."""
    (
        source, upload_path, file_name, method, size, sha256, state, url, file_id,
        uploaded, expires, attempts, error, path, downloaded, checked, dead,
    ) = _columns(page)  # fmt: skip
    values = (
        map(_quote, source), map(_quote, upload_path), map(_quote, file_name),
        _quoted(method), _numbers(size), _quoted(sha256), map(_quote, state), _quoted(url),
        _quoted(file_id), _json_times(uploaded), _json_times(expires), _numbers(attempts),
        _quoted(error), _quoted(path), _json_times(downloaded), _json_times(checked),
        _json_times(dead),
    )  # fmt: skip
    return map(_JSON_LINE.__mod__, zip(*values, strict=True))


def _quoted(column: Sequence[str | None]) -> list[str]:
    return ["null" if text is None else _quote(text) for text in column]


def _numbers(column: Sequence[object]) -> Iterable[str]:
    if all(type(value) is int for value in column):
        return map(int.__repr__, column)
    return map(_json, column)


def _json(value: object) -> str:
    if value is None:
        return "null"
    if type(value) is int:
        return int.__repr__(value)
    return json.dumps(value, ensure_ascii=False)


def _json_times(column: Sequence[float | None]) -> list[str]:
    return ["null" if moment is None else _json_time(moment) for moment in column]


def _json_time(moment: float) -> str:
    text = iso_utc(moment)
    return "null" if text is None else f'"{text}"'


async def export_ledger(
    ledger: BaseLedger, target: str, fmt: str, out: TextIO, *, scratch: Path | None = None
) -> int:
    """Write every item of `target` to `out` as `write_export` would; returns how many.

    `scratch`: a folder on the output's disk where a large export of a SQLite ledger is
    written in parts, spans of ids taken in turn by a pool of worker processes (one per
    CPU, up to MAX_WORKERS), and joined in order: Python's formatting of a row, not
    SQLite, is most of an export's time. Without one (stdout), one process writes it all.
    """
    if not isinstance(ledger, Ledger):
        return await write_export(ledger.iter_items(target), fmt, out)
    check_export_format(fmt)
    spans = [] if scratch is None or ledger.blank else await _id_spans(ledger)
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
    if not page:
        return
    if fmt == "csv":
        csv.writer(out, lineterminator="\n").writerows(_csv_rows(page))
    elif fmt == "json":
        out.write(("\n" if first else ",\n") + ",\n".join(_json_lines(page)))
    else:
        out.write("\n".join(_json_lines(page)) + "\n")


# -- a large export, in parts ---------------------------------------------------------------

PARALLEL_ROWS = 200_000  # fewer: one process is as quick (a worker takes ~0.3 s to start)
SPAN_ROWS = 100_000  # ids a worker takes at a time: a worker on a busy CPU takes fewer spans
MAX_WORKERS = 4
_JOIN_BLOCK = 4 * 1024 * 1024  # characters of a part copied to the output at a time


async def _id_spans(ledger: Ledger) -> list[tuple[int, int]]:
    """Ranges of SPAN_ROWS ids covering the table (counting the target's own items would
    read a million index entries first: half a second); none when the table is too small
    to be worth the processes. A worker passes over the rows of other targets in its
    ranges, as one process would."""
    low, high = await ledger.id_span()
    if high - low + 1 < PARALLEL_ROWS or _worker_count() < 2:
        return []
    return [(start, min(start + SPAN_ROWS - 1, high)) for start in range(low, high + 1, SPAN_ROWS)]


def _worker_count() -> int:
    return min(os.cpu_count() or 1, MAX_WORKERS)


async def _write_in_parts(
    database: Path,
    target: str,
    fmt: str,
    out: TextIO,
    scratch: Path,
    spans: list[tuple[int, int]],
) -> int:
    """Each span's rows to a part file by a pool of worker processes (`python -m
    migrator.export_worker`: nothing of the caller's program runs again in it), each
    taking the next span when it is done with one; each part joined to `out` as soon as
    it and the parts before it are written, as one process would have written them."""
    with tempfile.TemporaryDirectory(prefix=".export-", dir=scratch) as folder:
        loop = asyncio.get_running_loop()
        counts: list[asyncio.Future[int]] = [loop.create_future() for _ in spans]
        todo = iter(range(len(spans)))  # shared: a worker takes the next index left
        workers = [
            await _start_worker(database, target, fmt, folder)
            for _ in range(min(len(spans), _worker_count()))
        ]
        feeders = [asyncio.ensure_future(_feed(worker, todo, spans, counts)) for worker in workers]
        joiner = asyncio.ensure_future(_join_parts(folder, fmt, counts, out))
        try:
            await asyncio.gather(joiner, *feeders)
            return joiner.result()
        finally:  # one failed, or a Ctrl-C: the others stop too
            for task in (joiner, *feeders):
                task.cancel()
            for worker in workers:
                if worker.returncode is None:
                    worker.kill()
                    await worker.wait()


async def _start_worker(
    database: Path, target: str, fmt: str, folder: str
) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "migrator.export_worker",
        str(database),
        target,
        fmt,
        folder,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=_finding_this_package(),
    )


async def _feed(
    worker: asyncio.subprocess.Process,
    todo: Iterator[int],
    spans: Sequence[tuple[int, int]],
    counts: Sequence[asyncio.Future[int]],
) -> None:
    """Hand `worker` the next span left until none is, each one's row count to its future."""
    assert worker.stdin is not None and worker.stdout is not None
    for index in todo:
        first, last = spans[index]
        try:
            worker.stdin.write(f"{index} {first} {last}\n".encode())
            await worker.stdin.drain()
        except ConnectionError:  # it died: its stderr says why
            raise await _failure_of(worker) from None
        said = await worker.stdout.readline()
        if not said:
            raise await _failure_of(worker)
        counts[index].set_result(int(said))
    worker.stdin.close()
    await worker.wait()


async def _failure_of(worker: asyncio.subprocess.Process) -> OSError:
    assert worker.stderr is not None
    trouble = await worker.stderr.read()
    await worker.wait()
    lines = trouble.decode(errors="replace").strip().splitlines() or ["no message"]
    return OSError(f"an export worker failed: {lines[-1]}")


async def _join_parts(
    folder: str, fmt: str, counts: Sequence[asyncio.Future[int]], out: TextIO
) -> int:
    """The parts to `out` in order, each as soon as it is written, each removed once
    joined (a large export needs its own size on disk once, not twice)."""
    written = 0
    for index, count in enumerate(counts):
        rows = await count
        part = part_path(folder, index)
        if rows and written and fmt == "json":
            out.write(",")  # a json part opens with the "\n" of its first page
        _move_part(part, out)
        written += rows
    return written


def part_path(folder: str, index: int) -> str:
    return str(Path(folder) / f"part-{index}")


def _finding_this_package() -> dict[str, str]:
    """The environment, with this copy of migrator on the workers' path when it is not
    installed where the interpreter looks by itself (a checkout, a path a program added)."""
    home = str(Path(__file__).resolve().parent.parent)
    installed = {str(Path(sysconfig.get_path(name)).resolve()) for name in ("purelib", "platlib")}
    if home in installed:
        return dict(os.environ)
    paths = [home, *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}


def open_readonly(database: str) -> sqlite3.Connection:
    """The ledger at `database`, for a worker to read (a run may be writing it)."""
    db = sqlite3.connect(f"file:{quote(database)}?mode=ro", uri=True)
    db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    return db


def write_part(
    db: sqlite3.Connection, target: str, fmt: str, span: tuple[int, int], part: str
) -> int:
    """The rows of `target` whose id is in `span` to the file `part`, as `export_ledger`
    writes them (in a worker); a json part has no "," before its first row."""
    sql = (
        f"SELECT {_COLUMNS} FROM {Ledger.ITEMS_BY_ID} WHERE target = ? AND id BETWEEN ? AND ? "
        "ORDER BY id"
    )
    count = 0
    with open(part, "w", encoding="utf-8", newline="") as out, _collector_paused():
        cursor = db.execute(sql, (target, *span))
        while page := cursor.fetchmany(PAGE_SIZE * 5):
            _write_page(out, fmt, page, first=not count)
            count += len(page)
    return count


def _move_part(part: str, out: TextIO) -> None:
    """A part to the end of `out`, then removed: its bytes as they are when `out` writes
    UTF-8 (as the part was written), copied by the kernel when `out` is a file; else as
    text."""
    _copy_part(part, out)
    Path(part).unlink()


def _copy_part(part: str, out: TextIO) -> None:
    if _writes_utf8(out):
        out.flush()  # what the text layer holds goes first
        with open(part, "rb") as data:
            if not _sent_whole(data, out):
                shutil.copyfileobj(data, out.buffer, _JOIN_BLOCK)
        return
    with open(part, encoding="utf-8", newline="") as text:
        while block := text.read(_JOIN_BLOCK):
            out.write(block)


def _sent_whole(data: BinaryIO, out: TextIO) -> bool:
    """`data` appended to the file under `out` by `os.sendfile` (no copy through Python:
    a second at a million rows); False, with nothing sent, when `out` is not a file it
    can write to, for the caller to copy."""
    try:
        target = out.fileno()
    except (OSError, ValueError):  # io.UnsupportedOperation is both
        return False
    size, offset = os.fstat(data.fileno()).st_size, 0
    while offset < size:
        try:
            sent = os.sendfile(target, data.fileno(), offset, size - offset)
        except OSError as err:
            if offset or err.errno not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                raise
            return False
        if not sent:  # the part shrank under us: a broken export, not a short one
            raise OSError(errno.EIO, f"export part {data.name} ended early")
        offset += sent
    if hasattr(os, "posix_fadvise"):  # the disk starts writing what is joined so far: the
        os.posix_fadvise(target, 0, 0, os.POSIX_FADV_DONTNEED)  # last fsync has less to wait
    return True


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
