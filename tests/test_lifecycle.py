"""`refresh` and `download` from Python: the ledger, the emulator and real files.

The emulator's clock can be moved; migrator's is real time. Where a test needs the
ledger itself to consider an upload expired, the manifest's `ttl` is 1 s against an
emulator answering in the endpoint pages' shape (no expiresAt, so the ledger keeps
uploaded_at + ttl), and the test waits until the ledger's expiry has passed.
"""

from __future__ import annotations

import asyncio
import io
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from conftest import Origin, files_below, ledger_rows, load, write_file
from conftest import write_manifest as shared_write_manifest

from migrator.command import CommandSummary
from migrator.download import DownloadOptions, destination_for, download, temp_path_for
from migrator.emulator import Emulator
from migrator.errors import ConfigError, ExitCode
from migrator.ledger import Ledger, RunRow
from migrator.model import HOUR, ItemState, ItemUpdate, Manifest, Method, SourceKind
from migrator.outputs import write_export
from migrator.refresh import RefreshOptions, refresh
from migrator.report import build_status
from migrator.runner import RunOptions, run_manifest

pytestmark = pytest.mark.timeout(60)

WIDE = RefreshOptions(within=73 * HOUR, seed=1)


# -- helpers ------------------------------------------------------------------------------


def write_manifest(
    folder: Path, base_url: str, sources: list[dict[str, Any]], **settings: Any
) -> Manifest:
    """conftest's manifest, loaded: these tests take a Manifest, and their items
    straddle small method limits (base64 up to 4 KiB, url up to 64 KiB)."""
    limits = {"base64_max": "4KiB", "url_max": "64KiB", **settings}
    return load(shared_write_manifest(folder, base_url, sources, name="life", **limits))


async def run(manifest: Manifest, api_key: str) -> None:
    summary = await run_manifest(manifest, RunOptions(seed=1), environ={"KIE_API_KEY": api_key})
    assert summary.exit_code is ExitCode.OK, summary.as_dict()


async def do_refresh(
    manifest: Manifest, api_key: str, options: RefreshOptions = WIDE
) -> CommandSummary:
    return await refresh(manifest, options, environ={"KIE_API_KEY": api_key})


async def fetch(url: str) -> tuple[int, bytes]:
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        return response.status, await response.read()


async def wait_until_the_ledger_sees_everything_expired(manifest: Manifest) -> None:
    latest = max(row.expires_at or 0.0 for row in (await ledger_rows(manifest)).values())
    await asyncio.sleep(max(0.0, latest - time.time()) + 0.05)
    assert all(
        row.expires_at is not None and row.expires_at < time.time()
        for row in (await ledger_rows(manifest)).values()
    )


@pytest.fixture
async def endpoint_emulator(tmp_path: Path, api_key: str) -> AsyncIterator[Emulator]:
    """An emulator answering without expiresAt: the ledger computes uploaded_at + ttl."""
    async with Emulator(tmp_path / "endpoint-emu", api_key, response_shape="endpoint") as emu:
        yield emu


# -- refresh: links about to expire --------------------------------------------------------


class Scenario:
    """A job of local files and one URL source, uploaded, then 70 h later on the service."""

    def __init__(self, manifest: Manifest, sources: dict[str, bytes], before: dict[str, Any]):
        self.manifest = manifest
        self.sources = sources
        self.before = before


@pytest.fixture
async def seventy_hours_later(
    job: Path, emulator: Emulator, origin: Origin, api_key: str
) -> Scenario:
    sources = {
        "small.txt": write_file(job / "small.txt", 1000),
        "big.bin": write_file(job / "big.bin", 20_000, seed=1),
        "gone-small.txt": write_file(job / "gone-small.txt", 1500, seed=2),
        "gone-big.bin": write_file(job / "gone-big.bin", 30_000, seed=3),
    }
    origin.files["remote.bin"] = sources["remote.bin"] = bytes(range(256)) * 20
    manifest = write_manifest(
        job,
        emulator.base_url,
        [
            *({"path": f"./{name}"} for name in sources if name != "remote.bin"),
            {"url": origin.url("remote.bin")},
        ],
    )
    await run(manifest, api_key)
    before = await ledger_rows(manifest)
    (job / "gone-small.txt").unlink()
    (job / "gone-big.bin").unlink()
    emulator.advance_clock(70 * HOUR)
    return Scenario(manifest, sources, before)


async def test_refresh_reuploads_every_item_expiring_within_the_window(
    seventy_hours_later: Scenario, emulator: Emulator, api_key: str
) -> None:
    uploads_before = len(emulator.requests)

    summary = await do_refresh(seventy_hours_later.manifest, api_key)

    assert summary.exit_code is ExitCode.OK
    assert summary.counts == {"refreshed": 5}
    refreshed = {r.file_name for r in emulator.requests[uploads_before:] if r.status == 200}
    assert refreshed == set(seventy_hours_later.sources)


async def test_refreshed_links_serve_the_original_bytes(
    seventy_hours_later: Scenario, api_key: str
) -> None:
    await do_refresh(seventy_hours_later.manifest, api_key)

    after = await ledger_rows(seventy_hours_later.manifest)
    for name, data in seventy_hours_later.sources.items():
        assert after[name].state is ItemState.DONE
        assert after[name].download_url != seventy_hours_later.before[name].download_url
        assert await fetch(after[name].download_url or "") == (200, data), name


async def test_refreshed_items_expire_later_than_before(
    seventy_hours_later: Scenario, api_key: str
) -> None:
    await do_refresh(seventy_hours_later.manifest, api_key)

    after = await ledger_rows(seventy_hours_later.manifest)
    for name, old in seventy_hours_later.before.items():
        assert old.expires_at is not None
        assert (after[name].expires_at or 0.0) > old.expires_at + 60 * HOUR, name


async def test_refresh_copies_items_whose_local_source_is_gone_from_their_old_link(
    seventy_hours_later: Scenario, emulator: Emulator, api_key: str
) -> None:
    uploads_before = len(emulator.requests)

    await do_refresh(seventy_hours_later.manifest, api_key)

    by_name = {r.file_name: r for r in emulator.requests[uploads_before:]}
    for name in ("gone-small.txt", "gone-big.bin", "remote.bin"):
        assert by_name[name].endpoint == "url", name
        assert by_name[name].file_url == seventy_hours_later.before[name].download_url


async def test_refresh_reads_unchanged_local_files_again(
    seventy_hours_later: Scenario, emulator: Emulator, api_key: str
) -> None:
    uploads_before = len(emulator.requests)

    await do_refresh(seventy_hours_later.manifest, api_key)

    by_name = {r.file_name: r for r in emulator.requests[uploads_before:]}
    assert by_name["small.txt"].endpoint == "base64"
    assert by_name["big.bin"].endpoint == "stream"


async def test_refresh_leaves_items_expiring_after_the_window_alone(
    seventy_hours_later: Scenario, emulator: Emulator, api_key: str
) -> None:
    uploads_before = len(emulator.requests)

    # 70 h later on the service's clock, every item expires in 2 h: not within 1 h.
    summary = await do_refresh(seventy_hours_later.manifest, api_key, RefreshOptions(within=HOUR))

    assert summary.exit_code is ExitCode.OK
    assert summary.counts == {}
    assert emulator.requests[uploads_before:] == []
    assert await ledger_rows(seventy_hours_later.manifest) == seventy_hours_later.before


async def test_refresh_does_not_upload_a_local_file_that_changed_since_its_upload(
    job: Path, emulator: Emulator, api_key: str
) -> None:
    original = write_file(job / "notes.txt", 1000)
    manifest = write_manifest(job, emulator.base_url, [{"path": "./notes.txt"}])
    await run(manifest, api_key)
    old = (await ledger_rows(manifest))["notes.txt"]
    write_file(job / "notes.txt", 1200, seed=9)  # edited after the upload
    emulator.advance_clock(70 * HOUR)
    uploads_before = len(emulator.requests)

    summary = await do_refresh(manifest, api_key)

    assert summary.counts == {"refreshed": 1}
    [request] = emulator.requests[uploads_before:]
    assert (request.endpoint, request.file_url) == ("url", old.download_url)
    new = (await ledger_rows(manifest))["notes.txt"]
    assert await fetch(new.download_url or "") == (200, original)
    assert (new.size, new.sha256) == (old.size, old.sha256)


# -- refresh: links already gone ------------------------------------------------------------


@pytest.fixture
async def expired_job(
    job: Path, endpoint_emulator: Emulator, origin: Origin, api_key: str
) -> Scenario:
    """Uploaded with ttl 1 s, then past expiry on both clocks; gone.txt's source deleted."""
    sources = {
        "gone.txt": write_file(job / "gone.txt", 800),
        "kept.txt": write_file(job / "kept.txt", 900, seed=4),
    }
    origin.files["remote.bin"] = sources["remote.bin"] = bytes(range(200)) * 10
    manifest = write_manifest(
        job,
        endpoint_emulator.base_url,
        [{"path": "./gone.txt"}, {"path": "./kept.txt"}, {"url": origin.url("remote.bin")}],
        ttl="1s",
        refresh_within="0.5s",
    )
    await run(manifest, api_key)
    before = await ledger_rows(manifest)
    (job / "gone.txt").unlink()
    endpoint_emulator.advance_clock(73 * HOUR)
    await wait_until_the_ledger_sees_everything_expired(manifest)
    for row in before.values():
        assert (await fetch(row.download_url or ""))[0] == 404
    return Scenario(manifest, sources, before)


async def test_refresh_marks_an_expired_item_without_a_source_lost_and_exits_1(
    expired_job: Scenario, api_key: str
) -> None:
    summary = await do_refresh(expired_job.manifest, api_key)

    assert summary.exit_code is ExitCode.ITEMS_FAILED
    assert summary.counts.get("lost") == 1
    lost = (await ledger_rows(expired_job.manifest))["gone.txt"]
    assert lost.state is ItemState.LOST
    assert lost.last_error
    assert lost.download_url == expired_job.before["gone.txt"].download_url


async def test_a_lost_item_does_not_keep_the_others_from_being_refreshed(
    expired_job: Scenario, api_key: str
) -> None:
    summary = await do_refresh(expired_job.manifest, api_key)

    assert summary.counts == {"lost": 1, "refreshed": 2}
    after = await ledger_rows(expired_job.manifest)
    for name in ("kept.txt", "remote.bin"):
        assert after[name].state is ItemState.DONE
        assert after[name].last_error is None
        assert await fetch(after[name].download_url or "") == (200, expired_job.sources[name])


async def test_refresh_takes_an_expired_url_item_again_from_its_origin_through_here(
    expired_job: Scenario, endpoint_emulator: Emulator, origin: Origin, api_key: str
) -> None:
    uploads_before, gets_before = len(endpoint_emulator.requests), len(origin.gets)

    await do_refresh(expired_job.manifest, api_key)

    [request] = [
        r for r in endpoint_emulator.requests[uploads_before:] if r.file_name == "remote.bin"
    ]
    assert (request.endpoint, request.status) == ("stream", 200)
    assert origin.gets[gets_before:] == ["remote.bin"]
    row = (await ledger_rows(expired_job.manifest))["remote.bin"]
    assert await fetch(row.download_url or "") == (200, expired_job.sources["remote.bin"])


async def test_refresh_marks_an_expired_url_item_lost_when_its_origin_is_gone(
    expired_job: Scenario, origin: Origin, api_key: str
) -> None:
    del origin.files["remote.bin"]

    summary = await do_refresh(expired_job.manifest, api_key)

    assert summary.exit_code is ExitCode.ITEMS_FAILED
    assert (await ledger_rows(expired_job.manifest))["remote.bin"].state is ItemState.LOST


async def test_refresh_never_uploads_an_origin_that_changed_and_reports_the_item_lost(
    expired_job: Scenario, endpoint_emulator: Emulator, origin: Origin, api_key: str
) -> None:
    origin.files["remote.bin"] = b"a newer version, and longer " * 100
    uploads_before = len(endpoint_emulator.requests)

    summary = await do_refresh(expired_job.manifest, api_key)

    assert summary.exit_code is ExitCode.ITEMS_FAILED
    row = (await ledger_rows(expired_job.manifest))["remote.bin"]
    assert row.state is ItemState.LOST
    assert row.last_error is not None and "changed" in row.last_error
    sent = [r for r in endpoint_emulator.requests[uploads_before:] if r.file_name == "remote.bin"]
    assert sent == []  # refused before a byte was sent


# -- download -----------------------------------------------------------------------------


@pytest.fixture
async def mixed_job(job: Path, emulator: Emulator, origin: Origin, api_key: str) -> Scenario:
    """Local files (base64, stream) and URL sources (url, stream-through), uploaded."""
    sources = {
        "mig/a.txt": write_file(job / "a.txt", 700),
        "mig/docs/deep/b.bin": write_file(job / "docs" / "deep" / "b.bin", 50_000, seed=5),
        "mig/remote/r1.bin": b"remote one " * 100,
        "mig/remote/r2.bin": bytes(range(256)) * 400,  # above url_max: streamed through
    }
    origin.files["r1.bin"] = sources["mig/remote/r1.bin"]
    origin.files["r2.bin"] = sources["mig/remote/r2.bin"]
    manifest = write_manifest(
        job,
        emulator.base_url,
        [
            {"path": "./a.txt"},
            {"glob": "./docs/**/*.bin", "upload_path": "docs"},
            {"url": origin.url("r1.bin"), "upload_path": "remote"},
            {"url": origin.url("r2.bin"), "upload_path": "remote"},
        ],
    )
    await run(manifest, api_key)
    return Scenario(manifest, sources, await ledger_rows(manifest))


async def test_download_writes_every_item_byte_exact_under_upload_path_and_file_name(
    mixed_job: Scenario, tmp_path: Path
) -> None:
    summary = await download(mixed_job.manifest, tmp_path / "dest")

    assert summary.exit_code is ExitCode.OK
    assert summary.counts == {"downloaded": 4}
    assert files_below(tmp_path / "dest") == mixed_job.sources


async def test_status_shows_how_many_items_were_downloaded_and_when(
    mixed_job: Scenario, tmp_path: Path
) -> None:
    started = time.time()

    await download(mixed_job.manifest, tmp_path / "dest")

    report = await build_status(mixed_job.manifest)
    assert report.downloaded == len(mixed_job.sources)
    assert report.last_download is not None and report.last_download >= started
    assert report.as_dict()["downloaded"]["items"] == len(mixed_job.sources)


async def test_download_records_the_downloaded_path_in_the_ledger_and_its_export(
    mixed_job: Scenario, tmp_path: Path
) -> None:
    started = time.time()

    await download(mixed_job.manifest, tmp_path / "dest")

    async with await Ledger.open(mixed_job.manifest.ledger, readonly=True) as ledger:
        out = io.StringIO()
        await write_export(ledger.iter_items(mixed_job.manifest.target.base_url), "jsonl", out)
    records = [json.loads(line) for line in out.getvalue().splitlines()]
    assert sorted(r["downloaded_path"] for r in records) == sorted(
        str(tmp_path / "dest" / name) for name in mixed_job.sources
    )
    assert all(r["downloaded_at"] for r in records)
    for row in (await ledger_rows(mixed_job.manifest)).values():
        assert row.downloaded_at is not None and row.downloaded_at >= started
        assert row.state is ItemState.DONE


async def test_a_second_download_skips_every_item_already_there(
    mixed_job: Scenario, tmp_path: Path
) -> None:
    dest = tmp_path / "dest"
    await download(mixed_job.manifest, dest)
    written = {name: (dest / name).stat().st_mtime_ns for name in mixed_job.sources}

    summary = await download(mixed_job.manifest, dest)

    assert summary.exit_code is ExitCode.OK
    assert summary.counts == {"skipped": 4}
    assert {name: (dest / name).stat().st_mtime_ns for name in mixed_job.sources} == written


async def test_a_second_download_leaves_the_recorded_download_time_alone(
    mixed_job: Scenario, tmp_path: Path
) -> None:
    await download(mixed_job.manifest, tmp_path / "dest")
    first = {
        name: row.downloaded_at for name, row in (await ledger_rows(mixed_job.manifest)).items()
    }

    await download(mixed_job.manifest, tmp_path / "dest")

    second = {
        name: row.downloaded_at for name, row in (await ledger_rows(mixed_job.manifest)).items()
    }
    assert second == first


async def test_download_replaces_a_truncated_file_at_the_destination(
    mixed_job: Scenario, tmp_path: Path
) -> None:
    dest = tmp_path / "dest"
    await download(mixed_job.manifest, dest)
    (dest / "mig/docs/deep/b.bin").write_bytes(b"half")

    summary = await download(mixed_job.manifest, dest)

    assert summary.counts == {"downloaded": 1, "skipped": 3}
    assert files_below(dest) == mixed_job.sources


async def test_download_removes_a_stale_part_file_left_by_a_killed_download(
    mixed_job: Scenario, tmp_path: Path
) -> None:
    dest = tmp_path / "dest"
    stale = temp_path_for(dest / "mig" / "a.txt", mixed_job.before["a.txt"].id)
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"half of a file from a download killed with SIGKILL")

    await download(mixed_job.manifest, dest)

    assert files_below(dest) == mixed_job.sources


async def test_an_item_whose_destination_cannot_be_made_fails_alone_and_the_rest_arrive(
    mixed_job: Scenario, tmp_path: Path
) -> None:
    dest = tmp_path / "dest"
    (dest / "mig").mkdir(parents=True)
    (dest / "mig" / "remote").write_text("a file where a folder must go")

    summary = await download(mixed_job.manifest, dest, DownloadOptions(concurrency=1))

    assert summary.exit_code is ExitCode.ITEMS_FAILED
    assert summary.counts == {"downloaded": 2, "failed": 2}
    assert set(files_below(dest / "mig")) - {"remote"} == {"a.txt", "docs/deep/b.bin"}
    async with await Ledger.open(mixed_job.manifest.ledger, readonly=True) as ledger:
        [last_run] = await ledger.runs(limit=1)
    assert (last_run.command, last_run.status) == ("download", "failed")


async def test_download_only_remote_takes_only_url_sources(
    mixed_job: Scenario, tmp_path: Path
) -> None:
    summary = await download(
        mixed_job.manifest, tmp_path / "dest", DownloadOptions(only_remote=True)
    )

    assert summary.counts == {"downloaded": 2}
    assert set(files_below(tmp_path / "dest")) == {"mig/remote/r1.bin", "mig/remote/r2.bin"}


async def test_download_within_takes_only_items_expiring_within_the_window(
    job: Path, emulator: Emulator, api_key: str, tmp_path: Path
) -> None:
    write_file(job / "files" / "early.txt", 100)
    manifest = write_manifest(job, emulator.base_url, [{"glob": "./files/*.txt"}])
    await run(manifest, api_key)  # early.txt expires in 72 h
    write_file(job / "files" / "late.txt", 100, seed=1)
    emulator.advance_clock(48 * HOUR)
    await run(manifest, api_key)  # on the service's clock: early.txt in 24 h, late.txt in 72 h

    summary = await download(manifest, tmp_path / "dest", DownloadOptions(within=30 * HOUR))

    assert summary.counts == {"downloaded": 1}
    assert set(files_below(tmp_path / "dest")) == {"mig/early.txt"}


async def test_download_skips_items_whose_upload_already_expired(
    job: Path, endpoint_emulator: Emulator, api_key: str, tmp_path: Path
) -> None:
    write_file(job / "old.txt", 100)
    manifest = write_manifest(
        job, endpoint_emulator.base_url, [{"path": "./old.txt"}], ttl="1s", refresh_within="0.5s"
    )
    await run(manifest, api_key)
    await wait_until_the_ledger_sees_everything_expired(manifest)

    summary = await download(manifest, tmp_path / "dest")

    assert summary.exit_code is ExitCode.OK
    assert summary.counts == {}
    assert not (tmp_path / "dest").exists()


# -- download: names that would leave the destination ----------------------------------------


@pytest.mark.parametrize(
    ("upload_path", "file_name"),
    [
        ("..", "x.txt"),
        ("a/../..", "x.txt"),
        ("a", ".."),
        ("a", "../x.txt"),
        ("/etc", "passwd"),
        ("a", "/etc/passwd"),
        ("a\\..\\..", "x.txt"),
        ("a", "x\\y.txt"),
        ("a", "x\0.txt"),
        ("a\0", "x.txt"),
        ("a", ""),
        ("a/./b", "x.txt"),
    ],
)
def test_destination_for_refuses_a_name_that_could_leave_the_root(
    upload_path: str, file_name: str, tmp_path: Path
) -> None:
    assert destination_for(tmp_path, upload_path, file_name) is None


def test_the_temporary_name_of_a_download_stays_a_short_hidden_sibling(tmp_path: Path) -> None:
    long_name = "é" * 127 + ".bin"  # 258 bytes: more than a file name may have
    temp = temp_path_for(tmp_path / "a" / long_name, 12345)

    assert temp.parent == tmp_path / "a"
    assert temp.name.startswith(".") and temp.name.endswith(".12345.part")
    assert len(temp.name.encode()) <= 255


@pytest.mark.parametrize(
    ("upload_path", "file_name", "relative"),
    [
        ("", "x.txt", "x.txt"),
        ("a", "x.txt", "a/x.txt"),
        ("a/b/c", "x.txt", "a/b/c/x.txt"),
        ("a", "..x..txt", "a/..x..txt"),
        ("a", ".hidden", "a/.hidden"),
        ("mig/日本", "données v2.txt", "mig/日本/données v2.txt"),
    ],
)
def test_destination_for_places_a_nested_name_below_the_root(
    upload_path: str, file_name: str, relative: str, tmp_path: Path
) -> None:
    assert destination_for(tmp_path, upload_path, file_name) == tmp_path / relative


async def test_download_refuses_a_ledger_row_whose_upload_path_climbs_out(
    mixed_job: Scenario, tmp_path: Path
) -> None:
    good = mixed_job.before["a.txt"]
    async with await Ledger.open(mixed_job.manifest.ledger) as ledger:
        ledger.put_item(
            ItemUpdate(
                target=good.target,
                upload_path="mig/../../..",
                file_name="escaped.txt",
                source="/nowhere/escaped.txt",
                kind=SourceKind.FILE,
                state=ItemState.DONE,
                size=good.size,
                method=Method.BASE64,
                download_url=good.download_url,
                uploaded_at=good.uploaded_at,
                expires_at=good.expires_at,
            )
        )
    dest = tmp_path / "deep" / "er" / "dest"  # the row points at tmp_path / "deep"

    summary = await download(mixed_job.manifest, dest)

    assert summary.exit_code is ExitCode.ITEMS_FAILED
    assert summary.counts == {"downloaded": 4, "failed": 1}
    assert files_below(tmp_path / "deep") == {
        f"er/dest/{name}": data for name, data in mixed_job.sources.items()
    }


async def test_refresh_without_a_key_stops_before_it_writes_anything(
    seventy_hours_later: Scenario,
) -> None:
    manifest = seventy_hours_later.manifest
    runs_before = await run_rows(manifest)

    with pytest.raises(ConfigError, match="KIE_API_KEY"):
        await refresh(manifest, WIDE, environ={})

    assert await run_rows(manifest) == runs_before
    assert await ledger_rows(manifest) == seventy_hours_later.before


async def run_rows(manifest: Manifest) -> list[RunRow]:
    async with await Ledger.open(manifest.ledger, readonly=True) as ledger:
        return await ledger.runs(limit=100)
