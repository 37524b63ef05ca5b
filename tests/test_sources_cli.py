"""What a run takes from the disk, through the real CLI: an empty drop folder, a folder
that cannot be read, `require_match`, brace patterns and the command line's filters."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from conftest import Finished, run_cli, write_file, write_manifest

from migrator.emulator import Emulator

pytestmark = pytest.mark.timeout(90)

USAGE, ITEMS_FAILED = 2, 1


async def run(manifest: Path, api_key: str, *args: str) -> Finished:
    return await run_cli("run", str(manifest), "--no-progress", *args, key=api_key)


async def planned_names(manifest: Path, *args: str) -> list[str]:
    """`migrator plan --format json ARGS`: the file names it would upload."""
    result = await run_cli("plan", str(manifest), "--format", "json", *args)
    assert result.code == 0, result.stderr
    return sorted(item["file_name"] for item in json.loads(result.stdout)["items"])


def sent_names(emulator: Emulator) -> list[str]:
    return sorted(request.file_name or "" for request in emulator.requests)


def make_unreadable_folder(parent: Path) -> None:
    """A folder below `parent` that no walk can read, not even root's: nested deeper
    than any path can name (made level by level through folder descriptors), so its
    scandir fails with ENAMETOOLONG. chmod 000 would stop nobody in CI, which runs as root."""
    fd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(40):  # 40 x 121 bytes > PATH_MAX (4096)
            os.mkdir("d" * 120, dir_fd=fd)
            child = os.open("d" * 120, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = child
        os.close(os.open("lost.txt", os.O_CREAT | os.O_WRONLY, 0o644, dir_fd=fd))
    finally:
        os.close(fd)


# -- an empty drop folder, require_match ------------------------------------------------------


async def test_a_glob_that_matches_nothing_warns_and_the_run_goes_on(
    job: Path, emulator: Emulator, api_key: str
) -> None:
    write_file(job / "data" / "a.txt", 10)
    (job / "drop").mkdir()
    sources = [{"glob": "drop/*.csv"}, {"path": "data/a.txt"}]
    manifest = write_manifest(job, emulator.base_url, sources)

    result = await run(manifest, api_key)

    assert result.code == 0, result.stderr
    assert "run: 1 uploaded, 0 skipped, 0 failed" in result.stdout
    [warning] = result.stderr.strip().splitlines()
    assert "event=plan.no_match" in warning and "drop/*.csv" in warning
    assert sent_names(emulator) == ["a.txt"]


async def test_require_match_makes_an_empty_glob_an_error_before_anything_is_sent(
    job: Path, emulator: Emulator, api_key: str
) -> None:
    write_file(job / "data" / "a.txt", 10)
    (job / "drop").mkdir()
    sources = [{"path": "data/a.txt"}, {"glob": "drop/*.csv", "require_match": True}]
    manifest = write_manifest(job, emulator.base_url, sources)

    result = await run(manifest, api_key)

    assert result.code == USAGE
    line = result.one_error_line()
    assert "sources[1].glob" in line and "matches no files (require_match is set)" in line
    assert emulator.requests == []


async def test_require_match_must_be_true_or_false(job: Path, emulator: Emulator) -> None:
    manifest = write_manifest(job, emulator.base_url, [{"glob": "*.txt", "require_match": "yes"}])

    result = await run_cli("plan", str(manifest))

    assert result.code == USAGE
    assert "require_match: expected true or false" in result.one_error_line()


# -- a folder that cannot be read -------------------------------------------------------------


async def test_an_unreadable_folder_fails_as_one_item_and_the_rest_is_uploaded(
    job: Path, emulator: Emulator, api_key: str
) -> None:
    write_file(job / "data" / "a.txt", 10)
    write_file(job / "data" / "sub" / "b.txt", 20)
    make_unreadable_folder(job / "data")
    manifest = write_manifest(job, emulator.base_url, [{"glob": "data/**/*.txt"}])

    result = await run(manifest, api_key)

    assert result.code == ITEMS_FAILED, result.stderr
    assert "run: 2 uploaded, 0 skipped, 1 failed" in result.stdout
    assert sent_names(emulator) == ["a.txt", "b.txt"]
    [warning] = [line for line in result.stderr.splitlines() if "plan.unreadable" in line]
    assert "cannot read a folder (File name too long)" in warning
    assert "Traceback" not in result.stderr


async def test_plan_reports_an_unreadable_folder_and_still_shows_the_rest(
    job: Path, emulator: Emulator
) -> None:
    write_file(job / "data" / "a.txt", 10)
    make_unreadable_folder(job / "data")
    manifest = write_manifest(job, emulator.base_url, [{"glob": "data/**/*.txt"}])

    result = await run_cli("plan", str(manifest))

    assert result.code == 0, result.stderr
    assert "a.txt" in result.stdout
    assert "unreadable: 1 folder could not be read" in result.stdout
    assert "event=plan.unreadable" in result.stderr


# -- brace patterns and filters ---------------------------------------------------------------


@pytest.fixture
def photos(job: Path, emulator: Emulator) -> Path:
    """A manifest over photos/ with a brace glob; one photo is ten days old."""
    write_file(job / "photos" / "a.jpg", 10)
    write_file(job / "photos" / "2024" / "b.png", 2000)
    write_file(job / "photos" / "cache" / "c.jpg", 10)
    write_file(job / "photos" / "d.gif", 10)
    write_file(job / "photos" / "notes.txt", 10)
    write_file(job / "photos" / "old.jpg", 10)
    ten_days_ago = time.time() - 10 * 86400
    os.utime(job / "photos" / "old.jpg", (ten_days_ago, ten_days_ago))
    return write_manifest(job, emulator.base_url, [{"glob": "photos/**/*.{jpg,png,gif}"}])


async def test_a_brace_glob_takes_each_of_its_alternatives(photos: Path) -> None:
    assert await planned_names(photos) == ["a.jpg", "b.png", "c.jpg", "d.gif", "old.jpg"]


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--include", "*.jpg"], ["a.jpg", "c.jpg", "old.jpg"]),
        (["--include", "*.jpg", "--include", "*.png"], ["a.jpg", "b.png", "c.jpg", "old.jpg"]),
        (["--include", "*.{png,gif}"], ["b.png", "d.gif"]),
        (["--include", "/*.jpg"], ["a.jpg", "old.jpg"]),  # anchored at the glob's root
        (["--exclude", "cache/**"], ["a.jpg", "b.png", "d.gif", "old.jpg"]),
        (["--exclude", "cache/**", "--include", "*.jpg"], ["a.jpg", "old.jpg"]),  # excludes win
        (["--min-size", "1K"], ["b.png"]),
        (["--max-size", "100B"], ["a.jpg", "c.jpg", "d.gif", "old.jpg"]),
        (["--max-age", "1d"], ["a.jpg", "b.png", "c.jpg", "d.gif"]),
    ],
    ids=lambda value: " ".join(value) if isinstance(value, list) and "-" in value[0] else "",
)
async def test_plan_takes_what_the_filters_select(
    photos: Path, flags: list[str], expected: list[str]
) -> None:
    assert await planned_names(photos, *flags) == expected


async def test_run_uploads_only_what_the_filters_select(
    photos: Path, emulator: Emulator, api_key: str
) -> None:
    result = await run(photos, api_key, "--exclude", "cache/**", "--max-age", "1d")

    assert result.code == 0, result.stderr
    assert sent_names(emulator) == ["a.jpg", "b.png", "d.gif"]


async def test_filters_apply_to_path_sources_by_their_file_name(
    job: Path, emulator: Emulator
) -> None:
    write_file(job / "a.tmp", 10)
    write_file(job / "b.txt", 10)
    manifest = write_manifest(job, emulator.base_url, [{"path": "a.tmp"}, {"path": "b.txt"}])

    assert await planned_names(manifest, "--exclude", "*.tmp") == ["b.txt"]


@pytest.mark.parametrize(
    ("flag", "value"), [("--max-size", "lots"), ("--min-size", "-1"), ("--max-age", "soon")]
)
async def test_a_bad_filter_value_is_one_line_and_exit_2(
    photos: Path, flag: str, value: str
) -> None:
    result = await run_cli("plan", str(photos), f"{flag}={value}")

    assert result.code == USAGE
    assert result.one_error_line().startswith(f"migrator: {flag}: ")
