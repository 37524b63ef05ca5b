"""Benchmark: `migrator plan` of a URL list against an origin whose answers take 0-200 ms.

    python benchmarks/probe_window.py [--urls 100000] [--concurrency 32] [--max-delay-ms 200]

Starts a loopback origin in its own process that answers every HEAD after a delay
drawn uniformly from [0, max-delay) (fixed per URL, so every run sees the same
delays), writes a manifest with one `url_list` of `--urls` URLs, and runs
`python -m migrator plan MANIFEST --format json` of this checkout. Probes are in flight
in a window as wide as the origin session's connections (2 x concurrency); the
ceiling is that window / the mean delay. Prints the figures and exits 1 when the
plan reaches less than 80 % of that ceiling.
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
    stats = {"requests": 0, "in_flight": 0, "most_in_flight": 0, "delay_total": 0.0}

    async def answer(request: web.Request) -> web.StreamResponse:
        if request.path == "/_stats":
            return web.json_response(stats)
        stats["requests"] += 1
        stats["in_flight"] += 1
        stats["most_in_flight"] = max(stats["most_in_flight"], stats["in_flight"])
        delay = delay_of(request.path, max_delay)
        stats["delay_total"] += delay
        try:
            await asyncio.sleep(delay)
        finally:
            stats["in_flight"] -= 1
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


def run_plan(manifest: Path) -> tuple[float, float]:
    """Wall seconds and CPU seconds of `migrator plan MANIFEST --format json`."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.monotonic()
    subprocess.run(
        [sys.executable, "-m", "migrator", "plan", str(manifest), "--format", "json"],
        check=True,
        env=env,
        stdout=subprocess.DEVNULL,
    )
    wall = time.monotonic() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return wall, cpu


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
            seconds, cpu = run_plan(manifest)
        stats = origin_stats(base)
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
        f"client CPU {cpu:.1f} s ({cpu / args.urls * 1e6:.0f} us a URL); "
        f"load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}"
    )
    return 0 if rate >= TARGET_SHARE * ceiling else 1


if __name__ == "__main__":
    raise SystemExit(main())
