"""Which local files a command takes: `--include`, `--exclude`, sizes and age (pure).

The patterns follow rclone's rules. Each is matched against the file's path relative
to its source's root (a glob's root folder; for a `path:` source, its file name):

- a pattern that starts with `/` is anchored at that root (`/2024/*.jpg`);
- any other pattern matches the end of the path, whole segments only (`*.jpg` takes
  `a.jpg` and `x/y/a.jpg`; `cache/**` takes everything in any folder named `cache`);
- `*`, `?`, `[abc]`, `**` and `{jpg,png}` mean what they mean in manifest globs.

Excludes win: a file is taken when it matches no `--exclude` and, when any
`--include` is given, at least one of them; the order of the flags does not matter.
Size and age are judged on the file's stat at plan time. URL sources are not
filtered: nothing about them is known before they are fetched.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from migrator.naming import compile_glob

__all__ = ["Filters", "filter_regex"]


def filter_regex(pattern: str) -> re.Pattern[str]:
    """The regular expression a filter pattern stands for; use `fullmatch`."""
    body = compile_glob(pattern).pattern
    if pattern.startswith("/"):
        return re.compile(body, re.DOTALL)
    return re.compile(f"(?:.*/)?(?:{body})", re.DOTALL)


def _any_of(patterns: tuple[str, ...]) -> re.Pattern[str] | None:
    if not patterns:
        return None
    return re.compile("|".join(f"(?:{filter_regex(p).pattern})" for p in patterns), re.DOTALL)


@dataclass(frozen=True, slots=True)
class Filters:
    """The selection a command line asked for; the default takes everything."""

    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    min_size: int | None = None  # bytes, inclusive
    max_size: int | None = None  # bytes, inclusive
    modified_since: float | None = None  # POSIX seconds: --max-age, as a moment
    _included: re.Pattern[str] | None = field(init=False, repr=False, compare=False)
    _excluded: re.Pattern[str] | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_included", _any_of(self.include))
        object.__setattr__(self, "_excluded", _any_of(self.exclude))

    @property
    def by_path(self) -> bool:
        """Whether any pattern was given (else `takes_path` takes every path)."""
        return bool(self.include or self.exclude)

    @property
    def by_stat(self) -> bool:
        """Whether any size or age limit was given (else `takes_stat` takes every file)."""
        return not (self.min_size is None and self.max_size is None and self.modified_since is None)

    def takes_path(self, relative: str) -> bool:
        """Whether the patterns take the file at `relative` (below its source's root)."""
        if self._excluded is not None and self._excluded.fullmatch(relative):
            return False
        return self._included is None or self._included.fullmatch(relative) is not None

    def takes_stat(self, size: int | None, mtime_ns: int | None) -> bool:
        """Whether the size and age limits take a file; what could not be stat'ed is
        taken (its upload will say what is wrong with it)."""
        if size is not None:
            if self.min_size is not None and size < self.min_size:
                return False
            if self.max_size is not None and size > self.max_size:
                return False
        since = self.modified_since
        return since is None or mtime_ns is None or mtime_ns >= since * 1_000_000_000
