"""Benchmark: check_plan + a full expand over one glob of 200,000 files.

    python benchmarks/plan_glob.py [--dirs 200] [--files 1000]

Builds a temporary tree of empty files, writes a manifest with one glob over it,
and runs the plan in a child process so that its peak RSS is its own. Exits 1 when
the child takes more than 10 s or peaks above 200 MB.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MAX_SECONDS = 10.0
MAX_RSS_MB = 200.0

CHILD = """
import asyncio, json, sys, time
from pathlib import Path
from migrator.manifest import load_manifest
from migrator.plan import check_plan, expand

async def count(manifest):
    n = 0
    async for _ in expand(manifest, session=None):
        n += 1
    return n

started = time.perf_counter()
manifest = load_manifest(Path(sys.argv[1]), environ={})
check = check_plan(manifest)
checked = time.perf_counter()
items = asyncio.run(count(manifest))
done = time.perf_counter()
print(json.dumps({"items": items, "checked": check.items,
                  "check_s": checked - started, "expand_s": done - checked}))
"""


def make_tree(root: Path, dirs: int, files: int) -> None:
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
    for d in range(dirs):
        folder = root / f"d{d:04d}"
        folder.mkdir(parents=True)
        for f in range(files):
            os.close(os.open(folder / f"f{f:05d}.bin", flags, 0o644))


def write_manifest(folder: Path) -> Path:
    path = folder / "bench.yaml"
    path.write_text(
        "version: 1\nname: bench\ntarget:\n  base_url: embedded\n"
        'sources:\n  - glob: "./tree/**/*.bin"\n'
    )
    return path


def run_child(manifest: Path) -> tuple[dict[str, float], float, float]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(manifest)],
        env=env,
        check=True,
        capture_output=True,
        text=True,
    )
    wall = time.perf_counter() - started
    peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # KiB on Linux
    return json.loads(done.stdout), wall, peak_mb


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dirs", type=int, default=200)
    parser.add_argument("--files", type=int, default=1000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="migrator-bench-") as tmp:
        folder = Path(tmp)
        started = time.perf_counter()
        make_tree(folder / "tree", args.dirs, args.files)
        print(f"tree: {args.dirs * args.files} files in {time.perf_counter() - started:.1f} s")
        result, wall, peak_mb = run_child(write_manifest(folder))
    expected = args.dirs * args.files
    print(
        f"items: {result['items']} (check_plan {result['check_s']:.2f} s, "
        f"expand {result['expand_s']:.2f} s); child wall {wall:.2f} s, peak RSS {peak_mb:.1f} MB"
    )
    ok = result["items"] == result["checked"] == expected
    ok = ok and wall <= MAX_SECONDS and peak_mb <= MAX_RSS_MB
    print(
        "OK" if ok else f"FAIL (limits: {MAX_SECONDS:.0f} s, {MAX_RSS_MB:.0f} MB, {expected} items)"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
