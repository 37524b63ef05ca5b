"""The log file through the CLI: its mode, its level, its rotation by size."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest
from conftest import run_cli, write_file, write_manifest

from migrator.emulator import Emulator
from migrator.logs import LogFile, configure_logging, flush_logs, get_logger

pytestmark = pytest.mark.timeout(90)
FILES = 12


@pytest.fixture
def manifest(job: Path, emulator: Emulator) -> Path:
    for i in range(FILES):
        write_file(job / "files" / f"f{i:02d}.txt", 200, seed=i)
    return write_manifest(job, emulator.base_url, [{"glob": "./files/*.txt"}])


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def logs_in(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.glob("job.log*"))


def events_in(*paths: Path) -> list[dict[str, object]]:
    """Every line of the files, each one whole JSON object (a torn line fails)."""
    return [json.loads(line) for path in paths for line in path.read_text().splitlines()]


async def test_the_log_file_a_run_creates_is_0600_in_a_folder_made_0700(
    manifest: Path, api_key: str, tmp_path: Path
) -> None:
    log = tmp_path / "logs" / "job.log"

    ran = await run_cli("run", str(manifest), "--no-progress", "--log-file", str(log), key=api_key)

    assert ran.code == 0, ran.stderr
    assert (mode_of(log), mode_of(log.parent)) == (0o600, 0o700)


async def test_the_log_file_ends_with_the_runs_summary_once_the_process_has_exited(
    manifest: Path, api_key: str, tmp_path: Path
) -> None:
    # The program leaves its garbage to the end of the process (a light exit), not
    # what it wrote: the log is flushed whole, its last event the summary.
    log = tmp_path / "job.log"

    ran = await run_cli("run", str(manifest), "--no-progress", "--log-file", str(log), key=api_key)

    assert ran.code == 0, ran.stderr
    last = events_in(log)[-1]
    assert (last["event"], last["uploaded"]) == ("run.summary", FILES)


async def test_the_log_level_leaves_out_less_severe_events(
    manifest: Path, api_key: str, tmp_path: Path
) -> None:
    log = tmp_path / "job.log"
    (manifest.parent / "files" / "f00.txt").unlink()
    (manifest.parent / "files" / "f00.txt").symlink_to("/etc/hostname")  # skipped: a warning

    ran = await run_cli(
        "run",
        str(manifest),
        "--no-progress",
        "--log-file",
        str(log),
        "--log-level",
        "warning",
        key=api_key,
    )

    assert ran.code == 0, ran.stderr
    levels = {event["level"] for event in events_in(log)}
    assert levels == {"warning"}


async def test_the_log_rotates_past_its_size_and_keeps_three_old_files_0600(
    manifest: Path, api_key: str, tmp_path: Path
) -> None:
    log = tmp_path / "job.log"
    args = ("--no-progress", "--log-file", str(log), "--log-max-size", "1KiB")

    for _ in range(3):  # far more than 4 x 1 KiB of events: the oldest files are dropped
        ran = await run_cli("run", str(manifest), "--checksum", *args, key=api_key)
        assert ran.code == 0, ran.stderr

    kept = logs_in(tmp_path)
    assert kept == ["job.log", "job.log.1", "job.log.2", "job.log.3"]
    assert {mode_of(tmp_path / name) for name in kept} == {0o600}
    backups = [tmp_path / name for name in kept[1:]]
    assert all(path.stat().st_size >= 1024 for path in backups)
    newest = events_in(log)[-1] if log.stat().st_size else events_in(backups[0])[-1]
    assert newest["event"] == "run.summary"
    events_in(log, *backups)  # every line whole, across the rotations


async def test_a_log_max_size_of_0_never_rotates(
    manifest: Path, api_key: str, tmp_path: Path
) -> None:
    log = tmp_path / "job.log"

    ran = await run_cli(
        "run",
        str(manifest),
        "--no-progress",
        "--log-file",
        str(log),
        "--log-max-size",
        "0",
        key=api_key,
    )

    assert ran.code == 0, ran.stderr
    assert logs_in(tmp_path) == ["job.log"]


async def test_a_log_max_size_that_is_not_a_size_is_a_usage_error(
    manifest: Path, api_key: str
) -> None:
    ran = await run_cli("run", str(manifest), "--log-max-size", "ten megs", key=api_key)

    assert ran.code == 2
    assert ran.one_error_line().startswith("migrator: --log-max-size: ")


def test_a_writer_whose_file_was_rotated_by_another_reopens_the_new_one(tmp_path: Path) -> None:
    log = tmp_path / "shared.log"
    first = LogFile(log, max_bytes=10)
    second = LogFile(log)

    first.write("one line past ten bytes\n")
    first.flush()  # rotates: shared.log -> shared.log.1
    second.write("after\n")
    second.flush()
    first.close()
    second.close()

    assert (tmp_path / "shared.log.1").read_text() == "one line past ten bytes\n"
    assert log.read_text() == "after\n"
    assert mode_of(log) == 0o600


def test_a_log_file_removed_under_the_writer_is_created_again(tmp_path: Path) -> None:
    log = tmp_path / "job.log"
    configure_logging(log_file=log, console="none")
    get_logger().info("before")
    flush_logs()
    log.unlink()  # logrotate without copytruncate, or an operator

    get_logger().info("after")
    configure_logging(log_file=None, console="none")

    assert [event["event"] for event in events_in(log)] == ["after"]
