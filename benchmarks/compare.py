"""One benchmark anyone can rerun: migrator against the loops it replaces, in one run.

    python benchmarks/compare.py [--quick] [--scenario small,noop] [--condition loopback,rtt]
                                 [--repeat 3] [--concurrency 16] [--rtt 50] [--jitter 0]

Starts `python -m migrator emulator` as its own process, builds each scenario's data
in a temporary folder, and runs every contender of every scenario, each as its own
process, alternating contenders over --repeat repetitions. Reports the medians (wall
time, files/s, MB/s, client CPU per 1,000 items, peak RSS, the emulator's CPU) and
each ratio to the reference (the bare loop), writes them to benchmarks/RESULTS.md
(RESULTS-quick.md with --quick) with the machine and the date, and prints the same.
Over `rtt`, contenders talk to the emulator (and to the origin of URL items) through
benchmarks/delay_proxy.py. Everything listens on 127.0.0.1 only. See
benchmarks/README.md for what each figure means.

--profile DIR runs only migrator, once per scenario, under cProfile, and writes the
profiles (and their top functions) to DIR instead of results.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.metadata
import io
import json
import os
import platform
import pstats
import re
import secrets
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

from bench_procs import Sample, Server, emulator_argv, measure
from bench_report import Result, Run, raw, render, targets
from bench_scenarios import SCENARIOS, Condition, Contender, Context, Workload

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
NETWORK_SCENARIOS = ("small", "stream", "big", "url")
CONDITIONS = ("loopback", "rtt")
PROXY_VARIABLES = ("http_proxy", "https_proxy", "all_proxy", "no_proxy")
CONTENDER_SCRIPTS = ("bare_loop.py", "sequential_loop.py", "walk_floor.py", "delay_proxy.py")


class Servers:
    """The emulator, and the origins and delaying proxies started as scenarios need them."""

    def __init__(self, work: Path, env: dict[str, str], proxy_args: list[str]) -> None:
        self._work, self._env, self._proxy_args = work, env, proxy_args
        self._started: list[Server] = []
        self._proxies: dict[str, str] = {}
        self._origins: dict[Path, str] = {}
        self.emulator = self._start("emulator", emulator_argv(work / "emulator"))

    def _start(self, name: str, argv: list[str]) -> Server:
        server = Server(name, argv, env=self._env, log=self._work / f"{name}.log")
        self._started.append(server)
        return server

    def _delayed(self, url: str) -> str:
        """A delaying proxy in front of `url`, started once."""
        if url not in self._proxies:
            target = url.split("://", 1)[1]
            argv = [sys.executable, str(HERE / "delay_proxy.py"), "--target", target]
            argv += self._proxy_args
            self._proxies[url] = self._start(f"proxy-{len(self._proxies)}", argv).url
        return self._proxies[url]

    def service(self, condition: Condition) -> str:
        url = self.emulator.url
        return self._delayed(url) if condition.kind == "rtt" else url

    def origin(self, condition: Condition, root: Path) -> str:
        if root not in self._origins:
            argv = [sys.executable, str(HERE / "origin.py"), "--root", str(root)]
            self._origins[root] = self._start(f"origin-{len(self._origins)}", argv).url
        url = self._origins[root]
        return self._delayed(url) if condition.kind == "rtt" else url

    def stop(self) -> None:
        for server in reversed(self._started):
            server.stop()


def child_env(key: str, work: Path) -> dict[str, str]:
    """The environment of every child: this checkout first on the path, the key in
    KIE_API_KEY (never on a command line), no proxy variables (loopback only), and a
    bytecode cache in the work folder, as an installed migrator has one (a checkout
    run with PYTHONDONTWRITEBYTECODE=1 would compile every module at every start)."""
    env = {k: v for k, v in os.environ.items() if k.lower() not in PROXY_VARIABLES}
    for name in ("MIGRATOR_LEDGER_DIR", "PYTHONDONTWRITEBYTECODE"):
        env.pop(name, None)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env["PYTHONPYCACHEPREFIX"] = str(work / "pycache")
    env["KIE_API_KEY"] = key
    return env


def warm_up(env: dict[str, str]) -> None:
    """Fill the bytecode cache before anything is timed."""
    python = sys.executable
    for argv in (
        [python, "-m", "compileall", "-q", str(REPO / "migrator"), str(HERE)],
        [python, "-m", "migrator", "--help"],
        [python, "-c", "import aiohttp, aiohttp.web, aiosqlite, yaml"],
        *([python, str(HERE / name), "--help"] for name in CONTENDER_SCRIPTS),
    ):
        subprocess.run(argv, env=env, capture_output=True, check=True, timeout=120)


# The emulator's access log (its stderr) has one line per request, written before the
# answer leaves: once a contender has its answers, their lines are in the file.
UPLOAD_LINE = re.compile(r"path='/api/file-(?:base64|stream|url)-upload' status=200\b")


def uploads_logged(emulator: Server, offset: int) -> int:
    """Uploads the emulator answered 200 to since its log was `offset` bytes long."""
    return len(UPLOAD_LINE.findall(emulator.log_since(offset)))


def run_workload(
    work: Workload, servers: Servers, env: dict[str, str], args: argparse.Namespace
) -> Result:
    runs = []
    contenders = chosen(work.contenders, args.contenders)
    for rep in range(work.repeat or args.repeat):
        turn = rep % len(contenders)  # each repetition starts with the next contender
        for contender in contenders[turn:] + contenders[:turn]:
            run = run_one(work, contender, rep, servers, env, args)
            runs.append(run)
            status = run.problem or "ok"
            print(
                f"  {work.scenario} {work.condition.kind} #{rep + 1} {contender.name}: "
                f"{run.sample.wall:.2f} s, CPU {run.sample.cpu:.2f} s, "
                f"RSS {run.sample.max_rss / 1e6:.0f} MB, emulator {run.server_cpu:.2f} s; "
                f"{status}",
                flush=True,
            )
    return Result(work, tuple(runs))


def chosen(contenders: tuple[Contender, ...], prefixes: list[str] | None) -> list[Contender]:
    """The contenders whose name starts with one of `prefixes` (all without --contenders)."""
    if prefixes is None:
        return list(contenders)
    return [c for c in contenders if any(c.name.startswith(p) for p in prefixes)]


@contextlib.contextmanager
def fresh_folder(contender: Contender, work: Path) -> Iterator[Path]:
    """A new, empty folder for one run, set up as the contender needs; removed after."""
    folder = Path(tempfile.mkdtemp(prefix="run-", dir=work))
    try:
        if contender.setup is not None:
            contender.setup(folder)
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def problem_of(contender: Contender, sample: Sample, timeout: float) -> str | None:
    if sample.timed_out:
        return f"killed after the {timeout:g} s timeout"
    return contender.check(sample)


def run_one(
    work: Workload,
    contender: Contender,
    rep: int,
    servers: Servers,
    env: dict[str, str],
    args: argparse.Namespace,
) -> Run:
    with fresh_folder(contender, args.work) as folder:
        emulator_cpu = servers.emulator.cpu_seconds()
        logged = servers.emulator.log_size()
        sample = measure(contender.command(folder), env=env, timeout=args.timeout, cwd=folder)
        emulator_cpu = servers.emulator.cpu_seconds() - emulator_cpu
    problem = problem_of(contender, sample, args.timeout)
    uploads = None
    if work.expected_uploads is not None:
        uploads = uploads_logged(servers.emulator, logged)
        if problem is None and uploads != work.expected_uploads:
            problem = f"the emulator saw {uploads} uploads, not {work.expected_uploads}"
    return Run(contender.name, rep, sample, emulator_cpu, uploads, problem)


def profile_workload(work: Workload, env: dict[str, str], args: argparse.Namespace) -> None:
    """migrator's contenders once each under cProfile; the profile and its top lines."""
    args.profile.mkdir(parents=True, exist_ok=True)
    for contender in work.contenders:
        if contender.argv[1:3] != ("-m", "migrator"):
            continue
        slug = re.sub(r"[^a-z0-9]+", "-", contender.name.lower()).strip("-")
        stem = args.profile / f"{work.scenario}-{work.condition.kind}-{slug}"
        prof = stem.with_suffix(".prof")
        profiled = replace(
            contender,
            argv=(contender.argv[0], "-m", "cProfile", "-o", str(prof), *contender.argv[1:]),
        )
        with fresh_folder(profiled, args.work) as folder:
            sample = measure(profiled.command(folder), env=env, timeout=args.timeout, cwd=folder)
        problem = problem_of(profiled, sample, args.timeout)
        text = io.StringIO()
        text.write(f"{work.title}, {work.condition.label}: {contender.name} under cProfile, ")
        text.write(f"{sample.wall:.2f} s wall, {sample.cpu:.2f} s CPU; {problem or 'ok'}\n")
        if prof.exists():
            stats = pstats.Stats(str(prof), stream=text)
            stats.sort_stats("tottime").print_stats(25)
            stats.sort_stats("cumulative").print_stats(25)
        stem.with_suffix(".txt").write_text(text.getvalue(), encoding="utf-8")
        print(text.getvalue(), flush=True)


def conditions(scenario: str, args: argparse.Namespace) -> list[Condition]:
    if scenario not in NETWORK_SCENARIOS:
        return [Condition("local", "local")] if "loopback" in args.condition else []
    rtt = f"{args.rtt:g} ms RTT" + (f" (±{args.jitter:g} ms jitter)" if args.jitter else "")
    rtt += ", no handshake" if args.no_handshake else ""
    labels = {"loopback": "loopback", "rtt": rtt}
    return [Condition(kind, labels[kind]) for kind in CONDITIONS if kind in args.condition]


def _command(argv: list[str]) -> str:
    try:
        return subprocess.run(argv, capture_output=True, text=True, check=False).stdout.strip()
    except OSError:
        return "(not found)"


def _load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def machine(args: argparse.Namespace) -> list[str]:
    model = re.search(r"model name\s*:\s*(.+)", Path("/proc/cpuinfo").read_text())
    commit = _command(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"])
    changed = _command(["git", "-C", str(REPO), "log", "-1", "--format=%h", "--", "migrator"])
    dirty = _command(["git", "-C", str(REPO), "status", "--porcelain", "--", "migrator"])
    sizes = "the --quick sizes" if args.quick else "full sizes"
    return [
        f"- date: {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- machine: `{_command(['uname', '-a'])}`",
        f"- CPUs: {os.cpu_count()} ({model.group(1).strip() if model else 'unknown model'})",
        f"- Python {platform.python_version()}, aiohttp {importlib.metadata.version('aiohttp')}, "
        f"{_command(['curl', '--version']).splitlines()[0].split(' (')[0]}",
        f"- migrator at commit {commit} (migrator/ last changed in {changed})"
        f"{' with local changes' if dirty else ''}",
        f"- load average (1, 5, 15 min) at the start: {args.load_at_start}; at the end: "
        f"{_load()} (anything else running competes for the same CPUs)",
        f"- settings: concurrency {args.concurrency}, {args.repeat} repetitions, "
        f"{args.rtt:g} ms RTT (jitter {args.jitter:g} ms, a new connection "
        f"{'costs no extra' if args.no_handshake else 'costs one more'} round trip), {sizes}",
        f"- command: `{shlex.join(['python', 'benchmarks/compare.py', *sys.argv[1:]])}`",
    ]


def document(results: list[Result], args: argparse.Namespace) -> str:
    head = ["# migrator benchmark results", "", *machine(args), ""]
    head.append(
        "Each contender is its own process; client CPU and peak RSS are its own (and its "
        "children's), from `wait4`; the emulator's CPU is read from /proc. "
        "See benchmarks/README.md for the contenders and what each figure means."
    )
    goals = targets(results)
    if goals:
        head += ["", "## Issue 15's targets, as this run measured them", "", *goals]
        if args.quick:
            head += ["", "(--quick sizes: smaller than the targets', so start-up weighs more.)"]
    head += ["", "## Every scenario"]
    return "\n".join(head) + "\n\n" + "\n".join(render(result) for result in results)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="small sizes: a few minutes in all")
    parser.add_argument(
        "--scenario",
        type=functools.partial(_listed, allowed=tuple(SCENARIOS)),
        default=list(SCENARIOS),
        help=f"comma-separated, of: {', '.join(SCENARIOS)} (default: all)",
    )
    parser.add_argument(
        "--condition",
        type=functools.partial(_listed, allowed=CONDITIONS),
        default=list(CONDITIONS),
        help="loopback, rtt or both (default); local scenarios run with loopback",
    )
    parser.add_argument(
        "--contenders",
        type=lambda text: [name.strip() for name in text.split(",") if name.strip()],
        default=None,
        help="comma-separated name prefixes, e.g. 'migrator,bare' (default: every contender)",
    )
    parser.add_argument("--repeat", type=int, default=3, help="repetitions (default 3)")
    parser.add_argument("--concurrency", type=int, default=16, help="of every concurrent contender")
    parser.add_argument("--rtt", type=float, default=50.0, help="ms, for --condition rtt (50)")
    parser.add_argument("--jitter", type=float, default=0.0, help="± ms per chunk (default 0)")
    parser.add_argument(
        "--no-handshake", action="store_true", help="a new connection costs no extra round trip"
    )
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per run (900)")
    parser.add_argument("--output", type=Path, help="default benchmarks/RESULTS[-quick].md")
    parser.add_argument("--json", type=Path, help="also write every run here")
    parser.add_argument("--workdir", type=Path, help="build data here, and keep it")
    parser.add_argument("--profile", type=Path, metavar="DIR", help="profile migrator instead")
    args = parser.parse_args()
    if args.repeat < 1 or args.concurrency < 1:
        parser.error("--repeat and --concurrency must be at least 1")
    if args.output is None:
        args.output = HERE / ("RESULTS-quick.md" if args.quick else "RESULTS.md")
    return args


def _listed(text: str, allowed: tuple[str, ...]) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in allowed]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"{text!r}: choose from {', '.join(allowed)}")
    return names


KEPT_MARK = "<!-- kept: compare.py rewrites what is above this line, never what is below -->"


def kept_sections(output: Path) -> str:
    """What other benchmarks wrote below KEPT_MARK in the file about to be rewritten."""
    try:
        old = output.read_text(encoding="utf-8")
    except OSError:
        return ""
    at = old.find(KEPT_MARK)
    return "" if at < 0 else "\n" + old[at:]


def main() -> int:
    args = parse_args()
    args.load_at_start = _load()
    args.work = args.workdir or Path(tempfile.mkdtemp(prefix="migrator-compare-"))
    args.work.mkdir(parents=True, exist_ok=True)
    key = secrets.token_urlsafe(24)
    env = child_env(key, args.work)
    header = args.work / "auth.header"
    header.touch(mode=0o600)
    header.write_text(f"Authorization: Bearer {key}\n", encoding="utf-8")
    results: list[Result] = []
    servers: Servers | None = None
    started = time.perf_counter()
    try:
        warm_up(env)
        proxy_args = ["--rtt", f"{args.rtt:g}", "--jitter", f"{args.jitter:g}"]
        servers = Servers(args.work, env, proxy_args + ["--no-handshake"] * args.no_handshake)
        ctx = Context(
            work=args.work,
            quick=args.quick,
            concurrency=args.concurrency,
            timeout=args.timeout,
            env=env,
            header_file=header,
            service=servers.service,
            origin=servers.origin,
        )
        for scenario in args.scenario:
            for condition in conditions(scenario, args):
                print(f"{scenario}, {condition.label}: building", flush=True)
                workload = SCENARIOS[scenario](ctx, condition)
                if args.profile:
                    profile_workload(workload, env, args)
                else:
                    results.append(run_workload(workload, servers, env, args))
    except KeyboardInterrupt:
        print("interrupted: reporting what was measured", file=sys.stderr)
    finally:
        if servers is not None:
            servers.stop()
        if args.workdir is None:
            shutil.rmtree(args.work, ignore_errors=True)
    if args.profile:
        return 0
    text = document(results, args)
    text += f"\nThe whole comparison took {time.perf_counter() - started:.0f} s.\n"
    args.output.write_text(text + kept_sections(args.output), encoding="utf-8")
    if args.json:
        args.json.write_text(json.dumps(raw(results), indent=1), encoding="utf-8")
    print("\n" + text)
    print(f"written to {args.output}")
    failed = any(run.problem for result in results for run in result.runs)
    return 1 if failed or not results else 0


if __name__ == "__main__":
    raise SystemExit(main())
