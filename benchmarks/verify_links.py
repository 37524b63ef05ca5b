"""How long does `migrator verify` take to ask N live links, and does it upload anything?

Uploads N small files with `migrator run` to a `migrator emulator` started as its own
process, then times `migrator verify` over the finished ledger, and counts the
upload requests the emulator saw during the verify (there must be none).

    python benchmarks/verify_links.py --items 10000 --concurrency 32

Prints the upload time (setup), the verify wall time and links per second. Exits
non-zero when verify fails, finds a link not alive, sends an upload, or takes longer
than --limit seconds (default 10).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from bench_procs import Server, emulator_argv

REPO = Path(__file__).resolve().parents[1]
KEY = "benchmark-key-0123456789"


def start_emulator(data_dir: Path) -> Server:
    env = {**os.environ, "PYTHONPATH": str(REPO), "KIE_API_KEY": KEY}
    return Server(
        "emulator", emulator_argv(data_dir), env=env, log=data_dir.parent / "emulator.log"
    )


def uploads_seen(base_url: str) -> int:
    request = urllib.request.Request(
        f"{base_url}/_emulator/requests", headers={"Authorization": f"Bearer {KEY}"}
    )
    with urllib.request.urlopen(request, timeout=30) as answer:
        return len(json.load(answer))


def migrator(*args: str) -> tuple[int, str, float]:
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "migrator", *args],
        env={**os.environ, "PYTHONPATH": str(REPO), "KIE_API_KEY": KEY},
        capture_output=True,
        text=True,
        check=False,
    )
    return done.returncode, done.stdout + done.stderr, time.monotonic() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=10_000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--limit", type=float, default=10.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as temp:
        work = Path(temp)
        (work / "files").mkdir()
        for index in range(args.items):
            (work / "files" / f"f{index:06d}.txt").write_bytes(b"%d\n" % index)
        emulator = start_emulator(work / "emulator")
        base_url = emulator.url
        try:
            manifest = work / "job.yaml"
            manifest.write_text(
                f"version: 1\nname: verify-bench\ntarget:\n  base_url: {base_url}\n"
                f"settings:\n  concurrency: {args.concurrency}\n"
                'sources:\n  - glob: "./files/*.txt"\n',
                encoding="utf-8",
            )
            code, out, setup = migrator("run", str(manifest), "--no-progress")
            if code != 0:
                raise SystemExit(f"run failed ({code}): {out}")
            before = uploads_seen(base_url)
            code, out, took = migrator(
                "verify", str(manifest), "--no-progress", "--concurrency", str(args.concurrency)
            )
            uploads = uploads_seen(base_url) - before
        finally:
            emulator.stop()
    print(f"setup: {args.items} uploads in {setup:.1f} s")
    print(out.strip())
    print(
        f"verify: {args.items} links in {took:.2f} s ({args.items / took:.0f} links/s), "
        f"{uploads} upload requests"
    )
    alive = f"verify: {args.items} alive" in out
    return 0 if code == 0 and alive and uploads == 0 and took <= args.limit else 1


if __name__ == "__main__":
    raise SystemExit(main())
