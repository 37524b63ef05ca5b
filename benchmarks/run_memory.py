"""Does `migrator run` stay flat in memory as the number of items grows?

Creates N small files, starts `migrator emulator` as its own process (so its memory
is not counted), runs `migrator run` over a glob of them, and prints the run's
wall time, items per second and peak RSS (VmHWM of the child). Run it for two
sizes and compare: with a bounded queue and batched ledger writes, peak RSS should
barely move while the item count grows tenfold.

    python benchmarks/run_memory.py --items 2000 --items 20000

Exits non-zero when any run fails or the larger run's peak RSS exceeds the
smaller's by more than --max-growth MB (default 40).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_procs import Server, emulator_argv

REPO = Path(__file__).resolve().parents[1]
KEY = "benchmark-key-0123456789"


def make_files(root: Path, count: int, size: int) -> None:
    payload = os.urandom(size)
    for index in range(count):
        folder = root / f"d{index // 1000:04d}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"f{index:07d}.bin").write_bytes(payload)


def start_emulator(data_dir: Path) -> Server:
    env = {**os.environ, "PYTHONPATH": str(REPO), "KIE_API_KEY": KEY}
    return Server(
        "emulator", emulator_argv(data_dir), env=env, log=data_dir.parent / "emulator.log"
    )


def run_once(work: Path, base_url: str, count: int, concurrency: int) -> tuple[float, float]:
    manifest = work / f"job{count}.yaml"
    manifest.write_text(
        f"version: 1\nname: bench{count}\n"
        f"target:\n  base_url: {base_url}\n"
        f"settings:\n  concurrency: {concurrency}\n"
        f"sources:\n  - glob: ./files{count}/**/*.bin\n",
        encoding="utf-8",
    )
    started = time.monotonic()
    child = subprocess.Popen(
        [sys.executable, "-m", "migrator", "run", str(manifest), "--no-progress"],
        env={**os.environ, "PYTHONPATH": str(REPO), "KIE_API_KEY": KEY},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    peak = 0.0
    while child.poll() is None:
        peak = max(peak, vm_hwm_mb(child.pid))
        time.sleep(0.2)
    elapsed = time.monotonic() - started
    out, err = child.communicate()
    if child.returncode != 0:
        raise SystemExit(f"run of {count} items exited {child.returncode}: {err.strip()[-300:]}")
    print(f"  {out.strip()}")
    return elapsed, peak


def vm_hwm_mb(pid: int) -> float:
    try:
        status = Path(f"/proc/{pid}/status").read_text(encoding="ascii")
    except OSError:
        return 0.0
    match = re.search(r"VmHWM:\s+(\d+) kB", status)
    return int(match.group(1)) / 1024 if match else 0.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, action="append", help="item counts to run")
    parser.add_argument("--size", type=int, default=1024, help="bytes per file (default 1024)")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-growth", type=float, default=40.0, help="MB (default 40)")
    args = parser.parse_args()
    counts = sorted(args.items or [2000, 20000])
    with tempfile.TemporaryDirectory(prefix="migrator-bench-") as temp:
        work = Path(temp)
        emulator = start_emulator(work / "emulator")
        base_url = emulator.url
        peaks = []
        try:
            for count in counts:
                make_files(work / f"files{count}", count, args.size)
                elapsed, peak = run_once(work, base_url, count, args.concurrency)
                peaks.append(peak)
                print(
                    f"{count} items of {args.size} B: {elapsed:.1f} s, "
                    f"{count / elapsed:.0f} items/s, peak RSS {peak:.1f} MB"
                )
        finally:
            emulator.stop()
    growth = peaks[-1] - peaks[0]
    print(f"peak RSS growth from {counts[0]} to {counts[-1]} items: {growth:+.1f} MB")
    return 0 if growth <= args.max_growth else 1


if __name__ == "__main__":
    raise SystemExit(main())
