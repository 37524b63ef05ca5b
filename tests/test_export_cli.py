"""`migrator export --output FILE`: the format follows the file's name, and no folder is made."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest
from conftest import LEDGER_TARGET, item_update, load, run_cli, write_file, write_manifest

from migrator import export_lines
from migrator.emulator import Emulator
from migrator.errors import ExitCode
from migrator.export_lines import export_ledger
from migrator.ledger import Ledger
from migrator.model import ItemState, ItemUpdate, Method, SourceKind
from migrator.outputs import EXPORT_FORMATS, export_format, write_export
from migrator.runner import RunOptions, run_manifest

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
async def exported(job: Path, emulator: Emulator, api_key: str) -> Path:
    """Two files uploaded; returns the manifest's path."""
    write_file(job / "files" / "a.txt", 100)
    write_file(job / "files" / "b.txt", 200, seed=1)
    manifest = write_manifest(job, emulator.base_url, [{"glob": "./files/*"}])
    summary = await run_manifest(load(manifest), RunOptions(), environ={"KIE_API_KEY": api_key})
    assert summary.exit_code is ExitCode.OK
    return manifest


async def test_export_writes_the_format_its_output_file_is_named_for(
    exported: Path, tmp_path: Path
) -> None:
    for name in ("map.csv", "map.json", "map.jsonl", "map.ndjson"):
        result = await run_cli("export", str(exported), "--output", str(tmp_path / name))
        assert result.code == 0, result.stderr

    with (tmp_path / "map.csv").open(encoding="utf-8", newline="") as handle:
        assert [row["file_name"] for row in csv.DictReader(handle)] == ["a.txt", "b.txt"]
    assert [r["file_name"] for r in json.loads((tmp_path / "map.json").read_text())] == [
        "a.txt",
        "b.txt",
    ]
    for name in ("map.jsonl", "map.ndjson"):
        lines = (tmp_path / name).read_text().splitlines()
        assert [json.loads(line)["file_name"] for line in lines] == ["a.txt", "b.txt"]


async def test_a_format_its_output_file_contradicts_exits_2_with_one_line_and_writes_nothing(
    exported: Path, tmp_path: Path
) -> None:
    out = tmp_path / "map.json"

    result = await run_cli("export", str(exported), "--format", "csv", "--output", str(out))

    assert result.code == 2
    assert "--format csv does not match --output" in result.one_error_line()
    assert not out.exists()


async def test_a_format_given_for_a_name_without_a_known_extension_is_used(
    exported: Path, tmp_path: Path
) -> None:
    out = tmp_path / "mapping.txt"

    result = await run_cli("export", str(exported), "--format", "csv", "--output", str(out))

    assert result.code == 0, result.stderr
    assert out.read_text().startswith("source,upload_path,file_name,")


async def test_an_output_in_a_missing_folder_exits_2_and_creates_no_folder(
    exported: Path, tmp_path: Path
) -> None:
    out = tmp_path / "new" / "folder" / "map.jsonl"

    result = await run_cli("export", str(exported), "--output", str(out))

    assert result.code == 2
    assert f"the folder {out.parent} does not exist" in result.one_error_line()
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize(
    ("fmt", "name", "expected"),
    [
        (None, None, "jsonl"),
        (None, "x.CSV", "csv"),
        (None, "x.ndjson", "jsonl"),
        (None, "x.txt", "jsonl"),
        ("json", "x.txt", "json"),
        ("csv", "x.csv", "csv"),
    ],
)
def test_the_export_format_is_the_one_given_else_the_extensions_else_jsonl(
    fmt: str | None, name: str | None, expected: str
) -> None:
    assert export_format(fmt, None if name is None else Path(name)) == expected


# -- the lines SQLite writes ------------------------------------------------------------------

TARGET = "https://kie.example"
TRICKY = [  # (file_name, source, size, last_error, a time): each a reason SQL could go wrong
    ("plain.bin", "https://origin.example/plain.bin", 64, None, 1796045002.582),
    ("comma,name.bin", "https://origin.example/a,b", 0, 'HTTP 500: "busy", again', 1796045002.0),
    ('quote"back\\slash.bin', '/data/q"b\\s', None, "a\\b", 1796045002.9999995),
    ("ünïcode 名前.bin", "/data/ünïcode", 5, "ошибка", 0.0000005),
    ("tab\tnew\nline.bin", "/data/tab", 7, "line one\nline two\r\n", None),
    ("secret.bin", "https://user:pass@origin.example/s.bin", 9, "at https://u:p@h/x", 1.5),
    ("control\x01.bin", "/data/c", 3, "\x1f", 253402300800.0),
    ("nul\x00.bin", "/data/n\x00", 2**63 - 1, "\x00\r", 253402300798.9999999),
    ("quote'\u2028.bin", '/data/"quoted"', 0, "", 1e-7),
]


async def test_a_sqlite_ledger_exports_each_format_as_the_item_by_item_writer_does(
    tmp_path: Path,
) -> None:
    async with await Ledger.open(tmp_path / "ledger.sqlite") as ledger:
        for name, source, size, error, moment in TRICKY:
            ledger.put_item(
                ItemUpdate(
                    target=TARGET,
                    upload_path="mig/sub",
                    file_name=name,
                    state=ItemState.DONE if error is None else ItemState.FAILED,
                    source=source,
                    kind=SourceKind.URL if "://" in source else SourceKind.FILE,
                    size=size,
                    method=Method.URL,
                    download_url=f"https://kie.example/files/{name}",
                    file_id=f"id-{name}",
                    uploaded_at=moment,
                    expires_at=None if moment is None else moment + 3 * 86400,
                    last_error=error,
                    checked_at=moment,
                )
            )
        await ledger.flush()

    async with await Ledger.open(tmp_path / "ledger.sqlite", readonly=True) as ledger:
        for fmt in EXPORT_FORMATS:
            by_sql, by_item = io.StringIO(), io.StringIO()
            written = await export_ledger(ledger, TARGET, fmt, by_sql)
            await write_export(ledger.iter_items(TARGET), fmt, by_item)

            assert written == len(TRICKY)
            assert by_sql.getvalue() == by_item.getvalue(), fmt


# -- the exact bytes of an export, pinned -------------------------------------------------------


def hostile(name: str, **fields: object) -> ItemUpdate:
    """A done item uploaded by URL as batch/NAME from /data/NAME, `fields` set the rest."""
    values: dict[str, object] = {"state": ItemState.DONE, "method": Method.URL}
    return item_update(name, **{**values, **fields})  # type: ignore[arg-type]


HOSTILE = [  # each row hostile in a way or two
    hostile(
        "plain.bin",
        size=64,
        sha256="ab" * 32,
        download_url="https://kie.example/f/plain.bin",
        file_id="f1",
        uploaded_at=1796045002.582,
        expires_at=1796304202.582,
        checked_at=1796045002.0,
        attempts_added=1,
    ),
    hostile(
        'comma,"quote".bin',
        state=ItemState.FAILED,
        size=0,
        source='https://origin.example/a,b?y="2"',
        last_error='HTTP 500: "busy", again',
        attempts_added=3,
    ),
    hostile(
        "back\\slash/and\x7f.bin", last_error="a\\b/c</script>", uploaded_at=1796045002.9999995
    ),
    hostile(
        "ünïcode 名前 😀.bin",
        size=5,
        last_error="ошибка\u2028\u2029",
        uploaded_at=0.0000005,  # half a microsecond: rounded to even, no milliseconds
        expires_at=259200.0000005,  # rounded up: milliseconds .000
    ),
    hostile("tab\tnew\nline\r.bin", last_error="line one\nline two\r\n", uploaded_at=1.0078125),
    hostile(
        "secret.bin",
        source="https://user:pa%40ss@origin.example/s.bin",
        last_error="fetch of https://u:p@h/x failed",
        downloaded_path="/dl/secret.bin",
        downloaded_at=1796045010.25,
    ),
    hostile(
        "control\x01\x1f.bin",
        size=2**63 - 1,
        last_error="\x1f\x08\x0c",
        uploaded_at=253402300798.9999999,  # the last second datetime knows
        dead_at=253402300799.0,
    ),
    hostile(
        "nul\x00.bin", source="/data/n\x00", size=5 * 2**40, last_error="\x00\r\n", uploaded_at=-1.5
    ),
    hostile("far future.bin", uploaded_at=1e300, dead_at=253402300800.0),  # no calendar: null
    hostile("float size.bin", state=ItemState.PENDING, method=None, size=1.5, uploaded_at=0.0),
    hostile(" lead, trail .bin", source="/data/a@b", last_error="", uploaded_at=1e-7),
    hostile(
        "quote'single;semi.bin",
        size=-1,
        uploaded_at=1796045002.0005,
        downloaded_path='C:\\dl\\"x".bin',
    ),
]
PINNED_JSONL = (
    '{"source": "/data/plain.bin", "upload_path": "batch", "file_name": "plain.bin", '
    '"method": "url", "size": 64, '
    '"sha256": "abababababababababababababababababababababababababababababababab", '
    '"status": "done", "download_url": "https://kie.example/f/plain.bin", '
    '"file_id": "f1", "uploaded_at": "2026-11-30T13:23:22.582Z", '
    '"expires_at": "2026-12-03T13:23:22.582Z", "attempts": 1, "last_error": null, '
    '"downloaded_path": null, "downloaded_at": null, '
    '"checked_at": "2026-11-30T13:23:22Z", "dead_at": null}\n'
    '{"source": "https://origin.example/a,b?y=\\"2\\"", "upload_path": "batch", '
    '"file_name": "comma,\\"quote\\".bin", "method": "url", "size": 0, "sha256": null, '
    '"status": "failed", "download_url": null, "file_id": null, "uploaded_at": null, '
    '"expires_at": null, "attempts": 3, "last_error": "HTTP 500: \\"busy\\", again", '
    '"downloaded_path": null, "downloaded_at": null, "checked_at": null, '
    '"dead_at": null}\n'
    '{"source": "/data/back\\\\slash/and\x7f.bin", "upload_path": "batch", '
    '"file_name": "back\\\\slash/and\x7f.bin", "method": "url", "size": null, '
    '"sha256": null, "status": "done", "download_url": null, "file_id": null, '
    '"uploaded_at": "2026-11-30T13:23:23Z", "expires_at": null, "attempts": 0, '
    '"last_error": "a\\\\b/c</script>", "downloaded_path": null, '
    '"downloaded_at": null, "checked_at": null, "dead_at": null}\n'
    '{"source": "/data/ünïcode 名前 😀.bin", "upload_path": "batch", '
    '"file_name": "ünïcode 名前 😀.bin", "method": "url", "size": 5, "sha256": null, '
    '"status": "done", "download_url": null, "file_id": null, '
    '"uploaded_at": "1970-01-01T00:00:00Z", "expires_at": "1970-01-04T00:00:00.000Z", '
    '"attempts": 0, "last_error": "ошибка\u2028\u2029", "downloaded_path": null, '
    '"downloaded_at": null, "checked_at": null, "dead_at": null}\n'
    '{"source": "/data/tab\\tnew\\nline\\r.bin", "upload_path": "batch", '
    '"file_name": "tab\\tnew\\nline\\r.bin", "method": "url", "size": null, '
    '"sha256": null, "status": "done", "download_url": null, "file_id": null, '
    '"uploaded_at": "1970-01-01T00:00:01.007Z", "expires_at": null, "attempts": 0, '
    '"last_error": "line one\\nline two\\r\\n", "downloaded_path": null, '
    '"downloaded_at": null, "checked_at": null, "dead_at": null}\n'
    '{"source": "https://origin.example/s.bin", "upload_path": "batch", '
    '"file_name": "secret.bin", "method": "url", "size": null, "sha256": null, '
    '"status": "done", "download_url": null, "file_id": null, "uploaded_at": null, '
    '"expires_at": null, "attempts": 0, "last_error": "fetch of https://h/x failed", '
    '"downloaded_path": "/dl/secret.bin", "downloaded_at": "2026-11-30T13:23:30.250Z", '
    '"checked_at": null, "dead_at": null}\n'
    '{"source": "/data/control\\u0001\\u001f.bin", "upload_path": "batch", '
    '"file_name": "control\\u0001\\u001f.bin", "method": "url", '
    '"size": 9223372036854775807, "sha256": null, "status": "done", '
    '"download_url": null, "file_id": null, "uploaded_at": "9999-12-31T23:59:59Z", '
    '"expires_at": null, "attempts": 0, "last_error": "\\u001f\\b\\f", '
    '"downloaded_path": null, "downloaded_at": null, "checked_at": null, '
    '"dead_at": "9999-12-31T23:59:59Z"}\n'
    '{"source": "/data/n\\u0000", "upload_path": "batch", '
    '"file_name": "nul\\u0000.bin", "method": "url", "size": 5497558138880, '
    '"sha256": null, "status": "done", "download_url": null, "file_id": null, '
    '"uploaded_at": "1969-12-31T23:59:58.500Z", "expires_at": null, "attempts": 0, '
    '"last_error": "\\u0000\\r\\n", "downloaded_path": null, "downloaded_at": null, '
    '"checked_at": null, "dead_at": null}\n'
    '{"source": "/data/far future.bin", "upload_path": "batch", '
    '"file_name": "far future.bin", "method": "url", "size": null, "sha256": null, '
    '"status": "done", "download_url": null, "file_id": null, "uploaded_at": null, '
    '"expires_at": null, "attempts": 0, "last_error": null, "downloaded_path": null, '
    '"downloaded_at": null, "checked_at": null, "dead_at": null}\n'
    '{"source": "/data/float size.bin", "upload_path": "batch", '
    '"file_name": "float size.bin", "method": null, "size": 1.5, "sha256": null, '
    '"status": "pending", "download_url": null, "file_id": null, '
    '"uploaded_at": "1970-01-01T00:00:00Z", "expires_at": null, "attempts": 0, '
    '"last_error": null, "downloaded_path": null, "downloaded_at": null, '
    '"checked_at": null, "dead_at": null}\n'
    '{"source": "/data/a@b", "upload_path": "batch", "file_name": " lead, trail .bin", '
    '"method": "url", "size": null, "sha256": null, "status": "done", '
    '"download_url": null, "file_id": null, "uploaded_at": "1970-01-01T00:00:00Z", '
    '"expires_at": null, "attempts": 0, "last_error": "", "downloaded_path": null, '
    '"downloaded_at": null, "checked_at": null, "dead_at": null}\n'
    '{"source": "/data/quote\'single;semi.bin", "upload_path": "batch", '
    '"file_name": "quote\'single;semi.bin", "method": "url", "size": -1, '
    '"sha256": null, "status": "done", "download_url": null, "file_id": null, '
    '"uploaded_at": "2026-11-30T13:23:22.000Z", "expires_at": null, "attempts": 0, '
    '"last_error": null, "downloaded_path": "C:\\\\dl\\\\\\"x\\".bin", '
    '"downloaded_at": null, "checked_at": null, "dead_at": null}\n'
)
PINNED_CSV = (
    "source,upload_path,file_name,method,size,sha256,status,download_url,file_id,"
    "uploaded_at,expires_at,attempts,last_error,downloaded_path,downloaded_at,"
    "checked_at,dead_at\n"
    "/data/plain.bin,batch,plain.bin,url,64,"
    "abababababababababababababababababababababababababababababababab,done,"
    "https://kie.example/f/plain.bin,f1,2026-11-30T13:23:22.582Z,"
    "2026-12-03T13:23:22.582Z,1,,,,2026-11-30T13:23:22Z,\n"
    '"https://origin.example/a,b?y=""2""",batch,"comma,""quote"".bin",url,0,,failed,,,,'
    ',3,"HTTP 500: ""busy"", again",,,,\n'
    "/data/back\\slash/and\x7f.bin,batch,back\\slash/and\x7f.bin,url,,,done,,,"
    "2026-11-30T13:23:23Z,,0,a\\b/c</script>,,,,\n"
    "/data/ünïcode 名前 😀.bin,batch,ünïcode 名前 😀.bin,url,5,,done,,,1970-01-01T00:00:00Z,"
    "1970-01-04T00:00:00.000Z,0,ошибка\u2028\u2029,,,,\n"
    '"/data/tab\tnew\n'
    'line\r.bin",batch,"tab\tnew\n'
    'line\r.bin",url,,,done,,,1970-01-01T00:00:01.007Z,,0,"line one\n'
    "line two\r\n"
    '",,,,\n'
    "https://origin.example/s.bin,batch,secret.bin,url,,,done,,,,,0,"
    "fetch of https://h/x failed,/dl/secret.bin,2026-11-30T13:23:30.250Z,,\n"
    "/data/control\x01\x1f.bin,batch,control\x01\x1f.bin,url,9223372036854775807,,done,"
    ",,9999-12-31T23:59:59Z,,0,\x1f\x08\x0c,,,,9999-12-31T23:59:59Z\n"
    "/data/n\x00,batch,nul\x00.bin,url,5497558138880,,done,,,1969-12-31T23:59:58.500Z,,"
    '0,"\x00\r\n'
    '",,,,\n'
    "/data/far future.bin,batch,far future.bin,url,,,done,,,,,0,,,,,\n"
    "/data/float size.bin,batch,float size.bin,,1.5,,pending,,,1970-01-01T00:00:00Z,,0,"
    ",,,,\n"
    '/data/a@b,batch," lead, trail .bin",url,,,done,,,1970-01-01T00:00:00Z,,0,,,,,\n'
    "/data/quote'single;semi.bin,batch,quote'single;semi.bin,url,-1,,done,,,"
    '2026-11-30T13:23:22.000Z,,0,,"C:\\dl\\""x"".bin",,,\n'
)
PINNED = {
    "jsonl": PINNED_JSONL,
    "csv": PINNED_CSV,
    "json": "[\n" + ",\n".join(PINNED_JSONL.removesuffix("\n").split("\n")) + "\n]\n",
}


@pytest.fixture
async def hostile_job(tmp_path: Path) -> Path:
    """A manifest whose ledger holds the HOSTILE rows; returns the manifest's path."""
    manifest = write_manifest(tmp_path, LEDGER_TARGET, [{"glob": "./files/*"}])
    async with await Ledger.open(tmp_path / "ledger.sqlite") as ledger:
        for update in HOSTILE:
            ledger.put_item(update)
    return manifest


@pytest.mark.parametrize("fmt", EXPORT_FORMATS)
async def test_an_export_file_of_hostile_rows_holds_exactly_the_pinned_bytes(
    hostile_job: Path, tmp_path: Path, fmt: str
) -> None:
    out = tmp_path / f"map.{fmt}"

    result = await run_cli("export", str(hostile_job), "--output", str(out))

    assert result.code == 0, result.stderr
    assert out.read_bytes() == PINNED[fmt].encode()


@pytest.mark.parametrize("fmt", EXPORT_FORMATS)
async def test_an_export_to_stdout_of_hostile_rows_is_exactly_the_pinned_bytes(
    hostile_job: Path, fmt: str
) -> None:
    result = await run_cli("export", str(hostile_job), "--format", fmt)

    assert result.code == 0, result.stderr
    assert result.stdout == PINNED[fmt]


# -- a large export, in parts by worker processes -----------------------------------------------


@pytest.fixture
def in_three_parts(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any export with a scratch folder goes in three parts, of five ids at most, written by
    two workers, whatever this machine has."""
    monkeypatch.setattr(export_lines, "PARALLEL_ROWS", 1)
    monkeypatch.setattr(export_lines, "SPAN_ROWS", 5)
    monkeypatch.setattr(export_lines, "MAX_WORKERS", 2)
    monkeypatch.setattr(export_lines.os, "cpu_count", lambda: 4)


def parts_left(folder: Path) -> list[Path]:
    return list(folder.glob(".export-*"))


@pytest.mark.parametrize("fmt", EXPORT_FORMATS)
async def test_an_export_in_parts_holds_exactly_the_pinned_bytes_and_leaves_no_part(
    hostile_job: Path, tmp_path: Path, fmt: str, in_three_parts: None
) -> None:
    out = tmp_path / f"map.{fmt}"
    async with await Ledger.open(tmp_path / "ledger.sqlite", readonly=True) as ledger:
        assert len(await export_lines._id_spans(ledger)) == 3

        with out.open("w", encoding="utf-8", newline="") as handle:
            written = await export_ledger(ledger, LEDGER_TARGET, fmt, handle, scratch=tmp_path)

    assert written == len(HOSTILE)
    assert out.read_bytes() == PINNED[fmt].encode()
    assert not parts_left(tmp_path)


async def test_an_export_in_parts_to_a_text_buffer_is_the_same_text(
    hostile_job: Path, tmp_path: Path, in_three_parts: None
) -> None:
    async with await Ledger.open(tmp_path / "ledger.sqlite", readonly=True) as ledger:
        buffer = io.StringIO()
        await export_ledger(ledger, LEDGER_TARGET, "jsonl", buffer, scratch=tmp_path)

    assert buffer.getvalue() == PINNED["jsonl"]


async def test_an_export_in_parts_to_utf8_text_without_a_file_is_the_same_bytes(
    hostile_job: Path, tmp_path: Path, in_three_parts: None
) -> None:
    raw = io.BytesIO()
    async with await Ledger.open(tmp_path / "ledger.sqlite", readonly=True) as ledger:
        text = io.TextIOWrapper(raw, encoding="utf-8", newline="")
        await export_ledger(ledger, LEDGER_TARGET, "json", text, scratch=tmp_path)
        text.flush()

    assert raw.getvalue() == PINNED["json"].encode()


async def test_a_failed_export_worker_is_an_os_error_that_leaves_no_part(
    hostile_job: Path, tmp_path: Path, in_three_parts: None
) -> None:
    async with await Ledger.open(tmp_path / "ledger.sqlite", readonly=True) as ledger:
        (tmp_path / "ledger.sqlite").rename(tmp_path / "moved.sqlite")  # workers find none

        with pytest.raises(OSError, match=r"an export worker failed: .*unable to open"):
            await export_ledger(ledger, LEDGER_TARGET, "csv", io.StringIO(), scratch=tmp_path)

    assert not parts_left(tmp_path)
