"""When to try an upload again, and how long to wait first. Pure: no I/O, no clock.

The runner asks `should_retry` after each failed attempt and, when it says yes,
sleeps `backoff_delay` seconds. Delays use "full jitter" (a uniform draw between 0
and an exponentially growing cap) so that many workers hit by the same outage do
not come back in lockstep; a `Retry-After` from the service is a floor, itself
capped so that a hostile or broken header cannot park a worker for hours.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from migrator.errors import RetryableError


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How many times to retry and how long to wait between attempts (seconds)."""

    retries: int = 5  # retries after the first attempt: total attempts = retries + 1
    base_delay: float = 0.5
    max_delay: float = 30.0
    max_retry_after: float = 300.0

    def __post_init__(self) -> None:
        if self.retries < 0:
            raise ValueError("retries cannot be negative")
        if self.base_delay < 0 or self.max_delay < 0 or self.max_retry_after < 0:
            raise ValueError("delays cannot be negative")


def backoff_delay(
    policy: RetryPolicy, attempt: int, *, retry_after: float | None, rng: random.Random
) -> float:
    """Seconds to wait after attempt number `attempt` (1-based) failed.

    Full jitter: uniform(0, min(max_delay, base_delay * 2**(attempt-1))). A
    `retry_after` from the service wins when it is longer, capped at
    `policy.max_retry_after`.
    """
    cap = _jitter_cap(policy, attempt)
    delay = rng.uniform(0.0, cap)
    if retry_after is not None and retry_after > 0:
        delay = max(delay, min(retry_after, policy.max_retry_after))
    return delay


def should_retry(policy: RetryPolicy, error: Exception, attempt: int) -> bool:
    """True only for a RetryableError and only while `attempt` <= `policy.retries`."""
    return isinstance(error, RetryableError) and attempt <= policy.retries


def _jitter_cap(policy: RetryPolicy, attempt: int) -> float:
    exponent = max(attempt, 1) - 1
    # 2**exponent overflows a float long after it passed any sane max_delay.
    if exponent >= 64:
        return policy.max_delay
    return min(policy.max_delay, policy.base_delay * 2.0**exponent)
