"""Pure conversions between the units people write and the ones the program uses."""

from __future__ import annotations

import functools
import math
import re
import time
from datetime import UTC, datetime
from fractions import Fraction

_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "kib": 1024,
    "m": 1000**2,
    "mb": 1000**2,
    "mib": 1024**2,
    "g": 1000**3,
    "gb": 1000**3,
    "gib": 1024**3,
    "t": 1000**4,
    "tb": 1000**4,
    "tib": 1024**4,
}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")

_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_DURATION_RE = re.compile(r"(\d+(?:\.\d+)?)\s*([smhdw])")

MAX_SIZE = 8 * 1024**5
"""8 PiB (2**53 bytes): exact as a float, and far beyond any file or rate."""
MAX_DURATION = 100 * 365 * 86400
"""100 years: any later moment may be past what a timestamp can show."""
MAX_NUMBER_DIGITS = 40  # a longer number is refused before it is converted at all


def parse_size(value: str | int) -> int:
    """`512`, `64KiB`, `1MiB`, `10MB`, `2GiB` -> bytes. Raises ValueError with the reason.

    Exact (no float on the way), and at most MAX_SIZE: a number too large for a float
    is a mistake to report, never infinity.
    """
    if isinstance(value, bool):
        raise ValueError("expected a size such as 512, 64KiB, 10MB or 2GiB")
    if isinstance(value, int):
        if value < 0:
            raise ValueError("a size cannot be negative")
        return _bounded_size(value, shown(value))
    match = _SIZE_RE.match(str(value))
    if not match:
        raise ValueError(f"{shown(value)} is not a size (try 512, 64KiB, 10MB or 2GiB)")
    number, unit = match.groups()
    factor = _SIZE_UNITS.get(unit.lower())
    if factor is None:
        raise ValueError(
            f"{shown(value)} has an unknown unit {unit!r} (use B, KiB, MiB, GiB, KB, MB, GB)"
        )
    result = _exact(number, shown(value)) * factor
    if result.denominator != 1:
        raise ValueError(f"{shown(value)} is not a whole number of bytes")
    return _bounded_size(int(result), shown(value))


def _exact(number: str, shown: str) -> Fraction:
    """A decimal number as an exact fraction; refused when absurdly long."""
    if len(number) > MAX_NUMBER_DIGITS:
        raise ValueError(f"{shown} is too large a number")
    return Fraction(number)


def _bounded_size(size: int, shown: str) -> int:
    if size > MAX_SIZE:
        raise ValueError(f"{shown} is too large (at most 8 PiB)")
    return size


def shown(value: object, limit: int = 40) -> str:
    """A value for a message: a string quoted, and cut so a 400-digit number stays short."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 128:
        return f"a number of {_digits(value)} digits"
    text = repr(value) if isinstance(value, str) else str(value)
    return text if len(text) <= limit else text[: limit - 2] + "…" + text[-1]


def _digits(value: int) -> str:
    try:
        return str(len(str(abs(value))))
    except ValueError:  # Python refuses to write out more than 4,300 digits
        return "more than 4300"


def parse_duration(value: str | int | float) -> float:
    """`90s`, `15m`, `12h`, `3d`, `1h30m`, or a bare number of seconds -> seconds.

    At most MAX_DURATION: a number too large for a float (`ttl: 999...9`, `1e400`)
    is refused with the reason, never taken as infinity.
    """
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 90s, 15m, 12h or 3d")
    if isinstance(value, int | float):
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{shown(value)} is not a duration (try 90s, 15m, 12h or 3d)")
        if value < 0:
            raise ValueError("a duration cannot be negative")
        return _bounded_duration(Fraction(value), shown(value))
    text = str(value).strip().lower()
    if re.fullmatch(r"\d+(?:\.\d+)?", text):
        return _bounded_duration(_exact(text, shown(value)), shown(value))
    if not text or not re.fullmatch(r"(?:\d+(?:\.\d+)?\s*[smhdw]\s*)+", text):
        raise ValueError(f"{shown(value)} is not a duration (try 90s, 15m, 12h or 3d)")
    total = sum(
        (_exact(n, shown(value)) * _DURATION_UNITS[u] for n, u in _DURATION_RE.findall(text)),
        Fraction(0),
    )
    return _bounded_duration(total, shown(value))


def _bounded_duration(seconds: Fraction, shown: str) -> float:
    if seconds > MAX_DURATION:
        raise ValueError(f"{shown} is too long (at most {MAX_DURATION // 86400}d)")
    return float(seconds)


MAX_TPS = 100_000.0


def parse_rate(value: str | int | float) -> float:
    """Requests per second: `10`, `2.5`, `10/s` -> a finite number above 0."""
    if isinstance(value, bool):
        raise ValueError("expected a number of requests per second, such as 10 or 2.5")
    if isinstance(value, int | float) and not value <= MAX_TPS:
        text = "inf"  # also an int too large for a float: refused just below
    else:
        text = str(value).strip().lower().removesuffix("/s")
    try:
        rate = float(text) if len(text) <= MAX_NUMBER_DIGITS else math.inf
    except ValueError:
        raise ValueError(f"{shown(value)} is not a number of requests per second") from None
    if not 0 < rate <= MAX_TPS:
        raise ValueError(f"must be more than 0 and at most {MAX_TPS:g} requests per second")
    return rate


def parse_bandwidth(value: str | int) -> int:
    """Bytes per second: `8MiB`, `500KB/s`, `1048576` -> a whole number above 0."""
    text = value if isinstance(value, int) else str(value).strip().removesuffix("/s")
    rate = parse_size(text)
    if rate <= 0:
        raise ValueError("must be more than 0 bytes per second")
    return rate


MAX_TIMEOUT = 366 * 86_400.0  # a timeout longer than a year is a typo


def parse_positive_duration(value: str | int | float) -> float:
    """A duration above 0 and at most a year: timeouts."""
    seconds = parse_duration(value)
    if not 0 < seconds <= MAX_TIMEOUT:
        raise ValueError("must be more than 0s and at most a year")
    return seconds


def number_or_none(value: object) -> float | None:
    """A number read back from JSON (a ledger fact) as a float; anything else None."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def format_size(size: int | float | None) -> str:
    """Bytes -> `1.5 MiB`; None -> `?`."""
    if size is None:
        return "?"
    if -1024 < size < 1024:  # most rows of a plan of small files: no float, no loop
        return f"{int(size)} B"
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def format_duration(seconds: float | None) -> str:
    """Seconds -> `2d 3h`, `4h 10m`, `12m 5s`, `8s`; None -> `?`."""
    if seconds is None:
        return "?"
    sign = "-" if seconds < 0 else ""
    rest = int(abs(seconds))
    days, rest = divmod(rest, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{sign}{days}d {hours}h"
    if hours:
        return f"{sign}{hours}h {minutes}m"
    if minutes:
        return f"{sign}{minutes}m {secs}s"
    return f"{sign}{abs(seconds):.1f}s"


def relative_time(moment: float, now: float) -> str:
    """`in 3h 2m` for a moment to come, `13s ago` for one past; never a negative duration."""
    left = moment - now
    shown = format_duration(abs(left)) if abs(left) >= 60 else f"{int(abs(left))}s"
    return f"in {shown}" if left >= 0 else f"{shown} ago"


_LAST_SECOND = 253402300799  # 9999-12-31T23:59:59Z, datetime's last


def iso_utc(timestamp: float | None) -> str | None:
    """POSIX seconds -> `2025-01-18T10:30:00Z` (milliseconds kept when present).

    An export writes two a row, a million rows: the calendar text of each second is
    made once, and the microseconds rounded as datetime.fromtimestamp rounds them
    (half to even), so the text is the same as datetime's, at a quarter of the cost."""
    if timestamp is None:
        return None
    if 0 <= timestamp < _LAST_SECOND:
        whole = int(timestamp)
        micro = round((timestamp - whole) * 1_000_000)
        if micro >= 1_000_000:
            whole, micro = whole + 1, micro - 1_000_000
        return _second_text(whole) + (_MILLIS_Z[micro // 1000] if micro else "Z")
    return _iso_utc_by_datetime(timestamp)


# The milliseconds' text looked up, not formatted: half the cost of iso_utc.
_MILLIS_Z = tuple(f".{millis:03d}Z" for millis in range(1000))


@functools.lru_cache(maxsize=4096)
def _second_text(second: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))


def _iso_utc_by_datetime(timestamp: float) -> str | None:
    try:
        moment = datetime.fromtimestamp(timestamp, tz=UTC)
    except (OverflowError, OSError, ValueError):  # a ledger holding a time from no calendar
        return None
    if moment.microsecond:
        return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_iso(text: str) -> float:
    """ISO-8601 (`...Z`, `+00:00`, with or without fractions) -> POSIX seconds.

    A timestamp without an offset is taken as UTC. Raises ValueError.
    """
    cleaned = text.strip()
    if cleaned.endswith(("Z", "z")):
        cleaned = cleaned[:-1] + "+00:00"
    moment = datetime.fromisoformat(cleaned)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()
