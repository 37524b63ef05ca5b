"""A hostile user at the command line: every mistake gets one line on stderr, a
documented exit status, no traceback, and the ledger keeps what it held.

What needs a process of its own (a service to talk to, a signal, a pipe, a full
disk) runs `python -m migrator` as a subprocess, awaited with asyncio so that an
emulator or web server in the test's own event loop keeps answering meanwhile; the
errors found before anything runs go through `migrator.cli.main` in this process.
Tests that mount a tmpfs (a full or read-only disk) need root.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog
import yaml
from aiohttp import web
from conftest import (
    Finished,
    Origin,
    closed_port,
    ledger_states,
    migrator_env,
    run_cli,
    start_cli,
    web_server,
)

from migrator.cli import main
from migrator.emulator import Emulator
from migrator.ledger import Ledger
from migrator.logs import configure_logging
from migrator.model import ItemState, ItemUpdate, Method, SourceKind

pytestmark = pytest.mark.timeout(60)
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to mount a tmpfs")

USAGE, AUTH, UNAVAILABLE, IO, LOCKED = 2, 3, 69, 74, 75


def write_job(
    folder: Path,
    base_url: str = "embedded",
    *,
    files: int = 3,
    sources: list[dict[str, Any]] | None = None,
    **top: Any,
) -> Path:
    """A manifest in `folder` with `files` small files under data/, its ledger beside it."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(files):
        path = folder / "data" / f"f{i:04}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"file number {i}\n", encoding="utf-8")
    document = {
        "version": 1,
        "name": "hostile",
        "target": {"base_url": base_url},
        "ledger": "ledger.sqlite",
        "settings": {"retries": 1, "concurrency": 4, "settle": "1s"},
        "sources": sources or [{"glob": "./data/*.txt"}],
        **top,
    }
    manifest = folder / "job.yaml"
    manifest.write_text(yaml.safe_dump(document), encoding="utf-8")
    return manifest


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


Cli = Callable[..., Finished]


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> Iterator[Cli]:
    """`migrator ARGS` in this process (faster than a child), for errors found before
    anything runs concurrently; stdout and stderr as the user would see them."""
    monkeypatch.delenv("KIE_API_KEY", raising=False)
    monkeypatch.delenv("MIGRATOR_LEDGER_DIR", raising=False)

    def run(*args: str) -> Finished:
        try:
            code = main(list(args))
        except SystemExit as exit_:  # argparse, for a bad command line
            code = exit_.code if isinstance(exit_.code, int) else 1
        out, err = capsys.readouterr()
        return Finished(code, out, err)

    yield run
    configure_logging(log_file=None, console="none")  # close the log file main opened
    structlog.reset_defaults()


@pytest.fixture
def job(tmp_path: Path) -> Path:
    return write_job(tmp_path / "job")


@pytest.fixture(scope="module")
def done_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An embedded job of 300 done items (a ledger of several pages), run once per module."""
    manifest = write_job(tmp_path_factory.mktemp("template") / "done", files=300)
    result = subprocess.run(
        [sys.executable, "-m", "migrator", "run", str(manifest), "--no-progress"],
        env=migrator_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return manifest


@pytest.fixture
def done_job(done_template: Path, tmp_path: Path) -> Path:
    """A copy of the template job, for this test to harm."""
    shutil.copytree(done_template.parent, tmp_path / "done")
    return tmp_path / "done" / done_template.name


async def until_fetched(origin: Origin, limit: float = 15) -> None:
    """Until the child has started fetching from `origin`: a transfer in flight."""
    deadline = time.monotonic() + limit
    while not origin.gets:
        assert time.monotonic() < deadline, "the child never fetched from the origin"
        await asyncio.sleep(0.05)


def dead_base_url() -> str:
    """A loopback base URL where nothing listens: conftest's closed_port, as the URL
    that write_job and the error messages take."""
    return f"http://127.0.0.1:{closed_port()}"


@contextlib.contextmanager
def tmpfs(path: Path, size: str, *, readonly: bool = False) -> Iterator[Path]:
    path.mkdir(parents=True, exist_ok=True)
    options = f"size={size}" + (",ro" if readonly else "")
    subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(folder: Path, leave: int) -> Path:
    """Fill the filesystem of `folder`, leaving about `leave` bytes free."""
    stats = os.statvfs(folder)
    filler = folder / "filler"
    filler.write_bytes(b"\0" * max(stats.f_bavail * stats.f_frsize - leave, 0))
    return filler


# -- bad manifests ---------------------------------------------------------------------------


def _deep(path: Path) -> None:
    path.write_text("[" * 2000 + "]" * 2000, encoding="utf-8")


def _bomb(path: Path) -> None:
    lines = ['a0: &a0 ["x", "x", "x", "x", "x", "x", "x", "x", "x"]']
    for i in range(1, 10):
        refs = ", ".join([f"*a{i - 1}"] * 9)
        lines.append(f"a{i}: &a{i} [{refs}]")
    lines += ["version: 1", "name: bomb", "target: {base_url: embedded}", "sources: *a9"]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


BAD_MANIFESTS = {
    "missing": (lambda p: None, "no such manifest file"),
    "a directory": (lambda p: p.mkdir(), "is a directory"),
    "binary garbage": (lambda p: p.write_bytes(bytes(range(256)) * 8), "not UTF-8"),
    "empty": (lambda p: p.write_text("", encoding="utf-8"), "empty"),
    "deeply nested": (_deep, "nested too deeply"),
    "huge": (lambda p: p.write_bytes(b"# x\n" * (1_200_000)), "larger than 4 MiB"),
}


@pytest.mark.parametrize("case", BAD_MANIFESTS, ids=list(BAD_MANIFESTS))
def test_a_bad_manifest_exits_2_with_one_line(cli: Cli, tmp_path: Path, case: str) -> None:
    make, expected = BAD_MANIFESTS[case]
    manifest = tmp_path / "job.yaml"
    make(manifest)

    result = cli("plan", str(manifest))

    assert result.code == USAGE
    assert expected in result.one_error_line()


def test_a_yaml_bomb_is_refused_without_being_expanded(cli: Cli, tmp_path: Path) -> None:
    manifest = tmp_path / "job.yaml"
    _bomb(manifest)  # 9**10 strings, were the aliases expanded

    result = cli("plan", str(manifest))

    assert result.code == USAGE
    assert "Traceback" not in result.stderr
    assert "sources[0]: expected a mapping" in result.stderr
    assert len(result.stderr.splitlines()) <= 101


def test_a_manifest_with_thousands_of_problems_prints_at_most_a_hundred_and_one(
    cli: Cli,
    tmp_path: Path,
) -> None:
    manifest = tmp_path / "job.yaml"
    sources = "".join(f"  - path: ./missing{i}.txt\n" for i in range(3000))
    manifest.write_text(
        f"version: 1\nname: many\ntarget: {{base_url: embedded}}\nsources:\n{sources}",
        encoding="utf-8",
    )

    result = cli("plan", str(manifest))

    lines = result.stderr.strip().splitlines()
    assert result.code == USAGE
    assert len(lines) == 101
    assert lines[-1].endswith("... and 2900 more problems")


# -- bad command lines -----------------------------------------------------------------------


BAD_COMMAND_LINES = {
    "unknown command": (["frobnicate"], "invalid choice"),
    "unknown flag": (["plan", "{m}", "--frobnicate"], "unrecognized arguments"),
    "concurrency 0": (["run", "{m}", "--concurrency", "0"], "--concurrency"),
    "concurrency not a number": (["run", "{m}", "--concurrency", "many"], "--concurrency"),
    "negative grace": (["run", "{m}", "--grace", "-1"], "--grace"),
    "grace nan": (["run", "{m}", "--grace", "nan"], "--grace"),
    "within nonsense": (["refresh", "{m}", "--within", "nonsense"], "--within"),
    "export as xml": (["export", "{m}", "--format", "xml"], "--format"),
    "download without dest": (["download", "{m}"], "--dest"),
}


@pytest.mark.parametrize("case", BAD_COMMAND_LINES, ids=list(BAD_COMMAND_LINES))
def test_a_bad_command_line_exits_2_with_one_line(cli: Cli, job: Path, case: str) -> None:
    args, expected = BAD_COMMAND_LINES[case]

    result = cli(*(a.format(m=job) for a in args))

    assert result.code == USAGE
    assert expected in result.one_error_line()
    assert not (job.parent / "ledger.sqlite").exists()


def test_download_into_a_file_exits_2_and_touches_no_ledger(cli: Cli, done_job: Path) -> None:
    ledger = done_job.parent / "ledger.sqlite"
    before = digest(ledger)
    a_file = done_job.parent / "a-file"
    a_file.write_text("not a folder", encoding="utf-8")

    for dest in (a_file, a_file / "below"):
        result = cli("download", str(done_job), "--dest", str(dest))
        assert result.code == USAGE
        assert f"--dest: {dest}" in result.one_error_line()
    assert digest(ledger) == before


def test_a_ledger_under_a_regular_file_exits_2_naming_the_file(cli: Cli, job: Path) -> None:
    blocker = job.parent / "blocker"
    blocker.write_text("x", encoding="utf-8")

    result = cli("run", str(job), "--ledger", str(blocker / "l.sqlite"))

    assert result.code == USAGE
    assert f"{blocker} is not a folder" in result.one_error_line()


def test_a_ledger_that_is_a_directory_is_refused_by_name(
    cli: Cli, job: Path, tmp_path: Path
) -> None:
    result = cli("status", str(job), "--ledger", str(tmp_path))

    assert result.code == USAGE
    assert f"ledger {tmp_path} is a directory" in result.one_error_line()


def test_export_output_into_a_missing_folder_exits_2_and_creates_none(
    cli: Cli, done_job: Path
) -> None:
    out = done_job.parent / "new" / "folder" / "map.jsonl"

    result = cli("export", str(done_job), "--output", str(out))

    assert result.code == USAGE
    assert "does not exist" in result.one_error_line()
    assert not (done_job.parent / "new").exists()


# -- sources ---------------------------------------------------------------------------------


def test_a_source_deleted_after_plan_makes_run_exit_2_naming_it(cli: Cli, tmp_path: Path) -> None:
    manifest = write_job(tmp_path / "job", sources=[{"path": "./data/f0000.txt"}])
    assert (cli("plan", str(manifest))).code == 0
    (manifest.parent / "data" / "f0000.txt").unlink()

    result = cli("run", str(manifest), "--no-progress")

    assert result.code == USAGE
    assert "f0000.txt' does not exist" in result.one_error_line()


def test_a_glob_that_must_match_and_matches_nothing_exits_2(cli: Cli, tmp_path: Path) -> None:
    source = {"glob": "./data/*.nothing", "require_match": True}
    manifest = write_job(tmp_path / "job", sources=[source])

    result = cli("run", str(manifest), "--no-progress")

    assert result.code == USAGE
    assert "matches no files" in result.one_error_line()


def test_a_glob_skips_fifos_broken_links_and_folders_named_like_files(
    cli: Cli,
    tmp_path: Path,
) -> None:
    manifest = write_job(tmp_path / "job", files=1)
    data = manifest.parent / "data"
    os.mkfifo(data / "fifo.txt")
    (data / "broken.txt").symlink_to(tmp_path / "nowhere")
    (data / "folder.txt").mkdir()

    result = cli("run", str(manifest), "--no-progress")

    assert result.code == 0, result.stderr
    assert ledger_states(manifest.parent / "ledger.sqlite") == {"f0000.txt": "done"}


def test_a_url_list_with_bad_lines_names_each_line_in_one_short_line(
    cli: Cli, tmp_path: Path
) -> None:
    folder = tmp_path / "job"
    folder.mkdir()
    long_url = "https://example.com/" + "a" * 3000 + " b"
    (folder / "urls.txt").write_text(
        f"# fine\nnot a url\nftp://x/y\n\nhttp://\n{long_url}\n", encoding="utf-8"
    )
    manifest = write_job(folder, files=0, sources=[{"url_list": "./urls.txt"}])

    result = cli("plan", str(manifest))

    lines = result.stderr.strip().splitlines()
    assert result.code == USAGE
    located = [m[1] for line in lines if (m := re.search(r"urls\.txt:(\d+):", line))]
    assert located == ["2", "3", "5", "6"]
    assert lines[-1].endswith("lists no usable URLs")
    assert max(len(line) for line in lines) <= 300


# -- the API key -----------------------------------------------------------------------------


KEY_FILES = {
    "world-readable": (lambda p: (p.write_text("k" * 20), p.chmod(0o644)), "readable by others"),
    "missing": (lambda p: None, "No such file"),
    "empty": (lambda p: (p.write_text(""), p.chmod(0o600)), "is empty"),
    "a FIFO": (lambda p: os.mkfifo(p, 0o600), "not a regular file"),
    "binary": (lambda p: (p.write_bytes(b"\xff\xfe\x00k"), p.chmod(0o600)), "not text"),
    "two lines": (lambda p: (p.write_text("secret-one\nsecret-two\n"), p.chmod(0o600)), "line"),
}


@pytest.mark.parametrize("case", KEY_FILES, ids=list(KEY_FILES))
def test_a_bad_api_key_file_exits_2_with_one_line(cli: Cli, tmp_path: Path, case: str) -> None:
    make, expected = KEY_FILES[case]
    key_file = tmp_path / "kie.key"
    make(key_file)
    # Nothing listens there: a key read as good would end in "connection refused".
    manifest = write_job(tmp_path / "job", dead_base_url())
    document = yaml.safe_load(manifest.read_text(encoding="utf-8"))
    document["target"]["api_key_file"] = str(key_file)
    manifest.write_text(yaml.safe_dump(document), encoding="utf-8")

    result = cli("run", str(manifest), "--no-progress")

    assert result.code == USAGE
    line = result.one_error_line()
    assert expected in line
    assert "secret" not in line


def test_a_key_with_a_line_break_exits_2_without_showing_it(
    cli: Cli, job: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    manifest = write_job(job.parent / "real", dead_base_url())
    monkeypatch.setenv("KIE_API_KEY", "good-key-1234\nX-Evil: 1")

    result = cli("run", str(manifest), "--no-progress")

    assert result.code == USAGE
    line = result.one_error_line()
    assert "KIE_API_KEY" in line and "good-key" not in line and "Evil" not in line


def test_no_api_key_at_all_exits_2_naming_the_variable(cli: Cli, job: Path) -> None:
    manifest = write_job(job.parent / "real", dead_base_url())

    result = cli("run", str(manifest), "--no-progress")

    assert result.code == USAGE
    assert "KIE_API_KEY" in result.one_error_line()


async def test_a_wrong_key_exits_3_with_one_line(job: Path, emulator: Emulator) -> None:
    manifest = write_job(job.parent / "real", emulator.base_url)

    result = await run_cli("run", str(manifest), "--no-progress", key="wrong-key-1234")

    assert result.code == AUTH
    assert "rejected the API key" in result.one_error_line()
    assert "failed" not in set(ledger_states(manifest.parent / "ledger.sqlite").values())


# -- the base URL ----------------------------------------------------------------------------


async def test_a_base_url_that_refuses_connections_exits_69_and_fails_no_item(
    tmp_path: Path,
) -> None:
    base_url = dead_base_url()
    manifest = write_job(tmp_path / "job", base_url)

    result = await run_cli("run", str(manifest), "--no-progress", key="some-key-1234")

    assert result.code == UNAVAILABLE
    line = result.one_error_line()
    assert f"connection refused to {base_url}" in line and "target.base_url" in line
    assert "failed" not in set(ledger_states(manifest.parent / "ledger.sqlite").values())


async def test_a_base_url_with_a_path_answering_404_exits_2_naming_it(tmp_path: Path) -> None:
    async def not_found(request: web.Request) -> web.Response:
        return web.Response(status=404, text="<html>Not Found</html>", content_type="text/html")

    async with web_server(not_found) as server:
        manifest = write_job(tmp_path / "job", f"{server}/api")
        result = await run_cli("run", str(manifest), "--no-progress", key="some-key-1234")

    assert result.code == USAGE
    assert f"(base URL {server}/api)" in result.one_error_line()


async def test_a_web_site_that_is_not_the_api_exits_2_and_fails_no_item(tmp_path: Path) -> None:
    async def homepage(request: web.Request) -> web.Response:
        return web.Response(text="<html>Welcome</html>", content_type="text/html")

    async with web_server(homepage) as server:
        manifest = write_job(tmp_path / "job", server)
        result = await run_cli("run", str(manifest), "--no-progress", key="some-key-1234")

    assert result.code == USAGE
    assert "not a JSON object" in result.one_error_line()
    assert "failed" not in set(ledger_states(manifest.parent / "ledger.sqlite").values())


async def test_refresh_against_a_service_gone_away_exits_69_and_keeps_every_link(
    tmp_path: Path, api_key: str
) -> None:
    async with Emulator(tmp_path / "emu", api_key) as emu:
        manifest = write_job(tmp_path / "job", emu.base_url)
        assert (await run_cli("run", str(manifest), "--no-progress", key=api_key)).code == 0
    ledger = manifest.parent / "ledger.sqlite"
    before = ledger_states(ledger)

    result = await run_cli("refresh", str(manifest), "--within", "100d", key=api_key)

    assert result.code == UNAVAILABLE
    assert "connection refused" in result.one_error_line()
    assert ledger_states(ledger) == before == dict.fromkeys(before, "done")


# -- the ledger ------------------------------------------------------------------------------


def _garbage(ledger: Path) -> None:
    ledger.write_bytes(os.urandom(8192))


def _truncated(ledger: Path) -> None:
    data = ledger.read_bytes()
    ledger.write_bytes(data[: len(data) // 2])


def _damaged_page(ledger: Path) -> None:
    with ledger.open("r+b") as handle:
        handle.seek(4096 * 5)
        handle.write(os.urandom(4096 * 3))


def _newer_schema(ledger: Path) -> None:
    with contextlib.closing(sqlite3.connect(ledger)) as conn, conn:
        conn.execute("INSERT INTO schema_migrations VALUES (99, 'the future', 0)")


DAMAGES = {
    "garbage": (_garbage, "not a readable migrator ledger"),
    "truncated": (_truncated, "not a readable migrator ledger"),
    "damaged page": (_damaged_page, "not a readable migrator ledger"),
    "newer schema": (_newer_schema, "written by a newer migrator"),
}
COMMANDS = {
    "run": ["run", "--no-progress"],
    "status": ["status"],
}


@pytest.mark.parametrize("damage", DAMAGES, ids=list(DAMAGES))
def test_a_damaged_ledger_is_named_and_left_untouched_by_every_command(
    cli: Cli, done_job: Path, damage: str
) -> None:
    ledger = done_job.parent / "ledger.sqlite"
    harm, expected = DAMAGES[damage]
    harm(ledger)
    before = digest(ledger)

    for name, args in COMMANDS.items():
        result = cli(args[0], str(done_job), *args[1:])
        assert result.code == USAGE, (name, result.stderr)
        line = result.one_error_line()
        assert expected in line and str(ledger) in line, name
        assert digest(ledger) == before, name


async def test_a_run_killed_with_sigkill_shows_as_not_finished_in_status(
    tmp_path: Path, origin: Origin
) -> None:
    origin.files["slow.bin"] = b"s" * 200_000
    origin.slow.add("slow.bin")
    manifest = write_job(
        tmp_path / "job",
        files=0,
        sources=[{"url": origin.url("slow.bin"), "method": "stream"}],
    )
    process = await start_cli("run", str(manifest), "--no-progress")
    await until_fetched(origin)
    process.kill()
    await process.wait()

    result = await run_cli("status", str(manifest))

    assert result.code == 0, result.stderr
    assert "run did not finish" in result.stdout


async def test_two_runs_at_once_the_second_exits_75(tmp_path: Path, origin: Origin) -> None:
    origin.files["slow.bin"] = b"s" * 200_000
    origin.slow.add("slow.bin")
    manifest = write_job(
        tmp_path / "job", files=0, sources=[{"url": origin.url("slow.bin"), "method": "stream"}]
    )
    first = await start_cli("run", str(manifest), "--no-progress")
    try:
        await until_fetched(origin)

        second = await run_cli("run", str(manifest), "--no-progress")

        assert second.code == LOCKED
        assert "holds the lock" in second.one_error_line()
    finally:
        first.kill()
        await first.wait()


# -- signals during refresh and download ------------------------------------------------------


async def _stalling_ledger(manifest: Path, origin: Origin, *, expires_in: float) -> None:
    """Record one done item whose link (and source) is the origin's stalling file."""
    origin.files["stall.bin"] = b"z" * 100_000
    origin.slow.add("stall.bin")
    url = origin.url("stall.bin")
    async with await Ledger.open(manifest.parent / "ledger.sqlite") as ledger:
        ledger.put_item(
            ItemUpdate(
                target="embedded",
                upload_path="",
                file_name="stall.bin",
                source=url,
                kind=SourceKind.URL,
                state=ItemState.DONE,
                size=100_000,
                method=Method.URL,
                download_url=url,
                uploaded_at=time.time(),
                expires_at=time.time() + expires_in,
            )
        )


@pytest.mark.parametrize(
    ("command", "signum", "code"),
    [
        ("download", signal.SIGTERM, 143),
        ("download", signal.SIGINT, 130),
        ("refresh", signal.SIGINT, 130),
    ],
)
async def test_a_second_signal_stops_a_stalled_command_with_128_plus_it(
    tmp_path: Path, origin: Origin, command: str, signum: signal.Signals, code: int
) -> None:
    manifest = write_job(tmp_path / "job", files=0, sources=[{"url": origin.url("x.bin")}])
    await _stalling_ledger(manifest, origin, expires_in=600)  # inside refresh_within
    extra = ["--dest", str(tmp_path / "dest")] if command == "download" else []
    process = await start_cli(command, str(manifest), *extra)
    await until_fetched(origin)
    process.send_signal(signum)
    await asyncio.sleep(0.3)
    process.send_signal(signum)
    out, err = await asyncio.wait_for(process.communicate(), 15)

    result = Finished(process.returncode or 0, out.decode(), err.decode())
    assert result.code == code
    first, second, last = result.error_lines()
    noun = "downloads" if command == "download" else "uploads"
    assert first == f"migrator: finishing 1 {noun} in flight, up to 30.0s; Ctrl-C again to stop now"
    assert second == f"migrator: stopping now: 1 {noun} in flight are cut short"
    assert last == f"migrator: stopped by {signum.name}"
    assert "nothing finished" in result.stdout
    assert ledger_states(manifest.parent / "ledger.sqlite") == {"stall.bin": "done"}


# -- output ----------------------------------------------------------------------------------


@pytest.mark.parametrize("args", [["export"], ["status"], ["plan"], ["plan", "--format", "json"]])
async def test_a_reader_that_went_away_is_no_error(done_job: Path, args: list[str]) -> None:
    read_end, write_end = os.pipe()
    os.close(read_end)  # every write now fails with EPIPE, as after `| head -1`
    try:
        result = await run_cli(args[0], str(done_job), *args[1:], stdout=write_end)
    finally:
        os.close(write_end)

    assert result.code == 0
    assert result.stderr == ""


async def test_stdout_on_a_full_device_exits_74_with_one_line(done_job: Path) -> None:
    full = os.open("/dev/full", os.O_WRONLY)
    try:
        result = await run_cli("export", str(done_job), stdout=full)
    finally:
        os.close(full)

    assert result.code == IO
    assert "the disk is full" in result.one_error_line()


# -- full and read-only disks (root only) -----------------------------------------------------


@needs_root
async def test_a_ledger_on_a_full_disk_exits_74_keeps_its_items_and_resumes_with_space(
    tmp_path: Path, emulator: Emulator, api_key: str
) -> None:
    manifest = write_job(tmp_path / "job", emulator.base_url, files=600)
    with tmpfs(tmp_path / "tiny", "2M") as tiny:
        filler = fill(tiny, leave=256 * 1024)
        # The log elsewhere: this test is about the ledger filling the disk.
        args = ("--ledger", str(tiny / "job.sqlite"), "--log-file", str(tmp_path / "run.log"))

        full = await run_cli("run", str(manifest), "--no-progress", *args, key=api_key)

        assert full.code == IO
        assert "full" in full.one_error_line()
        status = await run_cli("status", str(manifest), "--format", "json", *args[:2])
        assert status.code == 0, status.stderr
        done = yaml.safe_load(status.stdout)["by_state"]["done"]["items"]
        assert 0 < done < 600
        export = await run_cli("export", str(manifest), *args[:2])
        assert export.code == 0
        assert export.stdout.count('"status": "done"') == done

        filler.unlink()
        again = await run_cli("run", str(manifest), "--no-progress", *args, key=api_key)

        assert again.code == 0, again.stderr
        assert f"{600 - done} uploaded, {done} skipped" in again.stdout


@needs_root
async def test_download_onto_a_full_disk_exits_74_and_resumes_with_space(
    done_job: Path, tmp_path: Path
) -> None:
    ledger = done_job.parent / "ledger.sqlite"
    with tmpfs(tmp_path / "tiny", "4M") as tiny:
        filler = fill(tiny, leave=64 * 1024)

        full = await run_cli("download", str(done_job), "--dest", str(tiny / "dl"))

        assert full.code == IO
        assert "the disk is full" in full.one_error_line()
        assert not [p for p in (tiny / "dl").iterdir() if p.name.endswith(".part")]
        assert set(ledger_states(ledger).values()) == {"done"}

        filler.unlink()
        again = await run_cli("download", str(done_job), "--dest", str(tiny / "dl"))

        assert again.code == 0, again.stderr
        assert len(list((tiny / "dl").iterdir())) == 300


@needs_root
@pytest.mark.parametrize("where", ["ledger", "log file", "export output"])
async def test_a_read_only_disk_exits_74_with_one_line(
    done_job: Path, tmp_path: Path, where: str
) -> None:
    with tmpfs(tmp_path / "ro", "1M", readonly=True) as ro:
        if where == "ledger":
            args = ["run", str(done_job), "--no-progress", "--ledger", str(ro / "l.sqlite")]
            args += ["--log-file", str(tmp_path / "run.log")]
        elif where == "log file":
            args = ["run", str(done_job), "--no-progress", "--log-file", str(ro / "run.log")]
        else:
            args = ["export", str(done_job), "--output", str(ro / "map.csv")]

        result = await run_cli(*args)

    assert result.code == IO
    assert "Read-only file system" in result.one_error_line()
