"""The retry policy: which failures are retried, how often, and how long to wait."""

from __future__ import annotations

import random

import pytest

from migrator.errors import (
    AuthRejectedError,
    EndpointError,
    PermanentError,
    RetryableError,
)
from migrator.retry import RetryPolicy, backoff_delay, should_retry

POLICY = RetryPolicy(retries=3, base_delay=0.5, max_delay=4.0, max_retry_after=60.0)


def delays(policy: RetryPolicy, attempt: int, *, retry_after: float | None = None) -> list[float]:
    rng = random.Random(1234)
    return [backoff_delay(policy, attempt, retry_after=retry_after, rng=rng) for _ in range(500)]


def test_default_policy_retries_five_times_after_the_first_attempt() -> None:
    assert RetryPolicy().retries == 5


@pytest.mark.parametrize(("attempt", "cap"), [(1, 0.5), (2, 1.0), (3, 2.0), (4, 4.0)])
def test_delay_stays_between_zero_and_the_exponential_cap(attempt: int, cap: float) -> None:
    drawn = delays(POLICY, attempt)
    assert all(0.0 <= d <= cap for d in drawn)
    assert max(drawn) > cap * 0.9  # full jitter spreads over the whole range


def test_delay_never_exceeds_max_delay_however_many_attempts_failed() -> None:
    assert all(d <= POLICY.max_delay for d in delays(POLICY, 10_000))


def test_delay_is_reproducible_with_a_seeded_random() -> None:
    assert delays(POLICY, 3) == delays(POLICY, 3)


def test_retry_after_longer_than_the_jitter_wins() -> None:
    assert all(d == 30.0 for d in delays(POLICY, 1, retry_after=30.0))


def test_retry_after_is_capped_by_max_retry_after() -> None:
    assert all(d == 60.0 for d in delays(POLICY, 1, retry_after=86_400.0))


def test_retry_after_shorter_than_the_jitter_does_not_shorten_the_wait() -> None:
    rng_a, rng_b = random.Random(7), random.Random(7)
    plain = backoff_delay(POLICY, 4, retry_after=None, rng=rng_a)
    with_header = backoff_delay(POLICY, 4, retry_after=0.001, rng=rng_b)
    assert with_header == max(plain, 0.001)


def test_retryable_error_is_retried_while_attempts_remain() -> None:
    error = RetryableError("HTTP 503")
    assert [should_retry(POLICY, error, n) for n in (1, 2, 3)] == [True, True, True]


def test_retries_are_exhausted_after_policy_retries() -> None:
    assert not should_retry(POLICY, RetryableError("HTTP 503"), 4)


def test_zero_retries_means_a_single_attempt() -> None:
    assert not should_retry(RetryPolicy(retries=0), RetryableError("timeout"), 1)


@pytest.mark.parametrize(
    "error",
    [
        PermanentError("HTTP 400"),
        AuthRejectedError("HTTP 401"),
        EndpointError("HTTP 404"),
        ValueError("a bug"),
    ],
)
def test_only_retryable_errors_are_retried(error: Exception) -> None:
    assert not should_retry(POLICY, error, 1)


def test_negative_retries_are_refused() -> None:
    with pytest.raises(ValueError, match="negative"):
        RetryPolicy(retries=-1)
