"""The worker pool every bulk command runs on: bounded, stoppable, honest about errors."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from migrator.pool import WorkPool

pytestmark = pytest.mark.timeout(20)


async def numbers(count: int, produced: list[int]) -> AsyncIterator[int]:
    for number in range(count):
        produced.append(number)
        yield number


class Recorder:
    """A handler that records what it saw; `gate` holds every worker until it is set."""

    def __init__(self, gate: asyncio.Event | None = None) -> None:
        self.started: list[int] = []
        self.finished: list[int] = []
        self.cancelled: list[int] = []
        self.gate = gate
        self.progress = asyncio.Condition()

    async def __call__(self, number: int) -> None:
        self.started.append(number)
        async with self.progress:
            self.progress.notify_all()
        try:
            if self.gate is not None:
                await self.gate.wait()
            await asyncio.sleep(0)
        except asyncio.CancelledError:
            self.cancelled.append(number)
            raise
        self.finished.append(number)


async def started(recorder: Recorder, count: int) -> None:
    async with recorder.progress:
        await recorder.progress.wait_for(lambda: len(recorder.started) >= count)


async def test_every_item_is_handled_once() -> None:
    recorder = Recorder()
    await WorkPool(4, recorder).run(numbers(100, []))
    assert sorted(recorder.finished) == list(range(100))


async def test_the_feeder_runs_at_most_a_bounded_queue_ahead_of_the_workers() -> None:
    gate, produced = asyncio.Event(), []
    recorder = Recorder(gate)
    pool = WorkPool(2, recorder)
    task = asyncio.create_task(pool.run(numbers(1000, produced)))
    await started(recorder, 2)
    await asyncio.sleep(0.05)
    # 2 in the workers' hands, a queue of 2 x 2, and one the feeder holds while it waits
    assert len(produced) <= 2 + 4 + 1
    gate.set()
    await task
    assert len(recorder.finished) == 1000


async def test_a_worker_error_cancels_the_others_and_is_raised() -> None:
    gate = asyncio.Event()
    recorder = Recorder(gate)

    async def handle(number: int) -> None:
        if number == 3:
            await started(recorder, 3)
            raise RuntimeError("boom")
        await recorder(number)

    with pytest.raises(RuntimeError, match="boom"):
        await WorkPool(4, handle).run(numbers(50, []))
    assert recorder.finished == []
    assert len(recorder.cancelled) == 3


async def test_a_stop_request_lets_in_flight_items_finish_and_takes_no_new_ones() -> None:
    gate = asyncio.Event()
    recorder = Recorder(gate)
    pool = WorkPool(3, recorder, grace_period=5)
    task = asyncio.create_task(pool.run(numbers(100, [])))
    await started(recorder, 3)
    pool.request_stop()
    await asyncio.sleep(0.01)
    gate.set()
    await task
    assert sorted(recorder.finished) == [0, 1, 2]


async def test_in_flight_items_are_cancelled_when_the_grace_period_ends() -> None:
    recorder = Recorder(asyncio.Event())  # never set: the items would wait forever
    pool = WorkPool(2, recorder, grace_period=0.05)
    task = asyncio.create_task(pool.run(numbers(10, [])))
    await started(recorder, 2)
    pool.request_stop()
    await task
    assert sorted(recorder.cancelled) == [0, 1]


async def test_a_second_stop_request_cuts_the_grace_period_short() -> None:
    recorder = Recorder(asyncio.Event())
    pool = WorkPool(2, recorder, grace_period=60)
    task = asyncio.create_task(pool.run(numbers(10, [])))
    await started(recorder, 2)
    pool.request_stop()
    await asyncio.sleep(0.01)
    pool.request_stop()
    await asyncio.wait_for(task, 5)
    assert sorted(recorder.cancelled) == [0, 1]


async def test_an_error_raised_during_the_grace_period_still_ends_the_run() -> None:
    gate = asyncio.Event()

    async def handle(number: int) -> None:
        await gate.wait()
        raise PermissionError("the key was rejected")

    pool = WorkPool(2, handle, grace_period=5)
    task = asyncio.create_task(pool.run(numbers(10, [])))
    await asyncio.sleep(0.01)
    pool.request_stop()
    await asyncio.sleep(0.01)
    gate.set()
    with pytest.raises(PermissionError):
        await task


async def test_sleep_is_cut_short_by_a_stop_request() -> None:
    pool: WorkPool[int] = WorkPool(1, Recorder())
    sleeper = asyncio.create_task(pool.sleep(30))
    await asyncio.sleep(0.01)
    pool.request_stop()
    assert await asyncio.wait_for(sleeper, 5) is False


async def test_sleep_runs_its_course_without_a_stop() -> None:
    pool: WorkPool[int] = WorkPool(1, Recorder())
    assert await pool.sleep(0.01) is True
