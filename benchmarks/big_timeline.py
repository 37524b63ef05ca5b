"""Where one big stream's wall time goes: before the first byte, the request, after it.

    python benchmarks/big_timeline.py [--size-mib 1024] [--repeat 5] [--nice -15]
                                      [--workdir DIR]

Starts the emulator of this checkout (its own process), writes one file of --size-mib
random MiB (kept in --workdir), then alternates `migrator run` of it with `curl -F` of
it, each run its own process. Per run: the wall time, split by the emulator's access
line for the upload (it logs when it answered and how long the request took) into
"before" (process start to the request's first byte), "request" and "after" (the
answer to the process's exit), and the client's user + system CPU and peak RSS (from
wait4, as compare.py measures them). --nice raises the contenders' priority (as root)
so that other work on the box disturbs the split less.
"""

from __future__ import annotations

import argparse
import os
import re
import secrets
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

from bench_procs import Sample, Server, emulator_argv, measure
from compare import child_env, warm_up

MIB = 1024 * 1024
UPLOAD = re.compile(
    r"timestamp='([^']+)Z' event='emulator.request' method='POST' "
    r"path='/api/file-stream-upload' status=200 ms=([\d.]+)"
)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--nice", type=int, default=0, help="niceness of the contenders")
    parser.add_argument("--workdir", type=Path, help="keep the file here (default: temporary)")
    return parser.parse_args()


def write_file(path: Path, size: int) -> None:
    if path.exists() and path.stat().st_size == size:
        return
    block = os.urandom(MIB)
    with path.open("wb") as out:
        for _ in range(size // MIB):
            out.write(block)


def contenders(work: Path, base_url: str, data: Path) -> dict[str, list[str]]:
    manifest = work / "job.yaml"
    manifest.write_text(
        f"version: 1\nname: big-timeline\ntarget:\n  base_url: {base_url}\n"
        f"  upload_path: bench\nsources:\n  - path: {data}\n",
        encoding="utf-8",
    )
    header = work / "auth.header"
    return {
        "migrator": ["python", "-m", "migrator", "run", str(manifest), "--no-progress",
                     "--ledger", "{rep}/l.sqlite"],
        "curl -F": ["curl", "-sS", "-o", "/dev/null", "-H", f"@{header}",
                    "-F", f"file=@{data}", "-F", "uploadPath=bench", "-F", "fileName=big.bin",
                    f"{base_url}/api/file-stream-upload"],
    }  # fmt: skip


def one_run(argv: list[str], emulator: Server, env: dict[str, str], nice: int) -> dict[str, float]:
    offset = emulator.log_size()
    with tempfile.TemporaryDirectory() as rep:
        command = [arg.replace("{rep}", rep) for arg in argv]
        if command[0] == "python":
            command[0] = sys.executable
        if nice:
            command = ["nice", "-n", str(nice), *command]
        sample: Sample = measure(command, env=env, timeout=900, cwd=Path(rep))
        started = time.time() - sample.wall  # the launcher's own spawn-to-reap
    if sample.returncode != 0:
        raise SystemExit(f"{argv[0]} failed: {sample.stderr.strip()[-300:]}")
    stamp, ms = UPLOAD.findall(emulator.log_since(offset))[-1]
    answered = datetime.fromisoformat(stamp + "+00:00").timestamp()
    request = float(ms) / 1000
    return {
        "wall": sample.wall,
        "before": answered - request - started,
        "request": request,
        "after": started + sample.wall - answered,
        "cpu": sample.cpu,
        "rss": sample.max_rss / MIB,
    }


def main() -> int:
    args = parse_args()
    with tempfile.TemporaryDirectory() as temporary:
        work = args.workdir or Path(temporary)
        work.mkdir(parents=True, exist_ok=True)
        key = secrets.token_urlsafe(24)
        env = child_env(key, work)
        (work / "auth.header").write_text(f"Authorization: Bearer {key}\n", encoding="utf-8")
        data = work / f"big-{args.size_mib}.bin"
        write_file(data, args.size_mib * MIB)
        warm_up(env)
        emulator = Server("emulator", emulator_argv(work / "emulator"), env=env,
                          log=work / "emulator.log")  # fmt: skip
        try:
            runs: dict[str, list[dict[str, float]]] = {}
            for rep in range(args.repeat):
                for name, argv in contenders(work, emulator.url, data).items():
                    run = one_run(argv, emulator, env, args.nice)
                    runs.setdefault(name, []).append(run)
                    shown = " ".join(f"{k} {v:.2f}" for k, v in run.items())
                    print(f"#{rep + 1} {name}: {shown}", flush=True)
        finally:
            emulator.stop()
    print("medians:")
    for name, done in runs.items():
        medians = {k: statistics.median(run[k] for run in done) for k in done[0]}
        print(f"  {name}: " + " ".join(f"{k} {v:.2f}" for k, v in medians.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
