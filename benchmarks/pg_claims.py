"""Benchmark: the PostgreSQL ledger's work claiming, and `migrator run` on it.

    python benchmarks/pg_claims.py [--items 20000] [--workers 4 16] [--batch 16]
                                   [--run-items 2000] [--processes 1 2 4] [--sqlite]
                                   [--url postgresql://...]

1. Claims: `--items` queued items; each of W worker processes (one connection each)
   claims batches of `--batch` (a run claims one item per worker of its concurrency)
   with leases and records each item done (a fenced write), until the queue is empty.
   Prints items/s from the first claim to the last result.
2. Runs: `--run-items` small files, uploaded to the emulator (a `migrator emulator`
   process) by 1, 2 and 4 `migrator run` processes sharing one ledger. Prints items/s.
   `--sqlite`: the same run by one process on an SQLite ledger, for reference.

Without `--url` a throwaway PostgreSQL server is started from the system's binaries
(as the tests do).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from bench_procs import Server, emulator_argv  # noqa: E402
from postgres_server import running_postgres  # noqa: E402

from migrator.ledger_pg import PgLedger  # noqa: E402
from migrator.model import ItemState, ItemUpdate, SourceKind  # noqa: E402

TARGET = "http://127.0.0.1:9/api"
BATCH = 16
API_KEY = "bench-key-0123456789abcdef"


@contextlib.contextmanager
def database(url: str | None) -> Iterator[str]:
    if url is not None:
        yield url
        return
    with running_postgres() as server:
        yield server.url()


async def fresh(url: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(
            "DROP TABLE IF EXISTS queue, workers, attempts, items, runs, facts, "
            "schema_migrations CASCADE"
        )
    finally:
        await conn.close()


async def queue_items(url: str, count: int) -> None:
    await fresh(url)
    async with await PgLedger.open(url, owner="planner") as ledger:
        for start in range(0, count, 1000):
            names = [f"f{i:07}" for i in range(start, min(count, start + 1000))]
            for name in names:
                ledger.put_item(
                    ItemUpdate(
                        TARGET,
                        "bench",
                        name,
                        ItemState.PENDING,
                        source=f"/data/{name}",
                        kind=SourceKind.FILE,
                    )
                )
            work = [("bench", n, {"upload_path": "bench", "file_name": n}) for n in names]
            await ledger.enqueue(TARGET, work)


async def drain(url: str, owner: str, batch_size: int = BATCH) -> tuple[int, float, float]:
    """Claim and finish items until none is left: (items, first claim, last result)."""
    done = 0
    async with await PgLedger.open(url, owner=owner) as ledger:
        first = time.time()
        while batch := await ledger.claim(TARGET, batch_size, 60.0):
            for work in batch:
                name = work.work["file_name"]
                ledger.put_item(
                    ItemUpdate(
                        TARGET,
                        "bench",
                        name,
                        ItemState.DONE,
                        download_url=f"https://files.example/{name}",
                    )
                )
            done += len(batch)
        await ledger.flush()
        last = time.time()
    return done, first, last


def drain_process(url: str, owner: str, batch_size: int) -> tuple[int, float, float]:
    return asyncio.run(drain(url, owner, batch_size))


def claims_per_second(url: str, items: int, workers: int, batch_size: int = BATCH) -> float:
    asyncio.run(queue_items(url, items))
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        results = pool.starmap(drain_process, [(url, f"w{i}", batch_size) for i in range(workers)])
    assert sum(done for done, _first, _last in results) == items
    # From the first claim to the last result: process start-up is not claiming.
    took = max(last for _d, _f, last in results) - min(first for _d, first, _l in results)
    return items / took


def run_throughput(url: str, items: int, processes: int, folder: Path) -> float:
    """`migrator run` of `items` files by `processes` workers on the ledger at `url` (a
    postgresql:// URL, emptied first, or a fresh SQLite file's path): items/s."""
    kind = "pg" if url.startswith("postgresql") else "sqlite"
    if kind == "pg":
        asyncio.run(fresh(url))
    else:
        for stale in Path(url).parent.glob(Path(url).name + "*"):
            stale.unlink()
    src = folder / "src"
    src.mkdir(exist_ok=True)
    for i in range(items):
        path = src / f"f{i:06}.bin"
        if not path.exists():
            path.write_bytes(os.urandom(256 + i % 4096))
    env = {**os.environ, "PYTHONPATH": str(REPO), "KIE_API_KEY": API_KEY}
    data = folder / f"emu-{kind}-{processes}"
    emulator = Server("emulator", emulator_argv(data), env=env, log=folder / "emulator.log")
    try:
        manifest = folder / "job.yaml"
        manifest.write_text(
            yaml.safe_dump(
                {
                    "version": 1,
                    "name": "bench",
                    "target": {"base_url": emulator.url, "upload_path": "b"},
                    "settings": {"concurrency": 16},
                    "sources": [{"glob": str(src / "*.bin")}],
                }
            )
        )
        started = time.perf_counter()
        workers = [
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "migrator",
                    "run",
                    str(manifest),
                    "--no-progress",
                    "--ledger",
                    url,
                    "--log-file",
                    str(folder / f"log-{processes}-{i}.jsonl"),
                ],
                stdout=subprocess.DEVNULL,
                env=env,
            )
            for i in range(processes)
        ]
        codes = [worker.wait() for worker in workers]
        took = time.perf_counter() - started
        assert codes == [0] * processes, codes
    finally:
        emulator.stop()
    return items / took


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=20_000)
    parser.add_argument("--workers", type=int, nargs="+", default=[4, 16])
    parser.add_argument("--batch", type=int, default=BATCH, help="items a claim takes")
    parser.add_argument("--run-items", type=int, default=2000)
    parser.add_argument("--processes", type=int, nargs="*", default=[1, 2, 4])
    parser.add_argument("--url", default=None)
    parser.add_argument(
        "--sqlite", action="store_true", help="also time one run process on an SQLite ledger"
    )
    args = parser.parse_args()
    with database(args.url) as url:
        for workers in args.workers:
            rate = claims_per_second(url, args.items, workers, args.batch)
            print(
                f"claims: {args.items} items, {workers} workers, batches of {args.batch}: "
                f"{rate:,.0f} items/s (load average {os.getloadavg()[0]:.1f})",
                flush=True,
            )
        with tempfile.TemporaryDirectory(prefix="pg-bench-") as folder:
            for processes in args.processes:
                rate = run_throughput(url, args.run_items, processes, Path(folder))
                print(
                    f"run: {args.run_items} items, {processes} processes: {rate:,.0f} items/s",
                    flush=True,
                )
            if args.sqlite:
                ledger = str(Path(folder) / "ledger.sqlite")
                rate = run_throughput(ledger, args.run_items, 1, Path(folder))
                print(
                    f"run: {args.run_items} items, 1 process, SQLite ledger: {rate:,.0f} items/s "
                    f"(load average {os.getloadavg()[0]:.1f})",
                    flush=True,
                )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
