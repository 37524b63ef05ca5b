"""The command line: parses arguments, calls the library, prints, and maps errors to exit codes.

Nothing here decides anything about migrations; every command is a thin call into
the library so that it can be used from Python just the same.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import gc
import json
import os
import sys
import time
from collections.abc import Callable, Coroutine, Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

# Only what parsing the command line needs is imported here: `--version` and `--help`
# must not pay for aiohttp, aiosqlite, rich or the emulator. Each command imports the
# library it calls (tests/test_cli_imports.py keeps it so).
from migrator.completion import SHELLS, script
from migrator.errors import (
    DISK_ERRNOS,
    ConfigError,
    DiskError,
    ExitCode,
    LedgerError,
    ManifestError,
    MigratorError,
    UsageError,
)
from migrator.filters import Filters
from migrator.flags import (
    EnvironmentValueError,
    VersionAction,
    apply_environment,
    bounded_int,
    typed,
)
from migrator.outputs import EXPORT_FORMATS
from migrator.shard import SHARD_ENV, Shard, chosen_shard, for_shard
from migrator.units import (
    parse_bandwidth,
    parse_duration,
    parse_positive_duration,
    parse_rate,
    parse_size,
)

if TYPE_CHECKING:
    from rich.console import Console

    from migrator.command import CommandSummary, Observer
    from migrator.model import Manifest
    from migrator.verify import Sample

Handler = Callable[[argparse.Namespace], int]
T = TypeVar("T")
MAX_PROBLEM_LINE = 300  # a 3,000-character URL in a message is noise, not help


class _HelpFormatter(argparse.HelpFormatter):
    """Wraps descriptions as usual; text written in lines (the examples) stays as written."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if "\n" in text:
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)


class _Parser(argparse.ArgumentParser):
    """argparse, with a bad command line reported in one line instead of usage + error,
    no abbreviated flags (`--dry` is not `--dry-run`), and each flag's MIGRATOR_*
    environment variable as its default (`env_defaults=False`: none)."""

    def __init__(self, *args: Any, env_defaults: bool = True, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)
        self.env_defaults = env_defaults

    def error(self, message: str) -> NoReturn:
        message = message.removeprefix("argument ")  # `--within: 'soon' is not a duration`
        self.exit(int(ExitCode.USAGE), f"{self.prog}: {message} (see: {self.prog} --help)\n")

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        try:
            given = apply_environment(self, os.environ) if self.env_defaults else None
        except EnvironmentValueError as err:
            self.exit(int(ExitCode.USAGE), f"{self.prog}: {err}\n")
        parsed, rest = super().parse_known_args(args, namespace)
        from_env = {}
        if given is not None:
            given.fill(parsed)
            from_env = given.names
        # {dest: variable} of the values the environment gave (a subcommand's included).
        parsed.from_env = {**getattr(parsed, "from_env", {}), **from_env}
        return parsed, rest


def build_parser() -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = _Parser(
        prog="migrator",
        description="Batch migration job runner for the kie.ai File Upload API.",
        epilog=_examples(""),
    )
    parser.add_argument(
        "--version", action=VersionAction, help="show the migrator, Python and aiohttp versions"
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_run_command(commands)
    _add_plan_command(commands)
    _add_status_command(commands)
    _add_export_command(commands)
    _add_show_command(commands)
    _add_refresh_command(commands)
    _add_download_command(commands)
    _add_verify_command(commands)
    _add_ledger_command(commands)
    _add_emulator_command(commands)
    _add_init_command(commands)
    _add_completion_command(commands)
    _add_epilogs(parser)
    return parser


def _add_epilogs(parser: argparse.ArgumentParser, command: str = "") -> None:
    """EXAMPLES at the end of each command's --help, subcommands' (`ledger merge`) too."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                sub.epilog = sub.epilog or _examples(f"{command} {name}".strip())
                _add_epilogs(sub, f"{command} {name}".strip())


EXAMPLES: dict[str, tuple[str, ...]] = {
    "": (
        "migrator plan job.yaml",
        "migrator run job.yaml",
        "migrator status job.yaml",
        "MIGRATOR_DRY_RUN=1 migrator run job.yaml   # every flag has a MIGRATOR_* variable",
        "migrator run --help",
    ),
    "run": (
        "migrator run job.yaml",
        "migrator run job.yaml -n                     # what would be sent; sends nothing",
        "migrator run job.yaml -c 16 --tps-limit 10 --bwlimit 8MiB",
        "migrator run job.yaml -q --ledger /srv/migrator/job.sqlite   # under cron",
        "MIGRATOR_CONCURRENCY=4 migrator run job.yaml -v --retries 8 --timeout 5m",
    ),
    "plan": (
        "migrator plan job.yaml",
        "migrator plan job.yaml --format json --checksum",
    ),
    "status": (
        "migrator status job.yaml",
        "migrator status job.yaml --format json --ledger /srv/migrator/job.sqlite",
    ),
    "export": (
        "migrator export job.yaml > links.jsonl",
        "migrator export job.yaml --format csv --output links.csv",
    ),
    "refresh": (
        "migrator refresh job.yaml",
        "migrator refresh job.yaml --within 24h -n",
    ),
    "download": (
        "migrator download job.yaml --dest ./copy",
        "migrator download job.yaml --dest ./copy --only-remote --within 6h",
    ),
    "verify": (
        "migrator verify job.yaml",
        "migrator verify job.yaml --sample 5% --format json",
    ),
    "show": (
        "migrator show job.yaml ./photos/a.png",
        "migrator show job.yaml migrations/photos/a.png --format json",
    ),
    "init": (
        "migrator init",
        "migrator init jobs/nightly.yaml",
    ),
    "ledger": ("migrator ledger merge job.sqlite job.shard-0-of-2.sqlite job.shard-1-of-2.sqlite",),
    "ledger merge": (
        "migrator ledger merge job.sqlite job.shard-0-of-2.sqlite job.shard-1-of-2.sqlite",
        "migrator ledger merge all.sqlite all.sqlite late-shard.sqlite   # fold one more in",
    ),
    "emulator": (
        "migrator emulator --data-dir /tmp/kie --api-key test-key --port 8080",
        "migrator emulator --data-dir /tmp/kie --port 0 --fault-rate 0.2 --fault-seed 7",
    ),
    "completion": (
        "migrator completion bash > ~/.local/share/bash-completion/completions/migrator",
        "migrator completion zsh > ~/.zfunc/_migrator      # with fpath+=(~/.zfunc)",
        "migrator completion fish > ~/.config/fish/completions/migrator.fish",
    ),
}
"""Examples shown at the end of each command's --help (the key "" is `migrator --help`)."""


def _examples(command: str) -> str | None:
    lines = EXAMPLES.get(command)
    return None if lines is None else "examples:\n" + "".join(f"  {line}\n" for line in lines)


def entry() -> int:
    """The program `migrator` (and `python -m migrator`): `main`, then a light exit.

    When `main` returns, what the command wrote is closed (the ledger, the outputs)
    or flushed at exit (the log file, by atexit). What is left is the interpreter's
    finalization, whose garbage collections walk every object of every module again:
    0.15 to 0.2 s of CPU after a run's summary. Frozen, those objects are freed as
    before when nothing refers to them any more, and only cycles that are garbage
    already are left to the end of the process, as its memory is.
    """
    code = main()
    gc.freeze()
    return code


def main(argv: Sequence[str] | None = None) -> int:
    _ensure_std_streams()
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Handler = args.handler
    with _not_installed("rich"):
        from migrator.logs import configure_logging, get_logger

    # Until a command sets up its own logging: warnings only, on stderr, never a
    # traceback with local variables on stdout (structlog's default).
    configure_logging(log_file=None, console="warnings" if sys.stderr.isatty() else "auto")
    try:
        return handler(args)
    except ManifestError as err:
        print(f"migrator: {_problem_lines(err)}", file=sys.stderr)
        return int(err.exit_code)
    except MigratorError as err:
        print(f"migrator: {err}", file=sys.stderr)
        return int(err.exit_code)
    except KeyboardInterrupt:
        return int(ExitCode.INTERRUPTED_INT)
    except BrokenPipeError:
        # The reader went away (`migrator export | head`): not an error of ours.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return int(ExitCode.OK)
    except OSError as err:
        if err.filename is None and _is_full(getattr(args, "log_path", None)):
            err.filename = args.log_path  # the log sink's write names no file
        print(f"migrator: {_os_error_line(err)}", file=sys.stderr)
        return int(ExitCode.IO)
    except Exception as err:
        get_logger().exception("internal.error", command=args.command)
        where = "the traceback is in the log file; " if getattr(args, "log_path", None) else ""
        print(
            f"migrator: internal error ({type(err).__name__}): {_one_line(str(err))}; "
            f"{where}please report it",
            file=sys.stderr,
        )
        return int(ExitCode.INTERNAL)


@contextlib.contextmanager
def _not_installed(module: str) -> Iterator[None]:
    """Inside, `import module` fails as if it were not installed, unless it is imported
    already (a None in sys.modules: the import system's own way of saying so).

    For structlog: `import structlog` imports rich (for rich tracebacks and rich reprs
    of local variables), and with it pygments and attrs: 0.05 to 0.1 s of every command,
    a run with nothing to send included. Our tracebacks are plain and never show locals,
    so nothing we write changes. Only the CLI does this: it owns the process, where a
    program using migrator as a library keeps its structlog as it is.
    """
    if module in sys.modules:
        yield
        return
    sys.modules[module] = None  # type: ignore[assignment]
    try:
        yield
    finally:
        if sys.modules.get(module, "") is None:
            del sys.modules[module]


def _ensure_std_streams() -> None:
    """`migrator ... >&-` (a closed stdout) must not turn every print into a crash."""
    if sys.stdout is None:
        sys.stdout = open(os.devnull, "w", encoding="utf-8")  # noqa: SIM115
    if sys.stderr is None:
        sys.stderr = open(os.devnull, "w", encoding="utf-8")  # noqa: SIM115


def _one_line(text: str, limit: int = MAX_PROBLEM_LINE) -> str:
    line = " ".join(text.split())
    return line if len(line) <= limit else line[: limit - 1] + "…"


def _problem_lines(err: ManifestError) -> str:
    """One line per problem (as the README promises), each cut to a readable length."""
    return "\n".join(_one_line(str(problem)) for problem in err.problems) or str(err)


def _is_full(path: Path | None) -> bool:
    try:
        return path is not None and os.statvfs(path.parent).f_bavail == 0
    except OSError:
        return False


def _os_error_line(err: OSError) -> str:
    """`cannot write /out/x: the disk is full`, or `a write failed: ...` with no file named."""
    reason = "the disk is full" if err.errno == errno.ENOSPC else (err.strerror or str(err))
    if err.errno in DISK_ERRNOS:
        return (
            f"cannot write {err.filename}: {reason}"
            if err.filename
            else f"a write failed: {reason}"
        )
    return f"{err.filename}: {reason}" if err.filename else reason


# -- shared pieces -------------------------------------------------------------------------


LEDGER_HELP = (
    "ledger file, or a postgresql:// URL that many processes share (default: "
    "$MIGRATOR_LEDGER, else $MIGRATOR_LEDGER_DIR/NAME.sqlite, else the manifest's "
    "`ledger:`, else .migrator/NAME.sqlite beside the manifest)"
)


def _add_manifest_args(sub: argparse.ArgumentParser) -> None:
    sub.add_argument("manifest", type=Path, help="the job's YAML manifest")
    sub.add_argument("--ledger", default=None, help=LEDGER_HELP)


def _add_reading_args(sub: argparse.ArgumentParser) -> None:
    """status and export: the manifest, and one or several ledgers to read."""
    sub.add_argument("manifest", type=Path, help="the job's YAML manifest")
    sub.add_argument(
        "--ledger",
        action="append",
        dest="ledgers",
        default=None,
        help=f"{LEDGER_HELP}; repeat it to read the union of several, such as the "
        "ledgers of --shard runs",
    )


def _add_shard_arg(sub: argparse.ArgumentParser) -> None:
    sub.add_argument(
        "--shard",
        default=None,
        metavar="K/N",
        help=f"handle only shard K of N (K from 0, like JOB_COMPLETION_INDEX), with its own "
        f"ledger NAME.shard-K-of-N.sqlite (default: ${SHARD_ENV}, else the whole job)",
    )


def _add_logging_args(sub: argparse.ArgumentParser) -> None:
    loudness = sub.add_mutually_exclusive_group()
    loudness.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        help="print nothing when all went well: no progress, no summary, only errors",
    )
    loudness.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="show every event on the console: each attempt, retry and item",
    )
    sub.add_argument(
        "--log-format",
        choices=("console", "json"),
        default=None,
        help="show every event on the console, human-readable or as JSON lines (default: "
        "warnings and errors only; every event always goes to the log file)",
    )
    sub.add_argument(
        "--log-file",
        type=Path,
        default=None,
        help="JSON-lines log of every event (default: NAME.log beside the ledger)",
    )
    sub.add_argument(
        "--log-level",
        choices=("debug", "info", "warning", "error"),
        default="info",
        help="the least severe event logged (default info)",
    )
    sub.add_argument(
        "--log-max-size",
        default="10MiB",
        metavar="SIZE",
        help="rotate the log file past this size, keeping 3 old ones: NAME.log.1 .. .3 "
        "(default 10MiB; 0: never, e.g. for logrotate)",
    )
    sub.add_argument(
        "--metrics-file",
        type=Path,
        default=None,
        help="also write a Prometheus textfile-collector file here (as outputs.metrics does)",
    )
    sub.add_argument(
        "--metrics-push",
        default=None,
        metavar="URL",
        help="also push the metrics to this Prometheus Pushgateway, e.g. "
        "http://pushgateway:9091 (as outputs.metrics_push does); a failed push is a warning",
    )


def _load(args: argparse.Namespace, *, check_sources: bool = True) -> Manifest:
    """The manifest as this process's shard sees it (the whole job without --shard), with
    the flags that stand for settings applied."""
    from migrator.manifest import load_manifest

    shard = _shard(args)  # a bad --shard is told before anything is read
    ledgers = getattr(args, "ledgers", None)
    override = ledgers[0] if ledgers else getattr(args, "ledger", None)
    manifest = load_manifest(args.manifest, ledger_override=override, check_sources=check_sources)
    try:
        return for_shard(_with_setting_flags(manifest, args), shard)
    except ValueError as err:
        raise UsageError(str(err)) from None


def _shard(args: argparse.Namespace) -> Shard | None:
    """--shard, else $MIGRATOR_SHARD, for the commands that take one."""
    if "shard" not in vars(args):
        return None
    flag = None if "shard" in args.from_env else args.shard  # chosen_shard reads it there
    try:
        return chosen_shard(flag, os.environ)
    except ValueError as err:
        raise UsageError(str(err)) from None


SETTING_FLAGS = ("timeout", "connect_timeout", "retries")
"""Flags that stand for the manifest setting of the same name (flag > env > manifest)."""


def _with_setting_flags(manifest: Manifest, args: argparse.Namespace) -> Manifest:
    given = {name: getattr(args, name, None) for name in SETTING_FLAGS}
    overrides = {name: value for name, value in given.items() if value is not None}
    if not overrides:
        return manifest
    return dataclasses.replace(
        manifest, settings=dataclasses.replace(manifest.settings, **overrides)
    )


def _add_filter_args(sub: argparse.ArgumentParser) -> None:
    """rclone's filters; see migrator.filters for how a pattern matches."""
    sub.add_argument(
        "--include",
        action="append",
        default=[],
        metavar="GLOB",
        help="only local files whose path below their source's root matches (repeatable; "
        "'*.jpg' matches at any depth, '/top/*.jpg' from the root; excludes win)",
    )
    sub.add_argument(
        "--exclude",
        action="append",
        default=[],
        metavar="GLOB",
        help="leave out local files whose path matches (repeatable; wins over --include)",
    )
    sub.add_argument(
        "--min-size", default=None, metavar="SIZE", help="only files of at least SIZE: 10M, 1MiB"
    )
    sub.add_argument(
        "--max-size", default=None, metavar="SIZE", help="only files of at most SIZE: 1GiB"
    )
    sub.add_argument(
        "--max-age", default=None, metavar="DURATION", help="only files modified within: 36h, 7d"
    )


def _load_filtered(args: argparse.Namespace) -> Manifest:
    """The manifest, with the selection the command line's filters ask for."""
    max_age = _converted("--max-age", parse_duration, args.max_age)
    filters = Filters(
        include=tuple(args.include),
        exclude=tuple(args.exclude),
        min_size=_converted("--min-size", parse_size, args.min_size),
        max_size=_converted("--max-size", parse_size, args.max_size),
        modified_since=None if max_age is None else time.time() - max_age,
    )
    return replace(_load(args), filters=filters)


def _load_for_ledger_work(args: argparse.Namespace) -> Manifest:
    """status, export, refresh, download, verify: they work from the ledger, and must
    work when sources are gone (that is what refresh and download are for). A ledger
    that is not there is a mistyped path, not an empty job: exit 2."""
    manifest = _load(args, check_sources=False)
    if manifest.ledger_url is None:  # a database is there or not: connecting tells
        _require_ledger(manifest.ledger, _ledger_origin(args))
    return manifest


def _require_ledger(path: Path, origin: str) -> None:
    if not path.exists():
        raise LedgerError(
            f"no ledger at {path} (from {origin}); is the path right? `migrator run` creates it"
        )


def _sample(text: str) -> Sample:
    from migrator.verify import Sample

    return Sample.parse(text)


def _ledger_origin(args: argparse.Namespace) -> str:
    """Where the ledger's path came from, for a message: --ledger (or its variable),
    $MIGRATOR_LEDGER_DIR, or the manifest."""
    from migrator.manifest import LEDGER_DIR_ENV

    for dest in ("ledger", "ledgers"):  # status and export take several
        if getattr(args, dest, None):
            origin: str = args.from_env.get(dest, "--ledger")
            return origin
    if os.environ.get(LEDGER_DIR_ENV, "").strip():
        return LEDGER_DIR_ENV
    return "the manifest"


def _setup_logging(
    args: argparse.Namespace, manifest: Manifest, *, default_file: bool = True
) -> None:
    """`default_file=False`: no log file unless --log-file names one (a dry run writes nothing)."""
    from migrator.logs import configure_logging

    default = manifest.ledger.with_suffix(".log") if default_file else None
    log_file: Path | None = args.log_file or default
    console = _console_mode(args)
    _refuse_ledger_paths(
        manifest,
        {
            "--log-file" if args.log_file else "the log file": log_file,
            "--metrics-file": getattr(args, "metrics_file", None),
        },
    )
    if log_file is not None:
        _check_log_file(log_file)
    max_bytes = _converted("--log-max-size", parse_size, args.log_max_size)
    # keys are redacted as read
    configure_logging(
        log_file=log_file, console=console, level=args.log_level, max_bytes=max_bytes or 0
    )
    args.log_path = log_file


def _console_mode(args: argparse.Namespace) -> str:
    """By default the console shows warnings only, readable on a terminal (beside the
    progress bar) and key=value under cron; every event goes to the log file."""
    if args.log_format:
        return str(args.log_format)
    if _is_quiet(args):
        return "errors"
    if getattr(args, "verbose", False):
        return "console"
    return "warnings" if sys.stderr.isatty() else "auto"


def _is_quiet(args: argparse.Namespace) -> bool:
    """-q, unless a -v on the command line beats a MIGRATOR_QUIET from the environment."""
    quiet = bool(getattr(args, "quiet", False))
    verbose = bool(getattr(args, "verbose", False))
    return quiet and not (verbose and "quiet" in args.from_env)


def _refuse_ledger_paths(manifest: Manifest, files: dict[str, Path | None]) -> None:
    """Files a command is told to write (`--log-file`, `--metrics-file`, ...) must not
    be the ledger or one of its own files: refused before anything runs (exit 2)."""
    from migrator.manifest import output_clash

    for what, path in files.items():
        reason = None if path is None else output_clash(path, manifest.ledger)
        if reason is not None:
            raise UsageError(f"{what}: {reason}")


def _check_log_file(log_file: Path) -> None:
    """Its folder exists and it can be opened; a failing disk is exit 74, as for the ledger.
    A folder made for it is 0700 and a new log 0600: the log holds the ledger's links."""
    from migrator.logs import open_log_file

    in_the_way = next((p for p in log_file.parents if p.exists() and not p.is_dir()), None)
    if in_the_way is not None:
        raise ConfigError(f"cannot write the log file {log_file}: {in_the_way} is not a folder")
    try:
        open_log_file(log_file).close()
    except OSError as err:
        kind = DiskError if err.errno in DISK_ERRNOS else ConfigError
        raise kind(f"cannot write the log file {log_file}: {err.strerror}") from None


def _stdout_console() -> Console:
    from rich.console import Console

    class _StdoutConsole(Console):
        def on_broken_pipe(self) -> None:
            # rich exits with status 1 here; `migrator status | head` is not a failure.
            self.quiet = True
            raise BrokenPipeError

    return _StdoutConsole(highlight=False, soft_wrap=True)


def _print_json(value: object) -> None:
    print(json.dumps(value, indent=2, ensure_ascii=False))


# -- run, refresh, download: commands on the command core ------------------------------------


def _add_command_args(sub: argparse.ArgumentParser) -> None:
    """What every command on the command core takes."""
    sub.add_argument(
        "-c",
        "--concurrency",
        metavar="N",
        type=bounded_int(1, 256),
        default=None,
        help="workers, 1-256 (default: settings.concurrency)",
    )
    sub.add_argument(
        "-n", "--dry-run", action="store_true", help="decide and count; write and send nothing"
    )
    sub.add_argument(
        "--grace",
        metavar="DURATION",
        type=typed(parse_duration),
        default=30.0,
        help="how long items in flight get to finish after a signal, e.g. 5s (default 30s)",
    )
    sub.add_argument(
        "--tps-limit",
        metavar="N",
        type=typed(parse_rate),
        default=None,
        help="at most this many requests per second to the service (default: settings.tps_limit)",
    )
    sub.add_argument(
        "--bwlimit",
        metavar="RATE",
        type=typed(parse_bandwidth),
        default=None,
        help="at most this many bytes per second, e.g. 8MiB (default: settings.bwlimit)",
    )
    _add_network_args(sub)
    sub.add_argument(
        "--lease",
        metavar="DURATION",
        type=typed(_lease),
        default="60s",
        help="with a postgresql:// ledger: how long a claimed item stays this process's "
        "without renewal; a dead worker's items return after it (default 60s)",
    )
    sub.add_argument("--no-progress", action="store_true", help="no progress bar or lines")
    sub.add_argument(
        "--summary-format",
        choices=("text", "json"),
        default="text",
        help="the final summary on stdout: a line (default), or one JSON document",
    )
    sub.add_argument(
        "--stats",
        metavar="DURATION",
        type=typed(parse_positive_duration),
        default=10.0,
        help="without a terminal, print a progress line this often (default 10s)",
    )
    _add_logging_args(sub)


def _lease(text: str) -> float:
    """--lease: a duration from 1s to 1d."""
    seconds = parse_duration(text)
    if not 1 <= seconds <= 86400:
        raise ValueError("must be a duration from 1s to 1d, such as 60s")
    return seconds


def _add_network_args(sub: argparse.ArgumentParser) -> None:
    """The SETTING_FLAGS: each stands for the manifest setting of its name."""
    sub.add_argument(
        "--timeout",
        metavar="DURATION",
        type=typed(parse_positive_duration),
        default=None,
        help="how long a read may wait for the next bytes of an answer (default: "
        "settings.timeout, 120s)",
    )
    sub.add_argument(
        "--connect-timeout",
        metavar="DURATION",
        type=typed(parse_positive_duration),
        default=None,
        help="how long opening a connection may take (default: settings.connect_timeout, 15s)",
    )
    sub.add_argument(
        "--retries",
        metavar="N",
        type=bounded_int(0, 50),
        default=None,
        help="retries after the first attempt of a request, 0-50 (default: settings.retries, 5)",
    )


def _command_options(args: argparse.Namespace) -> dict[str, Any]:
    """The CommandOptions fields every command's options share."""
    from migrator.claims import process_started

    return {
        "lease": args.lease,
        "launched_at": process_started(),
        "concurrency": args.concurrency,
        "dry_run": args.dry_run,
        "grace_period": args.grace,
        "handle_signals": True,
        "metrics_file": args.metrics_file,
        "metrics_push": _push_url(args.metrics_push),
        "tps_limit": args.tps_limit,
        "bwlimit": args.bwlimit,
    }


def _push_url(url: str | None) -> str | None:
    from migrator.pushgateway import check_push_url

    reason = None if url is None else check_push_url(url)
    if reason is not None:
        raise UsageError(f"--metrics-push: {reason}")
    return url


def _converted(flag: str, parse: Callable[[str], T], value: str | None) -> T | None:
    if value is None:
        return None
    try:
        return parse(value)
    except ValueError as err:
        raise UsageError(f"{flag}: {err}") from None


def _execute(
    args: argparse.Namespace,
    manifest: Manifest,
    noun: str,
    command: Callable[[Observer], Coroutine[Any, Any, CommandSummary]],
    *,
    as_json: bool = False,
) -> int:
    """Run one command with the display that suits where it runs, print its summary.
    -q: nothing on success; otherwise the summary and its notes go to stderr."""
    import asyncio

    quiet = _is_quiet(args)
    hide = quiet or args.no_progress
    as_json = as_json or args.summary_format == "json"
    try:
        _setup_logging(args, manifest, default_file=not args.dry_run)
        summary = asyncio.run(_with_display(command, noun, args.stats, quiet=hide))
    except MigratorError:
        from migrator.command import CommandSummary

        # Stopped before its first item (an output or log that cannot be written, the lock,
        # the key): scripts still find the summary they read, then the reason.
        _print_summary(CommandSummary(args.command, {}, 0, 0.0), as_json=as_json, quiet=quiet)
        raise
    _print_summary(summary, as_json=as_json, quiet=quiet)
    if summary.message:
        print(f"migrator: {summary.message}", file=sys.stderr)
    return int(summary.exit_code)


def _print_summary(summary: CommandSummary, *, as_json: bool, quiet: bool) -> None:
    if as_json:
        from migrator.views import summary_dict

        _print_json(summary_dict(summary))
    elif not quiet:
        print(summary.line())
        for note in summary.notes:
            print(note)
    elif summary.exit_code != ExitCode.OK:
        for line in (summary.line(), *summary.notes):
            print(f"migrator: {line}", file=sys.stderr)


async def _with_display(
    command: Callable[[Observer], Coroutine[Any, Any, CommandSummary]],
    noun: str,
    interval: float,
    *,
    quiet: bool,
) -> CommandSummary:
    import asyncio

    from migrator.progress import LineProgress, StopNotice

    if quiet:
        return await command(StopNotice(sys.stderr, noun))
    if sys.stderr.isatty():
        from rich.console import Console  # rich only for a terminal: a bar is worth its cost

        from migrator.progress_bar import BarProgress

        with BarProgress(Console(stderr=True), noun) as bar:
            return await command(bar)
    lines = LineProgress(sys.stderr, interval, noun=noun)
    ticker = asyncio.create_task(lines.ticking())
    try:
        return await command(lines)
    finally:
        ticker.cancel()


def _add_run_command(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    sub = commands.add_parser(
        "run", help="upload every item of the manifest that is not already done"
    )
    _add_manifest_args(sub)
    sub.add_argument(
        "--checksum", action="store_true", help="compare sha256 of local files, not size and mtime"
    )
    _add_shard_arg(sub)
    _add_filter_args(sub)
    _add_command_args(sub)
    sub.set_defaults(handler=_cmd_run)


def _cmd_run(args: argparse.Namespace) -> int:
    from migrator.runner import RunOptions, run_manifest

    options = RunOptions(checksum=args.checksum, **_command_options(args))
    manifest = _load_filtered(args)
    return _execute(args, manifest, "uploads", lambda shown: run_manifest(manifest, options, shown))


# -- plan ----------------------------------------------------------------------------------


def _add_plan_command(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    sub = commands.add_parser("plan", help="validate the manifest and show what a run would do")
    _add_manifest_args(sub)
    sub.add_argument("--format", choices=("table", "json"), default="table")
    sub.add_argument("--checksum", action="store_true", help="as `run --checksum` would decide")
    _add_shard_arg(sub)
    sub.add_argument(
        "--commit",
        action="store_true",
        help="with a postgresql:// ledger: queue the plan for the workers to claim",
    )
    _add_filter_args(sub)
    sub.set_defaults(handler=_cmd_plan)


def _cmd_plan(args: argparse.Namespace) -> int:
    import asyncio

    manifest = _load_filtered(args)
    if args.commit:
        return _commit_plan(manifest, args.checksum)
    asyncio.run(_plan(manifest, args.format, args.checksum))
    return int(ExitCode.OK)


def _commit_plan(manifest: Manifest, checksum: bool) -> int:
    import asyncio

    from migrator.claims import commit_plan

    if manifest.ledger_url is None:
        raise UsageError("--commit: needs a shared ledger (--ledger postgresql://...)")
    queued = asyncio.run(commit_plan(manifest, checksum=checksum))
    if queued is None:
        print("plan: workers are still on the queued plan; nothing was queued")
    else:
        print(f"plan: {queued} items queued for the workers")
    return int(ExitCode.OK)


async def _plan(manifest: Manifest, fmt: str, checksum: bool) -> None:
    import asyncio

    from migrator.plan import KEEP_BYTES, check_plan
    from migrator.runner import RunOptions, preview_batches
    from migrator.views import PlanJsonPrinter, PlanTablePrinter, PlanTotals

    check = await asyncio.to_thread(check_plan, manifest, keep=KEEP_BYTES)
    totals = PlanTotals(skipped=check.skipped, unreadable=check.unreadable_count)
    printer = PlanJsonPrinter() if fmt == "json" else PlanTablePrinter(_stdout_console())
    # aclosing: a reader gone mid-plan (`plan | head`) must close the preview's sessions
    # inside this loop, not in asyncio.run's shutdown (which prints a traceback).
    decided = preview_batches(manifest, RunOptions(checksum=checksum), check.kept)
    try:
        async with contextlib.aclosing(decided) as batches:
            async for batch in batches:
                totals.add(batch)
                printer.batch(batch)
    finally:
        printer.flush()  # the rows before a failure are shown too
    printer.totals(totals)


# -- status and export ---------------------------------------------------------------------


def _add_status_command(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    sub = commands.add_parser(
        "status",
        help="where the job stands: states, items not started, failures, expiry",
        description=(
            "What the ledger holds (counts by state, expired items apart from done ones, "
            "failures, the next expiry, the last refresh, download and verify), and how it "
            "compares with the items the manifest names today, found offline: how many are "
            "not started, and how many are no longer in the manifest."
        ),
    )
    _add_reading_args(sub)
    sub.add_argument("--format", choices=("table", "json"), default="table")
    walk = sub.add_mutually_exclusive_group()
    walk.add_argument(
        "--ledger-only",
        action="store_true",
        help="do not walk the manifest's sources to count items not started (a big tree)",
    )
    walk.add_argument(
        "--compare",
        action="store_true",
        help="compare with the manifest however many items either holds (unasked: up to 20,000)",
    )
    sub.set_defaults(handler=_cmd_status)


def _cmd_status(args: argparse.Namespace) -> int:
    import asyncio

    from migrator.report import COMPARE_LIMIT, build_status
    from migrator.views import print_status

    manifest = _load_for_ledger_work(args)
    report = asyncio.run(
        build_status(
            manifest,
            compare_manifest=not args.ledger_only,
            compare_limit=None if args.compare else COMPARE_LIMIT,
            ledgers=_ledgers_read(args, manifest),
        )
    )
    if args.format == "json":
        _print_json(report.as_dict())
    else:
        print_status(_stdout_console(), report)
    return int(ExitCode.OK)


def _add_export_command(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    sub = commands.add_parser("export", help="the mapping of every item to its download URL")
    _add_reading_args(sub)
    sub.add_argument(
        "--format",
        choices=EXPORT_FORMATS,
        default=None,
        help="default: from --output's extension (.jsonl, .ndjson, .csv, .json), else jsonl",
    )
    sub.add_argument(
        "--output",
        type=Path,
        default=None,
        help="file to write (atomically), in a folder that exists (default: stdout)",
    )
    sub.set_defaults(handler=_cmd_export)


def _cmd_export(args: argparse.Namespace) -> int:
    import asyncio

    from migrator.outputs import check_output_folder, export_format

    fmt = export_format(args.format, args.output)
    manifest = _load_for_ledger_work(args)
    ledgers = _ledgers_read(args, manifest)
    for ledger in ledgers:
        _refuse_ledger_paths(replace(manifest, ledger=ledger), {"--output": args.output})
    if args.output is not None:
        check_output_folder(args.output)
    asyncio.run(_export(manifest, ledgers, fmt, args.output))
    return int(ExitCode.OK)


def _ledgers_read(args: argparse.Namespace, manifest: Manifest) -> list[Path]:
    """status, export: the manifest's ledger (the first --ledger), then the other --ledgers."""
    others = [Path(path).expanduser().absolute() for path in (args.ledgers or [])[1:]]
    for path in others:
        _require_ledger(path, "--ledger")
    return [manifest.ledger, *others]


async def _export(manifest: Manifest, ledgers: list[Path], fmt: str, output: Path | None) -> None:
    from migrator.export_lines import export_ledger
    from migrator.report import export_to, reading_ledger

    async with reading_ledger(manifest, ledgers) as ledger:
        if output is not None:
            await export_to(manifest, ledger, fmt, output, make_parents=False)
        else:
            await export_ledger(ledger, manifest.target.base_url, fmt, sys.stdout)


def _add_show_command(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    sub = commands.add_parser(
        "show",
        help="one item's current row and every attempt the ledger recorded for it",
        description=(
            "Show one item's current row (state, link, expiry, last error) and every attempt "
            "the ledger recorded for it. ITEM is its source as the manifest names it (a path, "
            "or a URL) or where it lands (upload_path/file_name). An item the ledger does "
            "not hold exits 2."
        ),
    )
    _add_manifest_args(sub)
    sub.add_argument("item", metavar="ITEM", help="a source (path or URL) or upload_path/file_name")
    sub.add_argument("--format", choices=("table", "json"), default="table")
    sub.set_defaults(handler=_cmd_show)


def _cmd_show(args: argparse.Namespace) -> int:
    import asyncio

    from migrator.history import item_history
    from migrator.naming import without_credentials
    from migrator.views import print_history

    manifest = _load_for_ledger_work(args)
    histories = asyncio.run(item_history(manifest, args.item))
    if args.format == "json":
        shown = without_credentials(args.item)
        _print_json({"item": shown, "matches": [h.as_dict() for h in histories]})
    else:
        console = _stdout_console()
        for history in histories:
            print_history(console, history)
    return int(ExitCode.OK)


# -- refresh and download ------------------------------------------------------------------


def _add_refresh_command(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    sub = commands.add_parser(
        "refresh", help="re-upload done items that expire soon, to the same names"
    )
    _add_manifest_args(sub)
    sub.add_argument(
        "--within",
        type=typed(parse_duration),
        default=None,
        help="refresh what expires within this, e.g. 24h (default: settings.refresh_within)",
    )
    _add_shard_arg(sub)
    _add_command_args(sub)
    sub.set_defaults(handler=_cmd_refresh)


def _cmd_refresh(args: argparse.Namespace) -> int:
    from migrator.refresh import RefreshOptions, refresh

    options = RefreshOptions(within=args.within, **_command_options(args))
    manifest = _load_for_ledger_work(args)
    return _execute(args, manifest, "uploads", lambda shown: refresh(manifest, options, shown))


def _add_download_command(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    sub = commands.add_parser(
        "download", help="download every live item to DEST/<uploadPath>/<fileName>"
    )
    _add_manifest_args(sub)
    sub.add_argument("--dest", type=Path, required=True, help="folder to download into")
    sub.add_argument(
        "--within",
        type=typed(parse_duration),
        default=None,
        help="only items that expire within this",
    )
    sub.add_argument("--only-remote", action="store_true", help="only items whose source is a URL")
    _add_shard_arg(sub)
    _add_command_args(sub)
    sub.set_defaults(handler=_cmd_download)


def _cmd_download(args: argparse.Namespace) -> int:
    from migrator.download import DownloadOptions, download

    options = DownloadOptions(
        within=args.within, only_remote=args.only_remote, **_command_options(args)
    )
    manifest = _load_for_ledger_work(args)
    return _execute(
        args, manifest, "downloads", lambda shown: download(manifest, args.dest, options, shown)
    )


def _add_verify_command(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    sub = commands.add_parser(
        "verify", help="ask every recorded link whether it still serves its bytes; upload nothing"
    )
    _add_manifest_args(sub)
    sub.add_argument(
        "--within",
        type=typed(parse_duration),
        default=None,
        help="only links that expire within this",
    )
    sub.add_argument(
        "--sample",
        type=typed(_sample),
        default=None,
        help="probe a random sample: a count (500) or a share (5%%)",
    )
    sub.add_argument("--format", choices=("table", "json"), default="table")
    _add_shard_arg(sub)
    _add_command_args(sub)
    sub.set_defaults(handler=_cmd_verify)


def _cmd_verify(args: argparse.Namespace) -> int:
    from migrator.verify import VerifyOptions, verify

    options = VerifyOptions(within=args.within, sample=args.sample, **_command_options(args))
    manifest = _load_for_ledger_work(args)
    return _execute(
        args,
        manifest,
        "probes",
        lambda shown: verify(manifest, options, shown),
        as_json=args.format == "json",
    )


# -- init ----------------------------------------------------------------------------------


def _add_init_command(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    sub = commands.add_parser(
        "init",
        help="write a commented starter manifest (never over an existing file)",
        description="Write a commented starter manifest to PATH (default job.yaml; a folder "
        "gets job.yaml inside). The job is named after the file. An existing file is "
        "never replaced (exit 2).",
    )
    sub.add_argument("path", nargs="?", type=Path, default=Path("job.yaml"), metavar="PATH")
    sub.set_defaults(handler=_cmd_init)


def _cmd_init(args: argparse.Namespace) -> int:
    from migrator.starter import write_starter

    written = write_starter(args.path)
    print(f"wrote {written}: edit its target and sources, then: migrator plan {written}")
    return int(ExitCode.OK)


# -- ledger ------------------------------------------------------------------------------------


def _add_ledger_command(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    sub = commands.add_parser(
        "ledger", help="work on ledgers: merge the ledgers of shards, import one into PostgreSQL"
    )
    actions = sub.add_subparsers(dest="ledger_command", required=True, metavar="ACTION")
    merge = actions.add_parser(
        "merge",
        help="fold ledgers (such as those of --shard runs) into one",
        description="Write the union of the IN ledgers to OUT (atomically; OUT must be absent "
        "or a migrator ledger, and is replaced: name it among the INs to fold into it). An "
        "item in several ledgers keeps the row with its newest attempt; every attempt and "
        "run is kept, once.",
    )
    merge.add_argument("out", type=Path, metavar="OUT", help="the merged ledger to write")
    merge.add_argument("inputs", type=Path, nargs="+", metavar="IN", help="ledgers to merge")
    merge.set_defaults(handler=_cmd_ledger_merge)
    _add_ledger_import(actions)


def _cmd_ledger_merge(args: argparse.Namespace) -> int:
    import asyncio

    from migrator.ledger_merge import merge_ledgers

    out = args.out.expanduser().absolute()
    inputs = [path.expanduser().absolute() for path in args.inputs]
    counts = asyncio.run(merge_ledgers(out, inputs))
    print(counts.line(out))
    return int(ExitCode.OK)


def _add_ledger_import(actions: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    sub = actions.add_parser(
        "import", help="copy a job's SQLite ledger into a PostgreSQL ledger (--ledger URL)"
    )
    sub.add_argument("sqlite_file", type=Path, help="the SQLite ledger to copy")
    sub.add_argument(
        "--ledger",
        default=os.environ.get("MIGRATOR_LEDGER"),
        help="the postgresql:// ledger to copy into (default: $MIGRATOR_LEDGER)",
    )
    sub.set_defaults(handler=_cmd_ledger_import)


def _cmd_ledger_import(args: argparse.Namespace) -> int:
    import asyncio

    from migrator.ledger_import import import_sqlite
    from migrator.ledger_pg import redacted
    from migrator.manifest import is_postgres_url

    if not args.ledger or not is_postgres_url(args.ledger):
        raise UsageError("ledger import: --ledger must be a postgresql:// URL")
    where = redacted(args.ledger)
    imported = asyncio.run(import_sqlite(args.sqlite_file, args.ledger))
    print(imported.line(args.sqlite_file, where))
    return int(ExitCode.OK)


# -- emulator ------------------------------------------------------------------------------


def _add_emulator_command(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    sub = commands.add_parser(
        "emulator",
        env_defaults=False,  # the service's side: its flags are not the job's settings
        help="serve a local emulator of the File Upload API",
        description=(
            "Serve a local emulator of the kie.ai File Upload API. Prints one line, "
            "'emulator listening on http://HOST:PORT', once it listens (use --port 0 for a "
            "free port), then runs until SIGINT or SIGTERM."
        ),
    )
    sub.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    sub.add_argument("--port", default="8080", help="port to listen on; 0 picks a free one")
    sub.add_argument(
        "--data-dir",
        required=True,
        help="where uploaded files and their metadata live; reuse it to keep them across restarts",
    )
    sub.add_argument(
        "--api-key",
        default=None,
        help="the bearer key clients must send; when omitted, read from $KIE_API_KEY",
    )
    sub.add_argument("--ttl", default="72h", help="how long uploads live (default 72h)")
    sub.add_argument(
        "--lifetime",
        default=None,
        metavar="DURATION",
        help="delete each file this long after its upload, even before the expiresAt the "
        "answers state (upload time + --ttl); default: files live until expiresAt",
    )
    sub.add_argument(
        "--rate-limit",
        default=None,
        metavar="N",
        help="accept at most N requests a second (sliding window) on the upload endpoints and "
        "download links, answering the rest 429 with Retry-After; default: no limit",
    )
    sub.add_argument(
        "--clock-offset",
        default="0s",
        help="start the emulator's clock this far ahead of real time (default 0s); "
        "the clock never moves back, so a larger offset stored in the data dir wins",
    )
    sub.add_argument(
        "--response-shape",
        default="quickstart",
        help="'quickstart' (fileId, expiresAt, ...) or 'endpoint' (filePath, uploadedAt, "
        "no expiresAt); default quickstart",
    )
    sub.add_argument(
        "--url-max", default="100MiB", help="largest file a URL upload may fetch (default 100MiB)"
    )
    sub.add_argument(
        "--url-timeout", default="30s", help="time allowed to fetch a URL upload (default 30s)"
    )
    sub.add_argument(
        "--fault-rate",
        type=float,
        default=0.0,
        help="answer this share of upload requests (0-1) with a random fault: 500, an error "
        "in a 200, 429, a cut connection, a stall, a truncated answer, a proxy's HTML page",
    )
    sub.add_argument("--fault-seed", type=int, default=None, help="replay the same faults")
    sub.add_argument(
        "--fault-stall", default="5s", help="how long a stalled answer waits (default 5s)"
    )
    sub.set_defaults(handler=_cmd_emulator)


def _cmd_emulator(args: argparse.Namespace) -> int:
    import math
    import os
    from pathlib import Path

    from migrator.emulator import RESPONSE_SHAPES, EmulatorConfig, run_emulator
    from migrator.errors import UsageError
    from migrator.units import parse_duration

    def convert(flag: str, parse: Callable[[str], float], value: str) -> float:
        try:
            return parse(value)
        except ValueError as err:
            raise UsageError(f"{flag}: {err}") from None

    def per_second(value: str) -> float:
        try:
            rate = float(value)
        except ValueError:
            rate = 0.0  # refused just below, in the same words
        if not 1 <= rate < math.inf:
            raise ValueError(f"{value!r} is not a number of requests a second (at least 1)")
        return rate

    api_key = args.api_key or os.environ.get("KIE_API_KEY", "")
    if not api_key.strip():
        raise UsageError("emulator: no API key; pass --api-key or set KIE_API_KEY")
    if not args.port.isdigit() or not 0 <= int(args.port) <= 65535:
        raise UsageError(f"--port: {args.port!r} is not a port number (0-65535)")
    if args.response_shape not in RESPONSE_SHAPES:
        raise UsageError(f"--response-shape: must be one of {', '.join(RESPONSE_SHAPES)}")
    ttl = convert("--ttl", parse_duration, args.ttl)
    if ttl <= 0:
        raise UsageError("--ttl: must be more than 0s")
    url_timeout = convert("--url-timeout", parse_duration, args.url_timeout)
    if url_timeout <= 0:
        raise UsageError("--url-timeout: must be more than 0s")
    lifetime = (
        None if args.lifetime is None else convert("--lifetime", parse_duration, args.lifetime)
    )
    if lifetime is not None and lifetime <= 0:
        raise UsageError("--lifetime: must be more than 0s")
    rate_limit = (
        None if args.rate_limit is None else convert("--rate-limit", per_second, args.rate_limit)
    )
    config = EmulatorConfig(
        data_dir=Path(args.data_dir).expanduser().resolve(),
        api_key=api_key.strip(),
        host=args.host,
        port=int(args.port),
        ttl=ttl,
        response_shape=args.response_shape,
        url_fetch_timeout=url_timeout,
        url_max=int(convert("--url-max", parse_size, args.url_max)),
        clock_offset=convert("--clock-offset", parse_duration, args.clock_offset),
        lifetime=lifetime,
        rate_limit=rate_limit,
        fault_rate=_fault_rate(args.fault_rate),
        fault_seed=args.fault_seed,
        fault_stall=convert("--fault-stall", parse_duration, args.fault_stall),
    )
    run_emulator(config, lambda url: print(f"emulator listening on {url}", flush=True))
    return int(ExitCode.OK)


def _add_completion_command(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    sub = commands.add_parser(
        "completion",
        help="print a shell completion script (bash, zsh or fish)",
        description="Print a completion script for SHELL, generated from migrator's own flags.",
    )
    sub.add_argument("shell", choices=SHELLS, help="the shell to complete in")
    sub.set_defaults(handler=_cmd_completion)


def _cmd_completion(args: argparse.Namespace) -> int:
    print(script(build_parser(), args.shell), end="")
    return int(ExitCode.OK)


def _fault_rate(value: float) -> float:
    if not 0 <= value <= 1:
        raise UsageError("--fault-rate: must be between 0 and 1")
    return value
