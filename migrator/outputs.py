"""What migrator leaves for other programs: exports of the ledger and a metrics file.

Rendering is pure; writing is atomic (temp file in the same folder, fsync,
rename, fsync of the folder), so a reader never sees half a file and a crash
never destroys the previous one.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import functools
import json
import math
import os
import stat
import tempfile
from collections.abc import AsyncIterable, Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from migrator.errors import DISK_ERRNOS, ConfigError, DiskError, MigratorError, UsageError
from migrator.naming import hide_credentials, without_credentials
from migrator.units import iso_utc

if TYPE_CHECKING:
    from migrator.model import LedgerItem

OUTPUT_MODE = 0o644


def write_error(path: Path, err: OSError) -> MigratorError:
    """One line naming `path`: a DiskError when the disk failed, else a ConfigError."""
    if err.errno == errno.ENOSPC:
        return DiskError(f"cannot write {path}: the disk is full")
    if err.errno in DISK_ERRNOS:
        return DiskError(f"cannot write {path}: {err.strerror}")
    return ConfigError(f"cannot write {path}: {err.strerror or err}")


EXPORT_FIELDS: tuple[str, ...] = (
    "source",
    "upload_path",
    "file_name",
    "method",
    "size",
    "sha256",
    "status",
    "download_url",
    "file_id",
    "uploaded_at",
    "expires_at",
    "attempts",
    "last_error",
    "downloaded_path",
    "downloaded_at",
    "checked_at",
    "dead_at",
)
EXPORT_FORMATS: tuple[str, ...] = ("jsonl", "csv", "json")
EXPORT_EXTENSIONS: Mapping[str, str] = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".csv": "csv",
    ".json": "json",
}
"""The file extensions `export --output` knows the format of."""

# -- atomic writes --------------------------------------------------------------------------


def _fsync_dir(directory: Path) -> None:
    # Some filesystems refuse to open or fsync a directory; the rename is done anyway.
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _mode_for(path: Path) -> int:
    try:
        return stat.S_IMODE(path.stat().st_mode)
    except FileNotFoundError:
        return OUTPUT_MODE


@contextlib.contextmanager
def _as_config_error(path: Path) -> Iterator[None]:
    try:
        yield
    except OSError as err:
        raise write_error(path, err) from err


@contextlib.contextmanager
def atomic_writer(path: Path, *, make_parents: bool = True) -> Iterator[TextIO]:
    """Write `path` all at once: the old file stays untouched if the block raises.

    Parent folders are created unless `make_parents` is False; a new file gets mode
    0644, an existing one keeps its mode.
    """
    path = Path(path)
    with _as_config_error(path):
        if make_parents:
            path.parent.mkdir(parents=True, exist_ok=True)
        mode = _mode_for(path)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(tmp_name)
    try:
        # Writes inside the block fail too (a full disk): name the file, not just errno.
        with _as_config_error(path), os.fdopen(fd, "w", encoding="utf-8", newline="") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
            os.fchmod(handle.fileno(), mode)
        with _as_config_error(path):
            tmp.replace(path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    _fsync_dir(path.parent)


def check_writable(path: Path) -> None:
    """Raise the error `atomic_writer(path)` would meet, without writing `path`: a
    command checks its outputs before it sends anything. Creates and removes a
    temporary file in the nearest folder that exists (the writer would make the rest)."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"cannot write {path}: it is a folder")
    folder = next((p for p in path.parents if p.exists()), Path(path.anchor or "."))
    if not folder.is_dir():
        raise ConfigError(f"cannot write {path}: {folder} is not a folder")
    try:
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".check", dir=folder)
    except OSError as err:
        raise write_error(path, err) from None
    os.close(fd)
    with contextlib.suppress(OSError):
        Path(name).unlink()


def atomic_write_text(path: Path, text: str) -> None:
    """Replace `path` with `text` atomically (see atomic_writer)."""
    with atomic_writer(path) as handle:
        handle.write(text)


# -- exports --------------------------------------------------------------------------------


def export_record(item: LedgerItem) -> dict[str, object]:
    """One item as exported: EXPORT_FIELDS in order, times as ISO-8601 UTC or None.
    Credentials in a source URL stay in the ledger: the export shows the URL without."""
    return {
        "source": without_credentials(item.source),
        "upload_path": item.upload_path,
        "file_name": item.file_name,
        "method": None if item.method is None else item.method.value,
        "size": item.size,
        "sha256": item.sha256,
        "status": item.state.value,
        "download_url": item.download_url,
        "file_id": item.file_id,
        "uploaded_at": iso_utc(item.uploaded_at),
        "expires_at": iso_utc(item.expires_at),
        "attempts": item.attempts,
        "last_error": None if item.last_error is None else hide_credentials(item.last_error),
        "downloaded_path": item.downloaded_path,
        "downloaded_at": iso_utc(item.downloaded_at),
        "checked_at": iso_utc(item.checked_at),
        "dead_at": iso_utc(item.dead_at),
    }


def _not_json(value: object) -> object:
    raise TypeError(f"{type(value).__name__} is not JSON")


def _line_encoder() -> Callable[[Mapping[str, object]], str]:
    """What json.dumps(record, ensure_ascii=False) writes, with json's C encoder made
    once rather than once a line: half the CPU of an export of a million rows."""
    make = getattr(json.encoder, "c_make_encoder", None)
    if make is None:
        return functools.partial(json.dumps, ensure_ascii=False)
    encode = make(
        None, _not_json, json.encoder.encode_basestring, None, ": ", ", ", False, False, True
    )
    return lambda record: "".join(encode(record, 0))


json_line = _line_encoder()


async def _write_jsonl(items: AsyncIterable[LedgerItem], out: TextIO) -> int:
    count = 0
    async for item in items:
        out.write(json_line(export_record(item)) + "\n")
        count += 1
    return count


async def _write_json(items: AsyncIterable[LedgerItem], out: TextIO) -> int:
    count = 0
    out.write("[")
    async for item in items:
        out.write(",\n" if count else "\n")
        out.write(json_line(export_record(item)))
        count += 1
    out.write("\n]\n" if count else "]\n")
    return count


async def _write_csv(items: AsyncIterable[LedgerItem], out: TextIO) -> int:
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(EXPORT_FIELDS)
    count = 0
    async for item in items:
        record = export_record(item)
        writer.writerow(["" if record[name] is None else record[name] for name in EXPORT_FIELDS])
        count += 1
    return count


def check_export_format(fmt: str) -> str:
    """`fmt` if it is one of EXPORT_FORMATS, else UsageError."""
    if fmt not in EXPORT_FORMATS:
        raise UsageError(f"unknown export format {fmt!r} (use {', '.join(EXPORT_FORMATS)})")
    return fmt


def export_format(fmt: str | None, output: Path | None) -> str:
    """The format an export is written in: `fmt` when given, else the one `output`'s
    extension names (EXPORT_EXTENSIONS), else jsonl. A `fmt` that another known
    extension contradicts (`--format csv --output x.json`) is a UsageError (pure)."""
    implied = None if output is None else EXPORT_EXTENSIONS.get(output.suffix.lower())
    if fmt is None:
        return implied or "jsonl"
    check_export_format(fmt)
    if implied is not None and implied != fmt:
        raise UsageError(
            f"--format {fmt} does not match --output {output} (a {implied} file's name): "
            "drop --format, or name the file for the format"
        )
    return fmt


def check_output_folder(output: Path) -> None:
    """An export goes into a folder that exists: none is created (UsageError)."""
    parent = output.parent
    if not parent.exists():
        raise UsageError(f"--output: the folder {parent} does not exist (export creates none)")
    if not parent.is_dir():
        raise UsageError(f"--output: {parent} is not a folder")


async def write_export(items: AsyncIterable[LedgerItem], fmt: str, out: TextIO) -> int:
    """Stream `items` to `out` as jsonl, csv or json; returns how many were written."""
    check_export_format(fmt)
    if fmt == "jsonl":
        return await _write_jsonl(items, out)
    if fmt == "json":
        return await _write_json(items, out)
    return await _write_csv(items, out)


# -- metrics --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MetricsSnapshot:
    """What the metrics file says after a run, refresh or download."""

    migration: str  # the manifest's name: the `migration` label (Prometheus owns `job`)
    command: str
    items_by_state: Mapping[str, int]
    bytes_by_state: Mapping[str, int]
    last_success_timestamp: float | None
    next_expiry_seconds: float | None
    failures: int
    duration_seconds: float
    finished_at: float
    exit_code: int
    shard: str | None = None  # `2/4` under --shard: each shard's file has its own series


def escape_label_value(value: str) -> str:
    """A label value as the Prometheus text format wants it."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _format_value(value: float) -> str:
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


def _labels(labels: Mapping[str, str]) -> str:
    if not labels:
        return ""
    inner = ",".join(f'{key}="{escape_label_value(val)}"' for key, val in labels.items())
    return "{" + inner + "}"


def _gauge(name: str, help_text: str, samples: list[tuple[Mapping[str, str], float]]) -> str:
    lines = [f"# HELP {name} {help_text}", f"# TYPE {name} gauge"]
    lines += [f"{name}{_labels(labels)} {_format_value(value)}" for labels, value in samples]
    return "\n".join(lines) + "\n"


def render_metrics(s: MetricsSnapshot, *, without: frozenset[str] = frozenset()) -> str:
    """The snapshot in the Prometheus text format; None gauges are left out.

    The job's name is the `migration` label: a scraped `job` label would be renamed
    `exported_job`, and a Pushgateway sets `job` itself. Every sample also carries
    the `command` that wrote it: the files of run and refresh in one textfile folder
    must not hold the same series (the node exporter fails on it), and a Pushgateway
    groups them apart. Labels named in `without` are left out (a Pushgateway adds its
    grouping labels to every sample). Under --shard every sample carries its `shard`
    too: the shards' files hold the same series otherwise."""
    labels = {"migration": s.migration, "command": s.command}
    if s.shard is not None:
        labels["shard"] = s.shard
    job = {k: v for k, v in labels.items() if k not in without}
    parts = [
        _gauge(
            "migrator_items",
            "Items in the ledger, by state.",
            [({**job, "state": state}, n) for state, n in sorted(s.items_by_state.items())],
        ),
        _gauge(
            "migrator_bytes",
            "Bytes of the items in the ledger, by state.",
            [({**job, "state": state}, n) for state, n in sorted(s.bytes_by_state.items())],
        ),
    ]
    if s.last_success_timestamp is not None:
        parts.append(
            _gauge(
                "migrator_last_success_timestamp_seconds",
                "When the latest successful upload happened (POSIX seconds).",
                [(job, s.last_success_timestamp)],
            )
        )
    if s.next_expiry_seconds is not None:
        parts.append(
            _gauge(
                "migrator_next_expiry_seconds",
                "Seconds until the next uploaded file expires on the service.",
                [(job, s.next_expiry_seconds)],
            )
        )
    parts += [
        _gauge(
            "migrator_failures", "Items failed or lost, in the whole ledger.", [(job, s.failures)]
        ),
        _gauge(
            "migrator_last_run_duration_seconds",
            "How long the last run took.",
            [(job, s.duration_seconds)],
        ),
        _gauge(
            "migrator_last_run_timestamp_seconds",
            "When the last run finished (POSIX seconds).",
            [(job, s.finished_at)],
        ),
        _gauge(
            "migrator_last_run_exit_code",
            "Exit status of the last run.",
            [(job, s.exit_code)],
        ),
    ]
    return "".join(parts)
