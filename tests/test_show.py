"""`migrator show MANIFEST ITEM`: one item's current row and every attempt, credentials hidden."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from conftest import ledger_rows, load, run_cli, web_server, write_file, write_manifest

from migrator.emulator import Emulator

pytestmark = pytest.mark.timeout(60)

PASSWORD = "hunter2-secret"


async def show_json(manifest: Path, item: str, *, cwd: Path | None = None) -> dict[str, Any]:
    result = await run_cli("show", str(manifest), item, "--format", "json", cwd=cwd)
    assert result.code == 0, result.stderr
    shown: dict[str, Any] = json.loads(result.stdout)
    return shown


@pytest.fixture
async def retried(job: Path, emulator: Emulator, api_key: str) -> Path:
    """one.txt uploaded at the second attempt (the first answered 500); two.txt at once."""
    write_file(job / "files" / "one.txt", 300)
    write_file(job / "files" / "two.txt", 300, seed=2)
    manifest = write_manifest(job, emulator.base_url, [{"path": "./files/one.txt"}])
    emulator.inject_faults(500, 1)
    first = await run_cli("run", str(manifest), "--no-progress", key=api_key)
    assert first.code == 0, first.stderr
    write_manifest(
        job, emulator.base_url, [{"path": "./files/one.txt"}, {"path": "./files/two.txt"}]
    )
    second = await run_cli("run", str(manifest), "--no-progress", key=api_key)
    assert second.code == 0, second.stderr
    return manifest


async def test_show_by_source_gives_the_current_row_and_every_attempt(retried: Path) -> None:
    row = (await ledger_rows(load(retried)))["one.txt"]

    shown = await show_json(retried, "files/one.txt", cwd=retried.parent)

    [item] = shown["matches"]
    assert item["status"] == "done"
    assert item["download_url"] == row.download_url
    assert item["expired"] is False
    history = item["history"]
    assert [(a["command"], a["outcome"], a["http_status"]) for a in history] == [
        ("run", "retry", 500),
        ("run", "ok", 200),
    ]
    assert history[0]["error"] and history[1]["error"] is None
    assert (history[0]["link"], history[1]["link"]) == (None, row.download_url)
    assert history[1]["expires_at"] == item["expires_at"]
    assert all(a["at"] and a["method"] for a in history)


async def test_show_by_target_name_finds_the_same_item(retried: Path) -> None:
    by_source = await show_json(retried, str(retried.parent / "files" / "two.txt"))
    by_name = await show_json(retried, "mig/two.txt")

    assert by_name["matches"] == by_source["matches"]
    assert [a["outcome"] for a in by_name["matches"][0]["history"]] == ["ok"]


async def test_show_draws_a_table_with_the_row_and_the_attempts(retried: Path) -> None:
    result = await run_cli("show", str(retried), "mig/one.txt", env={"COLUMNS": "200"})

    assert result.code == 0, result.stderr
    assert "mig/one.txt" in result.stdout
    assert "state       done" in result.stdout
    assert "2 attempts" in result.stdout
    assert "retry (500)" in result.stdout
    assert "ok (200)" in result.stdout
    assert "made the current link" in result.stdout
    assert "expires     " in result.stdout and "(in 2d 23h)" in result.stdout


async def test_an_unknown_item_exits_2_with_one_line_and_the_closest_names(retried: Path) -> None:
    result = await run_cli("show", str(retried), "mig/one.tx")

    assert result.code == 2
    line = result.one_error_line()
    assert line.startswith(f"migrator: no item mig/one.tx in the ledger of {retried}")
    assert "did you mean mig/one.txt" in line


async def test_show_hides_the_credentials_of_a_source_url_in_every_field(
    job: Path, emulator: Emulator, api_key: str
) -> None:
    async def origin(request: web.Request) -> web.Response:
        return web.Response(status=404, text="no such file")

    async with web_server(origin) as base:
        url = base.replace("http://", f"http://user:{PASSWORD}@") + "/gone.bin"
        manifest = write_manifest(job, emulator.base_url, [{"url": url}])
        run = await run_cli("run", str(manifest), "--no-progress", key=api_key)
        assert run.code == 1, run.stderr

        as_json = await run_cli("show", str(manifest), url, "--format", "json")
        as_table = await run_cli("show", str(manifest), f"{base}/gone.bin")

    assert as_json.code == 0, as_json.stderr
    assert as_table.code == 0, as_table.stderr
    [item] = json.loads(as_json.stdout)["matches"]
    assert item["source"] == f"{base}/gone.bin"
    assert item["status"] == "failed"
    assert item["history"] and item["last_error"]
    for output in (as_json.stdout, as_table.stdout):
        assert PASSWORD not in output
        assert "user:" not in output
