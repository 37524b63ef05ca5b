"""What reads a finished ledger of a million items: status, export and a re-run, measured.

    python benchmarks/scale_ledger.py [--items 1000000] [--slice 1000] [--workdir DIR]

A real run of a million uploads takes hours on 2 cores; what reads its ledger does not
need them made. This builds the ledger a finished run of a `url_list` of --items URLs
(`immutable: true`) leaves, without the uploads:

1. starts `migrator emulator` and a synthetic origin (as scale_url_list.py does) and
   runs a real `migrator run` of the first --slice URLs: the ledger then holds the
   rows migrator itself wrote (items, one attempt each, the run);
2. copies those rows in SQLite, in one transaction, until the ledger holds --items:
   item j of copy k becomes item k * slice + j, its URL, file name, file id and link
   renamed to that index and every other column (state, size, ETag, expiry, times,
   the attempt's outcome and run) kept as the run wrote it; the indexes are the
   ledger's own, kept up to date by SQLite as for any insert;
3. writes the url_list of all --items URLs, the manifest's as it stands.

Then measures, each as its own process through launch.py (wall, CPU, peak RSS):
`status` (with the comparison with the manifest), `status --ledger-only`, `export` to
CSV and to JSONL, and `run` again (immutable: no probe, nothing to send). Exits 1 when
status takes 2 s or more, an export 10 s or more, or the re-run peaks over --max-rss.
"""

from __future__ import annotations

import argparse
import re
import secrets
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

from bench_procs import Server, emulator_argv, measure
from scale_url_list import (
    BODY_BYTES,
    EXPORT_LIMIT,
    HERE,
    STATUS_LIMIT,
    Step,
    child_env,
    clean_up,
    run_step,
    write_job,
    write_urls,
)

# One copy of every item row but its id, with the slice's index renamed to the copy's.
_INDEX = "CAST(substr(file_name, 2, 7) AS INTEGER)"
_OLD = f"printf('d%04d/f%07d', {_INDEX} / 1000, {_INDEX})"
_NEW = f"printf('d%04d/f%07d', (:offset + {_INDEX}) / 1000, :offset + {_INDEX})"
_RENAMED = {
    "source": f"replace(source, {_OLD}, {_NEW})",
    "file_name": f"printf('f%07d.bin', :offset + {_INDEX})",
    "download_url": f"replace(download_url, printf('f%07d', {_INDEX}), "
    f"printf('f%07d', :offset + {_INDEX}))",
    "file_id": "file_id || printf('-%07d', :offset)",
}


def columns(db: sqlite3.Connection, table: str) -> list[str]:
    return [row[1] for row in db.execute(f"PRAGMA table_info({table})") if row[1] != "id"]


def replicate(ledger: Path, items: int, slice_size: int) -> None:
    """Copy the slice's item and attempt rows until the ledger holds `items` items."""
    db = sqlite3.connect(ledger, isolation_level=None)
    try:
        db.execute("PRAGMA cache_size = -1000000")  # 1 GB: no page spilled, none written twice
        item_columns = columns(db, "items")
        chosen = ", ".join(_RENAMED.get(name, name) for name in item_columns)
        copy_items = (
            f"INSERT INTO items ({', '.join(item_columns)}) SELECT {chosen} FROM items "
            "WHERE id <= :slice ORDER BY id"
        )
        attempt_columns = columns(db, "attempts")
        chosen = ", ".join(
            "item_id + :offset" if name == "item_id" else name for name in attempt_columns
        )
        copy_attempts = (
            f"INSERT INTO attempts ({', '.join(attempt_columns)}) SELECT {chosen} FROM attempts "
            "WHERE item_id <= :slice ORDER BY id"
        )
        count, last = db.execute("SELECT COUNT(*), MAX(id) FROM items").fetchone()
        if count != slice_size or last != slice_size:  # ids 1..slice: attempts follow them
            raise SystemExit(
                f"the slice's run left {count} items (ids to {last}), not {slice_size}"
            )
        db.execute("BEGIN")
        for offset in range(slice_size, items, slice_size):
            params = {"offset": offset, "slice": slice_size}
            db.execute(copy_items, params)
            db.execute(copy_attempts, params)
        db.execute("COMMIT")
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        db.close()


def steps(job: Path, items: int) -> list[Step]:
    migrator = [sys.executable, "-m", "migrator"]
    ledger = ["--ledger", str(job.parent / "scale.sqlite")]
    status = [*migrator, "status", str(job), *ledger]
    export = [*migrator, "export", str(job), *ledger, "--output"]
    run = [*migrator, "run", str(job), "--no-progress", *ledger]
    return [
        Step("status", status, wall_limit=STATUS_LIMIT, expect=rf"{items:,}"),
        Step("status --ledger-only", [*status, "--ledger-only"], wall_limit=STATUS_LIMIT),
        Step("export csv", [*export, str(job.parent / "out.csv")], wall_limit=EXPORT_LIMIT),
        Step("export jsonl", [*export, str(job.parent / "out.jsonl")], wall_limit=EXPORT_LIMIT),
        Step("re-run", run, rss_limit=True, expect=rf"run: 0 uploaded, {items} skipped"),
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=1_000_000)
    parser.add_argument("--slice", type=int, default=1000, help="items really uploaded (1000)")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-rss", type=float, default=150.0, help="MB (150)")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per step")
    parser.add_argument("--workdir", type=Path, help="keep everything here (default: removed)")
    parser.add_argument(
        "--only", nargs="+", metavar="STEP", help="measure only these steps (names as printed)"
    )
    args = parser.parse_args()
    if args.items % args.slice or args.slice % 1000:
        parser.error("--items must be a multiple of --slice, and --slice of 1000")
    work = args.workdir or Path(tempfile.mkdtemp(prefix="migrator-scale-ledger-"))
    work.mkdir(parents=True, exist_ok=True)
    env = child_env(secrets.token_urlsafe(24), work)
    ledger, job = work / "scale.sqlite", work / "job.yaml"
    service_port, origin_port = ports_of(job) if ledger.exists() else (0, 0)
    servers: list[Server] = []
    failed = False
    try:
        emulator = emulator_argv(work / "emulator", port=service_port)
        servers.append(Server("emulator", emulator, env=env, log=work / "emulator.log"))
        origin = [sys.executable, str(HERE / "origin.py"), "--synthetic", str(BODY_BYTES)]
        origin += ["--port", str(origin_port)]
        servers.append(Server("origin", origin, env=env, log=work / "origin.log"))
        if not ledger.exists():
            origin_url, service_url = servers[1].url, servers[0].url
            write_job(work, origin_url, service_url, args.slice, args.concurrency, immutable=True)
            built = build(job, ledger, env, args)
            if built is not None:
                print(built, flush=True)
                return 1
            write_urls(work, origin_url, args.items)
        print(f"{args.items:,} items in {ledger}", flush=True)
        for step in steps(job, args.items):
            if args.only and step.name not in args.only:
                continue
            passed = run_step(step, env, work, args.timeout, args.max_rss, width=20)
            failed = not passed or failed
    finally:
        clean_up(servers, None if args.workdir else work)
    return 1 if failed else 0


def ports_of(job: Path) -> tuple[int, int]:
    """The emulator's and the origin's ports a kept --workdir's ledger and list name."""
    service = re.search(r"base_url: \S+:(\d+)", job.read_text(encoding="utf-8"))
    with (job.parent / "urls.txt").open(encoding="utf-8") as urls:
        origin = re.match(r"\S+?://[^/]+:(\d+)/", urls.readline())
    if service is None or origin is None:
        raise SystemExit(f"{job.parent} holds no ledger this script built")
    return int(service.group(1)), int(origin.group(1))


def build(job: Path, ledger: Path, env: dict[str, str], args: argparse.Namespace) -> str | None:
    """Run the slice for real, then copy its rows: None, or what went wrong."""
    run = [sys.executable, "-m", "migrator", "run", str(job), "--no-progress"]
    sample = measure([*run, "--ledger", str(ledger)], env=env, timeout=args.timeout)
    if sample.returncode != 0 or f"run: {args.slice} uploaded" not in sample.stdout:
        return f"the slice's run failed: {sample.stdout[-300:]} {sample.stderr[-300:]}"
    print(f"slice: {args.slice:,} uploaded in {sample.wall:.1f} s", flush=True)
    started = time.perf_counter()
    replicate(ledger, args.items, args.slice)
    print(f"copied to {args.items:,} items in {time.perf_counter() - started:.1f} s", flush=True)
    return None


if __name__ == "__main__":
    raise SystemExit(main())
