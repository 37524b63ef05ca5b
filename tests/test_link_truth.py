"""Link truth: what the ledger says of a link is what the link does.

`verify` asks the links; a 404 from `download`, or a copy the service could not
make, is evidence too; `refresh` takes the bytes from every copy we know of; and
expiry is judged on the service's clock, which its answers tell.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from conftest import (
    Origin,
    ledger_rows,
    load,
    run_cli,
    web_server,
    write_file,
    write_manifest,
)

from migrator.clock import OFFSET_FACT, service_time
from migrator.command import Outcome
from migrator.download import download
from migrator.emulator import Emulator
from migrator.errors import ExitCode
from migrator.ledger import Ledger
from migrator.manifest import load_manifest
from migrator.model import HOUR, ItemState, ItemUpdate, LedgerItem, Manifest, Method, SourceKind
from migrator.refresh import RefreshOptions, refresh
from migrator.runner import RunOptions, run_manifest
from migrator.verify import Sample, VerifyOptions, verify

pytestmark = pytest.mark.timeout(60)


def key_env(api_key: str) -> dict[str, str]:
    return {"KIE_API_KEY": api_key}


async def upload(manifest: Manifest, api_key: str) -> None:
    summary = await run_manifest(manifest, RunOptions(seed=1), environ=key_env(api_key))
    assert summary.exit_code is ExitCode.OK, summary.as_dict()


async def fetch(url: str) -> tuple[int, bytes]:
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        return response.status, await response.read()


async def assert_no_done_item_has_a_dead_link(manifest: Manifest) -> None:
    for row in (await ledger_rows(manifest)).values():
        if row.state is ItemState.DONE:
            status, _ = await fetch(row.download_url or "")
            assert status == 200, f"{row.file_name} is done with a dead link"


# -- the whole ladder, against a service whose clock ran ahead ------------------------------------


@dataclass(frozen=True, slots=True)
class Ladder:
    manifest: Manifest
    sources: dict[str, bytes]  # file name -> the bytes that were uploaded


@pytest.fixture
async def service_deleted_everything(
    job: Path, emulator: Emulator, origin: Origin, api_key: str, tmp_path: Path
) -> Ladder:
    """Local files (kept, deleted after a download, deleted with a damaged or no download)
    and URL items (origin alive, origin gone); then the service's clock passes every
    expiry while ours does not."""
    sources = {name: write_file(job / name, 700 + i, seed=i) for i, name in enumerate(LOCAL)}
    sources["big.bin"] = write_file(job / "big.bin", 40_000, seed=9)
    for name in REMOTE:
        origin.files[name] = sources[name] = f"remote {name} ".encode() * 50
    manifest = load(
        write_manifest(
            job,
            emulator.base_url,
            [
                *({"path": f"./{name}"} for name in [*LOCAL, "big.bin"]),
                *({"url": origin.url(name)} for name in REMOTE),
            ],
            base64_max="4KiB",
        )
    )
    await upload(manifest, api_key)
    dest = tmp_path / "home"
    assert (await download(manifest, dest)).exit_code is ExitCode.OK
    for name in ("copied.txt", "damaged.txt", "nowhere.txt"):
        (job / name).unlink()
    (dest / "mig" / "damaged.txt").write_bytes(b"not what was uploaded")
    (dest / "mig" / "nowhere.txt").unlink()
    (dest / "mig" / "origin-gone.bin").unlink()
    del origin.files["origin-gone.bin"]
    emulator.advance_clock(80 * HOUR)
    return Ladder(manifest, sources)


LOCAL = ("kept.txt", "copied.txt", "damaged.txt", "nowhere.txt")
REMOTE = ("origin-alive.bin", "origin-gone.bin")


async def test_refresh_brings_back_every_item_that_has_a_copy_somewhere_and_no_other(
    service_deleted_everything: Ladder, api_key: str
) -> None:
    ladder = service_deleted_everything

    summary = await refresh(ladder.manifest, RefreshOptions(seed=1), environ=key_env(api_key))

    rows = await ledger_rows(ladder.manifest)
    states = {name: row.state for name, row in rows.items()}
    assert states == {
        "kept.txt": ItemState.DONE,  # the local file
        "big.bin": ItemState.DONE,
        "copied.txt": ItemState.DONE,  # the file download brought home
        "origin-alive.bin": ItemState.DONE,  # the origin, checked
        "damaged.txt": ItemState.LOST,
        "nowhere.txt": ItemState.LOST,
        "origin-gone.bin": ItemState.LOST,
    }
    assert summary.counts == {Outcome.REFRESHED: 4, Outcome.LOST: 3}
    for name, row in rows.items():
        if row.state is ItemState.DONE:
            assert await fetch(row.download_url or "") == (200, ladder.sources[name])


async def test_refresh_never_asks_the_service_to_copy_links_its_clock_has_expired(
    service_deleted_everything: Ladder, emulator: Emulator, api_key: str
) -> None:
    sent = len(emulator.requests)

    await refresh(service_deleted_everything.manifest, environ=key_env(api_key))

    assert [r.endpoint for r in emulator.requests[sent:] if r.endpoint == "url"] == []
    await assert_no_done_item_has_a_dead_link(service_deleted_everything.manifest)


async def test_the_service_clock_is_measured_kept_and_shown(
    service_deleted_everything: Ladder, api_key: str
) -> None:
    await refresh(service_deleted_everything.manifest, environ=key_env(api_key))

    done = await run_cli("status", str(service_deleted_everything.manifest.path))
    report = json.loads(
        (
            await run_cli(
                "status", str(service_deleted_everything.manifest.path), "--format", "json"
            )
        ).stdout
    )
    assert 80 * HOUR - 5 < report["service_clock_offset"] < 80 * HOUR + 5
    assert "service clock: 3d 8h ahead of ours" in done.stdout


async def test_a_clock_far_ahead_is_a_warning_once_then_quiet(
    service_deleted_everything: Ladder, api_key: str
) -> None:
    path = str(service_deleted_everything.manifest.path)

    first = await run_cli("verify", path, key=api_key)
    second = await run_cli("verify", path, key=api_key)

    assert "service.clock" in first.stderr and "level=warning" in first.stderr
    assert "service.clock" not in second.stderr


# -- verify ---------------------------------------------------------------------------------------


@pytest.fixture
async def short_lived(job: Path, api_key: str, tmp_path: Path) -> AsyncIterator[Emulator]:
    """A service that states 72 h but deletes files after 24 h."""
    async with Emulator(tmp_path / "short", api_key, lifetime=24 * HOUR) as emulator:
        for i in range(3):
            write_file(job / "files" / f"f{i}.txt", 300, seed=i)
        yield emulator


async def test_verify_finds_every_link_dead_past_the_real_lifetime_and_refresh_restores_them(
    job: Path, short_lived: Emulator, api_key: str
) -> None:
    manifest = load(write_manifest(job, short_lived.base_url, [{"glob": "./files/*.txt"}]))
    await upload(manifest, api_key)
    short_lived.advance_clock(25 * HOUR)

    checked = await verify(manifest)
    restored = await refresh(manifest, environ=key_env(api_key))

    assert checked.exit_code is ExitCode.ITEMS_FAILED
    assert checked.counts == {Outcome.DEAD: 3}
    assert restored.counts == {Outcome.REFRESHED: 3}
    await assert_no_done_item_has_a_dead_link(manifest)


async def test_verify_says_by_how_much_refresh_within_is_too_late(
    job: Path, short_lived: Emulator, api_key: str
) -> None:
    manifest = load(write_manifest(job, short_lived.base_url, [{"glob": "./files/*.txt"}]))
    await upload(manifest, api_key)
    short_lived.advance_clock(25 * HOUR)

    checked = await verify(manifest)

    [note] = checked.notes
    assert note.startswith("3 links died before their stated expiry")
    assert "refresh_within 12h 0m is too late" in note
    status = await run_cli("status", str(manifest.path))
    assert "3 links died before their stated expiry" in status.stdout


async def test_verify_of_live_links_sends_no_upload_and_marks_them_checked(
    job: Path, emulator: Emulator, api_key: str
) -> None:
    for i in range(5):
        write_file(job / "files" / f"f{i}.txt", 100 + i, seed=i)
    manifest = load(write_manifest(job, emulator.base_url, [{"glob": "./files/*.txt"}]))
    await upload(manifest, api_key)
    uploads = len(emulator.requests)

    summary = await verify(manifest)

    assert summary.exit_code is ExitCode.OK
    assert summary.counts == {Outcome.ALIVE: 5}
    assert len(emulator.requests) == uploads
    assert {link.method for link in emulator.link_requests} == {"HEAD"}
    assert all(row.checked_at for row in (await ledger_rows(manifest)).values())


async def test_verify_a_sample_probes_only_that_many(
    job: Path, emulator: Emulator, api_key: str
) -> None:
    for i in range(10):
        write_file(job / "files" / f"f{i}.txt", 50, seed=i)
    manifest = load(write_manifest(job, emulator.base_url, [{"glob": "./files/*.txt"}]))
    await upload(manifest, api_key)

    summary = await verify(manifest, VerifyOptions(sample=Sample(count=4), seed=3))

    assert summary.counts == {Outcome.ALIVE: 4}
    assert len(emulator.link_requests) == 4


def test_a_sample_is_a_count_or_a_share() -> None:
    assert Sample.parse("500") == Sample(count=500)
    assert Sample.parse("5%") == Sample(fraction=0.05)
    for bad in ("0", "-3", "150%", "some"):
        with pytest.raises(ValueError, match="is not a sample"):
            Sample.parse(bad)


# -- links that refuse HEAD, or serve other bytes --------------------------------------------


@contextlib.asynccontextmanager
async def head_refusing_links(files: dict[str, bytes]) -> AsyncIterator[str]:
    """Links that answer 405 to HEAD and honour `Range: bytes=0-0` on GET."""

    async def handle(request: web.Request) -> web.StreamResponse:
        data = files.get(request.path.lstrip("/"))
        if data is None:
            return web.Response(status=404)
        if request.method == "HEAD":
            return web.Response(status=405)
        if request.headers.get("Range") == "bytes=0-0":
            headers = {"Content-Range": f"bytes 0-0/{len(data)}"}
            return web.Response(status=206, body=data[:1], headers=headers)
        return web.Response(body=data)

    async with web_server(handle) as base_url:
        yield base_url


async def put_links(manifest: Manifest, links: dict[str, tuple[str, int]]) -> None:
    """Done rows whose links are `links` (file name -> (url, recorded size))."""
    async with await Ledger.open(manifest.ledger) as ledger:
        for name, (url, size) in links.items():
            ledger.put_item(
                ItemUpdate(
                    target=manifest.target.base_url,
                    upload_path="mig",
                    file_name=name,
                    state=ItemState.DONE,
                    source=f"/gone/{name}",
                    kind=SourceKind.FILE,
                    size=size,
                    method=Method.BASE64,
                    download_url=url,
                    uploaded_at=1.0,
                    expires_at=4_000_000_000.0,
                )
            )


async def test_where_head_is_refused_a_one_byte_get_tells_the_size(job: Path) -> None:
    path = write_manifest(job, "http://127.0.0.1:9", [{"path": "./gone.txt"}])
    manifest = load_manifest(path, environ={}, check_sources=False)
    async with head_refusing_links({"a": b"x" * 1234, "b": b"y" * 99}) as base:
        await put_links(manifest, {"a": (f"{base}/a", 1234), "b": (f"{base}/b", 100)})

        summary = await verify(manifest)

    rows = await ledger_rows(manifest)
    assert summary.counts == {Outcome.ALIVE: 1, Outcome.MISMATCH: 1}
    assert (rows["a"].state, rows["b"].state) == (ItemState.DONE, ItemState.MISMATCH)
    assert rows["b"].dead_at is not None
    assert rows["b"].last_error == "link serves 99 bytes, not 100"


# -- evidence from download and from a copy that failed -------------------------------------


@pytest.fixture
async def overwritten(job: Path, emulator: Emulator, origin: Origin, api_key: str) -> Manifest:
    """Two URL items; then someone else uploads to the first one's name, so the service
    replaces that file and its recorded link dies long before its expiry."""
    origin.files["one.bin"] = b"first " * 100
    origin.files["two.bin"] = b"second " * 100
    manifest = load(
        write_manifest(
            job, emulator.base_url, [{"url": origin.url("one.bin")}, {"url": origin.url("two.bin")}]
        )
    )
    await upload(manifest, api_key)
    async with aiohttp.ClientSession() as session:
        answer = await session.post(
            f"{emulator.base_url}/api/file-base64-upload",
            json={"base64Data": "aGVsbG8=", "uploadPath": "mig", "fileName": "one.bin"},
            headers={"Authorization": f"Bearer {api_key}"},
        )
        assert answer.status == 200
    return manifest


async def test_a_404_from_download_is_recorded_dead_and_every_view_says_so(
    overwritten: Manifest, tmp_path: Path
) -> None:
    summary = await download(overwritten, tmp_path / "home")

    assert summary.counts == {Outcome.DEAD: 1, Outcome.DOWNLOADED: 1}
    path = str(overwritten.path)
    status = json.loads((await run_cli("status", path, "--format", "json")).stdout)
    assert status["by_state"]["dead"]["items"] == 1
    export = [json.loads(line) for line in (await run_cli("export", path)).stdout.splitlines()]
    dead = [line for line in export if line["status"] == "dead"]
    assert [line["file_name"] for line in dead] == ["one.bin"]
    assert dead[0]["download_url"]  # kept, for the record
    plan = await run_cli("plan", path)
    assert " dead " in plan.stdout


async def test_run_uploads_a_dead_item_again_from_its_source(
    overwritten: Manifest, emulator: Emulator, api_key: str, tmp_path: Path
) -> None:
    await download(overwritten, tmp_path / "home")

    summary = await run_manifest(overwritten, RunOptions(seed=1), environ=key_env(api_key))

    assert summary.counts == {Outcome.UPLOADED: 1, Outcome.SKIPPED: 1}
    await assert_no_done_item_has_a_dead_link(overwritten)


async def test_a_copy_the_service_cannot_make_proves_the_link_dead_and_refresh_goes_on(
    overwritten: Manifest, emulator: Emulator, origin: Origin, api_key: str
) -> None:
    sent = len(emulator.requests)

    summary = await refresh(
        overwritten, RefreshOptions(within=73 * HOUR, seed=1), environ=key_env(api_key)
    )

    assert summary.counts == {Outcome.REFRESHED: 2}
    ways = [(r.endpoint, r.status) for r in emulator.requests[sent:] if r.file_name == "one.bin"]
    assert ways == [("url", 400), ("stream", 200)]  # the copy failed, the origin worked
    rows: dict[str, LedgerItem] = await ledger_rows(overwritten)
    assert await fetch(rows["one.bin"].download_url or "") == (200, b"first " * 100)
    await assert_no_done_item_has_a_dead_link(overwritten)


async def test_a_service_that_fails_every_upload_loses_nothing(
    job: Path, emulator: Emulator, api_key: str
) -> None:
    write_file(job / "a.txt", 100)
    manifest = load(write_manifest(job, emulator.base_url, [{"path": "./a.txt"}], retries=0))
    await upload(manifest, api_key)
    emulator.advance_clock(80 * HOUR)
    emulator.inject_faults(500, 10)

    summary = await refresh(manifest, environ=key_env(api_key))

    assert summary.counts == {Outcome.FAILED: 1}
    assert (await ledger_rows(manifest))["a.txt"].state is ItemState.DEAD  # not lost


async def test_a_url_item_sent_again_after_its_origin_changed_forgets_the_old_hash(
    job: Path, emulator: Emulator, origin: Origin, api_key: str, tmp_path: Path
) -> None:
    origin.files["doc.bin"] = b"version one " * 40
    manifest = load(write_manifest(job, emulator.base_url, [{"url": origin.url("doc.bin")}]))
    await upload(manifest, api_key)
    await download(manifest, tmp_path / "home")  # learns the sha256 of version one
    origin.files["doc.bin"] = second = b"version two, longer " * 40

    await upload(manifest, api_key)

    row = (await ledger_rows(manifest))["doc.bin"]
    assert (row.size, row.sha256, row.downloaded_path) == (len(second), None, None)
    await download(manifest, tmp_path / "home")
    assert (tmp_path / "home" / "mig" / "doc.bin").read_bytes() == second


@pytest.mark.parametrize(("stored", "added"), [(1.0, 0.0), (-1.2, 0.0), (5.0, 5.0), (None, 0.0)])
async def test_commands_that_read_only_the_ledger_correct_the_clock_as_the_others_do(
    tmp_path: Path, stored: float | None, added: float
) -> None:
    async with await Ledger.open(tmp_path / "l.sqlite") as ledger:
        if stored is not None:
            await ledger.set_fact(OFFSET_FACT, stored)
        before = time.time()
        offset, now = await service_time(ledger)
        after = time.time()

    assert offset == stored
    assert before + added <= now <= after + added
