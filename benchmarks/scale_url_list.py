"""Scale on one machine: a `url_list` of a million items, planned, run, re-run, reported.

    python benchmarks/scale_url_list.py [--items 1000000] [--concurrency 16] [--workdir DIR]

Starts `migrator emulator` and a synthetic origin (benchmarks/origin.py --synthetic:
every path answers a few bytes, so no million files are needed on disk), writes a
url_list of --items URLs of that origin, and runs, each as its own process measured
by launch.py (wall time, CPU, peak RSS of the process itself):

1. `migrator plan` (every URL is asked for its size, as a plan does);
2. `migrator run` to the end (the emulator fetches every URL);
3. `migrator run` again: nothing to send, so zero uploads;
4. `migrator status` and `migrator export` of the finished ledger.

Prints one line per step and exits 1 when a step failed or a limit was passed: peak
RSS under --max-rss MB (150) for plan, run and re-run; status under 2 s, export under
10 s (issue 15's point 5). The full million takes hours on 2 cores, most of it the
emulator fetching and storing a million files: --items 20000 is a quick look.
"""

from __future__ import annotations

import argparse
import os
import re
import secrets
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from bench_procs import Sample, Server, emulator_argv, measure

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
BODY_BYTES = 64
STATUS_LIMIT, EXPORT_LIMIT = 2.0, 10.0


@dataclass(frozen=True, slots=True)
class Step:
    name: str
    argv: list[str]
    wall_limit: float | None = None
    rss_limit: bool = False
    expect: str | None = None  # a regular expression the output must contain


def child_env(key: str, work: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env["PYTHONPYCACHEPREFIX"] = str(work / "pycache")
    env["KIE_API_KEY"] = key
    return env


def url_of(origin: str, index: int) -> str:
    return f"{origin}/d{index // 1000:04d}/f{index:07d}.bin"


def write_urls(work: Path, origin: str, items: int) -> Path:
    urls = work / "urls.txt"
    with urls.open("w", encoding="utf-8") as out:
        for index in range(items):
            out.write(url_of(origin, index) + "\n")
    return urls


def write_job(
    work: Path, origin: str, service: str, items: int, concurrency: int, *, immutable: bool = False
) -> Path:
    urls = write_urls(work, origin, items)
    job = work / "job.yaml"
    job.write_text(
        f"version: 1\nname: scale\ntarget:\n  base_url: {service}\n  upload_path: scale\n"
        f"settings:\n  concurrency: {concurrency}\n"
        f"sources:\n  - url_list: {urls.name}\n" + ("    immutable: true\n" if immutable else ""),
        encoding="utf-8",
    )
    return job


def steps(job: Path, items: int) -> list[Step]:
    migrator = [sys.executable, "-m", "migrator"]
    ledger = ["--ledger", str(job.parent / "scale.sqlite")]
    run = [*migrator, "run", str(job), "--no-progress", *ledger]
    return [
        Step("plan", [*migrator, "plan", str(job), *ledger], rss_limit=True),
        Step("run", run, rss_limit=True, expect=rf"run: {items} uploaded"),
        Step("re-run", run, rss_limit=True, expect=rf"run: 0 uploaded, {items} skipped"),
        Step("status", [*migrator, "status", str(job), *ledger], wall_limit=STATUS_LIMIT),
        Step(
            "export",
            [*migrator, "export", str(job), *ledger, "--output", str(job.parent / "out.jsonl")],
            wall_limit=EXPORT_LIMIT,
        ),
    ]


def problem_of(step: Step, sample: Sample, max_rss: float) -> str | None:
    if sample.timed_out or sample.returncode != 0:
        return f"exit {sample.returncode}: {sample.stderr.strip()[-300:]}"
    if step.expect and not re.search(step.expect, sample.stdout):
        return f"output lacks {step.expect!r}: {sample.stdout.strip()[-300:]}"
    if step.rss_limit and sample.max_rss > max_rss * 1e6:
        return f"peak RSS {sample.max_rss / 1e6:.0f} MB is over {max_rss:g} MB"
    if step.wall_limit is not None and sample.wall > step.wall_limit:
        return f"{sample.wall:.2f} s is over {step.wall_limit:g} s"
    return None


def clean_up(servers: list[Server], work: Path | None) -> None:
    """Stop the servers (the last started first) and remove `work` unless None."""
    for server in reversed(servers):
        server.stop()
    if work is not None:
        shutil.rmtree(work, ignore_errors=True)


def run_step(
    step: Step, env: dict[str, str], work: Path, timeout: float, max_rss: float, width: int = 7
) -> bool:
    """Measure one step and print its line; False when it failed or passed a limit."""
    sample = measure(step.argv, env=env, timeout=timeout, cwd=work)
    problem = problem_of(step, sample, max_rss)
    print(
        f"{step.name:>{width}}: {sample.wall:8.2f} s wall, {sample.cpu:8.2f} s CPU, "
        f"peak RSS {sample.max_rss / 1e6:4.0f} MB; {problem or 'ok'}",
        flush=True,
    )
    return problem is None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=1_000_000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-rss", type=float, default=150.0, help="MB (150)")
    parser.add_argument("--timeout", type=float, default=6 * 3600.0, help="seconds per step")
    parser.add_argument("--workdir", type=Path, help="keep everything here (default: removed)")
    args = parser.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="migrator-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    env = child_env(secrets.token_urlsafe(24), work)
    servers: list[Server] = []
    failed = False
    try:
        emulator = emulator_argv(work / "emulator")
        servers.append(Server("emulator", emulator, env=env, log=work / "emulator.log"))
        origin = [sys.executable, str(HERE / "origin.py"), "--synthetic", str(BODY_BYTES)]
        servers.append(Server("origin", origin, env=env, log=work / "origin.log"))
        job = write_job(work, servers[1].url, servers[0].url, args.items, args.concurrency)
        print(f"{args.items:,} URL items, concurrency {args.concurrency}, in {work}", flush=True)
        for step in steps(job, args.items):
            failed = not run_step(step, env, work, args.timeout, args.max_rss) or failed
    finally:
        clean_up(servers, None if args.workdir else work)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
