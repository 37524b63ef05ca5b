"""`--shard K/N`: N processes split one job without sharing anything, each with its own
ledger; `migrator ledger merge` folds those ledgers back into one."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import sqlite3
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    Finished,
    Origin,
    closed_port,
    files_below,
    run_cli,
    write_file,
    write_manifest,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from test_run import fetch

from migrator.emulator import Emulator
from migrator.ledger import Ledger
from migrator.lock import RunLock
from migrator.model import AttemptRecord, ItemState, ItemUpdate, SourceKind
from migrator.shard import SHARD_ENV, Shard, chosen_shard, shard_of

pytestmark = pytest.mark.timeout(120)

# -- which shard an item belongs to ----------------------------------------------------------

_NAMES = st.text(st.characters(blacklist_categories=("Cc", "Cs")), min_size=1, max_size=12)
_ITEMS = st.sets(st.tuples(_NAMES, _NAMES), max_size=40)


def split(items: set[tuple[str, str]], count: int) -> list[set[tuple[str, str]]]:
    """The items each shard of `count` takes, as `Shard.holds` decides."""
    return [{item for item in items if Shard(k, count).holds(*item)} for k in range(count)]


@settings(max_examples=200, deadline=None, database=None)
@given(items=_ITEMS, others=_ITEMS, count=st.integers(1, 16))
def test_shards_are_disjoint_cover_every_item_and_keep_it_when_others_come_and_go(
    items: set[tuple[str, str]], others: set[tuple[str, str]], count: int
) -> None:
    shards = split(items, count)
    assert set().union(*shards) == items
    assert sum(len(shard) for shard in shards) == len(items)  # no item in two shards
    grown, shrunk = split(items | others, count), split(items - others, count)
    for k in range(count):
        assert shards[k] == grown[k] & items
        assert shards[k] - others == shrunk[k]


def test_an_items_shard_is_the_same_in_every_process_and_every_version() -> None:
    # Pinned: a hash that changed between releases would move items to another
    # shard's ledger, and they would be uploaded again.
    assert [shard_of("mig/photos", f"{n}.jpg", 16) for n in range(6)] == [14, 1, 1, 2, 6, 6]
    assert shard_of("mig", "café.txt", 1000) == shard_of("mig", "café.txt", 1000)


@pytest.mark.parametrize(
    "text",
    ["0/0", "5/3", "4/4", "x", "", "-1/4", "1/", "/4", "1/4/2", "1.0/4", "\u0661/4", "1/100001"],
)
def test_what_is_not_a_shard_is_refused_in_one_line(text: str) -> None:
    with pytest.raises(ValueError, match=r"not a shard|at most") as refused:
        Shard.parse(text)
    assert "\n" not in str(refused.value)


@pytest.mark.parametrize(("text", "shard"), [("0/1", Shard(0, 1)), (" 3/4 ", Shard(3, 4))])
def test_a_shard_is_k_of_n_counted_from_0(text: str, shard: Shard) -> None:
    assert Shard.parse(text) == shard


def test_the_flag_wins_over_the_environment_which_an_empty_value_leaves_out() -> None:
    assert chosen_shard("1/2", {SHARD_ENV: "0/3"}) == Shard(1, 2)
    assert chosen_shard(None, {SHARD_ENV: "2/3"}) == Shard(2, 3)
    assert chosen_shard(None, {SHARD_ENV: " "}) is None


def test_a_shards_files_are_named_after_the_unsharded_ones() -> None:
    shard = Shard(2, 4)
    assert shard.file_for(Path("/l/job.sqlite")) == Path("/l/job.shard-2-of-4.sqlite")
    assert shard.file_for(Path("out/map.jsonl")) == Path("out/map.shard-2-of-4.jsonl")


# -- the command line ------------------------------------------------------------------------


def names_in(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir())


@pytest.mark.parametrize(
    ("command", "value", "env"),
    [
        ("run", "5/3", None),
        ("plan", "x", None),
        ("refresh", "0/0", None),
        ("download", "2/2", None),
        ("verify", None, "4/3"),
        ("run", None, "one/4"),
    ],
)
async def test_a_bad_shard_is_a_usage_error_in_one_line_and_writes_nothing(
    job: Path, command: str, value: str | None, env: str | None
) -> None:
    manifest = write_manifest(job, f"http://127.0.0.1:{closed_port()}", [{"path": "./a.txt"}])
    write_file(job / "a.txt", 10)
    before = names_in(job)
    args = [command, str(manifest), *(["--shard", value] if value else [])]
    args += ["--dest", str(job / "dest")] if command == "download" else []
    finished = await run_cli(*args, env={SHARD_ENV: env} if env else None)
    assert finished.code == 2
    where = "--shard" if value else f"${SHARD_ENV}"
    assert finished.one_error_line().startswith(f"migrator: {where}: ")
    assert names_in(job) == before


async def test_a_shard_of_a_postgresql_ledger_is_refused_in_one_line(job: Path) -> None:
    manifest = write_manifest(job, f"http://127.0.0.1:{closed_port()}", [{"path": "./a.txt"}])
    write_file(job / "a.txt", 10)
    ledger = f"postgresql://migrator@127.0.0.1:{closed_port()}/job"
    finished = await run_cli("run", str(manifest), "--shard", "0/2", "--ledger", ledger)
    assert finished.code == 2
    assert "needs no shards" in finished.one_error_line()


async def test_adding_files_moves_no_planned_item_to_another_shard(job: Path) -> None:
    manifest = write_manifest(job, "embedded", [{"glob": "./data/*.txt"}])
    for n in range(20):
        write_file(job / "data" / f"{n}.txt", 5, seed=n)
    before = await planned_names(manifest, "1/3")
    for n in range(20, 40):
        write_file(job / "data" / f"{n}.txt", 5, seed=n)
    after = await planned_names(manifest, "1/3")
    assert before and before < after
    assert all(Shard(1, 3).holds("mig", name) for name in after)


async def planned_names(manifest: Path, shard: str) -> set[str]:
    finished = await run_cli("plan", str(manifest), "--format", "json", "--shard", shard)
    assert finished.code == 0, finished.stderr
    return {item["file_name"] for item in json.loads(finished.stdout)["items"]}


async def test_a_shard_downloads_from_its_own_ledger_only_its_own_items(
    job: Path, tmp_path: Path, emulator: Emulator, api_key: str
) -> None:
    files = {f"{n}.txt": write_file(job / "data" / f"{n}.txt", 50, seed=n) for n in range(12)}
    manifest = write_manifest(job, emulator.base_url, [{"glob": "./data/*.txt"}])
    for k in range(2):
        uploaded = await run_cli(
            "run", str(manifest), "--no-progress", key=api_key, env={SHARD_ENV: f"{k}/2"}
        )
        assert uploaded.code == 0, uploaded.stderr
    dest = tmp_path / "dest"
    finished = await run_cli(
        "download", str(manifest), "--no-progress", "--shard", "1/2", "--dest", str(dest)
    )
    assert finished.code == 0, finished.stderr
    mine = {name: data for name, data in files.items() if Shard(1, 2).holds("mig", name)}
    assert mine and len(mine) < len(files)
    assert files_below(dest) == {f"mig/{name}": data for name, data in mine.items()}


# -- four shards side by side, then merged ---------------------------------------------------


def mixed_job(job: Path, base_url: str, origin: Origin) -> tuple[Path, dict[str, bytes]]:
    """48 local files (base64 and stream) and 12 URLs (URL upload): name -> bytes."""
    expected: dict[str, bytes] = {}
    for n in range(48):
        expected[f"f{n}.bin"] = write_file(job / "data" / f"d{n % 3}" / f"f{n}.bin", 200 * n, n)
    for n in range(12):
        origin.files[f"u{n}.bin"] = expected[f"u{n}.bin"] = bytes([n]) * (1000 + n)
    (job / "urls.txt").write_text("".join(f"{origin.url(f'u{n}.bin')}\n" for n in range(12)))
    sources = [{"glob": "./data/**/*.bin"}, {"url_list": "./urls.txt"}]
    outputs = {"jsonl": "out/map.jsonl", "metrics": "out/migrator.prom"}
    manifest = write_manifest(job, base_url, sources, base64_max="4KiB", concurrency=4)
    text = manifest.read_text(encoding="utf-8") + f"outputs: {json.dumps(outputs)}\n"
    manifest.write_text(text, encoding="utf-8")
    return manifest, expected


async def export(manifest: Path, *ledgers: Path) -> list[dict[str, Any]]:
    chosen = [arg for ledger in ledgers for arg in ("--ledger", str(ledger))]
    finished = await run_cli("export", str(manifest), *chosen)
    assert finished.code == 0, finished.stderr
    return [json.loads(line) for line in finished.stdout.splitlines()]


def comparable(records: list[dict[str, Any]]) -> set[tuple[Any, ...]]:
    fields = ("upload_path", "file_name", "method", "size", "sha256", "status")
    return {tuple(record[name] for name in fields) for record in records}


def items_of(ledger: Path) -> set[tuple[str, str]]:
    with closing(sqlite3.connect(f"file:{ledger}?mode=ro", uri=True)) as conn:
        return set(conn.execute("SELECT upload_path, file_name FROM items").fetchall())


async def test_four_shards_side_by_side_merged_export_the_items_and_bytes_of_one_process(
    job: Path, emulator: Emulator, origin: Origin, api_key: str
) -> None:
    manifest, expected = mixed_job(job, emulator.base_url, origin)
    shards = await asyncio.gather(
        *(
            run_cli("run", str(manifest), "--no-progress", "--shard", f"{k}/4", key=api_key)
            for k in range(4)
        )
    )
    assert [finished.code for finished in shards] == [0, 0, 0, 0], [s.stderr for s in shards]
    ledgers = [job / f"ledger.shard-{k}-of-4.sqlite" for k in range(4)]
    for k, ledger in enumerate(ledgers):
        assert all(Shard(k, 4).holds(*item) for item in items_of(ledger))
        assert (job / "out" / f"map.shard-{k}-of-4.jsonl").is_file()
        metrics = (job / "out" / f"migrator.shard-{k}-of-4.prom").read_text(encoding="utf-8")
        assert f'shard="{k}/4"' in metrics
    assert not (job / "ledger.sqlite").exists() and not (job / "out" / "map.jsonl").exists()

    merged = job / "merged.sqlite"
    merge = await run_cli("ledger", "merge", str(merged), *map(str, ledgers))
    assert merge.code == 0, merge.stderr
    assert "60 items" in merge.stdout
    sharded = await export(manifest, merged)
    assert {record["file_name"] for record in sharded} == set(expected)
    assert {record["method"] for record in sharded} == {"base64", "stream", "url"}
    for record in sharded:
        data = await fetch(record["download_url"])
        assert data == expected[record["file_name"]]
        assert record["sha256"] in (None, hashlib.sha256(data).hexdigest())

    whole = job / "whole.sqlite"
    alone = await run_cli(
        "run", str(manifest), "--no-progress", "--ledger", str(whole), key=api_key
    )
    assert alone.code == 0, alone.stderr
    assert comparable(sharded) == comparable(await export(manifest, whole))
    assert comparable(await export(manifest, *ledgers)) == comparable(sharded)


# -- merging ---------------------------------------------------------------------------------

TARGET = "http://127.0.0.1:9"


async def ledger_with(path: Path, items: list[tuple[str, str, float]]) -> None:
    """A ledger where each (file name, link, attempt time) is done after one attempt."""
    async with await Ledger.open(path) as ledger:
        run_id = await ledger.start_run("run", "job.yaml")
        for name, link, at in items:
            ledger.put_item(
                ItemUpdate(
                    TARGET,
                    "mig",
                    name,
                    ItemState.DONE,
                    source=f"/src/{name}",
                    kind=SourceKind.FILE,
                    download_url=link,
                    attempts_added=1,
                )
            )
            record = AttemptRecord(run_id, TARGET, "mig", name, "stream", 1, at, 0.1, "ok", 200)
            ledger.put_attempt(record)
        await ledger.finish_run(run_id, "done", {})


def rows(ledger: Path, sql: str) -> list[tuple[Any, ...]]:
    with closing(sqlite3.connect(f"file:{ledger}?mode=ro", uri=True)) as conn:
        return conn.execute(sql).fetchall()


async def merge(out: Path, *inputs: Path) -> Finished:
    return await run_cli("ledger", "merge", str(out), *map(str, inputs))


async def test_merge_keeps_the_row_with_the_newest_attempt_and_every_attempt(
    tmp_path: Path,
) -> None:
    newer, older = tmp_path / "newer.sqlite", tmp_path / "older.sqlite"
    await ledger_with(newer, [("x.bin", "https://l/new", 2000.0)])
    # written last, so updated last: the attempt's age decides, not the row's
    await ledger_with(older, [("x.bin", "https://l/old", 1000.0), ("y.bin", "https://l/y", 5.0)])
    for order in ((newer, older), (older, newer)):
        out = tmp_path / "out.sqlite"
        assert (await merge(out, *order)).code == 0
        links = dict(rows(out, "SELECT file_name, download_url FROM items"))
        assert links == {"x.bin": "https://l/new", "y.bin": "https://l/y"}
        started = rows(out, "SELECT started_at FROM attempts ORDER BY started_at")
        assert started == [(5.0,), (1000.0,), (2000.0,)]
        assert len(rows(out, "SELECT id FROM runs")) == 2


async def test_merging_the_same_ledgers_again_adds_nothing(tmp_path: Path) -> None:
    a, b, out = tmp_path / "a.sqlite", tmp_path / "b.sqlite", tmp_path / "out.sqlite"
    await ledger_with(a, [("a.bin", "https://l/a", 1.0)])
    await ledger_with(b, [("b.bin", "https://l/b", 2.0)])
    assert (await merge(out, a, b)).code == 0
    again = await merge(out, out, a, b)
    assert again.code == 0, again.stderr
    assert "2 items, 2 attempts, 2 runs" in again.stdout
    started = [row[0] for row in rows(out, "SELECT started_at FROM runs ORDER BY id")]
    assert started == sorted(started)


async def test_merge_refuses_to_overwrite_a_file_that_is_not_a_ledger(tmp_path: Path) -> None:
    a, out = tmp_path / "a.sqlite", tmp_path / "notes.txt"
    await ledger_with(a, [("a.bin", "https://l/a", 1.0)])
    out.write_text("my notes\n", encoding="utf-8")
    finished = await merge(out, a)
    assert finished.code == 2
    assert "not a migrator ledger: refusing to overwrite it" in finished.one_error_line()
    assert out.read_text(encoding="utf-8") == "my notes\n"
    assert names_in(tmp_path) == ["a.sqlite", "notes.txt"]


async def test_merge_of_a_missing_ledger_names_it_and_writes_no_output(tmp_path: Path) -> None:
    a, out = tmp_path / "a.sqlite", tmp_path / "out.sqlite"
    await ledger_with(a, [("a.bin", "https://l/a", 1.0)])
    finished = await merge(out, a, tmp_path / "b.sqlite")
    assert finished.code == 2
    assert finished.one_error_line() == f"migrator: ledger {tmp_path / 'b.sqlite'} does not exist"
    assert not [name for name in names_in(tmp_path) if name.startswith(("out", ".out"))]


async def test_merge_refuses_a_ledger_a_run_still_holds(tmp_path: Path) -> None:
    a, out = tmp_path / "a.sqlite", tmp_path / "out.sqlite"
    await ledger_with(a, [("a.bin", "https://l/a", 1.0)])
    with RunLock(a):
        finished = await merge(out, a)
    assert finished.code == 75
    assert f"holds the lock on {a} (pid {os.getpid()})" in finished.one_error_line()
    assert not out.exists()


async def test_merge_takes_a_ledger_named_twice_once(tmp_path: Path) -> None:
    a, out = tmp_path / "a.sqlite", tmp_path / "out.sqlite"
    await ledger_with(a, [("a.bin", "https://l/a", 1.0)])
    finished = await merge(out, a, a)
    assert finished.code == 0, finished.stderr
    assert "1 items, 1 attempts, 1 runs" in finished.stdout


async def test_status_of_several_ledgers_counts_their_union_while_a_shard_runs(
    job: Path, tmp_path: Path
) -> None:
    manifest = write_manifest(job, TARGET, [{"path": "./a.txt"}])
    a, b = tmp_path / "a.sqlite", tmp_path / "b.sqlite"
    await ledger_with(a, [("a.bin", "https://l/a", 1.0), ("c.bin", "https://l/c", 1.0)])
    await ledger_with(b, [("b.bin", "https://l/b", 2.0)])
    with RunLock(a):
        finished = await run_cli(
            "status", str(manifest), "--ledger", str(a), "--ledger", str(b), "--format", "json"
        )
    assert finished.code == 0, finished.stderr
    report = json.loads(finished.stdout)
    assert report["items"] == 3
    assert report["by_state"]["done"]["items"] == 3
    assert report["ledgers"] == [str(a), str(b)]
