"""The plan: what a manifest's sources expand to, one `PlanItem` per file.

Two doors onto the same expansion:

- `check_plan` walks everything once, offline, and refuses a plan with bad names,
  bad URLs in lists, a `require_match` glob that matches nothing or two files landing
  on the same name. Its memory does not grow with the strings it sees: it keeps one
  8-byte digest per item. What a glob matches but does not take (symbolic links,
  FIFOs, devices, sockets), a glob that matches nothing and a folder that cannot be
  read are logged as warnings and counted; the run counts each such folder as failed.
- `expand` yields the items lazily in manifest order for the runner, asking origins
  for the size of remote files (HEAD, then a one-byte ranged GET) in a bounded
  sliding window, answers put back in order. It never talks to the service.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import itertools
import operator
import os
import re
import stat
import unicodedata
from collections import deque
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Awaitable,
    Callable,
    Iterator,
    Mapping,
    Sequence,
)
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple, TypeVar

from migrator.errors import ManifestError, ManifestProblem
from migrator.logs import get_logger
from migrator.methods import automatic_methods, choose_method, forced_method_problem
from migrator.model import (
    GlobSource,
    LocalItems,
    Manifest,
    Method,
    PathSource,
    PlanItem,
    Source,
    SourceKind,
    UrlListSource,
    UrlSource,
)
from migrator.naming import (
    check_name,
    check_url,
    collision_key,
    compile_glob,
    file_type,
    glob_depth,
    join_upload_path,
    name_from_url,
    names_pass,
    printable,
    substitute_url,
    without_credentials,
)
from migrator.transfer import plain_length, range_total

if TYPE_CHECKING:  # imported by the probes: a plan of local files never loads aiohttp
    import aiohttp

OpenSession = Callable[[], Awaitable["aiohttp.ClientSession"]]
"""A session opened at the first call: the probes open it only when one is sent."""

__all__ = [
    "GlobFile",
    "KeptEntries",
    "PlanCheck",
    "Remembered",
    "RemoteInfo",
    "Skipped",
    "check_plan",
    "compile_glob",
    "expand",
    "iter_url_list",
    "planned_keys",
    "probe_remote",
    "walk_glob",
]

PROBLEM_LIMIT = 100
SKIPS_LOGGED = 100  # warnings for skipped files at most; the rest are counted
PROBE_TIMEOUT = 10.0

T = TypeVar("T")
log = get_logger()


@dataclass(frozen=True, slots=True)
class Skipped:
    """A file a glob matched but does not take, and why."""

    path: str  # where it was found in the tree
    reason: str


OnProblem = Callable[[ManifestProblem], None]
OnWalkError = Callable[[str, OSError], None]
OnSkip = Callable[[Skipped], None]


@dataclass(frozen=True, slots=True)
class PlanCheck:
    """What a valid plan holds, and how many matched files were skipped."""

    items: int
    local_files: int
    remote_files: int
    local_bytes: int
    skipped: int = 0  # links not followed, FIFOs, devices, sockets (each logged)
    shared_sizes: frozenset[int] = frozenset()  # dedup: sizes two local files have
    unreadable: tuple[Skipped, ...] = ()  # folders globs could not read, the first ones
    unreadable_count: int = 0  # all of them
    kept: KeptEntries | None = field(default=None, compare=False, repr=False)


class KeptEntries:
    """What `check_plan` walked and stat'ed: this shard's entries in manifest order, for
    `expand` to plan from instead of walking the tree a second time.

    A folder's files are held as names with their sizes and mtimes in arrays (about 80
    bytes a file); anything else (a followed link, a URL) as the entry itself.
    """

    __slots__ = ("_parts", "cost")

    def __init__(self) -> None:
        self._parts: list[_Entry | _Folder] = []
        self.cost = 0  # bytes held, roughly

    def add(self, entry: _Entry) -> None:
        folder, _, name = entry.source.rpartition("/")
        if entry.kind is not SourceKind.FILE or name != entry.file_name:
            self._add_whole(entry)
            return
        if entry.size is None or entry.mtime_ns is None:  # vanished: no number to hold
            self._add_whole(entry)
            return
        last = self._parts[-1] if self._parts else None
        if not (isinstance(last, _Folder) and last.holds(entry, folder)):
            last = _Folder(entry, folder)
            self._parts.append(last)
            self.cost += _ENTRY_COST
        last.add(name, entry.size, entry.mtime_ns)
        self.cost += _NAME_COST + len(name)

    def add_folder(self, folder: _Folder) -> None:
        """Every file of `folder`, after what was added before."""
        self._parts.append(folder)
        self.cost += folder.cost

    def entries(self) -> Iterator[_Entry]:
        for part in self._parts:
            if isinstance(part, _Entry):
                yield part
            else:
                yield from part.entries()

    def parts(self) -> Iterator[_Entry | _Folder]:
        """What `entries` yields, with a folder's files as the folder."""
        yield from self._parts

    def _add_whole(self, entry: _Entry) -> None:
        self._parts.append(entry)
        self.cost += _ENTRY_COST + len(entry.source) + len(entry.file_name)


_ENTRY_COST = 400  # an _Entry and its strings, beyond their characters
_NAME_COST = 80  # a name's str, its list slot, and two array slots
FOLDER_PART = 4096  # files of a folder the expansion hands over at once, at most


class _Folder:
    """Files of one folder from one glob source, as `_Entry`s would hold them, without
    an object a file: how the expansion hands a folder's files to `check_plan` (a no-op
    re-run or a plan of a big tree is mostly this), and how `KeptEntries` keeps them."""

    __slots__ = ("cost", "first", "folder", "mtimes", "names", "sizes")

    def __init__(self, first: _Entry, folder: str) -> None:
        self.first = first  # what every file here shares with it: source, upload path
        self.folder = folder
        self.names: list[str] = []
        self.sizes = array.array("q")
        self.mtimes = array.array("q")
        self.cost = _ENTRY_COST  # as KeptEntries counts what it holds

    def holds(self, entry: _Entry, folder: str) -> bool:
        first = self.first
        return (
            folder == self.folder
            and entry.index == first.index
            and entry.upload_path == first.upload_path
            and entry.requested is first.requested
        )

    def held_by(self, manifest: Manifest) -> _Folder:
        """The files of this part that are the manifest's shard's."""
        held, upload_path = _Folder(self.first, self.folder), self.first.upload_path
        for name, size, mtime_ns in zip(self.names, self.sizes, self.mtimes, strict=True):
            if manifest.holds(upload_path, name):
                held.add(name, size, mtime_ns)
        return held

    def takes(self, folder: str, upload_path: str) -> bool:
        """Whether the next file of the same glob, in `folder`, may join this part."""
        return (
            folder == self.folder
            and upload_path == self.first.upload_path
            and len(self.names) < FOLDER_PART
        )

    def add(self, name: str, size: int, mtime_ns: int) -> None:
        self.names.append(name)
        self.sizes.append(size)
        self.mtimes.append(mtime_ns)
        self.cost += _NAME_COST + len(name)

    def extend(
        self, names: list[str], sizes: array.array[int], mtimes: array.array[int], start: int
    ) -> int:
        """`add` the files from `start` on, as many as fit in the part; how many did."""
        end = min(len(names), start + FOLDER_PART - len(self.names))
        taken = names[start:end]
        self.names += taken
        self.sizes += sizes[start:end]
        self.mtimes += mtimes[start:end]
        self.cost += _NAME_COST * len(taken) + sum(map(len, taken))
        return len(taken)

    def entry(self, index: int) -> _Entry:
        """The file at `index`, as an `_Entry`."""
        first = self.first
        return _Entry(
            index=first.index,
            source_line=first.source_line,
            kind=SourceKind.FILE,
            source=f"{self.folder}/{self.names[index]}",
            upload_path=first.upload_path,
            file_name=self.names[index],
            requested=first.requested,
            size=self.sizes[index],
            mtime_ns=self.mtimes[index],
        )

    def entries(self) -> Iterator[_Entry]:
        return map(self.entry, range(len(self.names)))

    def plan_items(self, manifest: Manifest, batch: int) -> Iterator[LocalItems]:
        """The folder's files as plan items, `batch` at a time: what `_plan_item` makes of
        each entry, held as columns (a no-op re-run or a plan of a big tree is mostly this)."""
        first, names, sizes, mtimes = self.first, self.names, self.sizes, self.mtimes
        forced = first.requested is not Method.AUTO
        for start in range(0, len(names), batch):
            end = min(start + batch, len(names))
            if forced:
                methods = [self._forced_method(manifest, index) for index in range(start, end)]
            else:
                methods = automatic_methods(sizes[start:end], manifest.settings)
            yield LocalItems(
                self.folder,
                first.upload_path,
                names[start:end],
                sizes[start:end],
                mtimes[start:end],
                methods,
                forced=forced,
            )

    def _forced_method(self, manifest: Manifest, index: int) -> Method:
        """The method the manifest names, or the ManifestError `_plan_item` raises."""
        first = self.first
        try:
            return choose_method(first.kind, self.sizes[index], first.requested, manifest.settings)
        except ValueError:
            entry = self.entry(index)
            return _plan_item(manifest, entry, RemoteInfo(entry.size)).method


class GlobFile(NamedTuple):
    """A file a glob takes: its path below the root, and the file to read."""

    relative: str
    path: str  # the entry itself, or where a followed link leads (never a link)


@dataclass(frozen=True, slots=True)
class RemoteInfo:
    """What an origin told about a remote file; all None when it told nothing."""

    size: int | None = None
    etag: str | None = None
    last_modified: str | None = None


@dataclass(slots=True)  # not frozen: a frozen __init__ costs a plan of 200,000 files a second
class _Entry:
    """One expanded file, before its method is chosen; never changed once made."""

    index: int  # the source's position in the manifest
    source_line: int | None
    kind: SourceKind
    source: str  # absolute local path, or the URL as written (variables kept)
    upload_path: str
    file_name: str
    requested: Method
    size: int | None = None  # local files only
    mtime_ns: int | None = None
    list_file: str | None = None  # url_list entries: the list and the line
    list_line: int | None = None
    immutable: bool = False  # a URL whose file never changes

    @property
    def key(self) -> str:
        """Where the file lands, as one string (a fileName holds no '/')."""
        return join_upload_path(self.upload_path, self.file_name)

    @property
    def collision(self) -> str:
        """What no other entry may share (see `collision_key`)."""
        return collision_key(self.upload_path, self.file_name)

    @property
    def identity(self) -> tuple[int, str, int | None]:
        return (self.index, self.source, self.list_line)

    @property
    def shown(self) -> str:
        """The source for a message: no credentials, no control characters."""
        return printable(without_credentials(self.source))

    def describe(self) -> str:
        where = f"line {self.source_line}" if self.source_line else "no line"
        origin = f"{self.list_file}:{self.list_line} " if self.list_file else ""
        return f"sources[{self.index}] ({where}, {origin}{self.shown})"


# -- walking globs and reading URL lists ----------------------------------------------------


def walk_glob(
    root: Path,
    relative_pattern: str,
    exclude: tuple[str, ...] = (),
    *,
    follow_symlinks: bool = False,
    on_error: OnWalkError | None = None,
    on_skip: OnSkip | None = None,
) -> Iterator[GlobFile]:
    """Yield every regular file the pattern matches, as a `GlobFile`.

    Lazy and iterative; entries in name order at every level. A directory matching an
    exclude pattern is not entered. Only regular files are taken: a matched FIFO,
    socket or device is skipped and told to `on_skip`, and so is a symbolic link,
    unless `follow_symlinks` is set and the link leads to a regular file inside the
    root (its `path` is then the real file). Links to folders are never followed:
    what they reach inside the root is walked anyway, and no loop can start.
    """
    walk = _walk_runs(
        root,
        relative_pattern,
        exclude,
        follow_symlinks=follow_symlinks,
        on_error=on_error,
        on_skip=on_skip,
    )
    for found in walk:
        if isinstance(found, GlobFile):
            yield found
            continue
        prefix, folder = found.prefix, found.folder + "/"
        for name in found.names:
            yield GlobFile(prefix + name, folder + name)


class _Run(NamedTuple):
    """Regular files a glob takes that come one after another in one folder."""

    prefix: str  # the folder below the root, with its '/' ('' for the root itself)
    folder: str  # the folder's path: a file's path is folder/name
    names: list[str]


def _walk_runs(
    root: Path,
    relative_pattern: str,
    exclude: tuple[str, ...] = (),
    *,
    follow_symlinks: bool = False,
    on_error: OnWalkError | None = None,
    on_skip: OnSkip | None = None,
) -> Iterator[_Run | GlobFile]:
    """What `walk_glob` yields, a folder's regular files as runs of names (a run ends
    where a subfolder or a link comes between), a followed link as its `GlobFile`."""
    include = compile_glob(relative_pattern)
    excludes = [compile_glob(p) for p in exclude]
    max_depth = glob_depth(relative_pattern)
    real_root = os.path.realpath(root) if follow_symlinks else None
    stack: list[tuple[str, Iterator[os.DirEntry[str]]]] = [("", _entries(str(root), on_error))]
    while stack:
        prefix, entries = stack[-1]
        run: _Run | None = None
        for entry in entries:  # until the folder's end, or a subfolder to go down into
            name = entry.name
            relative = prefix + name
            if _is_file(entry):
                if include.fullmatch(relative) and not (excludes and _matches(excludes, relative)):
                    if run is None:
                        run = _Run(prefix, entry.path[: -len(name) - 1], [])
                    run.names.append(name)
                continue
            kind = _kind(entry)
            if run is not None:
                yield run
                run = None
            if kind in (_DIR, _DIR_LINK):
                if not _may_descend(relative, max_depth, excludes):
                    continue
                if kind == _DIR:
                    stack.append((relative + "/", _entries(entry.path, on_error)))
                    break
                if on_skip is not None:
                    on_skip(Skipped(entry.path, "a symbolic link to a folder: never followed"))
                continue
            if (
                kind is None
                or not include.fullmatch(relative)
                or (excludes and _matches(excludes, relative))
            ):
                continue
            target, reason = (None, kind) if kind != _LINK else _link_target(entry.path, real_root)
            if target is not None:
                yield GlobFile(relative, target)
            elif on_skip is not None:
                on_skip(Skipped(entry.path, reason))
        else:
            stack.pop()
        if run is not None:
            yield run


def iter_url_list(path: Path) -> Iterator[tuple[int, str]]:
    """Yield (line number, URL) for each line that is neither blank nor a `#` comment.

    Reads lazily; raises OSError or UnicodeDecodeError for the caller to report.
    """
    with path.open(encoding="utf-8-sig") as lines:
        for number, line in enumerate(lines, start=1):
            text = line.strip()
            if text and not text.startswith("#"):
                yield number, text


_BY_NAME = operator.attrgetter("name")  # a folder's entries in name order, no lambda each


def _entries(path: str, on_error: OnWalkError | None) -> Iterator[os.DirEntry[str]]:
    try:
        with os.scandir(path) as scan:
            return iter(sorted(scan, key=_BY_NAME))
    except OSError as err:
        if on_error is not None:
            on_error(path, err)
        return iter(())


_FILE, _DIR, _LINK, _DIR_LINK = "file", "folder", "link", "folder link"


def _is_file(entry: os.DirEntry[str]) -> bool:
    """Whether the entry is a regular file, not a link (most entries: one look)."""
    try:
        return entry.is_file(follow_symlinks=False)
    except OSError:
        return False


def _kind(entry: os.DirEntry[str]) -> str | None:
    """_FILE, _DIR, _LINK, _DIR_LINK, or for anything else why it is skipped; None
    when the entry vanished while the folder was read."""
    try:
        if entry.is_file(follow_symlinks=False):
            return _FILE
        if entry.is_symlink():
            return _DIR_LINK if _leads_to_folder(entry) else _LINK
        if entry.is_dir(follow_symlinks=False):
            return _DIR
        mode = entry.stat(follow_symlinks=False).st_mode
    except OSError:
        return None
    return f"{file_type(mode)}, not a regular file"


def _leads_to_folder(entry: os.DirEntry[str]) -> bool:
    try:
        return entry.is_dir()
    except OSError:  # a loop: not a folder, and reported as a link
        return False


def _link_target(path: str, real_root: str | None) -> tuple[str | None, str]:
    """Where a link leads, when it may be followed; else None and why not."""
    if real_root is None:
        return None, "a symbolic link: not followed (see follow_symlinks)"
    try:
        target = os.path.realpath(path, strict=True)
        mode = Path(target).stat().st_mode
    except OSError:
        return None, "a broken symbolic link (or a loop of links)"
    if os.path.commonpath([real_root, target]) != real_root:
        return None, f"a symbolic link to {printable(target)}, outside the glob's root"
    if not stat.S_ISREG(mode):
        return None, f"a symbolic link to {file_type(mode)}, not a regular file"
    return target, ""


def _may_descend(relative: str, max_depth: int | None, excludes: list[re.Pattern[str]]) -> bool:
    if max_depth is not None and relative.count("/") + 1 > max_depth:
        return False
    return not (_matches(excludes, relative) or _matches(excludes, relative + "/"))


def _matches(patterns: list[re.Pattern[str]], relative: str) -> bool:
    return bool(patterns) and any(p.fullmatch(relative) for p in patterns)


# -- expansion into entries -----------------------------------------------------------------


@dataclass(slots=True)
class _Expansion:
    """Expands sources into entries, reporting problems to `on_problem` when given."""

    manifest: Manifest
    on_problem: OnProblem | None = None
    on_skip: Callable[[int, Skipped], None] | None = None  # (source index, what)
    on_unreadable: Callable[[int, Skipped], None] | None = None  # a folder, and why
    _file: str = field(init=False)

    def __post_init__(self) -> None:
        self._file = str(self.manifest.path)

    def entries(self) -> Iterator[_Entry]:
        for part in self.parts():
            if isinstance(part, _Entry):
                yield part
            else:
                yield from part.entries()

    def parts(self) -> Iterator[_Entry | _Folder]:
        """The entries, in order, a glob's files a folder (part) at a time."""
        for index, source in enumerate(self.manifest.sources):
            yield from self._source_parts(index, source)

    def report(self, file: str, line: int | None, where: str, message: str) -> None:
        if self.on_problem is not None:
            self.on_problem(ManifestProblem(file, line, where, message))

    def _source_parts(self, index: int, source: Source) -> Iterator[_Entry | _Folder]:
        if isinstance(source, PathSource):
            entry = self._path_entry(index, source)
            if self._takes(source.path.name, entry):
                yield entry
        elif isinstance(source, GlobSource):
            yield from self._glob_parts(index, source)
        elif isinstance(source, UrlSource):
            yield self._url_entry(index, source, source.url)
        else:
            yield from self._url_list_entries(index, source)

    def _takes(self, relative: str, entry: _Entry) -> bool:
        """Whether the command line's filters take the file (see migrator.filters)."""
        filters = self.manifest.filters
        return filters.takes_path(relative) and filters.takes_stat(entry.size, entry.mtime_ns)

    def _upload_path(self, source: Source, relative_dir: str = "") -> str:
        prefix = self.manifest.target.upload_path
        return join_upload_path(prefix, source.options.upload_path, relative_dir)

    def _path_entry(self, index: int, source: PathSource) -> _Entry:
        size, mtime_ns = _stat(source.path)
        path, upload_path = _followed(source.path), self._upload_path(source)
        name = source.options.file_name or source.path.name
        return self._file_entry(index, source, path, upload_path, name, size, mtime_ns)

    def _glob_parts(self, index: int, source: GlobSource) -> Iterator[_Entry | _Folder]:
        """The files the glob takes: those of a folder as `_Folder`s of up to FOLDER_PART
        files; a file that vanished before its stat, or a link followed to a file of
        another name, as an `_Entry` of its own."""

        def walk_error(path: str, err: OSError) -> None:
            if self.on_unreadable is not None:
                self.on_unreadable(index, Skipped(path, _walk_message(path, err)))

        def skipped(skip: Skipped) -> None:
            if self.on_skip is not None:
                self.on_skip(index, skip)

        found = False
        walk = _walk_runs(
            source.root,
            source.relative_pattern,
            source.exclude,
            follow_symlinks=source.follow_symlinks,
            on_error=walk_error,
            on_skip=skipped,
        )
        parts = _GlobParts(self, index, source)
        filters = self.manifest.filters
        for files in walk:
            found = True
            if isinstance(files, GlobFile):
                if filters.takes_path(files.relative):
                    yield from parts.file(files.relative, files.path, *_stat(files.path))
                continue
            prefix, folder, names = files
            if filters.by_path:
                names = [name for name in names if filters.takes_path(prefix + name)]
                files = _Run(prefix, folder, names)
            stats = None if filters.by_stat else _stat_all(folder, names)
            if stats is None:  # file by file: a size or an age may leave one out
                for name in names:
                    path = f"{folder}/{name}"
                    yield from parts.file(prefix + name, path, *_stat(path))
            elif names:
                yield from parts.run(files, *stats)
        yield from parts.end()
        if not found and source.require_match:
            message = f"{source.pattern!r} matches no files (require_match is set)"
            self.report(self._file, source.line, f"sources[{index}].glob", message)
        elif not found and self.on_problem is not None:  # check_plan's walk says it, once
            log.warning("plan.no_match", source=f"sources[{index}]", glob=printable(source.pattern))

    @staticmethod
    def _file_entry(
        index: int,
        source: PathSource | GlobSource,
        path: str,
        upload_path: str,
        name: str,
        size: int | None,
        mtime_ns: int | None,
    ) -> _Entry:
        return _Entry(
            index=index,
            source_line=source.line,
            kind=SourceKind.FILE,
            source=path,
            upload_path=upload_path,
            file_name=name,
            requested=source.options.method,
            size=size,
            mtime_ns=mtime_ns,
        )

    def _url_entry(
        self, index: int, source: Source, url: str, list_line: int | None = None
    ) -> _Entry:
        return _Entry(
            index=index,
            source_line=source.line,
            kind=SourceKind.URL,
            source=url,
            upload_path=self._upload_path(source),
            file_name=source.options.file_name or name_from_url(url),
            requested=source.options.method,
            list_file=str(source.path) if isinstance(source, UrlListSource) else None,
            list_line=list_line,
            immutable=isinstance(source, (UrlSource, UrlListSource)) and source.immutable,
        )

    def _url_list_entries(self, index: int, source: UrlListSource) -> Iterator[_Entry]:
        where = f"sources[{index}].url_list"
        embedded = self.manifest.target.is_embedded
        found = False
        try:
            for number, url in iter_url_list(source.path):
                reason = check_url(url, embedded=embedded)
                if reason:
                    self.report(str(source.path), number, where, reason)
                    continue
                found = True
                yield self._url_entry(index, source, url, number)
        except (OSError, UnicodeDecodeError) as err:
            self.report(self._file, source.line, where, f"cannot read {source.path}: {err}")
            return
        if not found:
            self.report(self._file, source.line, where, f"{source.path} lists no usable URLs")


class _GlobParts:
    """The files of one glob source, in order, as `_Folder` parts of up to FOLDER_PART
    files of one folder; a file that vanished before its stat, or a link followed to a
    file of another name, as an `_Entry` of its own."""

    __slots__ = ("_expansion", "_here", "_index", "_part", "_source", "_upload_path")

    def __init__(self, expansion: _Expansion, index: int, source: GlobSource) -> None:
        self._expansion, self._index, self._source = expansion, index, source
        self._here: str | None = None  # the folder below the root of the last file
        self._upload_path = ""  # its upload path: files come folder by folder, joined once
        self._part: _Folder | None = None

    def file(
        self, relative: str, path: str, size: int | None, mtime_ns: int | None
    ) -> Iterator[_Entry | _Folder]:
        """One file the glob takes (stat'ed: `size` and `mtime_ns`, None if it vanished)."""
        if not self._expansion.manifest.filters.takes_stat(size, mtime_ns):
            return
        here, _, name = relative.rpartition("/")
        upload_path = self._upload_path_of(here)
        where, _, own_name = path.rpartition("/")
        if size is None or mtime_ns is None or own_name != name:
            yield from self.end()
            yield self._entry(path, upload_path, name, size, mtime_ns)
            return
        yield from self._room(where, upload_path, path, name, size, mtime_ns)
        assert self._part is not None
        self._part.add(name, size, mtime_ns)

    def run(
        self, run: _Run, sizes: array.array[int], mtimes: array.array[int]
    ) -> Iterator[_Folder]:
        """A run's files, all taken, stat'ed: `sizes` and `mtimes` in the run's order."""
        upload_path = self._upload_path_of(run.prefix[:-1])
        names, start = run.names, 0
        while start < len(names):
            name = names[start]
            path = f"{run.folder}/{name}"
            yield from self._room(run.folder, upload_path, path, name, sizes[start], mtimes[start])
            assert self._part is not None
            start += self._part.extend(names, sizes, mtimes, start)

    def end(self) -> Iterator[_Folder]:
        """The part being filled, if any: what comes next is not of it."""
        if self._part is not None:
            yield self._part
            self._part = None

    def _room(
        self, where: str, upload_path: str, path: str, name: str, size: int, mtime_ns: int
    ) -> Iterator[_Folder]:
        """A part that takes the next file of `where` (the full one before it, if any)."""
        if self._part is not None and not self._part.takes(where, upload_path):
            yield from self.end()
        if self._part is None:
            self._part = _Folder(self._entry(path, upload_path, name, size, mtime_ns), where)

    def _upload_path_of(self, here: str) -> str:
        if here != self._here:
            self._here, self._upload_path = here, self._expansion._upload_path(self._source, here)
        return self._upload_path

    def _entry(
        self, path: str, upload_path: str, name: str, size: int | None, mtime_ns: int | None
    ) -> _Entry:
        index, source = self._index, self._source
        return _Expansion._file_entry(index, source, path, upload_path, name, size, mtime_ns)


def _stat_all(folder: str, names: list[str]) -> tuple[array.array[int], array.array[int]] | None:
    """The sizes and mtimes of these files of a folder, or None when one vanished. Each
    looked up from the folder opened once, when there are a few: the kernel then resolves
    a name, not the whole path (on this VM, a fifth less a file)."""
    sizes, mtimes = array.array("q"), array.array("q")
    size, mtime = sizes.append, mtimes.append
    stat, opened = os.stat, None
    try:
        if len(names) >= _STAT_FROM_FOLDER:
            opened = os.open(folder or "/", os.O_RDONLY | os.O_DIRECTORY)
        where = "" if opened is not None else f"{folder}/"
        for name in names:  # a loop, not a list of stat results to free at once
            info = stat(where + name, dir_fd=opened)
            size(info.st_size)
            mtime(info.st_mtime_ns)
    except OSError:
        return None
    finally:
        if opened is not None:
            os.close(opened)
    return sizes, mtimes


_STAT_FROM_FOLDER = 4  # files of a run, at least, to open their folder for


def _stat(path: Path | str) -> tuple[int | None, int | None]:
    try:
        info = os.stat(path)  # noqa: PTH116 -- a Path per file costs more than the stat
    except OSError:
        return None, None
    return info.st_size, info.st_mtime_ns


def _followed(path: Path) -> str:
    """A path source as the file to read: the user named it, so a symbolic link is
    followed, here, once; the sender then opens the real file and never a link."""
    return os.path.realpath(path) if path.is_symlink() else str(path)


def _walk_message(path: str, err: OSError) -> str:
    # The reason first: a path too long to read is also too long to show whole.
    return f"cannot read a folder ({err.strerror or err}): {printable(path)!r}"


# -- check_plan -----------------------------------------------------------------------------


@dataclass(slots=True)
class _Problems:
    """Problems, kept up to a limit so a million bad names cannot exhaust memory."""

    file: str
    limit: int = PROBLEM_LIMIT
    kept: list[ManifestProblem] = field(default_factory=list)
    dropped: int = 0

    def add(self, problem: ManifestProblem) -> None:
        if len(self.kept) < self.limit:
            self.kept.append(problem)
        else:
            self.dropped += 1

    def all(self) -> list[ManifestProblem]:
        if not self.dropped:
            return self.kept
        more = ManifestProblem(self.file, None, None, f"... and {self.dropped} more problems")
        return [*self.kept, more]


@dataclass(slots=True)
class _Tally:
    items: int = 0
    local_files: int = 0
    local_bytes: int = 0
    skipped: int = 0
    sizes_above: int | None = None  # dedup: local files larger than this have sizes noted
    sizes: set[int] = field(default_factory=set)
    shared: set[int] = field(default_factory=set)
    unreadable: list[Skipped] = field(default_factory=list)
    unreadable_count: int = 0

    def count(self, entry: _Entry) -> None:
        self.items += 1
        if entry.kind is SourceKind.FILE:
            self.local_files += 1
            self.local_bytes += entry.size or 0
            if self.sizes_above is not None:
                self._note_size(entry.size)

    def count_files(self, sizes: Sequence[int]) -> None:
        """`count` for local files of these sizes."""
        self.items += len(sizes)
        self.local_files += len(sizes)
        self.local_bytes += sum(sizes)
        if self.sizes_above is not None:
            above = self.sizes_above
            for size in sizes:
                if size > above:
                    self._note_size(size)

    def _note_size(self, size: int | None) -> None:
        if self.sizes_above is None or size is None or size <= self.sizes_above:
            return
        if size in self.sizes:
            self.shared.add(size)
        else:
            self.sizes.add(size)

    def skip(self, index: int, skipped: Skipped) -> None:
        """A file a glob did not take: a warning (the first SKIPS_LOGGED), and counted."""
        self.skipped += 1
        if self.skipped <= SKIPS_LOGGED:
            path = printable(skipped.path)
            log.warning("plan.skipped", source=f"sources[{index}]", path=path, why=skipped.reason)

    def cannot_read(self, index: int, folder: Skipped) -> None:
        """A folder a glob could not read: a warning (the first PROBLEM_LIMIT), counted."""
        self.unreadable_count += 1
        if len(self.unreadable) < PROBLEM_LIMIT:
            self.unreadable.append(folder)
            log.warning("plan.unreadable", source=f"sources[{index}]", why=folder.reason)

    def result(self, kept: KeptEntries | None) -> PlanCheck:
        remote = self.items - self.local_files
        if self.skipped > SKIPS_LOGGED:
            log.warning("plan.skipped_more", count=self.skipped - SKIPS_LOGGED)
        return PlanCheck(
            self.items,
            self.local_files,
            remote,
            self.local_bytes,
            self.skipped,
            frozenset(self.shared),
            tuple(self.unreadable),
            self.unreadable_count,
            kept,
        )


KEEP_BYTES = 32 * 1024 * 1024
"""Memory `check_plan` may hold its entries in for `expand` (about 400,000 files of a
tree, fewer URLs): a bigger plan is walked again by `expand` rather than held."""


def check_plan(manifest: Manifest, *, keep: int = 0) -> PlanCheck:
    """Expand every source offline and refuse the plan if anything is wrong.

    Checks each target name, forced methods against local sizes, `require_match`
    globs, every URL of every list (located in the list file), and collisions: two
    files landing on the same uploadPath + fileName (or on names equal in Unicode
    NFC), named both. Raises ManifestError. Logged as warnings, not refused: what a
    glob matched but did not take (`plan.skipped`, counted in `skipped`), a glob that
    matches nothing (`plan.no_match`), a folder that cannot be read (`plan.unreadable`,
    in `unreadable`). Files the manifest's `filters` set aside are left out quietly.
    With a shard, the whole job is checked (every shard refuses the same plan) and the
    shard's items counted.
    With `settings.dedup`, the sizes that two of its local files above base64_max share
    are noted (`shared_sizes`): only those files are worth hashing before they are sent.
    With `keep` > 0 and entries that fit in about that many bytes, the result keeps them
    (`kept`) for `expand`, so one walk and one stat a file serve both.
    """
    problems = _Problems(str(manifest.path))
    settings = manifest.settings
    tally = _Tally(sizes_above=settings.base64_max if settings.dedup else None)

    def cannot_read(index: int, folder: Skipped) -> None:
        if manifest.holds(folder.path, ""):  # one shard fails it; no file is named ""
            tally.cannot_read(index, folder)

    expansion = _Expansion(manifest, problems.add, tally.skip, cannot_read)
    check = _Checking(expansion, tally, KeptEntries() if keep > 0 else None, keep)
    for part in expansion.parts():
        if isinstance(part, _Folder):
            check.folder(part)
        else:
            check.entry(part)
    for later, first in _first_holders(manifest, check.repeats):
        message = f"{later.shown} lands on {later.key!r}, as does {first.describe()}"
        _report_entry(expansion, later, message)
    if problems.kept:
        raise ManifestError(problems.all())
    return tally.result(check.kept)


@dataclass(slots=True)
class _Checking:
    """`check_plan` on its way through the expansion: the names seen (a digest each),
    the first repeats, the counts, and the entries kept while they fit in `keep` bytes."""

    expansion: _Expansion
    tally: _Tally
    kept: KeptEntries | None
    keep: int
    seen: set[int] = field(default_factory=set)
    repeats: list[_Entry] = field(default_factory=list)

    def entry(self, entry: _Entry) -> None:
        reason = _entry_problem(entry)
        if reason:
            _report_entry(self.expansion, entry, reason)
            return
        if self._repeated(entry.upload_path, entry.file_name):
            self._note_repeat(entry)
        if self.expansion.manifest.holds(entry.upload_path, entry.file_name):
            self.tally.count(entry)
            if self.kept is not None:
                self.kept.add(entry)
                self._within_keep()

    def folder(self, folder: _Folder) -> None:
        """`entry` for each of the folder's files, without making an entry of each
        (one look at their upload path); a folder with a name check_name refuses, or
        with a method the manifest forces, goes entry by entry."""
        first, manifest = folder.first, self.expansion.manifest
        if first.requested is not Method.AUTO or not names_pass(first.upload_path, folder.names):
            for index in range(len(folder.names)):
                self.entry(folder.entry(index))
            return
        if not self._all_new(first.upload_path, folder.names):
            for index, name in enumerate(folder.names):
                if self._repeated(first.upload_path, name):
                    self._note_repeat(folder.entry(index))
        held = folder if manifest.shard is None else folder.held_by(manifest)
        if held.names:
            self.tally.count_files(held.sizes)
            if self.kept is not None:
                self.kept.add_folder(held)
                self._within_keep()

    def _all_new(self, upload_path: str, file_names: list[str]) -> bool:
        """Whether none of these names (all passing check_name) lands where a name seen
        before does, nor two of them on one place; if so, they are all seen now (what
        `_repeated` finds of each, for a folder at once)."""
        prefix = f"{upload_path}/" if upload_path else ""
        joined = [prefix + name for name in file_names]
        if not (prefix.isascii() and "".join(file_names).isascii()):  # NFC changes no ASCII
            joined = [unicodedata.normalize("NFC", key) for key in joined]
        digests = set(map(_digest, joined))
        if len(digests) < len(joined) or not self.seen.isdisjoint(digests):
            return False
        self.seen |= digests
        return True

    def _repeated(self, upload_path: str, file_name: str) -> bool:
        """Whether a name seen before lands where this one does (or one sharing its
        digest: the second pass tells them apart); if not, it is seen now."""
        # collision_key, joined at no cost: check_name found no segment to drop
        joined = f"{upload_path}/{file_name}" if upload_path else file_name
        digest = _digest(unicodedata.normalize("NFC", joined))
        if digest in self.seen:
            return True
        self.seen.add(digest)
        return False

    def _note_repeat(self, entry: _Entry) -> None:
        if len(self.repeats) < PROBLEM_LIMIT:
            self.repeats.append(entry)

    def _within_keep(self) -> None:
        if self.kept is not None and self.kept.cost > self.keep:
            self.kept = None  # too big: `expand` walks again


def _entry_problem(entry: _Entry) -> str | None:
    reason = check_name(entry.upload_path, entry.file_name)
    if reason:
        return f"{entry.shown}: {reason}"
    if entry.requested is Method.AUTO:
        return None
    forced = forced_method_problem(entry.kind, entry.size, entry.requested)
    return f"{entry.shown}: {forced}" if forced else None


def _report_entry(expansion: _Expansion, entry: _Entry, message: str) -> None:
    if entry.list_file is not None:
        where = f"sources[{entry.index}].url_list"
        expansion.report(entry.list_file, entry.list_line, where, message)
    else:
        where = f"sources[{entry.index}]"
        expansion.report(str(expansion.manifest.path), entry.source_line, where, message)


def _digest(key: str) -> int:
    # Python's own string hash: 64 bits, computed in C, and only compared within this
    # process. Two names sharing one are told apart by the second pass.
    return hash(key)


def _first_holders(manifest: Manifest, repeats: list[_Entry]) -> Iterator[tuple[_Entry, _Entry]]:
    """Pair each repeated entry with the first entry holding its name (a second pass)."""
    if not repeats:
        return
    wanted = {r.collision for r in repeats}
    first: dict[str, _Entry] = {}
    for entry in _Expansion(manifest).entries():
        if entry.collision in wanted and entry.collision not in first:
            first[entry.collision] = entry
    for later in repeats:
        holder = first.get(later.collision)
        # A digest can repeat for two different names; then the holder is `later` itself.
        if holder is not None and holder.identity != later.identity:
            yield later, holder


# -- planned_keys ---------------------------------------------------------------------------


def planned_keys(manifest: Manifest) -> Iterator[tuple[str, str]]:
    """Every (upload_path, file_name) the manifest's sources name today (its shard's, under
    --shard), offline: no origin is asked anything (a name never depends on a size). A
    source that cannot be read names nothing, silently; nothing is checked (`check_plan`
    does that)."""
    for entry in _Expansion(manifest).entries():
        if manifest.holds(entry.upload_path, entry.file_name):
            yield entry.upload_path, entry.file_name


# -- expand ---------------------------------------------------------------------------------


Remembered = Callable[
    [Sequence[tuple[str, str, str]]], Awaitable[Mapping[tuple[str, str, str], RemoteInfo]]
]
"""What is known of remote files, by (upload_path, file_name, URL as written): the ledger's
record of an `immutable` source's file, which is then not asked again."""

PROBE_WINDOW = 16  # probes in flight when the session does not bound its connections
PROBE_LOOKAHEAD = 1024  # entries that may wait behind one slow answer while others go on

_Pending = RemoteInfo | asyncio.Task[RemoteInfo]


async def expand(
    manifest: Manifest,
    *,
    session: aiohttp.ClientSession | OpenSession | None,
    probe_concurrency: int | None = None,
    url_vars: Mapping[str, str] | None = None,
    probe_timeout: float = PROBE_TIMEOUT,
    remembered: Remembered | None = None,
    kept: KeptEntries | None = None,
) -> AsyncIterator[PlanItem]:
    """Yield the plan's items lazily, in manifest order: `expand_batches`, one at a time."""
    batches = expand_batches(
        manifest,
        session=session,
        probe_concurrency=probe_concurrency,
        url_vars=url_vars,
        probe_timeout=probe_timeout,
        remembered=remembered,
        kept=kept,
    )
    async for item in one_at_a_time(batches):
        yield item


async def one_at_a_time(batches: AsyncGenerator[Sequence[T], None]) -> AsyncIterator[T]:
    """The elements of each batch in turn; the batches are closed with this iterator."""
    async with contextlib.aclosing(batches):
        async for batch in batches:
            for element in batch:
                yield element


async def expand_batches(
    manifest: Manifest,
    *,
    session: aiohttp.ClientSession | OpenSession | None,
    probe_concurrency: int | None = None,
    url_vars: Mapping[str, str] | None = None,
    probe_timeout: float = PROBE_TIMEOUT,
    remembered: Remembered | None = None,
    kept: KeptEntries | None = None,
) -> AsyncGenerator[Sequence[PlanItem], None]:
    """Yield the plan's items lazily, in manifest order, in batches of about BATCH (a
    folder's files as `LocalItems`); from `kept` (what `check_plan` kept) when given, else
    walking the sources.

    Local files carry size and mtime from stat. Remote files are probed for their size
    (and ETag / Last-Modified) through `session` (or the session it opens at the first
    probe) in a sliding window of `probe_concurrency` requests (default: as many as an
    open session may connect at once), so one slow origin holds up no other probe;
    answers are put back in order, and what is ready is yielded before waiting for a
    slow one.
    An `immutable` source's file that `remembered` knows is not probed. Without a
    session, or when the origin tells nothing, a remote file's size is None.
    `url_vars` fills `${NAME}` in URLs (e.g. EMBEDDED_ORIGIN) for probing only: an
    item's source and name keep the URL as written, so a demo origin on a new port
    each run changes neither (the sender substitutes again). Skips what `check_plan`
    refuses; raises ManifestError only for a forced method the file's size forbids.
    """
    width = probe_concurrency or _connection_limit(session)
    window = _ProbeWindow(_opener(session), width, dict(url_vars or {}), probe_timeout)
    pending: deque[tuple[_Entry, _Pending]] = deque()
    try:
        chunks = _kept_chunks(kept) if kept is not None else _chunks_off_the_loop(manifest)
        async for chunk in chunks:
            if isinstance(chunk, _Folder):  # local files: nothing to probe or wait for
                if pending:
                    yield [await _planned(manifest, head, info) for head, info in _drain(pending)]
                for items in chunk.plan_items(manifest, BATCH):
                    yield items
                continue
            known = await _remembered_infos(chunk, remembered)
            ready: list[PlanItem] = []
            for entry in chunk:
                pending.append((entry, window.info(entry, known.get(entry.identity))))
                while pending and (_ready(pending[0][1]) or len(pending) > PROBE_LOOKAHEAD):
                    if _full(ready, pending):
                        yield ready
                        ready = []
                    head, info = pending.popleft()
                    ready.append(await _planned(manifest, head, info))
            if ready:
                yield ready
        ready = []
        while pending:
            if _full(ready, pending):
                yield ready
                ready = []
            head, info = pending.popleft()
            ready.append(await _planned(manifest, head, info))
        if ready:
            yield ready
    finally:
        for _, info in pending:
            if isinstance(info, asyncio.Task):
                info.cancel()


BATCH = 500  # items in a batch of `expand_batches`, about (one ledger lookup)


def _full(ready: list[PlanItem], pending: deque[tuple[_Entry, _Pending]]) -> bool:
    """Whether the items ready go now: a batch is full, or the next one waits for an
    origin (what is ready goes on meanwhile)."""
    return len(ready) >= BATCH or (bool(ready) and not _ready(pending[0][1]))


def _drain(pending: deque[tuple[_Entry, _Pending]]) -> Iterator[tuple[_Entry, _Pending]]:
    while pending:
        yield pending.popleft()


async def _planned(manifest: Manifest, entry: _Entry, info: _Pending) -> PlanItem:
    return _plan_item(manifest, entry, await _result(info))


@dataclass(slots=True)
class _ProbeWindow:
    """Probes of remote files, at most `width` in flight; each a task of its own."""

    session: OpenSession | None
    width: int
    variables: dict[str, str]
    timeout: float = PROBE_TIMEOUT
    _slots: asyncio.Semaphore = field(init=False)

    def __post_init__(self) -> None:
        self._slots = asyncio.Semaphore(max(self.width, 1))

    def info(self, entry: _Entry, remembered: RemoteInfo | None) -> _Pending:
        """What is known of the entry's file now, or the probe that will tell."""
        if entry.kind is SourceKind.FILE:
            return RemoteInfo(entry.size)
        if remembered is not None:
            return remembered
        if self.session is None:
            return RemoteInfo()
        url = substitute_url(entry.source, self.variables)
        return asyncio.create_task(self._probe(self.session, url))

    async def _probe(self, session: OpenSession, url: str) -> RemoteInfo:
        async with self._slots:
            return await probe_remote(await session(), url, probe_timeout=self.timeout)


def _opener(session: aiohttp.ClientSession | OpenSession | None) -> OpenSession | None:
    if session is None or callable(session):
        return session
    opened = session

    async def open_session() -> aiohttp.ClientSession:
        return opened

    return open_session


def _connection_limit(session: aiohttp.ClientSession | OpenSession | None) -> int:
    if session is None or callable(session) or session.connector is None:
        return PROBE_WINDOW
    return session.connector.limit or PROBE_WINDOW


def _ready(info: _Pending) -> bool:
    return isinstance(info, RemoteInfo) or info.done()


async def _result(info: _Pending) -> RemoteInfo:
    return info if isinstance(info, RemoteInfo) else await info


async def _remembered_infos(
    chunk: list[_Entry], remembered: Remembered | None
) -> dict[tuple[int, str, int | None], RemoteInfo]:
    """What `remembered` knows of the chunk's immutable URLs, by entry identity."""
    wanted = [e for e in chunk if e.immutable and e.kind is SourceKind.URL]
    if remembered is None or not wanted:
        return {}
    found = await remembered([(e.upload_path, e.file_name, e.source) for e in wanted])
    infos = ((e, found.get((e.upload_path, e.file_name, e.source))) for e in wanted)
    return {e.identity: info for e, info in infos if info is not None}


async def _chunks_off_the_loop(
    manifest: Manifest, chunk: int = BATCH
) -> AsyncIterator[list[_Entry]]:
    """The expansion's entries of this process's shard, walked and stat'ed in a thread
    a chunk at a time, so a folder of a million files does not stall the uploads sharing
    the event loop. Other shards' URLs are never probed."""
    entries = _Expansion(manifest).entries()
    while batch := await asyncio.to_thread(lambda: list(itertools.islice(entries, chunk))):
        held = [e for e in batch if manifest.holds(e.upload_path, e.file_name)]
        if held:
            yield held


async def _kept_chunks(
    kept: KeptEntries, chunk: int = BATCH
) -> AsyncIterator[list[_Entry] | _Folder]:
    """The kept entries: a folder's files as the folder, other entries in lists."""
    entries: list[_Entry] = []
    for part in kept.parts():
        if isinstance(part, _Folder):
            if entries:
                yield entries
                entries = []
            yield part
            continue
        entries.append(part)
        if len(entries) >= chunk:
            yield entries
            entries = []
    if entries:
        yield entries


def _plan_item(manifest: Manifest, entry: _Entry, info: RemoteInfo) -> PlanItem:
    try:
        method = choose_method(entry.kind, info.size, entry.requested, manifest.settings)
    except ValueError as err:
        where = f"sources[{entry.index}].method"
        message = f"{entry.shown}: {err}"
        problem = ManifestProblem(str(manifest.path), entry.source_line, where, message)
        raise ManifestError([problem]) from None
    return PlanItem(
        source=entry.source,
        kind=entry.kind,
        upload_path=entry.upload_path,
        file_name=entry.file_name,
        size=info.size,
        method=method,
        method_forced=entry.requested is not Method.AUTO,
        mtime_ns=entry.mtime_ns,
        etag=info.etag,
        last_modified=info.last_modified,
    )


# -- probing origins ------------------------------------------------------------------------

_IDENTITY = {"Accept-Encoding": "identity"}


async def probe_remote(
    session: aiohttp.ClientSession, url: str, *, probe_timeout: float = PROBE_TIMEOUT
) -> RemoteInfo:
    """Ask an origin for a file's size without downloading it; never raises.

    HEAD first (redirects followed); when it fails or gives no length, a GET for
    `Range: bytes=0-0` whose Content-Range tells the total (the body is not read).
    """
    import aiohttp

    limit = aiohttp.ClientTimeout(total=probe_timeout)
    head = await _probe_head(session, url, limit)
    if head.size is not None:
        return head
    ranged = await _probe_ranged_get(session, url, limit)
    return RemoteInfo(
        size=ranged.size,
        etag=head.etag or ranged.etag,
        last_modified=head.last_modified or ranged.last_modified,
    )


async def _probe_head(
    session: aiohttp.ClientSession, url: str, limit: aiohttp.ClientTimeout
) -> RemoteInfo:
    import aiohttp

    try:
        async with session.head(
            url, allow_redirects=True, timeout=limit, headers=_IDENTITY
        ) as response:
            if not 200 <= response.status < 300:
                return RemoteInfo()
            return _info(response, plain_length(response))
    except (aiohttp.ClientError, TimeoutError, ValueError, OSError):
        return RemoteInfo()


async def _probe_ranged_get(
    session: aiohttp.ClientSession, url: str, limit: aiohttp.ClientTimeout
) -> RemoteInfo:
    import aiohttp

    headers = {**_IDENTITY, "Range": "bytes=0-0"}
    try:
        async with session.get(url, timeout=limit, headers=headers) as response:
            if response.status == 206:
                size = range_total(response.headers.get("Content-Range", ""))
            elif response.status == 200:
                size = plain_length(response)  # the origin ignored Range
            else:
                size = None
            info = _info(response, size)
            response.close()  # drop the connection rather than read a body we do not want
            return info
    except (aiohttp.ClientError, TimeoutError, ValueError, OSError):
        return RemoteInfo()


def _info(response: aiohttp.ClientResponse, size: int | None) -> RemoteInfo:
    return RemoteInfo(
        size=size,
        etag=response.headers.get("ETag"),
        last_modified=response.headers.get("Last-Modified"),
    )
