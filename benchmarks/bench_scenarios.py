"""The scenarios of compare.py: the data each one builds, and the contenders it runs.

A scenario, for one condition, is a `Workload`: its items and bytes, and the commands
of its contenders, each run as its own process. `{rep}` in a command stands for a
fresh, empty folder of that one run (migrator's ledger goes there). Data are built
once per run of compare.py, under its work folder, and shared by the conditions that
use the same number of items.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from bench_procs import Sample, measure
from upload_items import STREAM_ENDPOINT, URL_ENDPOINT, Item, url_body, write_items

HERE = Path(__file__).resolve().parent
KIB, MIB, GIB = 1024, 1024 * 1024, 1024 * 1024 * 1024
PER_FOLDER = 1000  # files per folder of a generated tree
UPLOAD_PATH = "bench"  # target.upload_path of every manifest, and of every contender

# Items per scenario and condition kind: (full, --quick). "big" counts bytes,
# "startup" repetitions.
SIZES: dict[str, dict[str, tuple[int, int]]] = {
    "small": {"loopback": (5000, 200), "rtt": (300, 24)},
    "stream": {"loopback": (500, 24), "rtt": (100, 8)},
    "big": {"loopback": (GIB, 32 * MIB), "rtt": (GIB, 32 * MIB)},
    "url": {"loopback": (1000, 80), "rtt": (300, 16)},
    "noop": {"local": (20000, 1000)},
    "plan": {"local": (200000, 10000)},
    "startup": {"local": (10, 5)},
}
SMALL_SIZE, STREAM_SIZE, URL_SIZE, NOOP_SIZE = 8 * KIB, 2 * MIB, 8 * KIB, KIB


@dataclass(frozen=True, slots=True)
class Condition:
    kind: str  # loopback | rtt | local
    label: str


Check = Callable[[Sample], "str | None"]


@dataclass(frozen=True, slots=True)
class Contender:
    name: str
    argv: tuple[str, ...]
    check: Check
    setup: Callable[[Path], None] | None = None  # untimed, in the run's own folder

    def command(self, rep: Path) -> list[str]:
        return [arg.replace("{rep}", str(rep)) for arg in self.argv]


@dataclass(frozen=True, slots=True)
class Workload:
    scenario: str
    title: str
    condition: Condition
    items: int
    payload: int  # file bytes that cross from client to service (0: none)
    contenders: tuple[Contender, ...]
    reference: str  # the contender every ratio is taken to
    expected_uploads: int | None  # per run, as the emulator counts them; None: not checked
    repeat: int | None = None  # None: compare.py's --repeat
    notes: tuple[str, ...] = field(default=())


@dataclass
class Context:
    """What the scenarios need from compare.py."""

    work: Path
    quick: bool
    concurrency: int
    timeout: float
    env: dict[str, str]
    header_file: Path  # `Authorization: Bearer KEY`, for curl's -H @file
    service: Callable[[Condition], str]  # the base URL contenders send to
    origin: Callable[[Condition, Path], str]  # an origin serving a folder, as seen by them
    python: str = sys.executable

    def size(self, scenario: str, condition: Condition) -> int:
        full, quick = SIZES[scenario][condition.kind]
        return quick if self.quick else full

    def data(self, name: str) -> Path:
        return self.work / "data" / name


# -- checks of a contender's own output ---------------------------------------------------


def said(pattern: str, where: str = "stdout") -> Check:
    """The run exited 0 and its output matches `pattern`."""

    def check(sample: Sample) -> str | None:
        text = sample.stdout if where == "stdout" else sample.stderr
        if sample.returncode != 0:
            return f"exit {sample.returncode}: {_last_line(sample.stderr or sample.stdout)}"
        if not re.search(pattern, text):
            return f"expected /{pattern}/ on {where}: {_last_line(text)}"
        return None

    return check


def http_200s(count: int) -> Check:
    """curl's `-w '%{http_code}\\n'` printed 200 `count` times."""

    def check(sample: Sample) -> str | None:
        codes = sample.stdout.split()
        if sample.returncode != 0 or codes.count("200") != count:
            others = sorted(set(codes) - {"200"})
            return (
                f"exit {sample.returncode}, {codes.count('200')} of {count} answered 200 "
                f"(others: {others}): {_last_line(sample.stderr)}"
            )
        return None

    return check


def _last_line(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[-1][:200] if lines else "(no output)"


# -- data ----------------------------------------------------------------------------------


def _built(folder: Path, build: Callable[[Path], None]) -> Path:
    """Build `folder` once; a marker says it is complete."""
    marker = folder / ".complete"
    if not marker.exists():
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        build(folder)
        marker.touch()
    return folder


def _write_files(root: Path, count: int, size: int, prefix: str = "f") -> list[Path]:
    """`count` files of `size` bytes, each unlike the others (a counter in its first
    bytes), PER_FOLDER to a folder: root/d0000/f00000.bin, ..."""
    block = os.urandom(size) if size else b""
    paths = []
    for index in range(count):
        folder = root / f"d{index // PER_FOLDER:04d}"
        if index % PER_FOLDER == 0:
            folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{prefix}{index:06d}.bin"
        head = f"{index:016d}".encode()[:size]
        with open(path, "wb") as out:
            out.write(head + block[len(head) :])
        paths.append(path)
    return paths


def _tree_paths(root: Path) -> Iterable[Path]:
    """The files _write_files made under `root`, in order."""
    for folder in sorted(root.iterdir()):
        yield from sorted(folder.iterdir())


def _tree_items(files: Path) -> Iterable[Item]:
    """The items of a glob over `files`, named as migrator names them."""
    for path in _tree_paths(files):
        yield Item(str(path), f"{UPLOAD_PATH}/{path.parent.name}", path.name)


def _manifest(folder: Path, name: str, base_url: str, concurrency: int, sources: str) -> Path:
    path = folder / f"job-{name}.yaml"
    path.write_text(
        f"version: 1\nname: bench-{name}\n"
        f"target:\n  base_url: {base_url}\n  upload_path: {UPLOAD_PATH}\n"
        f"settings:\n  concurrency: {concurrency}\n"
        f"sources:\n{sources}",
        encoding="utf-8",
    )
    return path


def _curl_lines(path: Path, items: Iterable[Item]) -> Path:
    """One line of curl arguments per item, for `xargs -L 1 curl ...`."""
    with path.open("w", encoding="utf-8") as out:
        for item in items:
            if item.is_url:
                body = url_body(item).decode()
                out.write(f"-H Content-Type:application/json -d '{body}'\n")
            else:
                out.write(
                    f"-F file=@{item.source} -F uploadPath={item.upload_path} "
                    f"-F fileName={item.file_name}\n"
                )
    return path


# -- contenders ----------------------------------------------------------------------------


def _migrator(ctx: Context, *args: str) -> tuple[str, ...]:
    return (ctx.python, "-m", "migrator", *args)


def _curl(ctx: Context, *args: str) -> tuple[str, ...]:
    return (
        "curl",
        "-sS",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}\\n",
        "-H",
        f"@{ctx.header_file}",
        "--max-time",
        f"{ctx.timeout:.0f}",
        *args,
    )


def _uploaders(
    ctx: Context,
    condition: Condition,
    manifest: Path,
    items: list[Item],
    folder: Path,
    *,
    sequential: bool = True,
) -> tuple[Contender, ...]:
    """migrator run, the bare loop, the sequential loop and curl, over the same items."""
    count, service = len(items), ctx.service(condition)
    items_file = folder / f"items-{condition.kind}.tsv"
    write_items(items_file, items)
    n = str(ctx.concurrency)
    if count == 1 and not items[0].is_url:
        item = items[0]
        curl = Contender(
            "curl -F",
            _curl(
                ctx,
                "-F",
                f"file=@{item.source}",
                "-F",
                f"uploadPath={item.upload_path}",
                "-F",
                f"fileName={item.file_name}",
                service + STREAM_ENDPOINT,
            ),
            http_200s(1),
        )
    else:
        endpoint = URL_ENDPOINT if items[0].is_url else STREAM_ENDPOINT
        args = _curl_lines(folder / f"curl-{condition.kind}.args", items)
        curl = Contender(
            f"curl, xargs -P {n}",
            ("xargs", "-P", n, "-L", "1", "-a", str(args), *_curl(ctx, service + endpoint)),
            http_200s(count),
        )
    contenders = [
        Contender(
            "migrator",
            _migrator(ctx, "run", str(manifest), "--no-progress", "--ledger", "{rep}/l.sqlite"),
            said(rf"run: {count} uploaded, 0 skipped, 0 failed"),
        ),
        Contender(
            "bare loop",
            (
                ctx.python,
                str(HERE / "bare_loop.py"),
                "--base-url",
                service,
                "--items",
                str(items_file),
                "--concurrency",
                n,
            ),
            said(rf"bare: {count} uploaded, 0 failed"),
        ),
    ]
    if sequential:
        contenders.append(
            Contender(
                "sequential loop",
                (
                    ctx.python,
                    str(HERE / "sequential_loop.py"),
                    "--base-url",
                    service,
                    "--items",
                    str(items_file),
                ),
                said(rf"sequential: {count} uploaded, 0 failed"),
            )
        )
    contenders.append(curl)
    return tuple(contenders)


# -- the scenarios -------------------------------------------------------------------------


def _local_files(
    ctx: Context, scenario: str, condition: Condition, size: int, method: str
) -> Workload:
    count = ctx.size(scenario, condition)
    folder = _built(
        ctx.data(f"{scenario}-{count}"), lambda f: _write_files(f / "files", count, size)
    )
    items = list(_tree_items(folder / "files"))
    manifest = _manifest(
        folder,
        f"{scenario}-{condition.kind}",
        ctx.service(condition),
        ctx.concurrency,
        '  - glob: "./files/**/*.bin"\n',
    )
    return Workload(
        scenario,
        f"{count:,} \N{MULTIPLICATION SIGN} {_size_text(size)} ({method})",
        condition,
        count,
        count * size,
        _uploaders(ctx, condition, manifest, items, folder),
        "bare loop",
        expected_uploads=count,
    )


def small(ctx: Context, condition: Condition) -> Workload:
    return _local_files(ctx, "small", condition, SMALL_SIZE, "base64")


def stream(ctx: Context, condition: Condition) -> Workload:
    return _local_files(ctx, "stream", condition, STREAM_SIZE, "stream")


def big(ctx: Context, condition: Condition) -> Workload:
    size = ctx.size("big", condition)

    def build(folder: Path) -> None:
        block = os.urandom(MIB)
        with open(folder / "big.bin", "wb") as out:
            for _ in range(size // MIB):
                out.write(block)
            out.write(block[: size % MIB])

    folder = _built(ctx.data(f"big-{size}"), build)
    path = folder / "big.bin"
    manifest = _manifest(
        folder,
        f"big-{condition.kind}",
        ctx.service(condition),
        ctx.concurrency,
        "  - path: ./big.bin\n",
    )
    items = [Item(str(path), UPLOAD_PATH, path.name)]
    return Workload(
        "big",
        f"one {_size_text(size)} file (stream)",
        condition,
        1,
        size,
        # One file: the sequential loop would be one request, as the bare loop; and it
        # builds its body in memory, which for this file is the point of the others.
        _uploaders(ctx, condition, manifest, items, folder, sequential=False),
        "bare loop",
        expected_uploads=1,
    )


def url(ctx: Context, condition: Condition) -> Workload:
    count = ctx.size("url", condition)
    folder = _built(
        ctx.data(f"url-{count}"), lambda f: _write_files(f / "site", count, URL_SIZE, "u")
    )
    site = folder / "site"
    origin = ctx.origin(condition, site)
    paths = list(_tree_paths(site))
    urls = [f"{origin}/{path.relative_to(site).as_posix()}" for path in paths]
    url_list = folder / f"urls-{condition.kind}.txt"
    url_list.write_text("".join(f"{one}\n" for one in urls), encoding="utf-8")
    manifest = _manifest(
        folder,
        f"url-{condition.kind}",
        ctx.service(condition),
        ctx.concurrency,
        f"  - url_list: ./{url_list.name}\n",
    )
    items = [Item(one, UPLOAD_PATH, path.name) for one, path in zip(urls, paths, strict=True)]
    return Workload(
        "url",
        f"{count:,} URL items ({_size_text(URL_SIZE)} each, URL upload)",
        condition,
        count,
        0,
        _uploaders(ctx, condition, manifest, items, folder),
        "bare loop",
        expected_uploads=count,
        notes=(
            "The emulator fetches every URL from a loopback origin (through a delaying "
            "proxy too, over RTT); migrator also asks the origin for each size first "
            "(HEAD), as its plan does; the other contenders do not.",
        ),
    )


def noop(ctx: Context, condition: Condition) -> Workload:
    count = ctx.size("noop", condition)
    folder = _built(
        ctx.data(f"noop-{count}"), lambda f: _write_files(f / "files", count, NOOP_SIZE)
    )
    manifest = _manifest(
        folder, "noop", ctx.service(condition), ctx.concurrency, '  - glob: "./files/**/*.bin"\n'
    )
    ledger, state, finished = folder / "done.sqlite", folder / "state.json", folder / ".finished"
    notes = []
    # A ledger is done for the base URL it uploaded to: a new emulator (another port, in
    # a kept --workdir) needs a new first run.
    if not finished.exists() or finished.read_text() != ctx.service(condition):
        for part in folder.glob("done.sqlite*"):
            part.unlink()
        first = measure(
            _migrator(ctx, "run", str(manifest), "--no-progress", "--ledger", str(ledger)),
            env=ctx.env,
            timeout=ctx.timeout,
        )
        problem = said(rf"run: {count} uploaded")(first)
        if problem:
            raise RuntimeError(f"noop: the first run failed: {problem}")
        walk = measure(
            (
                ctx.python,
                str(HERE / "walk_floor.py"),
                str(folder / "files"),
                "--save-state",
                str(state),
            ),
            env=ctx.env,
            timeout=ctx.timeout,
        )
        if walk.returncode != 0:
            raise RuntimeError(f"noop: walk_floor failed: {_last_line(walk.stderr)}")
        finished.write_text(ctx.service(condition))
        notes.append(
            f"Set-up (not timed above): the first `migrator run` uploaded the {count:,} files "
            f"in {first.wall:.1f} s."
        )

    def copy_ledger(rep: Path) -> None:
        for part in folder.glob("done.sqlite*"):
            if not part.name.endswith(".lock"):
                shutil.copy2(part, rep / part.name.replace("done", "l", 1))

    return Workload(
        "noop",
        f"no-op re-run of {count:,} files",
        condition,
        count,
        0,
        (
            Contender(
                "migrator",
                _migrator(ctx, "run", str(manifest), "--no-progress", "--ledger", "{rep}/l.sqlite"),
                said(rf"run: 0 uploaded, {count} skipped, 0 failed"),
                setup=copy_ledger,
            ),
            Contender(
                "walk + stat floor",
                (
                    ctx.python,
                    str(HERE / "walk_floor.py"),
                    str(folder / "files"),
                    "--state",
                    str(state),
                ),
                said(rf"walk: {count} files, {count} unchanged", "stderr"),
            ),
        ),
        "walk + stat floor",
        expected_uploads=0,
        notes=tuple(notes),
    )


def plan(ctx: Context, condition: Condition) -> Workload:
    count = ctx.size("plan", condition)
    folder = _built(ctx.data(f"plan-{count}"), lambda f: _write_files(f / "tree", count, 0))
    manifest = _manifest(
        folder, "plan", ctx.service(condition), ctx.concurrency, '  - glob: "./tree/**/*.bin"\n'
    )
    return Workload(
        "plan",
        f"plan of {count:,} files",
        condition,
        count,
        0,
        (
            Contender(
                "migrator plan",
                _migrator(ctx, "plan", str(manifest), "--ledger", "{rep}/l.sqlite"),
                said(rf"ledger: {count} new"),
            ),
            Contender(
                "walk + stat floor",
                (ctx.python, str(HERE / "walk_floor.py"), str(folder / "tree")),
                said(rf"walk: {count} files", "stderr"),
            ),
        ),
        "walk + stat floor",
        expected_uploads=None,
        notes=("Empty files; the plan's rows go to a file, as they would to a pipe.",),
    )


def startup(ctx: Context, condition: Condition) -> Workload:
    ok = said(r"")
    return Workload(
        "startup",
        "start-up",
        condition,
        1,
        0,
        (
            Contender("migrator --version", _migrator(ctx, "--version"), said(r"migrator \d")),
            Contender("migrator --help", _migrator(ctx, "--help"), said(r"usage: migrator")),
            Contender("python -c pass", (ctx.python, "-c", "pass"), ok),
            Contender("python -c 'import aiohttp'", (ctx.python, "-c", "import aiohttp"), ok),
        ),
        "python -c 'import aiohttp'",
        expected_uploads=None,
        repeat=ctx.size("startup", condition),
        notes=(
            "`python -m migrator`, as the `migrator` script runs it. The reference is the "
            "bare loop's own floor: the interpreter plus `import aiohttp`.",
        ),
    )


def _size_text(size: int) -> str:
    for unit, scale in (("GiB", GIB), ("MiB", MIB), ("KiB", KIB)):
        if size >= scale and size % scale == 0:
            return f"{size // scale} {unit}"
    return f"{size} B"


SCENARIOS: dict[str, Callable[[Context, Condition], Workload]] = {
    "small": small,
    "stream": stream,
    "big": big,
    "url": url,
    "noop": noop,
    "plan": plan,
    "startup": startup,
}
