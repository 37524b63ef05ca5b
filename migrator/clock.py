"""The service's clock, as its answers tell it.

Expiry is the service's business: a file is deleted when *its* clock passes the
expiry, not ours. Every answer carries an HTTP `Date` header; the difference between
that date and our clock when the answer arrived is the offset, measured again with
every answer. "Expires within W" is then judged as `expires_at <= service_now + W`,
and the ledger keeps the latest offset for the commands that talk to nobody
(`plan`, `status`, dry runs).

A `Date` has whole seconds: an offset is known to about a second, which is why
offsets under `SKEW_WARNING` are only reported, never warned about.
"""

from __future__ import annotations

import email.utils
import functools
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

from migrator.units import number_or_none

if TYPE_CHECKING:
    from migrator.ledger import BaseLedger

SKEW_WARNING = 60.0  # seconds between the service's clock and ours worth a warning
RESOLUTION = 1.5  # a Date has whole seconds: a smaller offset is noise, taken as none
OFFSET_FACT = "service_clock_offset"  # the ledger fact holding the latest offset


def offset_from_date(date: str | None, received_at: float) -> float | None:
    """The service's clock minus ours, from an answer's `Date` (pure); None if unreadable.

    The date is truncated to the second, so its middle (+0.5 s) is the best guess.
    """
    moment = _date_timestamp(date) if date else None
    return None if moment is None else moment + 0.5 - received_at


@functools.lru_cache(maxsize=16)  # a Date changes once a second; thousands of answers share it
def _date_timestamp(date: str) -> float | None:
    try:
        moment = email.utils.parsedate_to_datetime(date)
    except (TypeError, ValueError, IndexError):
        return None
    return None if moment.tzinfo is None else moment.timestamp()


class ServiceClock:
    """Our best knowledge of the service's clock, kept up to date by its answers."""

    def __init__(
        self, offset: float | None = None, *, local: Callable[[], float] = time.time
    ) -> None:
        self.offset = offset  # None: never measured (taken as 0)
        self.measured = False  # an answer of this command measured it
        self._local = local

    def now(self) -> float:
        """The service's time now, in POSIX seconds."""
        return self._local() + self.correction

    @property
    def correction(self) -> float:
        """What to add to our clock: the offset, unless it is below what a Date can tell."""
        offset = self.offset or 0.0
        return offset if abs(offset) >= RESOLUTION else 0.0

    def observe(self, headers: Mapping[str, str]) -> None:
        """Learn from one answer's headers (its `Date`)."""
        offset = offset_from_date(headers.get("Date"), self._local())
        if offset is not None:
            self.offset = offset
            self.measured = True

    @property
    def skewed(self) -> bool:
        return self.offset is not None and abs(self.offset) > SKEW_WARNING


async def service_time(ledger: BaseLedger) -> tuple[float | None, float]:
    """For the commands that talk to nobody: the offset the ledger last measured (None:
    never), and the service's time now by it, corrected as every other command corrects it."""
    offset = number_or_none(await ledger.fact(OFFSET_FACT))
    return offset, ServiceClock(offset).now()
