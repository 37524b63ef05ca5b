"""The logging pipeline: structlog events to a JSON-lines file and to the console.

Silent until told otherwise: migrator used as a library writes nothing anywhere
until `configure_logging` is called (the CLI calls it at its edge). Our loggers are
wrapped around our own pipeline, not structlog's global configuration, so a program
that configures structlog for itself is neither changed by us nor sees our events.

Every event is redacted before any sink sees it, whatever the configuration: each
API key migrator reads is registered (`register_secret`) and replaced by "***"
wherever it appears, tracebacks included; keys named like credentials are dropped.

Per sink, an event goes through: exception formatting (never with local
variables) -> secret redaction -> the sink's renderer. Redaction therefore sees
the final text of every traceback.

Sinks:

- the log file (`log_file`): every event at `level` and above, one JSON object a
  line: `timestamp` (ISO-8601 UTC), `level`, `event`, then the fields; a
  traceback is a structured `exception` list (structlog's dict tracebacks).
  Lines are buffered: written every FLUSH_SECONDS, at once for a warning or an
  error, by `flush_logs`, when logging is configured again and at exit (a
  `kill -9` may lose the last fraction of a second of lines; never the ledger).
- the console (`stream`, default stderr), by `console`:
  - "console": human-readable lines (colours only on a TTY), every event >= level;
  - "json": the same JSON lines as the file;
  - "warnings": human-readable, warnings and errors only (beside a progress bar);
  - "errors": the same, errors only (`-q`: nothing when all goes well);
  - "none": nothing;
  - "auto": "console" when the stream is a TTY; otherwise (cron, CI, a pipe) only
    warnings and errors, as one `key=value` line each with the exception reduced
    to its last line, so cron mails stay short and the file keeps the details.

Event names are a stable vocabulary (`run.start`, `upload.attempt`,
`upload.done`, `upload.failed`, `run.summary`, ...); fields are data.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import functools
import json
import os
import sys
import threading
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO, cast

import structlog
from structlog.typing import EventDict, ExcInfo, FilteringBoundLogger, Processor, WrappedLogger

from migrator.errors import ConfigError
from migrator.naming import hide_credentials

LEVELS = {"debug": 10, "info": 20, "warning": 30, "warn": 30, "error": 40, "critical": 50}
CONSOLE_MODES = ("auto", "console", "warnings", "errors", "json", "none")
REDACTED = "***"
SENSITIVE_KEYS = frozenset(
    {"authorization", "api_key", "apikey", "x_api_key", "token", "access_token", "password"}
)
MIN_SECRET_LENGTH = 4
_FIRST_KEYS = ("timestamp", "level", "event")
FLUSH_SECONDS = 0.2  # the most of the log file's lines a kill -9 can lose
_METHOD_LEVELS = {"exception": "error", "warn": "warning", "fatal": "critical", "msg": "info"}

Format = Callable[[EventDict], str]
_PLAIN_TYPES = frozenset({int, float, bool})


# -- redaction ----------------------------------------------------------------------------------


_REGISTERED: set[str] = set()


def register_secret(secret: str) -> str:
    """Never let `secret` out in any log event from now on; returns it unchanged."""
    if len(secret) >= MIN_SECRET_LENGTH:
        _REGISTERED.add(secret)
    return secret


def redact_secrets(secrets: Sequence[str] = ()) -> Processor:
    """A processor replacing each secret (length >= 4) by "***" in every string value:
    `secrets`, and every secret registered with `register_secret`, then or later.

    Walks dicts, lists and tuples; other objects are turned into their text first so
    a repr cannot carry a secret out. The `user:password@` of any URL is removed too.
    Keys named authorization, api_key, token, password (any case, '-' or '_') are
    dropped. An `exc_info` still present is rendered to a plain `exception` text (no
    locals) first, then redacted.
    """
    given = {s for s in secrets if len(s) >= MIN_SECRET_LENGTH}
    longest_first: list[str] = []
    known: set[str] = set()

    def learn_new_secrets() -> None:
        if len(known) != len(given) + len(_REGISTERED):  # a key was registered since
            known.clear()
            known.update(given | _REGISTERED)
            longest_first[:] = sorted(known, key=len, reverse=True)

    def redact_text(text: str) -> str:
        for secret in longest_first:
            if secret in text:
                text = text.replace(secret, REDACTED)
        return hide_credentials(text)  # a source URL's `user:password@` stays in the ledger

    def redact_value(value: object) -> object:
        kind = type(value)
        if kind is str:
            return redact_text(cast(str, value))
        if value is None or kind in _PLAIN_TYPES:  # most fields of most events: cheap
            return value
        if isinstance(value, str):
            return redact_text(value)
        if isinstance(value, bool | int | float):
            return value
        if isinstance(value, Mapping):
            return {
                redact_text(str(k)): redact_value(v)
                for k, v in value.items()
                if not _is_sensitive_key(k)
            }
        if isinstance(value, list | tuple | set | frozenset):
            return [redact_value(v) for v in value]
        return redact_text(str(value))

    def processor(logger: WrappedLogger, method_name: str, event_dict: EventDict) -> EventDict:
        learn_new_secrets()
        exc_info = event_dict.pop("exc_info", None)
        resolved = _resolve_exc_info(exc_info)
        if resolved is not None and "exception" not in event_dict:
            event_dict["exception"] = _plain_traceback(resolved)
        return {
            key: redact_value(value)
            for key, value in event_dict.items()
            if not _is_sensitive_key(key)
        }

    return processor


def _is_sensitive_key(key: object) -> bool:
    return isinstance(key, str) and _sensitive_name(key)


@functools.lru_cache(maxsize=1024)
def _sensitive_name(key: str) -> bool:
    return key.lower().replace("-", "_") in SENSITIVE_KEYS


# -- exceptions ---------------------------------------------------------------------------------


def _resolve_exc_info(exc_info: object) -> ExcInfo | None:
    if exc_info is None or exc_info is False:
        return None
    if isinstance(exc_info, BaseException):
        return (type(exc_info), exc_info, exc_info.__traceback__)
    if isinstance(exc_info, tuple) and len(exc_info) == 3 and exc_info[0] is not None:
        return cast(ExcInfo, exc_info)
    if exc_info is True:
        current = sys.exc_info()
        return cast(ExcInfo, current) if current[0] is not None else None
    return None


def _plain_traceback(exc_info: ExcInfo) -> str:
    return "".join(traceback.format_exception(*exc_info)).rstrip("\n")


def _last_line(exc_info: ExcInfo) -> str:
    return "".join(traceback.format_exception_only(exc_info[0], exc_info[1])).strip()


def _resolve_exc_info_processor(
    logger: WrappedLogger, method_name: str, event_dict: EventDict
) -> EventDict:
    """`exc_info=True` means "the exception being handled": pin it while it still is."""
    if "exc_info" in event_dict:
        resolved = _resolve_exc_info(event_dict.pop("exc_info"))
        if resolved is not None:
            event_dict["exc_info"] = resolved
    return event_dict


_dict_tracebacks = structlog.processors.ExceptionRenderer(
    structlog.tracebacks.ExceptionDictTransformer(show_locals=False)
)


def _plain_exception(logger: WrappedLogger, method_name: str, event_dict: EventDict) -> EventDict:
    resolved = _resolve_exc_info(event_dict.pop("exc_info", None))
    if resolved is not None:
        event_dict["exception"] = _plain_traceback(resolved)
    return event_dict


def _short_exception(logger: WrappedLogger, method_name: str, event_dict: EventDict) -> EventDict:
    resolved = _resolve_exc_info(event_dict.pop("exc_info", None))
    if resolved is not None:
        event_dict["exception"] = _last_line(resolved)
    return event_dict


# -- sinks --------------------------------------------------------------------------------------


@dataclass(slots=True)
class _Sink:
    stream: TextIO
    min_level: int
    steps: tuple[Processor, ...]  # exception formatting and redaction
    render: Format
    name: str | None = None  # the log file's path; None for the console
    buffered: bool = False  # flushed by the tee's timer and on warnings, not per event
    broken: bool = False

    def emit(self, method_name: str, event: EventDict, level: int) -> None:
        if self.broken:
            return
        event_dict: EventDict = dict(event)
        for step in self.steps:
            event_dict = cast(EventDict, step(None, method_name, event_dict))
        try:
            self.stream.write(self.render(event_dict) + "\n")
            if not self.buffered or level >= LEVELS["warning"]:
                self.stream.flush()
        except OSError as err:
            self._stop(err)

    def flush(self) -> None:
        if self.broken:
            return
        try:
            self.stream.flush()
        except OSError as err:
            self._stop(err)

    def _stop(self, err: OSError) -> None:
        # A full disk under the log must not stop the uploads: say so once, go on.
        self.broken = True
        if self.name is not None:
            print(
                f"migrator: cannot write the log file {self.name}: {err.strerror or err};"
                " logging to it stopped",
                file=sys.stderr,
            )


class _CurrentStderr:
    """Whatever sys.stderr is when an event is written, not when logging was set up:
    a progress bar that redirects stderr then keeps log lines above itself."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()

    def isatty(self) -> bool:
        return sys.stderr.isatty()


class _Tee:
    """What every migrator logger writes to: the sinks of the latest configure_logging."""

    def __init__(self) -> None:
        self._sinks: tuple[_Sink, ...] = ()
        self._owned: tuple[TextIO, ...] = ()
        self._lock = threading.RLock()
        self._flusher: threading.Thread | None = None

    @property
    def silent(self) -> bool:
        return not self._sinks

    def replace(self, sinks: tuple[_Sink, ...], owned: tuple[TextIO, ...]) -> None:
        with self._lock:
            self._flush_sinks()
            old, self._sinks, self._owned = self._owned, sinks, owned
            for stream in old:
                with contextlib.suppress(OSError):  # what a full disk left in the buffer
                    stream.close()
        if any(sink.buffered for sink in sinks):
            self._start_flusher()

    def dispatch(self, method_name: str, event: EventDict) -> None:
        level = LEVELS.get(str(event.get("level", "info")), LEVELS["info"])
        with self._lock:
            for sink in self._sinks:
                if level >= sink.min_level:
                    sink.emit(method_name, event, level)

    def flush(self) -> None:
        with self._lock:
            self._flush_sinks()

    def _flush_sinks(self) -> None:
        for sink in self._sinks:
            sink.flush()

    def _start_flusher(self) -> None:
        """One daemon thread for the process, flushing every FLUSH_SECONDS."""
        if self._flusher is None:
            self._flusher = threading.Thread(target=self._flush_forever, daemon=True)
            self._flusher.start()
            atexit.register(self.flush)

    def _flush_forever(self) -> None:
        while True:
            time.sleep(FLUSH_SECONDS)
            self.flush()


_TEE = _Tee()


class _NamedTee:
    """What a logger named `name` writes to: the one tee, with the name attached.
    structlog calls `logger.<method>(**event_dict)`, <method> being the one used."""

    def __init__(self, name: str | None) -> None:
        self.name = name

    def __getattr__(self, method_name: str) -> Callable[..., None]:
        def emit(**event: Any) -> None:
            _TEE.dispatch(method_name, event)

        setattr(self, method_name, emit)  # made once per method, not once per event
        return emit


def _drop_when_silent(logger: WrappedLogger, method_name: str, event_dict: EventDict) -> EventDict:
    """Before configure_logging (a library caller's program): nothing, at no cost."""
    if _TEE.silent:
        raise structlog.DropEvent
    return event_dict


def _add_logger_name(logger: WrappedLogger, method_name: str, event_dict: EventDict) -> EventDict:
    name = getattr(logger, "name", None)
    if name and name != "migrator":
        event_dict.setdefault("logger", name)
    return event_dict


def _pass_as_kwargs(logger: WrappedLogger, method_name: str, event_dict: EventDict) -> EventDict:
    return event_dict


def _add_level(logger: WrappedLogger, method_name: str, event_dict: EventDict) -> EventDict:
    event_dict.setdefault("level", _METHOD_LEVELS.get(method_name, method_name))
    return event_dict


class _Second:
    """The text of the current second, made once a second rather than once an event."""

    number = -1
    text = ""


def _add_timestamp(logger: WrappedLogger, method_name: str, event_dict: EventDict) -> EventDict:
    """ISO-8601 UTC with microseconds and `Z`, as structlog's TimeStamper(fmt="iso",
    utc=True) writes it, at a fraction of its cost (an event per uploaded item)."""
    now = time.time()
    second = int(now)
    if second != _Second.number:
        moment = datetime.datetime.fromtimestamp(second, datetime.UTC)
        _Second.number, _Second.text = second, moment.strftime("%Y-%m-%dT%H:%M:%S")
    micro = int((now - second) * 1_000_000)
    event_dict["timestamp"] = f"{_Second.text}.{micro:06d}Z" if micro else f"{_Second.text}Z"
    return event_dict


# Fixed: the sinks change, the chain does not. Loggers made at import time use it.
_PROCESSORS: list[Processor] = [
    _drop_when_silent,
    structlog.contextvars.merge_contextvars,
    _add_level,
    _add_timestamp,
    _resolve_exc_info_processor,
    _add_logger_name,
    _pass_as_kwargs,
]


# -- renderers ----------------------------------------------------------------------------------


_JSON = json.JSONEncoder(ensure_ascii=False, default=str)  # one, not one per line


def _json_line(event_dict: EventDict) -> str:
    ordered = {k: event_dict[k] for k in _FIRST_KEYS if k in event_dict}
    ordered.update(event_dict)  # the first keys keep their places
    return _JSON.encode(ordered)


def _console_renderer(stream: TextIO) -> Format:
    renderer = structlog.dev.ConsoleRenderer(
        colors=_is_tty(stream),
        exception_formatter=structlog.dev.plain_traceback,
    )
    return lambda event_dict: str(renderer(None, "", event_dict))


def _key_value_line(event_dict: EventDict) -> str:
    renderer = structlog.processors.LogfmtRenderer(key_order=list(_FIRST_KEYS), drop_missing=True)
    return str(renderer(None, "", event_dict))


def _is_tty(stream: TextIO) -> bool:
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty()) if callable(isatty) else False
    except ValueError:  # a closed stream
        return False


# -- configuration ------------------------------------------------------------------------------


def configure_logging(
    *,
    log_file: Path | None,
    console: str = "auto",
    secrets: Sequence[str] = (),
    level: str = "info",
    stream: TextIO | None = None,
    max_bytes: int = 0,
) -> None:
    """Send every event to `log_file` (JSON lines) and to `stream` per `console`.

    `max_bytes` > 0 rotates the log file past that size (see LogFile). Safe to call
    again: the previous sinks are replaced (and the previous log file closed), never
    added to. Raises ConfigError for an unknown level or console mode, or a log file
    that cannot be opened.
    """
    min_level = _level_number(level)
    if console not in CONSOLE_MODES:
        raise ConfigError(f"unknown console log mode {console!r} (use {', '.join(CONSOLE_MODES)})")
    redact = redact_secrets(secrets)
    sinks: list[_Sink] = []
    owned: list[TextIO] = []
    if log_file is not None:
        handle = _open_log_file(log_file, max_bytes)
        owned.append(handle)
        sinks.append(
            _Sink(
                handle,
                min_level,
                (_dict_tracebacks, redact),
                _json_line,
                name=str(log_file),
                buffered=True,
            )
        )
    console_stream = stream or cast(TextIO, _CurrentStderr())
    console_sink = _console_sink(console, console_stream, min_level, redact)
    if console_sink is not None:
        sinks.append(console_sink)
    _TEE.replace(tuple(sinks), tuple(owned))


def flush_logs() -> None:
    """Write what the log file holds in its buffer now (the timer does so every
    FLUSH_SECONDS, and exit does too): for a caller about to read the file."""
    _TEE.flush()


def get_logger(name: str = "migrator") -> FilteringBoundLogger:
    """A logger whose events go where `configure_logging` said (nowhere before it);
    they carry `logger=<name>` unless the name is the default."""
    # Bound now, not through structlog's lazy proxy: it would look the method up
    # through __getattr__ on every event, and the chain never changes anyway.
    wrapper: Any = structlog.make_filtering_bound_logger(LEVELS["debug"])
    return cast(FilteringBoundLogger, wrapper(_NamedTee(name), _PROCESSORS, {}))


def _console_sink(console: str, stream: TextIO, min_level: int, redact: Processor) -> _Sink | None:
    if console == "none":
        return None
    if console == "json":
        return _Sink(stream, min_level, (_dict_tracebacks, redact), _json_line)
    if console in ("warnings", "errors"):
        quiet = max(min_level, LEVELS[console.removesuffix("s")])
        return _Sink(stream, quiet, (_plain_exception, redact), _console_renderer(stream))
    if console == "console" or _is_tty(stream):
        return _Sink(stream, min_level, (_plain_exception, redact), _console_renderer(stream))
    quiet = max(min_level, LEVELS["warning"])
    return _Sink(stream, quiet, (_short_exception, redact), _key_value_line)


def _level_number(level: str) -> int:
    number = LEVELS.get(level.strip().lower())
    if number is None:
        names = ", ".join(k for k in LEVELS if k != "warn")
        raise ConfigError(f"unknown log level {level!r} (use {names})")
    return number


LOG_FILE_MODE = 0o600  # as the ledger: the log holds the same links
LOG_DIR_MODE = 0o700


def _open_log_file(path: Path, max_bytes: int) -> TextIO:
    try:
        return cast(TextIO, LogFile(path, max_bytes))
    except OSError as err:
        raise ConfigError(f"cannot write the log file {path}: {err.strerror or err}") from None


def open_log_file(path: Path) -> TextIO:
    """The log file opened to append; its folder is made 0700 and a new file 0600 (an
    existing one keeps its mode). Raises OSError."""
    path.parent.mkdir(mode=LOG_DIR_MODE, parents=True, exist_ok=True)
    existed = path.exists()  # `--log-file /dev/null` must keep its mode
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, LOG_FILE_MODE)
    try:
        if not existed:
            os.fchmod(fd, LOG_FILE_MODE)  # whatever the umask
        return os.fdopen(fd, "a", encoding="utf-8")
    except BaseException:
        os.close(fd)
        raise


LOG_BACKUPS = 3  # job.log.1 .. job.log.3 are kept beside job.log


class LogFile:
    """The log file as a sink writes it: reopened when it was moved away, rotated by size.

    Before each write the path is checked: when another process (a second command on
    the same `--log-file`, or logrotate without copytruncate) renamed or removed the
    file, it is reopened, so no process keeps writing into a rotated file. Past
    `max_bytes` (0: never) the file becomes `.1`, `.1` becomes `.2`, and so on up to
    LOG_BACKUPS; the oldest is dropped. Several processes rotating at the same moment
    can at worst rotate twice (a short `.1`): no line is lost.
    """

    def __init__(self, path: Path, max_bytes: int = 0, backups: int = LOG_BACKUPS) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.backups = backups
        self._handle = open_log_file(path)
        self._pending: list[str] = []

    def write(self, text: str) -> int:
        """Kept until `flush`, which writes it to whatever file the path names then."""
        self._pending.append(text)
        return len(text)

    def flush(self) -> None:
        if not self._pending:
            return
        if self._moved_away():
            self._reopen()
        lines, self._pending = self._pending, []
        if not self.max_bytes:
            self._write(lines)
            return
        size, start = self._size(), 0
        for end, line in enumerate(lines, 1):
            size += len(line.encode())
            if size >= self.max_bytes:  # rotate right after the line that crosses the size
                self._write(lines[start:end])
                self._rotate()
                size, start = self._size(), end
        self._write(lines[start:])

    def _write(self, lines: list[str]) -> None:
        if lines:
            self._handle.write("".join(lines))
            self._handle.flush()

    def _size(self) -> int:
        return os.fstat(self._handle.fileno()).st_size

    def close(self) -> None:
        try:
            self.flush()
        finally:
            self._handle.close()

    def _moved_away(self) -> bool:
        try:
            return self.path.stat().st_ino != os.fstat(self._handle.fileno()).st_ino
        except FileNotFoundError:
            return True

    def _reopen(self) -> None:
        old, self._handle = self._handle, open_log_file(self.path)
        old.close()

    def _rotate(self) -> None:
        if not self._moved_away():  # another process may have rotated it already
            for n in range(self.backups - 1, 0, -1):
                with contextlib.suppress(FileNotFoundError):
                    self._backup(n).replace(self._backup(n + 1))
            self.path.replace(self._backup(1))
        self._reopen()

    def _backup(self, n: int) -> Path:
        return self.path.with_name(f"{self.path.name}.{n}")
