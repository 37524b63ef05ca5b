"""The shared pacer: a throttling service slows every worker; the user's limits hold.

The pure rules are tested on their own; the behaviour is measured end to end against
the emulator, which answers 429 with Retry-After beyond its rate limit and logs when
each request arrived. Rates are measured at the server, over whole runs and over
every one-second window.
"""

from __future__ import annotations

import bisect
from pathlib import Path

import pytest
from conftest import load, write_file, write_manifest

from migrator.download import DownloadOptions, download
from migrator.emulator import Emulator
from migrator.errors import ExitCode
from migrator.model import KIB, Outcome
from migrator.pacer import (
    MIN_RATE,
    Pacer,
    RateState,
    after_success,
    after_throttle,
    is_throttle,
    request_interval,
)
from migrator.runner import RunOptions, run_manifest

pytestmark = pytest.mark.timeout(90)


# -- the rules ------------------------------------------------------------------------------


def test_a_first_throttle_cuts_the_rate_below_what_was_being_sent() -> None:
    state = after_throttle(RateState(), now=10.0, sent_at=9.9, sending=40.0)
    assert state.rate is not None and state.rate < 40.0
    assert state.decreased_at == 10.0


def test_answers_to_requests_sent_before_the_cut_do_not_cut_again() -> None:
    cut = after_throttle(RateState(), now=10.0, sent_at=9.9, sending=40.0)
    again = after_throttle(cut, now=10.1, sent_at=9.95, sending=40.0)
    assert again == cut


def test_a_throttle_after_the_cut_cuts_again() -> None:
    cut = after_throttle(RateState(), now=10.0, sent_at=9.9, sending=40.0)
    again = after_throttle(cut, now=12.0, sent_at=11.0, sending=40.0)
    assert again.rate is not None and cut.rate is not None and again.rate < cut.rate


def test_the_rate_never_falls_below_the_minimum() -> None:
    state = RateState()
    for second in range(100):
        state = after_throttle(state, now=second, sent_at=second, sending=0.0)
    assert state.rate == MIN_RATE


def test_good_answers_let_the_rate_grow_back_step_by_step() -> None:
    state = RateState(rate=10.0)
    rates = []
    for _ in range(30):
        state = after_success(state)
        assert state.rate is not None
        rates.append(state.rate)
    assert rates == sorted(rates)
    assert 11.5 < rates[-1] < 14.0  # about one more request a second per second


def test_without_a_throttle_nothing_limits_requests() -> None:
    assert after_success(RateState()) == RateState()
    assert request_interval(RateState(), None) == 0.0


def test_the_tighter_of_the_user_limit_and_the_learnt_rate_spaces_requests() -> None:
    assert request_interval(RateState(rate=20.0), 5.0) == pytest.approx(0.2)
    assert request_interval(RateState(rate=4.0), 5.0) == pytest.approx(0.25)


@pytest.mark.parametrize(
    ("status", "retry_after", "throttle"),
    [
        (429, None, True),
        (503, None, True),
        (500, 2.0, True),
        (500, None, False),
        (None, None, False),
    ],
)
def test_what_counts_as_being_asked_to_slow_down(
    status: int | None, retry_after: float | None, throttle: bool
) -> None:
    assert is_throttle(status, retry_after) is throttle


async def test_a_retry_after_pauses_every_later_request() -> None:
    clock = [100.0]
    slept: list[float] = []

    async def sleep(delay: float) -> bool:
        slept.append(delay)
        clock[0] += delay
        return True

    pacer = Pacer(clock=lambda: clock[0])
    sent_at = await pacer.request(sleep)
    pacer.throttled(sent_at, retry_after=2.0)
    await pacer.request(sleep)

    assert slept and sum(slept) == pytest.approx(2.0)


# -- end to end against the emulator ---------------------------------------------------------
# A limit is a ceiling: the rate must stay under it, and not far below it. "Far" is half: a
# starved CPU (a loaded CI box) slows the run below the limit without the pacer being wrong.


def small_files(folder: Path, count: int, size: int = 100) -> None:
    for i in range(count):
        write_file(folder / "files" / f"f{i:04d}.bin", size, seed=i)


def busiest_second(moments: list[float]) -> int:
    """The most moments in any one-second window [t, t + 1)."""
    ordered = sorted(moments)
    return max(bisect.bisect_left(ordered, t + 1.0) - i for i, t in enumerate(ordered))


async def test_a_throttling_service_sees_few_429s_because_every_worker_slows_down(
    job: Path, api_key: str, tmp_path: Path
) -> None:
    small_files(job, 600)
    async with Emulator(tmp_path / "limited", api_key, rate_limit=30) as emulator:
        manifest = load(write_manifest(job, emulator.base_url, [{"glob": "./files/*.bin"}]))

        summary = await run_manifest(
            manifest, RunOptions(concurrency=16, seed=1), environ={"KIE_API_KEY": api_key}
        )

        refused = sum(request.status == 429 for request in emulator.requests)
        assert summary.exit_code is ExitCode.OK
        assert len({r.file_name for r in emulator.requests if r.status == 200}) == 600
        assert refused < 0.10 * len(emulator.requests), (refused, len(emulator.requests))


async def test_tps_limit_holds_over_the_run_and_in_every_second(
    job: Path, emulator: Emulator, api_key: str
) -> None:
    small_files(job, 100)
    manifest = load(write_manifest(job, emulator.base_url, [{"glob": "./files/*.bin"}]))

    await run_manifest(
        manifest, RunOptions(concurrency=16, tps_limit=25), environ={"KIE_API_KEY": api_key}
    )

    moments = [request.received_at for request in emulator.requests]
    rate = (len(moments) - 1) / (max(moments) - min(moments))
    assert 0.5 * 25 <= rate <= 1.1 * 25
    assert busiest_second(moments) <= 25 * 4 / 3


async def test_bwlimit_holds_over_the_run_and_in_every_second(
    job: Path, emulator: Emulator, api_key: str
) -> None:
    small_files(job, 48, size=64 * KIB)
    manifest = load(
        write_manifest(job, emulator.base_url, [{"glob": "./files/*.bin"}], base64_max="1KiB")
    )
    limit = 1024 * KIB

    await run_manifest(
        manifest, RunOptions(concurrency=8, bwlimit=limit), environ={"KIE_API_KEY": api_key}
    )

    answered = sorted((r.answered_at, r.size or 0) for r in emulator.requests)
    total = sum(size for _, size in answered)
    rate = total / (answered[-1][0] - min(r.received_at for r in emulator.requests))
    assert 0.5 * limit <= rate <= 1.1 * limit
    moments = [moment for moment, _ in answered]
    for i, start in enumerate(moments):
        window = answered[i : bisect.bisect_left(moments, start + 1.0)]
        assert sum(size for _, size in window) <= limit * 4 / 3


async def test_downloads_keep_to_the_tps_limit_too(
    job: Path, emulator: Emulator, api_key: str, tmp_path: Path
) -> None:
    small_files(job, 60)
    manifest = load(write_manifest(job, emulator.base_url, [{"glob": "./files/*.bin"}]))
    await run_manifest(manifest, RunOptions(concurrency=16), environ={"KIE_API_KEY": api_key})

    summary = await download(
        manifest, tmp_path / "dest", DownloadOptions(concurrency=16, tps_limit=20)
    )

    assert summary.exit_code is ExitCode.OK
    moments = [link.received_at for link in emulator.link_requests]
    assert len(moments) == 60
    rate = (len(moments) - 1) / (max(moments) - min(moments))
    assert 0.5 * 20 <= rate <= 1.1 * 20
    assert busiest_second(moments) <= 20 * 4 / 3


# -- a service that is down ---------------------------------------------------------------------


async def test_a_service_down_past_the_outage_limit_stops_the_run_with_69_failing_nothing(
    job: Path, emulator: Emulator, api_key: str
) -> None:
    small_files(job, 20)
    manifest = load(
        write_manifest(
            job, emulator.base_url, [{"glob": "./files/*.bin"}], retries=5, outage_limit="3s"
        )
    )
    key = {"KIE_API_KEY": api_key}
    await run_manifest(manifest, RunOptions(concurrency=4, seed=1), environ=key)  # one good run
    small_files(job / "more", 20)
    manifest = load(
        write_manifest(
            job,
            emulator.base_url,
            [{"glob": "./files/*.bin"}, {"glob": "./more/files/*.bin", "upload_path": "more"}],
            retries=5,
            outage_limit="3s",
        )
    )
    emulator.inject_faults(500, 10_000)

    down = await run_manifest(manifest, RunOptions(concurrency=4, seed=1), environ=key)

    assert down.exit_code is ExitCode.UNAVAILABLE
    assert down.count(Outcome.FAILED) == 0
    assert "failed every request for 3 s" in (down.message or "")
    answered_500 = sum(r.status == 500 for r in emulator.requests)
    assert answered_500 < 20 * 6  # not every item's every retry: the breaker held them
    emulator.clear_faults()
    up = await run_manifest(manifest, RunOptions(concurrency=4, seed=1), environ=key)
    assert (up.exit_code, up.count(Outcome.UPLOADED)) == (ExitCode.OK, 20)


async def test_a_short_outage_is_waited_out_and_nothing_fails(
    job: Path, emulator: Emulator, api_key: str
) -> None:
    small_files(job, 30)
    manifest = load(write_manifest(job, emulator.base_url, [{"glob": "./files/*.bin"}], retries=2))
    emulator.inject_faults(500, 10)  # eight open the breaker, two probes find it still down

    summary = await run_manifest(
        manifest, RunOptions(concurrency=8, seed=1), environ={"KIE_API_KEY": api_key}
    )

    assert (summary.exit_code, summary.count(Outcome.UPLOADED)) == (ExitCode.OK, 30)
    assert sum(r.status == 500 for r in emulator.requests) == 10
