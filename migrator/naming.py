"""Pure rules about names: where a file lands (uploadPath, fileName), which URLs a
manifest may name, and what a glob pattern matches.

Target names are deterministic (a retry must overwrite, never copy), so every rule
here is a function of the manifest and the source alone. Nothing here does I/O.
"""

from __future__ import annotations

import functools
import hashlib
import posixpath
import re
import stat
import unicodedata
from collections.abc import Iterable, Mapping
from urllib.parse import unquote, urlsplit, urlunsplit

MAX_SEGMENT_BYTES = 255
EMBEDDED_ORIGIN = "${EMBEDDED_ORIGIN}"
"""Stands for the embedded demo origin (loopback, serving the manifest's folder)."""
_EMBEDDED_ORIGIN_STAND_IN = "http://127.0.0.1:1"
_VARIABLE_RE = re.compile(r"\$\{([^}]*)\}")
_WILDCARDS = frozenset("*?[{")
_SAFE_ASCII = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-")
_CONTROL_RE = re.compile("[\x00-\x1f\x7f-\x9f]")  # Unicode category Cc, exactly
_SURROGATE_RE = re.compile("[\ud800-\udfff]")  # a byte of a name that is not UTF-8
_UNPRINTABLE_RE = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")
_EXTENSION_RE = re.compile(r"\.[A-Za-z0-9]{1,16}$")
_USERINFO_RE = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/?#\s]*@")


def join_upload_path(*parts: str | None) -> str:
    """Join uploadPath pieces with '/', dropping empty and '.' segments and outer slashes.

    `join_upload_path("migrations/", "photos", "2024/may")` -> `migrations/photos/2024/may`.
    '..' is kept on purpose so that `check_name` can refuse it.
    """
    segments: list[str] = []
    for part in parts:
        if not part:
            continue
        if _is_clean(part):  # the common case, a path already joined: taken whole
            segments.append(part)
        else:
            segments.extend(s for s in part.split("/") if s not in ("", "."))
    return "/".join(segments)


def _is_clean(part: str) -> bool:
    """No empty or '.' segment, no slash at either end (pure)."""
    return not (
        part[0] == "/"
        or part[-1] == "/"
        or "//" in part
        or part == "."
        or part.startswith("./")
        or part.endswith("/.")
        or "/./" in part
    )


def name_from_url(url: str) -> str:
    """The fileName for a remote file: its last path segment, percent-decoded and made safe.

    Characters outside [A-Za-z0-9._-] (non-ASCII letters and digits excepted) become '_'.
    A URL with no usable segment (`https://host/`, `.../.`, `.../..`) gets
    `url-<12 hex of sha256(url)>`, plus the extension when the segment had one.
    """
    path = urlsplit(url).path
    segment = unquote(path.rsplit("/", 1)[-1])
    safe = "".join(ch if _is_safe_char(ch) else "_" for ch in segment)
    if safe.strip(".") == "" or len(safe.encode()) > MAX_SEGMENT_BYTES:
        return _hashed_name(url, safe)
    return safe


def check_name(upload_path: str, file_name: str) -> str | None:
    """Why this uploadPath + fileName cannot be sent, or None when it is fine."""
    reason = _upload_path_problem(upload_path)
    if reason:
        return reason
    if "/" in file_name:
        return f"file name {file_name!r} contains '/'; put folders in upload_path"
    return _check_segment(file_name, "file name")


def names_pass(upload_path: str, file_names: Iterable[str]) -> bool:
    """Whether `check_name` finds nothing wrong with any of these file names in this
    upload path: one look at the path, one scan of each name (a folder of files)."""
    if _upload_path_problem(upload_path) is not None:
        return False
    names = list(file_names)
    together = "".join(names)
    if (
        "/" not in together
        and _ODD_CHAR_RE.search(together) is None
        and max(map(len, names), default=0) <= _SHORT_SEGMENT
        and _SPECIAL_SEGMENTS.isdisjoint(names)
    ):
        return True  # what _check_segment's common case finds of each, for all at once
    return all("/" not in name and _check_segment(name, "file name") is None for name in names)


@functools.lru_cache(maxsize=4096)  # every file of a folder shares its upload path
def _upload_path_problem(upload_path: str) -> str | None:
    if upload_path.startswith("/"):
        return f"upload path {upload_path!r} is absolute; write it without the leading '/'"
    for segment in upload_path.split("/") if upload_path else []:
        reason = _check_segment(segment, "upload path")
        if reason:
            return f"{reason} (in {upload_path!r})"
    return None


def collision_key(upload_path: str, file_name: str) -> str:
    """What two names must not share: the joined name in Unicode NFC, so that `café`
    written precomposed and decomposed (two files on Linux, one on macOS, and maybe
    one on the service) count as the same name."""
    return unicodedata.normalize("NFC", join_upload_path(upload_path, file_name))


def check_upload_path(upload_path: str) -> str | None:
    """Why an `upload_path` written in the manifest is unusable, or None."""
    if upload_path.startswith("/"):
        return f"{upload_path!r} is absolute; write it without the leading '/'"
    cleaned = join_upload_path(upload_path)
    for segment in cleaned.split("/") if cleaned else []:
        reason = _check_segment(segment, "upload path")
        if reason:
            return reason
    return None


_ODD_CHAR_RE = re.compile("[\\\\\x00-\x1f\x7f-\x9f\ud800-\udfff]")
_SHORT_SEGMENT = MAX_SEGMENT_BYTES // 4  # characters that cannot exceed it in UTF-8


_SPECIAL_SEGMENTS = frozenset(("", ".", ".."))


def _check_segment(segment: str, what: str) -> str | None:
    if (
        len(segment) <= _SHORT_SEGMENT
        and segment not in _SPECIAL_SEGMENTS
        and _ODD_CHAR_RE.search(segment) is None
    ):
        return None  # the common case, in one scan: every check below passes
    if segment == "":
        return f"{what} has an empty segment" if what == "upload path" else "file name is empty"
    if segment in (".", ".."):
        return f"{what} must not contain a {segment!r} segment"
    if "\\" in segment:
        return f"{what} {segment!r} contains a backslash"
    if _SURROGATE_RE.search(segment):
        return f"{what} {segment!r} is not valid UTF-8"
    if _CONTROL_RE.search(segment):
        return f"{what} {segment!r} contains a control character"
    if len(segment.encode()) > MAX_SEGMENT_BYTES:
        return f"{what} segment is longer than {MAX_SEGMENT_BYTES} bytes"
    return None


def printable(text: str) -> str:
    """Text with its control characters (a line break, a terminal escape) and the bytes
    of a name that is not UTF-8 written as escapes, so a hostile file name can neither
    break a line, steer a terminal, nor fail the write of a log line."""
    if text.isprintable():  # the common case: no Cc or Cs character, nothing to escape
        return text
    return _UNPRINTABLE_RE.sub(lambda match: repr(match.group(0))[1:-1], text)


def _is_safe_char(ch: str) -> bool:
    return ch in _SAFE_ASCII or (not ch.isascii() and ch.isalnum())


def _hashed_name(url: str, safe_segment: str) -> str:
    digest = hashlib.sha256(url.encode()).hexdigest()[:12]
    match = _EXTENSION_RE.search(posixpath.basename(safe_segment))
    extension = match.group(0) if match and match.start() > 0 else ""
    return f"url-{digest}{extension}"


# -- source URLs ------------------------------------------------------------------------------


def check_url(url: str, *, embedded: bool) -> str | None:
    """Why a source URL is unusable, or None. `embedded`: the target is the emulator.

    `${EMBEDDED_ORIGIN}` may open a URL only when the target is embedded; the rest of
    the URL is checked as if the variable were a loopback origin.
    """
    if not url.strip():
        return "the URL is empty"
    if url != url.strip() or any(ch.isspace() for ch in url):
        return f"{without_credentials(url)!r} contains whitespace"
    if _CONTROL_RE.search(url):
        return f"{without_credentials(url)!r} contains a control character"
    for name in _VARIABLE_RE.findall(url):
        if name != "EMBEDDED_ORIGIN":
            shown = without_credentials(url)
            return f"{shown!r} names an unknown variable ${{{name}}} (only ${{EMBEDDED_ORIGIN}})"
    if EMBEDDED_ORIGIN in url:
        return _check_embedded_origin_url(url, embedded=embedded)
    return _check_http_url(url)


def without_credentials(url: str) -> str:
    """The URL without `user:password@`, for every place but the ledger (pure).

    `http://u:p@host/a` -> `http://host/a`; a URL without credentials, or text that is
    not a URL, is returned unchanged.
    """
    if "@" not in url:
        return url  # the common case, at no cost (plan prints a row per file)
    try:
        parts = urlsplit(url)
    except ValueError:
        return hide_credentials(url)
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))


def hide_credentials(text: str) -> str:
    """Text (a message, a log line) with the `user:password@` of every URL in it
    removed (pure). `fetch of http://u:p@h/x failed` -> `fetch of http://h/x failed`."""
    if "@" not in text:
        return text
    return _USERINFO_RE.sub(r"\1", text)


def substitute_url(url: str, variables: Mapping[str, str] | None) -> str:
    """Replace `${NAME}` by its value; unknown names are left as written."""
    if not variables:
        return url
    return _VARIABLE_RE.sub(lambda m: variables.get(m.group(1), m.group(0)), url)


def _check_embedded_origin_url(url: str, *, embedded: bool) -> str | None:
    if not embedded:
        return f"{EMBEDDED_ORIGIN} is only available when target.base_url is embedded"
    if not url.startswith(EMBEDDED_ORIGIN) or url.count(EMBEDDED_ORIGIN) > 1:
        return f"{EMBEDDED_ORIGIN} may only open the URL, as in {EMBEDDED_ORIGIN}/data/file.png"
    return _check_http_url(_EMBEDDED_ORIGIN_STAND_IN + url[len(EMBEDDED_ORIGIN) :])


def _check_http_url(url: str) -> str | None:
    shown = without_credentials(url)
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 -- raises ValueError on a bad port
    except ValueError as err:
        return f"{shown!r} is not a valid URL ({hide_credentials(str(err))})"
    if parts.scheme.lower() not in ("http", "https"):
        scheme = parts.scheme or "no scheme"
        return f"{shown!r} has {scheme}; only http:// and https:// URLs can be migrated"
    if not parts.hostname:
        return f"{shown!r} has no host"
    return None


def file_type(mode: int) -> str:
    """What kind of file a stat mode names, in words: `a FIFO`, `a socket`, ..."""
    kinds = (
        (stat.S_ISREG, "a regular file"),
        (stat.S_ISDIR, "a folder"),
        (stat.S_ISLNK, "a symbolic link"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
    )
    return next((words for test, words in kinds if test(mode)), "not a file")


# -- glob patterns ----------------------------------------------------------------------------


def split_glob(pattern: str) -> tuple[str, str]:
    """Split a glob into its root (the longest leading run of segments without a
    wildcard) and the pattern relative to that root.

    `./photos/**/*.jpg` -> (`./photos`, `**/*.jpg`); `*.txt` -> (`.`, `*.txt`);
    a pattern without wildcards splits before its last segment.
    """
    segments = pattern.split("/")
    first_wild = next((i for i, s in enumerate(segments) if _WILDCARDS & set(s)), len(segments) - 1)
    root = "/".join(segments[:first_wild])
    if not root:
        root = "/" if pattern.startswith("/") and first_wild > 0 else "."
    relative = "/".join(s for s in segments[first_wild:] if s not in ("", "."))
    return root, relative


def compile_glob(pattern: str) -> re.Pattern[str]:
    """A regular expression that fully matches the '/'-separated paths the glob names.

    `*` matches within one segment (dot files included, as rsync does), `?` one
    character, `[abc]` / `[!abc]` a class, `{jpg,png}` one of the alternatives (each
    a pattern itself, within one segment; nested braces work), and a `**` segment any
    number of directories, zero included (`a/**/b` matches `a/b`). Use `fullmatch`.
    """
    segments = [s for s in pattern.strip("/").split("/") if s not in ("", ".")]
    parts: list[str] = []
    for index, segment in enumerate(segments):
        last = index == len(segments) - 1
        if segment == "**":
            parts.append(".*" if last else "(?:.*/)?")
        else:
            parts.append(_segment_regex(segment) + ("" if last else "/"))
    return re.compile("".join(parts), re.DOTALL)


def glob_depth(relative_pattern: str) -> int | None:
    """How many directories deep a match can lie below the root; None with `**`."""
    segments = [s for s in relative_pattern.split("/") if s not in ("", ".")]
    if "**" in segments:
        return None
    return max(len(segments) - 1, 0)


def _segment_regex(segment: str) -> str:
    out: list[str] = []
    i = 0
    while i < len(segment):
        ch = segment[i]
        if ch == "*":
            out.append("[^/]*")
        elif ch == "?":
            out.append("[^/]")
        elif ch == "[" and (end := _class_end(segment, i)) > 0:
            out.append(_class_regex(segment[i + 1 : end]))
            i = end
        elif ch == "{" and (alternatives := _brace_alternatives(segment, i)) is not None:
            end, choices = alternatives
            out.append("(?:" + "|".join(_segment_regex(c) for c in choices) + ")")
            i = end
        else:
            out.append(re.escape(ch))
        i += 1
    return "".join(out)


def _brace_alternatives(segment: str, start: int) -> tuple[int, list[str]] | None:
    """For the '{' at `start`: the index of its '}' and the alternatives between, split at
    top-level commas; None when it closes nowhere or holds no comma (then it is literal,
    as in the shell: `{x}` names a file called `{x}`)."""
    depth, begin = 0, start + 1
    choices: list[str] = []
    for i in range(start, len(segment)):
        ch = segment[i]
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return (i, [*choices, segment[begin:i]]) if choices else None
        elif ch == "," and depth == 1:
            choices.append(segment[begin:i])
            begin = i + 1
    return None


def _class_end(segment: str, start: int) -> int:
    """Index of the ']' closing the class opened at `start`, or -1 (then '[' is literal)."""
    i = start + 1
    if i < len(segment) and segment[i] in "!^":
        i += 1
    if i < len(segment) and segment[i] == "]":
        i += 1  # a leading ']' belongs to the class
    end = segment.find("]", i)
    return end


def _class_regex(body: str) -> str:
    negate = body[:1] in ("!", "^")
    if negate:
        body = body[1:]
    escaped = body.replace("\\", "\\\\").replace("^", "\\^").replace("[", "\\[")
    escaped = escaped.replace("]", "\\]") if escaped.startswith("]") else escaped
    return f"[^/{escaped}]" if negate else f"(?!/)[{escaped}]"
