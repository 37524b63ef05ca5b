"""What the ledger tells others: the manifest's `outputs:` after every command, and `status`."""

from __future__ import annotations

import asyncio
import csv
import json
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import closed_port, ledger_rows, load, run_cli
from conftest import write_manifest as shared_write_manifest
from prometheus_client.parser import text_string_to_metric_families

from migrator.download import DownloadOptions, download
from migrator.emulator import Emulator
from migrator.errors import ExitCode
from migrator.model import HOUR, Manifest
from migrator.refresh import RefreshOptions, refresh
from migrator.runner import RunOptions, run_manifest
from migrator.units import iso_utc

pytestmark = pytest.mark.timeout(60)

ITEMS = 30


def write_manifest(
    folder: Path, base_url: str, outputs: dict[str, str] | None = None, **settings: Any
) -> Manifest:
    """conftest's manifest of ./files/*, loaded, with an `outputs:` section added: the
    shared helper writes none, and these tests read what the outputs hold."""
    path = shared_write_manifest(
        folder, base_url, [{"glob": "./files/*"}], name="reported", upload_path="rep", **settings
    )
    if outputs is not None:
        document = yaml.safe_load(path.read_text(encoding="utf-8"))
        path.write_text(yaml.safe_dump({**document, "outputs": outputs}), encoding="utf-8")
    return load(path)


def write_files(folder: Path, names: list[str]) -> None:
    (folder / "files").mkdir(exist_ok=True)
    for index, name in enumerate(names):
        (folder / "files" / name).write_bytes(bytes([index % 256]) * (100 + index))


async def run(manifest: Manifest, api_key: str) -> ExitCode:
    summary = await run_manifest(manifest, RunOptions(seed=1), environ={"KIE_API_KEY": api_key})
    return summary.exit_code


@dataclass(frozen=True, slots=True)
class Outputs:
    jsonl: list[dict[str, Any]]
    csv: list[dict[str, str]]
    json: list[dict[str, Any]]
    metrics: dict[tuple[str, tuple[tuple[str, str], ...]], float]


def read_outputs(folder: Path) -> Outputs:
    """Every output file, parsed strictly (a half-written file raises)."""
    out = folder / "out"
    with (out / "map.csv").open(encoding="utf-8", newline="") as handle:
        csv_rows = list(csv.DictReader(handle))
    metrics: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families((out / "migrator.prom").read_text()):
        for sample in family.samples:
            metrics[sample.name, tuple(sorted(sample.labels.items()))] = sample.value
    return Outputs(
        jsonl=[json.loads(line) for line in (out / "map.jsonl").read_text().splitlines()],
        csv=csv_rows,
        json=json.loads((out / "map.json").read_text()),
        metrics=metrics,
    )


def items_in_state(outputs: Outputs, state: str) -> float:
    """The one migrator_items sample of `state` (labelled with the last command)."""
    [value] = [
        value
        for (name, labels), value in outputs.metrics.items()
        if name == "migrator_items" and {("migration", "reported"), ("state", state)} <= set(labels)
    ]
    return value


@pytest.fixture
def job(tmp_path: Path) -> Path:
    folder = tmp_path / "job"
    folder.mkdir()
    write_files(folder, [f"f{i:02d}.bin" for i in range(ITEMS)])
    return folder


@pytest.fixture
def with_outputs(job: Path, emulator: Emulator) -> Manifest:
    outputs = {
        "jsonl": "out/map.jsonl",
        "csv": "out/map.csv",
        "json": "out/map.json",
        "metrics": "out/migrator.prom",
    }
    return write_manifest(job, emulator.base_url, outputs=outputs)


# -- outputs ------------------------------------------------------------------------------


def assert_one_record_per_item(outputs: Outputs, links: set[str]) -> None:
    assert {r["download_url"] for r in outputs.jsonl} == links
    assert {r["download_url"] for r in outputs.csv} == links
    assert {r["download_url"] for r in outputs.json} == links
    assert len(outputs.jsonl) == len(outputs.csv) == len(outputs.json) == ITEMS
    assert items_in_state(outputs, "done") == ITEMS


async def test_a_run_writes_every_output_with_one_record_per_item(
    with_outputs: Manifest, job: Path, api_key: str
) -> None:
    assert await run(with_outputs, api_key) is ExitCode.OK

    links = {row.download_url or "" for row in (await ledger_rows(with_outputs)).values()}
    assert_one_record_per_item(read_outputs(job), links)


async def test_a_refresh_rewrites_the_outputs_with_the_new_links(
    with_outputs: Manifest, job: Path, emulator: Emulator, api_key: str
) -> None:
    await run(with_outputs, api_key)
    old_links = {row.download_url for row in (await ledger_rows(with_outputs)).values()}
    emulator.advance_clock(70 * HOUR)

    summary = await refresh(
        with_outputs, RefreshOptions(within=73 * HOUR), environ={"KIE_API_KEY": api_key}
    )

    assert summary.counts == {"refreshed": ITEMS}
    links = {row.download_url or "" for row in (await ledger_rows(with_outputs)).values()}
    assert links.isdisjoint(old_links)
    outputs = read_outputs(job)
    assert_one_record_per_item(outputs, links)
    command = outputs.metrics[
        "migrator_last_run_exit_code", (("command", "refresh"), ("migration", "reported"))
    ]
    assert command == 0


async def test_a_download_rewrites_the_outputs_with_the_downloaded_paths(
    with_outputs: Manifest, job: Path, tmp_path: Path, api_key: str
) -> None:
    await run(with_outputs, api_key)

    await download(with_outputs, tmp_path / "dest")

    outputs = read_outputs(job)
    assert_one_record_per_item(
        outputs, {row.download_url or "" for row in (await ledger_rows(with_outputs)).values()}
    )
    expected = {str(tmp_path / "dest" / "rep" / f"f{i:02d}.bin") for i in range(ITEMS)}
    assert {r["downloaded_path"] for r in outputs.jsonl} == expected
    assert {r["downloaded_path"] for r in outputs.csv} == expected


async def test_the_metrics_file_option_writes_a_second_metrics_file(
    with_outputs: Manifest, tmp_path: Path, api_key: str
) -> None:
    await run(with_outputs, api_key)
    extra = tmp_path / "textfile" / "extra.prom"

    await download(with_outputs, tmp_path / "dest", DownloadOptions(metrics_file=extra))

    families = {f.name: f for f in text_string_to_metric_families(extra.read_text())}
    done = [s for s in families["migrator_items"].samples if s.labels["state"] == "done"]
    assert [s.value for s in done] == [ITEMS]
    [exit_code] = families["migrator_last_run_exit_code"].samples
    assert exit_code.labels["command"] == "download"


async def test_outputs_are_replaced_whole_and_leave_no_temporary_file(
    with_outputs: Manifest, job: Path, api_key: str
) -> None:
    await run(with_outputs, api_key)
    jsonl = job / "out" / "map.jsonl"
    stop = threading.Event()
    reads: list[int] = []
    broken: list[str] = []

    def reader() -> None:
        for _ in range(100_000):
            if stop.is_set():
                return
            text = jsonl.read_text()
            try:
                reads.append(len([json.loads(line) for line in text.splitlines()]))
            except ValueError:
                broken.append(text)

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for _ in range(6):  # each run skips every item and rewrites every output
            assert await run(with_outputs, api_key) is ExitCode.OK
    finally:
        stop.set()
        await asyncio.to_thread(thread.join, 10)

    assert broken == []
    assert reads and set(reads) == {ITEMS}
    assert sorted(p.name for p in (job / "out").iterdir()) == [
        "map.csv",
        "map.json",
        "map.jsonl",
        "migrator.prom",
    ]


# -- status -------------------------------------------------------------------------------


async def status(manifest: Manifest, *args: str) -> tuple[int, str]:
    result = await run_cli("status", str(manifest.path), *args, env={"COLUMNS": "120"})
    assert result.stderr == "", result.stderr
    return result.code, result.stdout


@pytest.fixture
async def spread(tmp_path: Path, api_key: str) -> Manifest:
    """Done items expiring in ~5 h, ~10 h, ~20 h, ~60 h and ~100 h, and one failed item.

    One emulator (same port, same data) is started again with another ttl for each
    item, so each upload states another expiresAt; the clocks are not moved.
    """
    folder = tmp_path / "spread"
    (folder / "files").mkdir(parents=True)
    port = closed_port()
    manifest: Manifest | None = None
    for name, ttl in (("h05", 5), ("h10", 10), ("h20", 20), ("h60", 60), ("h100", 100)):
        async with Emulator(tmp_path / "emu", api_key, port=port, ttl=ttl * HOUR) as emulator:
            manifest = write_manifest(folder, emulator.base_url, ttl="200h", refresh_within="1h")
            (folder / "files" / f"{name}.txt").write_bytes(name.encode() * 10)
            assert await run(manifest, api_key) is ExitCode.OK
            if name == "h100":
                write_files(folder, ["bad.txt"])
                emulator.inject_faults(400, 1, endpoint="base64")
                assert await run(manifest, api_key) is ExitCode.ITEMS_FAILED
    assert manifest is not None
    return manifest


async def test_status_json_counts_items_by_state(spread: Manifest) -> None:
    code, out = await status(spread, "--format", "json")

    report = json.loads(out)
    assert code == 0
    assert report["items"] == 6
    assert report["by_state"]["done"] == {"items": 5, "bytes": 5 * 30 + 10}
    assert report["by_state"]["failed"]["items"] == 1
    assert report["by_state"]["lost"]["items"] == 0
    assert [f["file_name"] for f in report["failures"]] == ["bad.txt"]


async def test_status_json_tells_the_next_expiry_and_the_expiry_buckets(spread: Manifest) -> None:
    by_name = await ledger_rows(spread)

    _, out = await status(spread, "--format", "json")

    report = json.loads(out)
    assert report["next_expiry"] == iso_utc(by_name["h05.txt"].expires_at)
    assert report["expiring_within"] == {"6h": 1, "12h": 2, "24h": 3, "72h": 4}


async def test_status_table_on_a_pipe_shows_the_expiry_bars(spread: Manifest) -> None:
    code, out = await status(spread)

    assert code == 0
    bars = [line.strip() for line in out.splitlines() if re.match(r"\s*next \d+h ", line)]
    assert len(bars) == 4
    for bar, (label, count) in zip(
        bars, [("6h", 1), ("12h", 2), ("24h", 3), ("72h", 4)], strict=True
    ):
        assert re.fullmatch(rf"next {label}\s+[#.]{{30}} {count}", bar), bar
    assert bars[-1] == "next 72h  " + "#" * 30 + " 4"
    assert "\x1b[" not in out
    assert "next expiry: " in out
