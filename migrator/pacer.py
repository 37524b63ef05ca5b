"""One pacer per command, shared by every worker: how fast requests and bytes may go.

In the spirit of rclone's `lib/pacer` and of TCP's congestion control (AIMD):

- a 429 or 503 from the service, or any answer with `Retry-After`, slows *every*
  worker: a `Retry-After` pauses all new requests until it has passed, and the
  request rate is cut to a fraction of what was being sent (once per throttling
  episode: answers to requests sent before the cut do not cut again);
- good answers let the rate grow back step by step (additively at low rates,
  by a few percent a second at high ones) until it no longer limits anything;
- the user's limits live here too: `tps_limit` (requests per second to the
  service) and `bwlimit` (bytes per second through this machine, uploads and
  downloads alike);
- a circuit breaker: after `BREAKER_THRESHOLD` failures in a row (5xx, no
  connection) with no good answer between, every worker waits while one request
  at a time probes the service, at growing intervals; the first good answer closes
  it. A service that stays down past `outage_limit` stops the command
  (ServiceUnavailableError, exit 69) with the items not yet done left as they were.

Both limits are spaced, not bursty (a "generic cell rate" schedule): request k may
start at the earliest 1/rate after request k-1 was due, so no one-second window holds
more than the limit plus one, and bytes are released at most a short tolerance
ahead of their schedule. The decisions are pure functions of a small state
(`RateState`); `Pacer` only keeps the clock and sleeps.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace

from migrator.errors import Interrupted, ServiceUnavailableError

MIN_RATE = 0.5  # requests/s: however hard the service throttles, keep asking now and then
MAX_RATE = 10_000.0  # above this the adaptive limit is lifted (it limits nothing)
DECREASE = 0.7  # the rate after a throttle, as a fraction of what was sent
ADDITIVE_STEP = 1.0  # requests/s gained per second of good answers, at least
GROWTH = 0.05  # ... or this fraction of the rate per second, when that is more
BYTE_TOLERANCE = 0.1  # seconds of bytes that may leave ahead of their schedule
RATE_WINDOW = 1.0  # seconds over which the sending rate is measured
BREAKER_THRESHOLD = 8  # failures in a row that open the breaker
BREAKER_FIRST_PAUSE = 2.0  # seconds before the first probe; doubled after each failed one
BREAKER_LONGEST_PAUSE = 60.0
BREAKER_POLL = 0.25  # how often a waiting worker looks again

Sleep = Callable[[float], Awaitable[bool]]  # False when a stop cut the sleep short


@dataclass(frozen=True, slots=True)
class RateState:
    """The adaptive request rate: None while the service has not throttled us."""

    rate: float | None = None
    decreased_at: float = float("-inf")  # when the rate was last cut (monotonic seconds)


def after_throttle(state: RateState, *, now: float, sent_at: float, sending: float) -> RateState:
    """The state after the service throttled a request sent at `sent_at` (pure).

    `sending` is the rate at which requests were being sent (per second, measured).
    One cut per episode: a throttled answer to a request sent before the last cut
    was already accounted for.
    """
    if sent_at < state.decreased_at:
        return state
    base = sending if state.rate is None else min(state.rate, max(sending, MIN_RATE))
    return RateState(rate=max(MIN_RATE, base * DECREASE), decreased_at=now)


def after_success(state: RateState) -> RateState:
    """The state after a good answer (pure): the rate grows by max(ADDITIVE_STEP,
    GROWTH x rate) per second, spread over the answers of that second."""
    if state.rate is None:
        return state
    per_second = max(ADDITIVE_STEP, GROWTH * state.rate)
    rate = state.rate + per_second / state.rate
    return replace(state, rate=None if rate >= MAX_RATE else rate)


def request_interval(state: RateState, tps_limit: float | None) -> float:
    """Seconds between the starts of two requests (pure); 0 when nothing limits them."""
    rates = [r for r in (state.rate, tps_limit) if r is not None]
    return 1.0 / min(rates) if rates else 0.0


def is_throttle(status: int | None, retry_after: float | None) -> bool:
    """Whether an answer asks the whole client to slow down (pure)."""
    return status in (429, 503) or (retry_after is not None and retry_after > 0)


@dataclass(frozen=True, slots=True)
class Ticket:
    """One request's turn: when it was sent, and whether it probes an open breaker."""

    sent_at: float
    probe: bool = False


@dataclass(slots=True)
class PacerStats:
    """What the pacer did, for the summary and the tests."""

    throttled: int = 0  # answers that asked us to slow down
    paused: float = 0.0  # seconds requests waited for a Retry-After or a rate
    outages: int = 0  # times the breaker opened


class Pacer:
    """The shared schedule of requests to the service and of bytes through this machine.

    `tps_limit` and `bwlimit` are the user's ceilings (None: none). `max_pause` caps
    a hostile `Retry-After`. `clock` is monotonic seconds (the event loop's time).
    """

    def __init__(
        self,
        *,
        tps_limit: float | None = None,
        bwlimit: float | None = None,
        max_pause: float = 300.0,
        outage_limit: float = 600.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if tps_limit is not None and tps_limit <= 0:
            raise ValueError("tps_limit must be more than 0")
        if bwlimit is not None and bwlimit <= 0:
            raise ValueError("bwlimit must be more than 0")
        self.tps_limit = tps_limit
        self.bwlimit = bwlimit
        self.max_pause = max_pause
        self.stats = PacerStats()
        self._clock = clock
        self._state = RateState()
        self._next_request = float("-inf")  # when the next request may start
        self._next_byte = float("-inf")  # when the bytes consumed so far are due
        self._paused_until = float("-inf")
        self._recent: deque[float] = deque()  # starts of requests in the last RATE_WINDOW
        self.outage_limit = outage_limit
        self._failures = 0  # service failures in a row
        self._last_failure = ""
        self._open_since: float | None = None  # the breaker is open since
        self._probing = False  # a probe of the open breaker is in flight
        self._breaker_pause = BREAKER_FIRST_PAUSE

    @property
    def rate(self) -> float | None:
        """The adaptive request rate; None while nothing was throttled."""
        return self._state.rate

    def chunk_size(self, default: int) -> int:
        """A chunk small enough that the byte schedule stays smooth (1/8 s of bwlimit)."""
        if self.bwlimit is None:
            return default
        return max(4096, min(default, int(self.bwlimit / 8)))

    @property
    def broken(self) -> bool:
        """The breaker is open: the service failed every recent request."""
        return self._open_since is not None

    async def request(self, sleep: Sleep) -> Ticket:
        """Wait for this request's turn; the ticket goes back with how it ended. Raises
        Interrupted when a stop cut the wait short, ServiceUnavailableError when the
        service stayed down past the outage limit."""
        probe = await self._through_the_breaker(sleep)
        now = self._clock()
        interval = request_interval(self._state, self.tps_limit)
        start = max(now, self._paused_until, self._next_request)
        self._next_request = start + interval if interval else start
        try:
            await self._wait_until(start, sleep)
        except BaseException:
            self._probing = self._probing and not probe
            raise
        sent_at = self._clock()
        self._remember(sent_at)
        return Ticket(sent_at, probe)

    async def _through_the_breaker(self, sleep: Sleep) -> bool:
        """Wait while the breaker is open and another request probes; True when this one
        is to be the probe."""
        while self._open_since is not None:
            now = self._clock()
            if now - self._open_since > self.outage_limit:
                raise ServiceUnavailableError(
                    f"the service failed every request for {self.outage_limit:.0f} s "
                    f"({self._failures} in a row; the last: {self._last_failure})"
                )
            if not self._probing and now >= self._paused_until:
                self._probing = True
                return True
            self.stats.paused += BREAKER_POLL
            if not await sleep(BREAKER_POLL):
                raise Interrupted("stopped while the service was down")
        return False

    async def transfer(self, count: int, sleep: Sleep) -> None:
        """Wait until `count` more bytes may pass (uploads and downloads alike)."""
        if self.bwlimit is None or count <= 0:
            return
        now = self._clock()
        start = max(now, self._next_byte)
        self._next_byte = start + count / self.bwlimit
        await self._wait_until(start - BYTE_TOLERANCE, sleep)

    def throttled(self, ticket: Ticket, retry_after: float | None) -> None:
        """The service asked to slow down (429, 503, Retry-After): every worker does."""
        now = self._clock()
        self.stats.throttled += 1
        self._probing = self._probing and not ticket.probe
        if retry_after is not None and retry_after > 0:
            until = now + min(retry_after, self.max_pause)
            self._paused_until = max(self._paused_until, until)
        self._state = after_throttle(
            self._state, now=now, sent_at=ticket.sent_at, sending=self._sending_rate(now)
        )

    def succeeded(self, ticket: Ticket) -> None:
        """A good answer: the rate may grow back, and an open breaker closes."""
        self._state = after_success(self._state)
        self.answered(ticket)

    def answered(self, ticket: Ticket) -> None:
        """The service answered (even with a refusal): it is up."""
        self._failures = 0
        if ticket.probe or self._open_since is not None:
            self._open_since = None
            self._probing = False
            self._breaker_pause = BREAKER_FIRST_PAUSE

    def failed(self, ticket: Ticket, reason: str) -> None:
        """The service failed this request (5xx, no connection, no answer)."""
        now = self._clock()
        self._failures += 1
        self._last_failure = reason
        if ticket.probe:  # still down: wait longer before the next probe
            self._probing = False
            self._breaker_pause = min(self._breaker_pause * 2, BREAKER_LONGEST_PAUSE)
            self._paused_until = max(self._paused_until, now + self._breaker_pause)
        elif self._open_since is None and self._failures >= BREAKER_THRESHOLD:
            self._open_since = now
            self.stats.outages += 1
            self._paused_until = max(self._paused_until, now + self._breaker_pause)

    def released(self, ticket: Ticket) -> None:
        """The request ended without an answer about the service (a stop, a local error)."""
        self._probing = self._probing and not ticket.probe

    def _remember(self, moment: float) -> None:
        self._recent.append(moment)
        while self._recent and self._recent[0] < moment - RATE_WINDOW:
            self._recent.popleft()

    def _sending_rate(self, now: float) -> float:
        while self._recent and self._recent[0] < now - RATE_WINDOW:
            self._recent.popleft()
        return len(self._recent) / RATE_WINDOW

    async def _wait_until(self, moment: float, sleep: Sleep) -> None:
        delay = moment - self._clock()
        if delay <= 0:
            return
        self.stats.paused += delay
        if not await sleep(delay):
            raise Interrupted("stopped while waiting for the pacer")


async def plain_sleep(delay: float) -> bool:
    """A `Sleep` that nothing interrupts (for callers without a worker pool)."""
    await asyncio.sleep(delay)
    return True
