"""Identical content crosses the wire once; immutable URLs are not asked again.

Real files, the in-process emulator (whose request log says what it received) and
loopback origins; nothing of ours is mocked.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from conftest import ledger_rows, load, run_cli, web_server, write_file, write_manifest

from migrator import cli
from migrator.command import CommandSummary, Outcome
from migrator.emulator import Emulator
from migrator.model import Method
from migrator.resume import Decision
from migrator.runner import RunOptions, preview, run_manifest

pytestmark = pytest.mark.timeout(60)

KIB = 1024
SMALL = "16KiB"  # base64_max in these jobs: files above it are streamed, and deduplicated


async def run(path: Path, api_key: str, **options: Any) -> CommandSummary:
    opts = RunOptions(seed=1, **options)
    return await run_manifest(load(path), opts, environ={"KIE_API_KEY": api_key})


def bytes_received(emulator: Emulator, upload_path: str | None = None) -> int:
    """The bytes the emulator stored from bodies sent to it (not fetched by itself)."""
    return sum(
        request.size or 0
        for request in emulator.requests
        if request.endpoint in ("stream", "base64")
        and (upload_path is None or (request.upload_path or "").startswith(upload_path))
    )


async def export_jsonl(manifest: Path, out: Path) -> list[dict[str, Any]]:
    """`migrator export MANIFEST --format jsonl --output OUT`, read back."""
    args = ["export", str(manifest), "--format", "jsonl", "--output", str(out)]
    assert await asyncio.to_thread(cli.main, args) == 0
    text = await asyncio.to_thread(out.read_text, encoding="utf-8")
    return [json.loads(line) for line in text.splitlines()]


def endpoints(emulator: Emulator) -> dict[str, list[str]]:
    seen: dict[str, list[str]] = {}
    for request in emulator.requests:
        seen.setdefault(request.file_name or "", []).append(request.endpoint)
    return seen


async def fetch(url: str) -> bytes:
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        assert response.status == 200, url
        return await response.read()


def pairs_tree(folder: Path, pairs: int) -> dict[str, bytes]:
    """`pairs` large files under one/ and the same bytes again under two/, each pair
    its own size; returns every file's bytes by its path below `folder`."""
    files: dict[str, bytes] = {}
    for n in range(pairs):
        data = write_file(folder / "one" / f"{n}.bin", 64 * KIB + n * 1000, seed=n)
        (folder / "two").mkdir(exist_ok=True)
        (folder / "two" / f"{n}.bin").write_bytes(data)
        files[f"one/{n}.bin"] = files[f"two/{n}.bin"] = data
    return files


def twins(job: Path, size: int) -> bytes:
    """a.bin and b.bin in `job`, holding the same `size` bytes; returns them."""
    data = write_file(job / "a.bin", size)
    (job / "b.bin").write_bytes(data)
    return data


def bin_job(job: Path, emulator: Emulator, **settings: Any) -> Path:
    """A manifest uploading job/*.bin, files above 16 KiB streamed (and deduplicated)."""
    sources = [{"glob": "./*.bin"}]
    return write_manifest(job, emulator.base_url, sources, base64_max=SMALL, **settings)


# -- dedup -------------------------------------------------------------------------------------


async def test_half_duplicates_send_at_most_55_percent_of_the_bytes_a_run_without_dedup_sends(
    tmp_path: Path, emulator: Emulator, api_key: str
) -> None:
    received = {}
    for dedup in (True, False):
        folder = tmp_path / f"dedup-{dedup}"
        files = pairs_tree(folder, 4)
        sources = [{"glob": "./**/*.bin"}]
        manifest = write_manifest(
            folder,
            emulator.base_url,
            sources,
            upload_path=f"d{dedup}",
            base64_max=SMALL,
            dedup=dedup,
            concurrency=4,
        )
        summary = await run(manifest, api_key)
        assert summary.count(Outcome.UPLOADED) == 8
        received[dedup] = bytes_received(emulator, f"d{dedup}")
        lines = await export_jsonl(manifest, folder / "export.jsonl")
        assert len(lines) == 8
        for line in lines:
            data = files[str(Path(line["source"]).relative_to(folder))]
            assert await fetch(line["download_url"]) == data
            assert (line["size"], line["sha256"]) == (len(data), hashlib.sha256(data).hexdigest())
        copies = sum(line["method"] == "copy" for line in lines)
        assert copies == (4 if dedup else 0)
    assert received[True] <= 0.55 * received[False]


async def test_a_copied_item_records_the_method_copy_with_its_own_size_and_sha256(
    job: Path, emulator: Emulator, api_key: str
) -> None:
    data = twins(job, 40 * KIB)
    manifest = bin_job(job, emulator, concurrency=1)
    summary = await run(manifest, api_key)

    rows = await ledger_rows(load(manifest))
    assert (rows["a.bin"].method, rows["b.bin"].method) == (Method.STREAM, Method.COPY)
    assert rows["b.bin"].sha256 == hashlib.sha256(data).hexdigest()
    assert rows["b.bin"].size == len(data)
    assert rows["b.bin"].download_url != rows["a.bin"].download_url
    assert await fetch(rows["b.bin"].download_url or "") == data
    assert endpoints(emulator) == {"a.bin": ["stream"], "b.bin": ["url"]}
    assert any("1 files copied on the service" in note for note in summary.notes)


async def test_two_identical_files_in_flight_at_once_send_their_bytes_once(
    job: Path, emulator: Emulator, api_key: str
) -> None:
    data = twins(job, 200 * KIB)
    manifest = bin_job(job, emulator, concurrency=2)
    emulator.delay_stores(0.5, endpoint="stream")  # the first is in flight while the other looks
    await run(manifest, api_key)

    sent = sorted(e for name in ("a.bin", "b.bin") for e in endpoints(emulator)[name])
    assert sent == ["stream", "url"]  # whichever hashed first led; the other copied it
    assert bytes_received(emulator) == len(data)


async def test_a_file_identical_to_one_a_previous_run_uploaded_is_copied_from_its_link(
    job: Path, emulator: Emulator, api_key: str
) -> None:
    data = write_file(job / "a.bin", 40 * KIB)
    manifest = bin_job(job, emulator)
    await run(manifest, api_key)
    (job / "b.bin").write_bytes(data)

    summary = await run(manifest, api_key)

    assert (summary.count(Outcome.UPLOADED), summary.count(Outcome.SKIPPED)) == (1, 1)
    assert endpoints(emulator) == {"a.bin": ["stream"], "b.bin": ["url"]}
    rows = await ledger_rows(load(manifest))
    assert await fetch(rows["b.bin"].download_url or "") == data


async def test_a_copy_whose_link_died_falls_back_to_sending_the_bytes(
    job: Path, tmp_path: Path, api_key: str
) -> None:
    data = write_file(job / "a.bin", 40 * KIB)
    async with Emulator(tmp_path / "short-lived", api_key, lifetime=60) as emulator:
        manifest = bin_job(job, emulator)
        await run(manifest, api_key)
        emulator.advance_clock(120)  # a.bin's file is gone; its expiry says 72 h
        (job / "b.bin").write_bytes(data)

        summary = await run(manifest, api_key)

        assert summary.count(Outcome.UPLOADED) == 1
        rows = await ledger_rows(load(manifest))
        assert rows["b.bin"].method is Method.STREAM
        assert await fetch(rows["b.bin"].download_url or "") == data
        assert endpoints(emulator)["b.bin"] == ["url", "stream"]


async def test_with_dedup_off_identical_files_are_each_sent(
    job: Path, emulator: Emulator, api_key: str
) -> None:
    twins(job, 40 * KIB)
    manifest = bin_job(job, emulator, dedup=False)
    await run(manifest, api_key)
    assert endpoints(emulator) == {"a.bin": ["stream"], "b.bin": ["stream"]}


async def test_small_files_are_sent_as_they_are_even_when_identical(
    job: Path, emulator: Emulator, api_key: str
) -> None:
    data = write_file(job / "a.txt", 100)
    (job / "b.txt").write_bytes(data)
    manifest = write_manifest(job, emulator.base_url, [{"glob": "./*.txt"}], base64_max=SMALL)
    await run(manifest, api_key)
    assert endpoints(emulator) == {"a.txt": ["base64"], "b.txt": ["base64"]}


def hashed_events(log_file: Path) -> list[dict[str, Any]]:
    lines = log_file.read_text(encoding="utf-8").splitlines()
    return [event for event in map(json.loads, lines) if event["event"] == "dedup.hashed"]


async def test_a_tree_without_shared_sizes_hashes_nothing_before_sending(
    job: Path, emulator: Emulator, api_key: str
) -> None:
    for n in range(4):
        write_file(job / f"{n}.bin", 40 * KIB + n, seed=n)
    manifest = bin_job(job, emulator)
    finished = await run_cli("run", str(manifest), key=api_key)
    assert finished.code == 0, finished.stderr
    assert hashed_events(job / "ledger.log") == []
    assert [r.endpoint for r in emulator.requests] == ["stream"] * 4


async def test_only_files_whose_size_another_file_shares_are_hashed(
    job: Path, emulator: Emulator, api_key: str
) -> None:
    write_file(job / "a.bin", 40 * KIB, seed=1)
    write_file(job / "b.bin", 40 * KIB, seed=2)  # same size, other bytes: both are sent
    write_file(job / "c.bin", 41 * KIB, seed=3)
    manifest = bin_job(job, emulator)
    finished = await run_cli("run", str(manifest), key=api_key)
    assert finished.code == 0, finished.stderr
    hashed = sorted(Path(event["item"]).name for event in hashed_events(job / "ledger.log"))
    assert hashed == ["a.bin", "b.bin"]
    assert sorted(r.endpoint for r in emulator.requests) == ["stream"] * 3


# -- immutable URL sources ---------------------------------------------------------------------


class CountingOrigin:
    """Serves `files` and counts every request it is sent, HEAD included."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.requests: list[tuple[str, str]] = []

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.requests.append((request.method, request.path))
        data = self.files.get(request.path.lstrip("/"))
        if data is None:
            return web.Response(status=404)
        return web.Response(body=data, content_type="application/octet-stream")


async def test_a_plan_and_a_rerun_of_a_finished_job_of_immutable_urls_send_no_probe(
    job: Path, emulator: Emulator, api_key: str
) -> None:
    origin = CountingOrigin()
    async with web_server(origin.handle) as base:
        for n in range(5):
            origin.files[f"{n}.bin"] = bytes([n]) * (1000 + n)
        (job / "urls.txt").write_text("".join(f"{base}/{n}.bin\n" for n in range(5)))
        sources = [{"url_list": "urls.txt", "immutable": True}]
        manifest = write_manifest(job, emulator.base_url, sources)
        first = await run(manifest, api_key)
        assert first.count(Outcome.UPLOADED) == 5
        asked = len(origin.requests)

        planned = [decision async for _, decision, _ in preview(load(manifest))]
        again = await run(manifest, api_key)

        assert planned == [Decision.UNCHANGED] * 5
        assert again.count(Outcome.SKIPPED) == 5
        assert len(origin.requests) == asked


async def test_a_rerun_of_urls_that_may_change_asks_their_origin_again(
    job: Path, emulator: Emulator, api_key: str
) -> None:
    origin = CountingOrigin()
    async with web_server(origin.handle) as base:
        origin.files["a.bin"] = b"a" * 1000
        manifest = write_manifest(job, emulator.base_url, [{"url": f"{base}/a.bin"}])
        await run(manifest, api_key)
        asked = len(origin.requests)

        again = await run(manifest, api_key)

        assert again.count(Outcome.SKIPPED) == 1
        assert origin.requests[asked:] == [("HEAD", "/a.bin")]
