"""Benchmark: `migrator plan` of a URL list against an origin whose answers take 0-200 ms.

    python benchmarks/probe_window.py [--urls 100000] [--concurrency 32] [--max-delay-ms 200]

Starts a loopback origin in its own process that answers every HEAD after a delay
drawn uniformly from [0, max-delay) (fixed per URL, so every run sees the same
delays), writes a manifest with one `url_list` of `--urls` URLs, and runs
`python -m migrator plan MANIFEST --format json` of this checkout. Probes are in flight
in a window as wide as the origin session's connections (2 x concurrency); the
ceiling is that window / the mean delay. Prints the figures, the three factors of the
share reached (time spent probing, the window's fill, the origin's lateness) and how long
the plan and the origin waited for a CPU, and exits 1 when the plan reaches less than
80 % of that ceiling.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from aiohttp import web

REPO = Path(__file__).resolve().parents[1]
TARGET_SHARE = 0.80


def delay_of(path: str, max_delay: float) -> float:
    """The fixed delay of one URL: uniform over [0, max_delay) by its path's hash."""
    draw = int.from_bytes(hashlib.blake2b(path.encode(), digest_size=4).digest(), "big")
    return max_delay * draw / 2**32


async def serve_origin(max_delay: float) -> None:
    """The delaying origin: HEAD and GET of any path say 4096 bytes after the delay;
    /_stats tells how many probes came and the most in flight at once."""
    stats = {
        "requests": 0,
        "in_flight": 0,
        "most_in_flight": 0,
        "delay_total": 0.0,
        "held_total": 0.0,  # seconds the answers were held, as the origin's clock saw it
        "first": 0.0,
        "last": 0.0,
    }
    clock = asyncio.get_running_loop().time

    async def answer(request: web.Request) -> web.StreamResponse:
        if request.path == "/_stats":
            return web.json_response(stats)
        started = clock()
        stats["first"] = stats["first"] or started
        stats["requests"] += 1
        stats["in_flight"] += 1
        stats["most_in_flight"] = max(stats["most_in_flight"], stats["in_flight"])
        delay = delay_of(request.path, max_delay)
        stats["delay_total"] += delay
        try:
            await asyncio.sleep(delay)
        finally:
            stats["in_flight"] -= 1
            stats["last"] = clock()
            stats["held_total"] += stats["last"] - started
        return web.Response(body=b"x" * 4096)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", answer)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, backlog=4096)
    await site.start()
    print(f"http://127.0.0.1:{runner.addresses[0][1]}", flush=True)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await runner.cleanup()


def origin_stats(base: str) -> dict[str, float]:
    import urllib.request

    with urllib.request.urlopen(f"{base}/_stats", timeout=10) as response:
        stats: dict[str, float] = json.load(response)
    return stats


def write_job(folder: Path, base: str, urls: int, concurrency: int) -> Path:
    (folder / "urls.txt").write_text("".join(f"{base}/f/{n}.bin\n" for n in range(urls)))
    manifest = folder / "job.yaml"
    manifest.write_text(
        "version: 1\nname: probes\ntarget:\n  base_url: https://api.example.com\n"
        f"ledger: ledger.sqlite\nsettings:\n  concurrency: {concurrency}\n"
        "sources:\n  - url_list: urls.txt\n"
    )
    return manifest


def run_plan(manifest: Path) -> tuple[float, float, float]:
    """Wall seconds, CPU seconds and run-queue seconds (see `waited`) of
    `migrator plan MANIFEST --format json`."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.monotonic()
    plan = subprocess.Popen(
        [sys.executable, "-m", "migrator", "plan", str(manifest), "--format", "json"],
        env=env,
        stdout=subprocess.DEVNULL,
    )
    queued = 0.0
    while plan.poll() is None:  # read while it lives: /proc forgets it once reaped
        queued = max(queued, waited(plan.pid))
        time.sleep(0.2)
    if plan.returncode != 0:
        raise subprocess.CalledProcessError(plan.returncode, plan.args)
    wall = time.monotonic() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return wall, cpu, queued


def waited(pid: int) -> float:
    """Seconds the process was ready to run but waited for a CPU (Linux schedstat; 0
    elsewhere): on a shared machine, what its loop lost to other processes."""
    try:
        return int(Path(f"/proc/{pid}/schedstat").read_text().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return 0.0


def process_cpu(pid: int) -> float:
    """User + system CPU seconds a live process has used (Linux /proc; 0 elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def shortfall(stats: dict[str, float], seconds: float, window: int, origin_cpu: float) -> str:
    """Where the rate went short of window / mean delay, as three factors whose product
    is the share reached: the plan's time spent probing (not starting or writing), the
    window's mean fill at the origin (Little's law), and the delay drawn over the time an
    answer was held (the origin's loop late to wake)."""
    requests = max(stats["requests"], 1)
    span = max(stats["last"] - stats["first"], 1e-9)
    mean_fill = stats["held_total"] / span
    held = stats["held_total"] / requests
    drawn = stats["delay_total"] / requests
    return (
        f"share = probing {span / seconds:.0%} of the plan's time"
        f" x window filled {mean_fill / window:.0%} ({mean_fill:.1f} of {window})"
        f" x delay drawn / held {drawn / held:.0%} ({drawn * 1000:.1f} / {held * 1000:.1f} ms);"
        f" origin CPU {origin_cpu:.1f} s ({origin_cpu / requests * 1e6:.0f} us a probe)"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--urls", type=int, default=100_000)
    parser.add_argument("--concurrency", type=int, default=32, help="settings.concurrency")
    parser.add_argument("--max-delay-ms", type=float, default=200.0)
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    max_delay = args.max_delay_ms / 1000
    if args.serve:
        asyncio.run(serve_origin(max_delay))
        return 0
    origin = subprocess.Popen(
        [sys.executable, __file__, "--serve", "--max-delay-ms", str(args.max_delay_ms)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert origin.stdout is not None
        base = origin.stdout.readline().strip()
        with tempfile.TemporaryDirectory() as folder:
            manifest = write_job(Path(folder), base, args.urls, args.concurrency)
            origin_cpu, origin_queued = process_cpu(origin.pid), waited(origin.pid)
            seconds, cpu, queued = run_plan(manifest)
        stats = origin_stats(base)
        origin_cpu = process_cpu(origin.pid) - origin_cpu
        origin_queued = waited(origin.pid) - origin_queued
    finally:
        origin.send_signal(signal.SIGTERM)
        origin.wait(timeout=30)
    window = 2 * args.concurrency
    mean_delay = stats["delay_total"] / max(stats["requests"], 1)
    ceiling = window / mean_delay
    rate = args.urls / seconds
    print(
        f"{args.urls} URLs, concurrency {args.concurrency} (probe window {window}, "
        f"most in flight at the origin {stats['most_in_flight']:.0f}), "
        f"mean delay {mean_delay * 1000:.1f} ms, {stats['requests']:.0f} probes"
    )
    print(
        f"plan took {seconds:.1f} s: {rate:.0f} URLs/s; ceiling window/mean delay "
        f"{ceiling:.0f}/s; {rate / ceiling:.0%} of it (target {TARGET_SHARE:.0%}); "
        f"plan CPU {cpu:.1f} s ({cpu / args.urls * 1e6:.0f} us a URL); "
        f"load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}"
    )
    print(shortfall(stats, seconds, window, origin_cpu))
    print(
        f"waiting for a CPU (ready, not running): plan {queued:.1f} s for its {cpu:.1f} s"
        f" of CPU, origin {origin_queued:.1f} s for its {origin_cpu:.1f} s"
    )
    return 0 if rate >= TARGET_SHARE * ceiling else 1


if __name__ == "__main__":
    raise SystemExit(main())
