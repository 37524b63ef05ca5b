"""`migrator export --output FILE`: the format follows the file's name, and no folder is made."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest
from conftest import load, run_cli, write_file, write_manifest

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
