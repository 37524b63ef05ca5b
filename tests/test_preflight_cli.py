"""Outputs are checked before the first upload, through the real CLI: a metrics file or
an `outputs:` path that cannot be written stops the run before it sends anything (one
line, exit 2), and the summary line is printed all the same."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import run_cli, write_file, write_manifest

from migrator.command import Observer
from migrator.emulator import Emulator
from migrator.errors import ExitCode
from migrator.manifest import load_manifest
from migrator.runner import RunOptions, run_manifest

pytestmark = pytest.mark.timeout(90)

USAGE = 2
EMPTY_SUMMARY = "run: 0 uploaded, 0 skipped, 0 failed, 0 interrupted"


def with_outputs(manifest: Path, **outputs: str) -> Path:
    document: dict[str, Any] = yaml.safe_load(manifest.read_text(encoding="utf-8"))
    document["outputs"] = outputs
    manifest.write_text(yaml.safe_dump(document), encoding="utf-8")
    return manifest


@pytest.fixture
def manifest(job: Path, emulator: Emulator) -> Path:
    write_file(job / "a.txt", 100)
    (job / "a-file").write_text("in the way\n", encoding="utf-8")
    return write_manifest(job, emulator.base_url, [{"path": "a.txt"}])


async def test_an_unwritable_metrics_file_stops_the_run_before_anything_is_sent(
    manifest: Path, emulator: Emulator, api_key: str
) -> None:
    metrics = manifest.parent / "a-file" / "migrator.prom"

    result = await run_cli(
        "run", str(manifest), "--no-progress", "--metrics-file", str(metrics), key=api_key
    )

    assert result.code == USAGE, result.stderr
    assert result.one_error_line() == (
        f"migrator: cannot write {metrics}: {manifest.parent / 'a-file'} is not a folder"
    )
    assert EMPTY_SUMMARY in result.stdout
    assert emulator.requests == []


@pytest.mark.parametrize("key", ["jsonl", "csv", "json", "metrics"])
async def test_an_unwritable_manifest_output_stops_the_run_before_anything_is_sent(
    manifest: Path, emulator: Emulator, api_key: str, key: str
) -> None:
    with_outputs(manifest, **{key: "a-file/out"})

    result = await run_cli("run", str(manifest), "--no-progress", key=api_key)

    assert result.code == USAGE, result.stderr
    assert "cannot write " in result.one_error_line()
    assert EMPTY_SUMMARY in result.stdout
    assert emulator.requests == []
    assert not (manifest.parent / "ledger.sqlite").exists()


async def test_an_output_that_is_a_folder_stops_the_run_before_anything_is_sent(
    manifest: Path, emulator: Emulator, api_key: str
) -> None:
    (manifest.parent / "exports").mkdir()
    with_outputs(manifest, jsonl="exports")

    result = await run_cli("run", str(manifest), "--no-progress", key=api_key)

    assert result.code == USAGE, result.stderr
    assert result.one_error_line().endswith("exports: it is a folder")
    assert emulator.requests == []


async def test_an_unwritable_log_file_stops_the_run_before_anything_is_sent(
    manifest: Path, emulator: Emulator, api_key: str
) -> None:
    log = manifest.parent / "a-file" / "run.log"

    result = await run_cli(
        "run", str(manifest), "--no-progress", "--log-file", str(log), key=api_key
    )

    assert result.code == USAGE, result.stderr
    assert "cannot write the log file" in result.one_error_line()
    assert EMPTY_SUMMARY in result.stdout
    assert emulator.requests == []


async def test_outputs_in_folders_yet_to_be_made_pass_the_check(
    manifest: Path, api_key: str
) -> None:
    with_outputs(manifest, jsonl="exports/new/map.jsonl")

    result = await run_cli("run", str(manifest), "--no-progress", key=api_key)

    assert result.code == 0, result.stderr
    assert (manifest.parent / "exports" / "new" / "map.jsonl").is_file()


class _BlockOutputOnceStarted(Observer):
    """Puts a folder where the export goes once the checks have passed: the write at
    the end fails as a disk filled during the run would make it fail."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def on_totals(self, items: int, local_bytes: int) -> None:
        self.path.mkdir()


async def test_an_output_failing_after_the_uploads_still_gives_the_summary(
    manifest: Path, emulator: Emulator, api_key: str
) -> None:
    with_outputs(manifest, jsonl="map.jsonl")
    loaded = load_manifest(manifest, environ={"KIE_API_KEY": api_key})
    blocker = _BlockOutputOnceStarted(manifest.parent / "map.jsonl")

    summary = await run_manifest(loaded, RunOptions(), blocker, environ={"KIE_API_KEY": api_key})

    assert summary.line().startswith("run: 1 uploaded, 0 skipped, 0 failed")
    assert summary.exit_code == ExitCode.USAGE
    assert summary.message is not None and "map.jsonl" in summary.message
    assert len(emulator.requests) == 1
