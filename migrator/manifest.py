"""Reading a manifest: YAML with line numbers -> a validated, immutable `Manifest`.

Every problem is located (file, line, field path such as `sources[2].exclude`) and
all of them are collected before one `ManifestError` is raised, so a user fixes a
manifest in one round. Anything the format does not name is refused, not ignored.
Loading does no network I/O and writes nothing.
"""

from __future__ import annotations

import contextlib
import difflib
import math
import os
import re
import stat
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlsplit

import yaml
from yaml.constructor import SafeConstructor
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from migrator.errors import ManifestError, ManifestProblem
from migrator.logs import register_secret
from migrator.methods import forced_method_problem
from migrator.model import (
    BASE64_LIMIT,
    EMBEDDED,
    MIB,
    PLANNABLE_METHODS,
    URL_LIMIT,
    GlobSource,
    Manifest,
    Method,
    Outputs,
    PathSource,
    Settings,
    Source,
    SourceKind,
    SourceOptions,
    Target,
    UrlListSource,
    UrlSource,
)
from migrator.naming import (
    check_name,
    check_upload_path,
    check_url,
    file_type,
    printable,
    split_glob,
)
from migrator.pushgateway import check_push_url
from migrator.units import (
    format_duration,
    parse_bandwidth,
    parse_duration,
    parse_positive_duration,
    parse_rate,
    parse_size,
    shown,
)

LEDGER_DIR_ENV = "MIGRATOR_LEDGER_DIR"
LEDGER_ENV = "MIGRATOR_LEDGER"  # a ledger file, or a postgresql:// URL
CA_BUNDLE_ENV = "MIGRATOR_CA_BUNDLE"
MAX_MANIFEST_BYTES = 4 * MIB  # ~150,000 path sources; more is a job for glob or url_list
PROBLEM_LIMIT = 100  # problems reported at most; the rest are counted
MAX_PATH_BYTES = 4096  # PATH_MAX: no longer path, pattern or exclude can name a file

_NAME_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,99}")
_ENV_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def is_job_name(text: str) -> bool:
    """Whether `text` may be a manifest's `name` (pure)."""
    return _NAME_RE.fullmatch(text) is not None


_TOP_KEYS = ("version", "name", "target", "ledger", "outputs", "settings", "sources")
_TARGET_KEYS = ("base_url", "api_key_env", "api_key_file", "upload_path", "ca_bundle")
_OUTPUT_FILE_KEYS = ("jsonl", "csv", "json", "metrics")
_OUTPUT_KEYS = (*_OUTPUT_FILE_KEYS, "metrics_push")
_SETTING_KEYS = (
    "concurrency",
    "base64_max",
    "url_max",
    "retries",
    "ttl",
    "refresh_within",
    "tps_limit",
    "bwlimit",
    "timeout",
    "connect_timeout",
    "min_rate",
    "max_size",
    "outage_limit",
    "settle",
    "allow_private_origins",
    "dedup",
    "checksum",
)
_SOURCE_KINDS = ("path", "glob", "url", "url_list")
_OPTION_KEYS = ("file_name", "upload_path", "method")
_GLOB_ONLY_KEYS = ("exclude", "follow_symlinks", "require_match")
_URL_ONLY_KEYS = ("immutable",)
_SOURCE_KEYS = (*_SOURCE_KINDS, *_OPTION_KEYS, *_GLOB_ONLY_KEYS, *_URL_ONLY_KEYS)
MANIFEST_KEYS: Mapping[str, tuple[str, ...]] = {
    "": _TOP_KEYS,
    "target": _TARGET_KEYS,
    "outputs": _OUTPUT_KEYS,
    "settings": _SETTING_KEYS,
    "sources[]": _SOURCE_KEYS,
}
"""Every key the format names, by where it may appear (the reference names each)."""
_REMOTE_KINDS = ("url", "url_list")
_MANY_FILE_KINDS = ("glob", "url_list")

_MAP_TAG = "tag:yaml.org,2002:map"
_SEQ_TAG = "tag:yaml.org,2002:seq"

T = TypeVar("T")
_INVALID = object()  # a scalar already reported as unreadable


@dataclass(slots=True)
class _Reader:
    """Walks the node tree, turning nodes into values and recording every problem."""

    file: str
    base_dir: Path
    check_sources: bool = True  # False: local sources may be missing
    problems: list[ManifestProblem] = field(default_factory=list)
    _constructor: SafeConstructor = field(default_factory=SafeConstructor)

    def problem(self, node: Node | None, where: str | None, message: str) -> None:
        line = node.start_mark.line + 1 if node is not None else None
        # A key or value may hold a line break or a terminal escape: shown escaped.
        field = None if where is None else printable(where)
        self.problems.append(ManifestProblem(self.file, line, field, printable(message)))

    def mapping(self, node: Node, where: str, allowed: tuple[str, ...]) -> dict[str, Node]:
        """The mapping's keys and value nodes; type, duplicate and unknown keys reported."""
        if isinstance(node, MappingNode | SequenceNode) and node.tag not in (_MAP_TAG, _SEQ_TAG):
            self.problem(node, where or None, f"unsupported YAML tag {node.tag!r}")
            return {}
        if not isinstance(node, MappingNode):
            self.problem(node, where or None, f"expected a mapping (key: value), got {_kind(node)}")
            return {}
        result: dict[str, Node] = {}
        for key_node, value_node in node.value:
            key = key_node.value if isinstance(key_node, ScalarNode) else None
            if isinstance(key, str) and _has_surrogate(key):
                key = None
            path = f"{where}.{key}" if where else str(key)
            if not isinstance(key, str) or key_node.tag != "tag:yaml.org,2002:str":
                self.problem(key_node, where or None, "keys must be plain words")
            elif key in result:
                first = result[key].start_mark.line + 1
                self.problem(key_node, path, f"duplicate key (first given on line {first})")
            elif key not in allowed:
                self.problem(key_node, path, _unknown_key_message(key, allowed))
            else:
                result[key] = value_node
        return result

    def scalar(self, node: Node, where: str) -> object:
        if not isinstance(node, ScalarNode):
            self.problem(node, where, f"expected a single value, got {_kind(node)}")
            return None
        try:
            value = self._constructor.construct_object(node, deep=True)
        except yaml.YAMLError:
            self.problem(node, where, f"unsupported YAML tag {node.tag!r}")
            return _INVALID
        except (ValueError, OverflowError):  # an integer of more than 4,300 digits
            self.problem(node, where, f"{_cut(node.value)} is too large a number")
            return _INVALID
        if isinstance(value, str) and _has_surrogate(value):
            # "\ud800" in YAML: no file name or URL can hold it, nor can a message show it.
            self.problem(node, where, "holds a lone surrogate (\\ud800-\\udfff), not text")
            return _INVALID
        return value

    def string(self, node: Node, where: str, *, secret: bool = False) -> str | None:
        """A non-empty string; `secret`: never echo the value in a message."""
        value = self.scalar(node, where)
        if value is _INVALID:
            return None
        if isinstance(value, str) and value.strip():
            return value
        if isinstance(value, str) or (value is None and isinstance(node, ScalarNode)):
            self.problem(node, where, "must not be empty")
        elif value is not None:
            got = type(value).__name__ if secret else _describe(value)
            self.problem(node, where, f"expected a string, got {got}")
        return None

    def integer(self, node: Node, where: str, low: int, high: int) -> int | None:
        value = self.scalar(node, where)
        if value is _INVALID:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            if value is not None or isinstance(node, ScalarNode):
                self.problem(node, where, f"expected a whole number, got {_describe(value)}")
            return None
        if not low <= value <= high:
            self.problem(node, where, f"must be between {low} and {high}, got {shown(value)}")
            return None
        return value

    def parsed(self, node: Node, where: str, parse: Callable[[str | int], T]) -> T | None:
        value = self.scalar(node, where)
        if value is _INVALID:
            return None
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            if value is not None or isinstance(node, ScalarNode):
                self.problem(node, where, f"expected a size or duration, got {_describe(value)}")
            return None
        if isinstance(value, float) and not math.isfinite(value):
            # `1e400` in YAML reads as infinity: a mistake, never a setting.
            what = "too large a number" if not math.isnan(value) else "not a number"
            self.problem(node, where, f"{_cut(str(node.value))} is {what}")
            return None
        try:
            return parse(value if isinstance(value, str | int) else str(value))
        except ValueError as err:
            self.problem(node, where, str(err))
            return None

    def local_path(self, node: Node, where: str) -> Path | None:
        text = self.string(node, where)
        if text is None:
            return None
        path, reason = _local(self.base_dir, text)
        if reason is not None:
            self.problem(node, where, reason)
        return path


# -- entry point ----------------------------------------------------------------------------


def load_manifest(
    path: Path,
    *,
    ledger_override: Path | str | None = None,
    environ: Mapping[str, str] | None = None,
    check_sources: bool = True,
) -> Manifest:
    """Read and validate a manifest; raise ManifestError listing every problem found.

    `check_sources=False` accepts local sources that are gone: `refresh`, `download`,
    `status` and `export` work from the ledger, and a deleted source is exactly the
    case refresh must handle.

    Relative paths in the manifest are relative to its folder. The ledger is, in
    order: `ledger_override` (the CLI's --ledger), `$MIGRATOR_LEDGER`,
    `$MIGRATOR_LEDGER_DIR/<name>.sqlite`, the manifest's `ledger:`,
    `<manifest folder>/.migrator/<name>.sqlite`. An override or environment path that
    is relative is taken from the current directory. Any of the first, second and
    fourth may be a `postgresql://` URL instead: a ledger shared by many processes
    (`Manifest.ledger_url`; `Manifest.ledger` then only places the default log).
    """
    env = os.environ if environ is None else environ
    manifest_path = _absolute(Path.cwd(), path)
    reader = _Reader(file=str(path), base_dir=manifest_path.parent, check_sources=check_sources)
    root = _compose(reader, manifest_path)
    if root is None:
        raise ManifestError(reader.problems)
    manifest = _read_top(reader, root, manifest_path, ledger_override, env)
    if reader.problems or manifest is None:
        raise ManifestError(_capped(reader.problems, reader.file))
    return manifest


def _capped(problems: list[ManifestProblem], file: str) -> list[ManifestProblem]:
    if len(problems) <= PROBLEM_LIMIT:
        return problems
    more = ManifestProblem(
        file, None, None, f"... and {len(problems) - PROBLEM_LIMIT} more problems"
    )
    return [*problems[:PROBLEM_LIMIT], more]


def _compose(reader: _Reader, path: Path) -> Node | None:
    text = _read_text(reader, path)
    if text is None:
        return None
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except RecursionError:
        reader.problems.append(
            ManifestProblem(reader.file, None, None, "nested too deeply to be a manifest")
        )
        return None
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        line = mark.line + 1 if mark is not None else None
        reader.problems.append(ManifestProblem(reader.file, line, None, _yaml_message(err)))
        return None
    except yaml.reader.ReaderError as err:
        line = text.count("\n", 0, err.position) + 1
        column = _column(text, err.position)
        message = f"a character YAML does not allow: #x{err.character:04x} (column {column})"
        reader.problems.append(ManifestProblem(reader.file, line, None, message))
        return None
    except yaml.YAMLError as err:
        reader.problems.append(ManifestProblem(reader.file, None, None, f"not YAML: {err}"))
        return None
    if root is None or (isinstance(root, ScalarNode) and root.value == ""):
        reader.problems.append(ManifestProblem(reader.file, None, None, "the manifest is empty"))
        return None
    return root


def _read_text(reader: _Reader, path: Path) -> str | None:
    try:
        data = _read_bounded(path, MAX_MANIFEST_BYTES + 1)  # /dev/zero is no manifest either
    except IsADirectoryError:
        message = "is a directory, not a manifest file"
    except FileNotFoundError:
        message = "no such manifest file"
    except OSError as err:
        message = f"cannot read the manifest: {err.strerror or err}"
    else:
        if len(data) > MAX_MANIFEST_BYTES:
            message = (
                f"the manifest is larger than {MAX_MANIFEST_BYTES // MIB} MiB; "
                "list many files with a glob or a url_list instead"
            )
        else:
            try:
                return data.decode("utf-8-sig")
            except UnicodeDecodeError as err:
                message = f"the manifest is not UTF-8 text (byte {err.start})"
    reader.problems.append(ManifestProblem(reader.file, None, None, message))
    return None


def _column(text: str, position: int) -> int:
    return position - text.rfind("\n", 0, position)


def _read_bounded(path: Path, limit: int) -> bytes:
    """At most `limit` bytes of a file. Opened without blocking, so a FIFO nobody writes
    to reads as empty instead of hanging; one with a writer (`<(cat job.yaml)`) is
    read as it comes. Raises OSError."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as handle:
        os.set_blocking(fd, True)  # only the open must not wait
        return handle.read(limit)


def _yaml_message(err: yaml.MarkedYAMLError) -> str:
    problem = err.problem or str(err)
    if "'\\t'" in problem:
        return "a tab character: YAML indentation must use spaces, not tabs"
    context = f" ({err.context})" if err.context else ""
    return f"YAML syntax error: {problem}{context}"


# -- sections -------------------------------------------------------------------------------


def _read_top(
    reader: _Reader,
    root: Node,
    manifest_path: Path,
    ledger_override: Path | str | None,
    env: Mapping[str, str],
) -> Manifest | None:
    keys = reader.mapping(root, "", _TOP_KEYS)
    if not _is_mapping(root):
        return None
    _require(reader, root, keys, ("version", "name", "target", "sources"))
    _read_version(reader, keys.get("version"))
    name = _read_name(reader, keys.get("name"))
    target = _read_target(reader, keys.get("target"), env)
    settings = _read_settings(reader, keys.get("settings"))
    outputs = _read_outputs(reader, keys.get("outputs"))
    embedded = target is not None and target.is_embedded
    sources = _read_sources(reader, keys.get("sources"), settings, embedded=embedded)
    ledger_url, ledger_node, ledger_override = _ledger_url(
        reader, keys.get("ledger"), ledger_override, env
    )
    ledger = _resolve_ledger(reader, ledger_node, name, ledger_override, env)
    _check_outputs_spare(reader, keys.get("outputs"), outputs, ledger)
    if name is None or target is None:
        return None
    return Manifest(
        path=manifest_path,
        name=name,
        target=target,
        ledger=ledger,
        ledger_url=ledger_url,
        settings=settings,
        sources=sources,
        outputs=outputs,
    )


def _require(
    reader: _Reader, node: Node, keys: dict[str, Node], names: tuple[str, ...], prefix: str = ""
) -> None:
    for name in names:
        if name not in keys:
            reader.problem(node, prefix + name, "is required")


def _read_version(reader: _Reader, node: Node | None) -> None:
    if node is None:
        return
    version = reader.scalar(node, "version")
    if version is _INVALID or not isinstance(node, ScalarNode):
        return
    if version != 1 or isinstance(version, bool):
        reader.problem(node, "version", f"unsupported version {version!r}; this migrator reads 1")


def _read_name(reader: _Reader, node: Node | None) -> str | None:
    if node is None:
        return None
    name = reader.string(node, "name")
    if name is not None and not _NAME_RE.fullmatch(name):
        reader.problem(
            node,
            "name",
            f"{_cut(name)} is not a job name: use lower-case letters, digits, '.', '_' and '-' "
            "(starting with a letter or digit, at most 100 characters)",
        )
        return None
    return name


def _read_target(reader: _Reader, node: Node | None, env: Mapping[str, str]) -> Target | None:
    if node is None:
        return None
    keys = reader.mapping(node, "target", _TARGET_KEYS)
    if _is_mapping(node):
        _require(reader, node, keys, ("base_url",), "target.")
    base_url = _read_base_url(reader, keys.get("base_url"))
    env_name = _read_api_key_env(reader, keys.get("api_key_env"))
    key_file = keys.get("api_key_file")
    api_key_file = reader.local_path(key_file, "target.api_key_file") if key_file else None
    upload_path = _read_upload_path(reader, keys.get("upload_path"), "target.upload_path")
    ca_bundle = _read_ca_bundle(reader, keys.get("ca_bundle"), env)
    if base_url is None:
        return None
    return Target(
        base_url=base_url,
        api_key_env=env_name,
        api_key_file=api_key_file,
        upload_path=upload_path or "",
        ca_bundle=ca_bundle,
    )


def _read_ca_bundle(reader: _Reader, node: Node | None, env: Mapping[str, str]) -> Path | None:
    """$MIGRATOR_CA_BUNDLE (from the current directory), else target.ca_bundle. The file
    is read when a connection is made: status and export never need it."""
    written = reader.local_path(node, "target.ca_bundle") if node is not None else None
    from_env = env.get(CA_BUNDLE_ENV, "").strip()
    return _outside_path(reader, Path(from_env), f"${CA_BUNDLE_ENV}") if from_env else written


def _read_base_url(reader: _Reader, node: Node | None) -> str | None:
    if node is None:
        return None
    value = reader.string(node, "target.base_url")
    if value is None or value == EMBEDDED:
        return value
    reason = check_url(value, embedded=False)
    if reason:
        reader.problem(node, "target.base_url", f"{reason}; or write: embedded")
        return None
    return value.rstrip("/")


def _read_api_key_env(reader: _Reader, node: Node | None) -> str:
    default = Target(base_url=EMBEDDED).api_key_env
    if node is None:
        return default
    value = reader.string(node, "target.api_key_env", secret=True)
    if value is not None and not _ENV_NAME_RE.fullmatch(value):
        # Never echo the value: people paste the key itself here.
        reader.problem(
            node,
            "target.api_key_env",
            "must name an environment variable (letters, digits, '_'), not hold the key",
        )
    return value or default


def _read_upload_path(reader: _Reader, node: Node | None, where: str) -> str | None:
    if node is None:
        return None
    value = reader.string(node, where)
    if value is None:
        return None
    reason = check_upload_path(value)
    if reason:
        reader.problem(node, where, reason)
        return None
    return value.strip("/")


def _read_outputs(reader: _Reader, node: Node | None) -> Outputs:
    if node is None:
        return Outputs()
    keys = reader.mapping(node, "outputs", _OUTPUT_KEYS)
    push = keys.pop("metrics_push", None)
    paths = {k: reader.local_path(v, f"outputs.{k}") for k, v in keys.items()}
    seen: dict[Path, str] = {}
    for key, path in paths.items():
        if path is not None and path in seen:
            reader.problem(keys[key], f"outputs.{key}", f"same file as outputs.{seen[path]}")
        elif path is not None:
            seen[path] = key
    return Outputs(**paths, metrics_push=_read_push_url(reader, push))


def _read_push_url(reader: _Reader, node: Node | None) -> str | None:
    if node is None:
        return None
    value = reader.string(node, "outputs.metrics_push")
    reason = None if value is None else check_push_url(value)
    if reason is not None:
        reader.problem(node, "outputs.metrics_push", reason)
        return None
    return value


def _check_outputs_spare(
    reader: _Reader, node: Node | None, outputs: Outputs, ledger: Path
) -> None:
    """An output written over the ledger (or its -wal, -shm or lock) would destroy it."""
    if node is None or not _is_mapping(node):
        return
    nodes = {key.value: value for key, value in node.value if isinstance(key, ScalarNode)}
    for key in _OUTPUT_FILE_KEYS:
        path = getattr(outputs, key)
        reason = None if path is None else output_clash(path, ledger)
        if reason is not None:
            reader.problem(nodes.get(key), f"outputs.{key}", reason)


def _read_settings(reader: _Reader, node: Node | None) -> Settings:
    if node is None:
        return Settings()
    keys = reader.mapping(node, "settings", _SETTING_KEYS)
    d = Settings()
    concurrency = _setting_int(reader, keys, "concurrency", 1, 256)
    retries = _setting_int(reader, keys, "retries", 0, 50)
    base64_max = _setting_size(reader, keys, "base64_max", BASE64_LIMIT, "10MiB")
    url_max = _setting_size(reader, keys, "url_max", URL_LIMIT, "100MiB")
    ttl = _setting_duration(reader, keys, "ttl")
    refresh_within = _setting_duration(reader, keys, "refresh_within")
    tps_limit = _setting_parsed(reader, keys, "tps_limit", parse_rate)
    bwlimit = _setting_parsed(reader, keys, "bwlimit", parse_bandwidth)
    timeout = _setting_parsed(reader, keys, "timeout", parse_positive_duration)
    connect_timeout = _setting_parsed(reader, keys, "connect_timeout", parse_positive_duration)
    min_rate = _setting_parsed(reader, keys, "min_rate", parse_bandwidth)
    max_size = _setting_parsed(reader, keys, "max_size", parse_bandwidth)
    outage_limit = _setting_parsed(reader, keys, "outage_limit", parse_positive_duration)
    settle = _setting_parsed(reader, keys, "settle", parse_duration)
    private = _read_boolean(
        reader, keys.get("allow_private_origins"), "settings.allow_private_origins"
    )
    dedup = _read_boolean(reader, keys.get("dedup"), "settings.dedup", default=d.dedup)
    checksum = _read_boolean(reader, keys.get("checksum"), "settings.checksum")
    settings = Settings(
        concurrency=d.concurrency if concurrency is None else concurrency,
        base64_max=d.base64_max if base64_max is None else base64_max,
        url_max=d.url_max if url_max is None else url_max,
        retries=d.retries if retries is None else retries,
        ttl=d.ttl if ttl is None else ttl,
        refresh_within=d.refresh_within if refresh_within is None else refresh_within,
        tps_limit=tps_limit,
        bwlimit=bwlimit,
        timeout=d.timeout if timeout is None else timeout,
        connect_timeout=d.connect_timeout if connect_timeout is None else connect_timeout,
        min_rate=d.min_rate if min_rate is None else min_rate,
        max_size=d.max_size if max_size is None else max_size,
        outage_limit=d.outage_limit if outage_limit is None else outage_limit,
        settle=d.settle if settle is None else settle,
        allow_private_origins=private,
        dedup=dedup,
        checksum=checksum,
    )
    valid_ttl = (ttl is not None or "ttl" not in keys) and (
        refresh_within is not None or "refresh_within" not in keys
    )
    if valid_ttl:
        _check_ttl(reader, keys, settings)
    return settings


def _setting_int(
    reader: _Reader, keys: dict[str, Node], key: str, low: int, high: int
) -> int | None:
    node = keys.get(key)
    return None if node is None else reader.integer(node, f"settings.{key}", low, high)


def _setting_parsed(
    reader: _Reader, keys: dict[str, Node], key: str, parse: Callable[[str | int], T]
) -> T | None:
    node = keys.get(key)
    return None if node is None else reader.parsed(node, f"settings.{key}", parse)


def _setting_size(
    reader: _Reader, keys: dict[str, Node], key: str, limit: int, limit_text: str
) -> int | None:
    node = keys.get(key)
    if node is None:
        return None
    size = reader.parsed(node, f"settings.{key}", parse_size)
    if size is not None and size > limit:
        reader.problem(node, f"settings.{key}", f"must be at most {limit_text}, got {size} bytes")
        return None
    return size


def _setting_duration(reader: _Reader, keys: dict[str, Node], key: str) -> float | None:
    node = keys.get(key)
    if node is None:
        return None
    seconds = reader.parsed(node, f"settings.{key}", parse_duration)
    if seconds is not None and seconds <= 0 and key == "ttl":
        reader.problem(node, f"settings.{key}", "must be longer than zero")
        return None
    return seconds


def _check_ttl(reader: _Reader, keys: dict[str, Node], settings: Settings) -> None:
    if settings.refresh_within >= settings.ttl:
        node = keys.get("refresh_within") or keys.get("ttl")
        reader.problem(
            node,
            "settings.refresh_within",
            f"must be shorter than settings.ttl ({format_duration(settings.refresh_within)} >= "
            f"{format_duration(settings.ttl)}): links would be refreshed as soon as made",
        )


# -- the ledger -----------------------------------------------------------------------------

_LEDGER_FILES = (
    ("", "the ledger"),
    ("-wal", "the ledger's write-ahead log"),
    ("-shm", "the ledger's shared-memory file"),
    ("-journal", "the ledger's journal"),
    (".lock", "the ledger's lock"),
)


def ledger_clash(path: Path, ledger: Path) -> str | None:
    """Why a file written at `path` would destroy the ledger: it is the ledger, its
    `-wal`, `-shm` or `-journal`, or its `.lock`; None when it is none of them.
    Pure: both paths absolute and normalised, compared as written."""
    what = _ledger_file(path, ledger)
    return None if what is None else _clash_message(path, f"is {what}")


def output_clash(path: Path, ledger: Path) -> str | None:
    """`ledger_clash` for a file about to be written, seen also through symbolic links
    and hard links (so it reads the file system). Relative paths are from the
    current directory."""
    path, ledger = _absolute(Path.cwd(), path), _absolute(Path.cwd(), ledger)
    reason = ledger_clash(path, ledger)
    if reason is not None:
        return reason
    what = _ledger_file(Path(os.path.realpath(path)), Path(os.path.realpath(ledger)))
    if what is not None:
        return _clash_message(path, f"leads to {what}")
    if _same_file_as_any(path, ledger):
        return _clash_message(path, "is a hard link to the ledger")
    return None


def ledger_files(ledger: Path) -> tuple[Path, ...]:
    """The ledger and the files that are part of it: `-wal`, `-shm`, `-journal`, `.lock`."""
    return tuple(ledger.with_name(ledger.name + suffix) for suffix, _ in _LEDGER_FILES)


def _ledger_file(path: Path, ledger: Path) -> str | None:
    for file, (_, what) in zip(ledger_files(ledger), _LEDGER_FILES, strict=True):
        if path == file:
            return what
    return None


def _clash_message(path: Path, what: str) -> str:
    return f"{path} {what}: writing it would destroy the ledger; choose another file"


def _same_file_as_any(path: Path, ledger: Path) -> bool:
    for file in ledger_files(ledger):
        with contextlib.suppress(OSError):
            if path.samefile(file):
                return True
    return False


def is_postgres_url(text: str) -> bool:
    """Whether a ledger setting names a PostgreSQL database rather than a file (pure)."""
    scheme, sep, _rest = text.partition("://")
    return bool(sep) and scheme.lower() in ("postgresql", "postgres")


def _ledger_url(
    reader: _Reader, node: Node | None, override: Path | str | None, env: Mapping[str, str]
) -> tuple[str | None, Node | None, Path | None]:
    """A PostgreSQL URL from --ledger, $MIGRATOR_LEDGER or `ledger:` (in that order), and
    what is left for the file ledger's resolution: the manifest's node, the override."""
    from_env = env.get(LEDGER_ENV, "").strip()
    chosen = [str(override) if override is not None else None, from_env or None]
    written = reader.scalar(node, "ledger") if isinstance(node, ScalarNode) else None
    if isinstance(written, str) and is_postgres_url(written):
        chosen.append(written)
        node = None
    url = next((text for text in chosen if text is not None), None)
    if url is None or not is_postgres_url(url):
        path = Path(url) if url is not None else None
        return None, node, path
    if password := urlsplit(url).password:
        register_secret(password)
    return url, None, None


def _resolve_ledger(
    reader: _Reader,
    node: Node | None,
    name: str | None,
    override: Path | None,
    env: Mapping[str, str],
) -> Path:
    file_name = f"{name or 'job'}.sqlite"
    written = reader.local_path(node, "ledger") if node is not None else None
    if override is not None:
        return _outside_path(reader, override, "--ledger")
    env_dir = env.get(LEDGER_DIR_ENV, "").strip()
    if env_dir:
        return _outside_path(reader, Path(env_dir), f"${LEDGER_DIR_ENV}") / file_name
    if written is not None:
        return written
    return reader.base_dir / ".migrator" / file_name


def _outside_path(reader: _Reader, path: Path, where: str) -> Path:
    """A path from the command line or the environment, from the current directory."""
    local, reason = _local(Path.cwd(), str(path))
    if local is None:
        reader.problems.append(ManifestProblem(where, None, None, reason or "unusable"))
        return Path.cwd() / "unusable"
    return local


# -- sources --------------------------------------------------------------------------------


def _read_sources(
    reader: _Reader, node: Node | None, settings: Settings, *, embedded: bool
) -> tuple[Source, ...]:
    if node is None:
        return ()
    if not isinstance(node, SequenceNode):
        reader.problem(node, "sources", f"expected a list of sources, got {_kind(node)}")
        return ()
    if node.tag != _SEQ_TAG:
        reader.problem(node, "sources", f"unsupported YAML tag {node.tag!r}")
        return ()
    if not node.value:
        reader.problem(node, "sources", "lists no sources; name at least one")
        return ()
    sources = (
        _read_source(reader, item, f"sources[{i}]", settings, embedded=embedded)
        for i, item in enumerate(node.value)
    )
    return tuple(s for s in sources if s is not None)


def _read_source(
    reader: _Reader, node: Node, where: str, settings: Settings, *, embedded: bool
) -> Source | None:
    keys = reader.mapping(node, where, _SOURCE_KEYS)
    if not _is_mapping(node):
        return None
    kind = _source_kind(reader, node, keys, where)
    if kind is None:
        return None
    options = _read_options(reader, keys, where, kind)
    line = node.start_mark.line + 1
    for key in _GLOB_ONLY_KEYS:
        if key in keys and kind != "glob":
            reader.problem(keys[key], f"{where}.{key}", f"only glob sources take {key}")
    for key in _URL_ONLY_KEYS:
        if key in keys and kind not in _REMOTE_KINDS:
            reader.problem(keys[key], f"{where}.{key}", f"only url and url_list sources take {key}")
    immutable = _read_boolean(reader, keys.get("immutable"), f"{where}.immutable")
    value = keys[kind]
    if kind == "path":
        return _read_path_source(reader, value, where, options, line, settings)
    if kind == "glob":
        return _read_glob_source(reader, value, keys, where, options, line)
    source: UrlSource | UrlListSource | None
    if kind == "url":
        source = _read_url_source(reader, value, where, options, line, embedded=embedded)
    else:
        source = _read_url_list_source(reader, value, where, options, line)
    return None if source is None else replace(source, immutable=immutable)


def _source_kind(reader: _Reader, node: Node, keys: dict[str, Node], where: str) -> str | None:
    kinds = [k for k in _SOURCE_KINDS if k in keys]
    if len(kinds) == 1:
        return kinds[0]
    if not kinds:
        reader.problem(node, where, "names no source: give one of path, glob, url, url_list")
    else:
        reader.problem(node, where, f"names {' and '.join(kinds)}: give exactly one per source")
    return None


def _read_options(reader: _Reader, keys: dict[str, Node], where: str, kind: str) -> SourceOptions:
    file_name = _read_file_name(reader, keys.get("file_name"), f"{where}.file_name", kind)
    upload_path = _read_upload_path(reader, keys.get("upload_path"), f"{where}.upload_path")
    method = _read_method(reader, keys.get("method"), f"{where}.method", kind)
    return SourceOptions(file_name=file_name, upload_path=upload_path, method=method)


def _read_file_name(reader: _Reader, node: Node | None, where: str, kind: str) -> str | None:
    if node is None:
        return None
    value = reader.string(node, where)
    if value is None:
        return None
    if kind in _MANY_FILE_KINDS:
        reader.problem(node, where, f"a {kind} source names many files, so it cannot set one")
        return None
    reason = check_name("", value)
    if reason:
        reader.problem(node, where, reason)
        return None
    return value


def _read_method(reader: _Reader, node: Node | None, where: str, kind: str) -> Method:
    if node is None:
        return Method.AUTO
    value = reader.scalar(node, where)
    if value is _INVALID:
        return Method.AUTO
    try:
        method = Method(value if isinstance(value, str) else repr(value))
        if method not in PLANNABLE_METHODS:
            raise ValueError(method)
    except ValueError:
        choices = ", ".join(m.value for m in PLANNABLE_METHODS)
        reader.problem(node, where, f"{value!r} is not a method; use one of {choices}")
        return Method.AUTO
    source_kind = SourceKind.URL if kind in _REMOTE_KINDS else SourceKind.FILE
    reason = forced_method_problem(source_kind, None, method)
    if reason:
        reader.problem(node, where, reason)
    return method


def _read_path_source(
    reader: _Reader,
    node: Node,
    where: str,
    options: SourceOptions,
    line: int,
    settings: Settings,
) -> PathSource | None:
    path = reader.local_path(node, f"{where}.path")
    if path is None:
        return None
    if not reader.check_sources:
        return PathSource(path=path, options=options, line=line)
    info = _regular_file(reader, node, f"{where}.path", path)
    if info is None:
        return None
    reason = forced_method_problem(SourceKind.FILE, info.st_size, options.method)
    if reason:
        reader.problem(node, f"{where}.method", reason)
    return PathSource(path=path, options=options, line=line)


def _read_glob_source(
    reader: _Reader,
    node: Node,
    keys: dict[str, Node],
    where: str,
    options: SourceOptions,
    line: int,
) -> GlobSource | None:
    pattern = reader.string(node, f"{where}.glob")
    exclude = _read_exclude(reader, keys.get("exclude"), f"{where}.exclude")
    follow = _read_boolean(reader, keys.get("follow_symlinks"), f"{where}.follow_symlinks")
    require = _read_boolean(reader, keys.get("require_match"), f"{where}.require_match")
    if pattern is None:
        return None
    if len(pattern.encode()) > MAX_PATH_BYTES:
        reader.problem(
            node, f"{where}.glob", f"is longer than any path can be ({MAX_PATH_BYTES} bytes)"
        )
        return None
    root_text, relative = split_glob(pattern)
    root, reason = _local(reader.base_dir, root_text)
    if root is None:
        reader.problem(node, f"{where}.glob", reason or "unusable")
        return None
    if ".." in relative.split("/"):
        reader.problem(node, f"{where}.glob", "'..' may appear only before the first wildcard")
        return None
    if reader.check_sources:
        state = _folder_state(root)
        if state is not None:
            reader.problem(node, f"{where}.glob", f"the glob's root folder {str(root)!r} {state}")
            return None
    return GlobSource(
        pattern=pattern,
        root=root,
        relative_pattern=relative,
        exclude=exclude,
        options=options,
        line=line,
        follow_symlinks=follow,
        require_match=require,
    )


def _read_boolean(reader: _Reader, node: Node | None, where: str, *, default: bool = False) -> bool:
    """true or false; absent (or unreadable) is `default`."""
    if node is None:
        return default
    value = reader.scalar(node, where)
    if value is _INVALID:
        return default
    if not isinstance(value, bool):
        reader.problem(node, where, f"expected true or false, got {_describe(value)}")
        return default
    return value


def _folder_state(path: Path) -> str | None:
    """Why `path` is not a folder to walk, or None when it is one."""
    try:
        info = path.stat()
    except FileNotFoundError:
        return "does not exist"
    except OSError as err:
        return f"cannot be read: {err.strerror or err}"
    return None if stat.S_ISDIR(info.st_mode) else "is not a directory"


def _read_exclude(reader: _Reader, node: Node | None, where: str) -> tuple[str, ...]:
    if node is None:
        return ()
    if isinstance(node, SequenceNode) and node.tag != _SEQ_TAG:
        reader.problem(node, where, f"unsupported YAML tag {node.tag!r}")
        return ()
    items = node.value if isinstance(node, SequenceNode) else [node]
    patterns: dict[str, None] = {}  # in order, each once: aliases cannot multiply the work
    for item in {id(item): item for item in items}.values():  # an alias is its anchor's node
        pattern = reader.string(item, where)
        if pattern is not None and len(pattern.encode()) > MAX_PATH_BYTES:
            reader.problem(item, where, f"is longer than any path can be ({MAX_PATH_BYTES} bytes)")
        elif pattern is not None:
            patterns[_strip_dot_slash(pattern)] = None
    return tuple(patterns)


def _read_url_source(
    reader: _Reader, node: Node, where: str, options: SourceOptions, line: int, *, embedded: bool
) -> UrlSource | None:
    url = reader.string(node, f"{where}.url")
    if url is None:
        return None
    reason = check_url(url, embedded=embedded)
    if reason:
        reader.problem(node, f"{where}.url", reason)
        return None
    return UrlSource(url=url, options=options, line=line)


def _read_url_list_source(
    reader: _Reader, node: Node, where: str, options: SourceOptions, line: int
) -> UrlListSource | None:
    path = reader.local_path(node, f"{where}.url_list")
    if path is None:
        return None
    if reader.check_sources and _regular_file(reader, node, f"{where}.url_list", path) is None:
        return None
    return UrlListSource(path=path, options=options, line=line)


# -- helpers --------------------------------------------------------------------------------


def _regular_file(reader: _Reader, node: Node, where: str, path: Path) -> os.stat_result | None:
    """The file's stat (links followed: the user named it), or None with the reason told."""
    try:
        info = path.stat()
    except FileNotFoundError:
        message = f"{str(path)!r} does not exist"
    except OSError as err:
        message = f"cannot read {str(path)!r}: {err.strerror or err}"
    else:
        if stat.S_ISREG(info.st_mode):
            return info
        if stat.S_ISDIR(info.st_mode):
            message = f"{str(path)!r} is a folder; use glob: '<folder>/**' to migrate a folder"
        else:
            message = f"{str(path)!r} is not a regular file ({file_type(info.st_mode)})"
    reader.problem(node, where, message)
    return None


def _absolute(base: Path, path: Path) -> Path:
    """Absolute and normalised, without resolving symlinks."""
    return Path(os.path.normpath(base / path))


def _local(base: Path, text: str) -> tuple[Path | None, str | None]:
    """A path written in the manifest, made absolute; or None and why it cannot be one."""
    if "\0" in text:
        return None, "a path cannot contain a NUL character"
    if len(text.encode()) > MAX_PATH_BYTES:
        return None, f"is longer than any path can be ({MAX_PATH_BYTES} bytes)"
    expanded = _expanded(Path(text))
    if expanded is None:
        return None, f"cannot expand {shown(text.split('/', 1)[0])}: no such user"
    return _absolute(base, expanded), None


def _expanded(path: Path) -> Path | None:
    """`~` and `~user` expanded; None when there is no such user (pathlib raises)."""
    try:
        return path.expanduser()
    except RuntimeError:
        return None


def _strip_dot_slash(pattern: str) -> str:
    while pattern.startswith(("./", "/")):
        pattern = pattern[1:] if pattern.startswith("/") else pattern[2:]
    return pattern


def _unknown_key_message(key: str, allowed: tuple[str, ...]) -> str:
    close = difflib.get_close_matches(key, allowed, n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]!r}?" if close else f"; known keys: {', '.join(allowed)}"
    if key in ("api_key", "key", "token"):
        hint = "; the key itself never goes in a manifest: use api_key_env or api_key_file"
    return f"unknown key{hint}"


def _is_mapping(node: Node) -> bool:
    """A plain mapping: `mapping()` reads its keys (a tagged one is reported there)."""
    return isinstance(node, MappingNode) and node.tag == _MAP_TAG


def _kind(node: Node) -> str:
    if isinstance(node, MappingNode):
        return "a mapping"
    if isinstance(node, SequenceNode):
        return "a list"
    return "a single value"


def _describe(value: object) -> str:
    if value is None:
        return "nothing"
    if isinstance(value, bool):
        return f"{str(value).lower()} (a boolean)"
    if isinstance(value, str):
        return f"the string {shown(value)}"
    if isinstance(value, int | float):
        return shown(value)
    return _cut(repr(value))


def _has_surrogate(text: str) -> bool:
    return any("\ud800" <= ch <= "\udfff" for ch in text)


def _cut(text: str, limit: int = 40) -> str:
    """Text from the manifest, quoted for a message and cut to a readable length."""
    return shown(text, limit)
