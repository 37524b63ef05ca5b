"""A fixed set of workers draining a bounded queue: the shape of every bulk command.

One feeder task moves items from an async iterator into a queue of at most
`2 x concurrency` entries, and `concurrency` workers take them one at a time, so
memory stays flat whether the source yields ten items or a million (no task per
item, as s3transfer learnt). A stop request (a signal) stops the feeding at once,
lets in-flight items finish within a grace period, then cancels them; a second
request cancels them at once. The first exception a worker raises cancels the
rest and is raised from `run()`.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class WorkPool(Generic[T]):
    def __init__(
        self,
        concurrency: int,
        handle: Callable[[T], Awaitable[None]],
        *,
        grace_period: float = 30.0,
    ) -> None:
        self.concurrency = concurrency
        self.handle = handle
        self.grace_period = grace_period
        self.stopping = asyncio.Event()
        self.hurry = asyncio.Event()
        self.in_flight = 0  # items a worker is handling right now
        self._queue: asyncio.Queue[tuple[T] | None] = asyncio.Queue(maxsize=concurrency * 2)

    def request_stop(self) -> None:
        """Stop taking items; a second request also cuts the grace period short."""
        if self.stopping.is_set():
            self.hurry.set()
        self.stopping.set()

    async def run(self, items: AsyncIterator[T]) -> None:
        feeder = asyncio.create_task(self._feed(items))
        workers = [asyncio.create_task(self._work()) for _ in range(self.concurrency)]
        try:
            await self._supervise(feeder, workers)
        finally:
            for task in (feeder, *workers):
                task.cancel()
            await asyncio.gather(feeder, *workers, return_exceptions=True)

    async def sleep(self, delay: float) -> bool:
        """Sleep unless a stop is requested meanwhile; True when the sleep was whole."""
        try:
            await asyncio.wait_for(self.stopping.wait(), timeout=delay)
        except TimeoutError:
            return True
        return False

    async def _feed(self, items: AsyncIterator[T]) -> None:
        async for item in items:
            await self._queue.put((item,))
        for _ in range(self.concurrency):
            await self._queue.put(None)

    async def _work(self) -> None:
        while True:
            entry = await self._queue.get()
            if entry is None or self.stopping.is_set():
                return
            self.in_flight += 1
            try:
                await self.handle(entry[0])
            finally:
                self.in_flight -= 1

    async def _supervise(
        self, feeder: asyncio.Task[None], workers: list[asyncio.Task[None]]
    ) -> None:
        stop_wait = asyncio.create_task(self.stopping.wait())
        pending: set[asyncio.Task[Any]] = {feeder, *workers}
        try:
            while pending:
                done, pending = await asyncio.wait(
                    pending | {stop_wait}, return_when=asyncio.FIRST_COMPLETED
                )
                pending.discard(stop_wait)
                for task in done - {stop_wait}:
                    if (error := task.exception()) is not None:
                        raise error
                if stop_wait in done:
                    feeder.cancel()
                    await self._finish_in_flight(pending - {feeder})
                    _raise_first_error(pending - {feeder})
                    return
        finally:
            stop_wait.cancel()

    async def _finish_in_flight(self, running: set[asyncio.Task[Any]]) -> None:
        """Give running workers the grace period (or until a second stop request)."""
        while not self._queue.empty():  # workers must not pick up anything new
            self._queue.get_nowait()
        for _ in range(self.concurrency):
            self._queue.put_nowait(None)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.grace_period
        hurry_wait = asyncio.create_task(self.hurry.wait())
        try:
            while running and not self.hurry.is_set():
                remaining = deadline - loop.time()
                if remaining <= 0:
                    return
                _done, running = await asyncio.wait(
                    running | {hurry_wait}, timeout=remaining, return_when=asyncio.FIRST_COMPLETED
                )
                running.discard(hurry_wait)
        finally:
            hurry_wait.cancel()


@contextlib.contextmanager
def stop_on_signals(stop: Callable[[signal.Signals], None], *, enabled: bool) -> Iterator[None]:
    """Route SIGINT and SIGTERM to `stop` while the block runs (the CLI's commands)."""
    if not enabled:
        yield
        return
    loop = asyncio.get_running_loop()
    wanted = (signal.SIGINT, signal.SIGTERM)
    for signum in wanted:
        loop.add_signal_handler(signum, stop, signum)
    try:
        yield
    finally:
        for signum in wanted:
            loop.remove_signal_handler(signum)


def _raise_first_error(tasks: set[asyncio.Task[Any]]) -> None:
    """A worker that failed during the grace period (a rejected key, a ledger error)
    still decides how the run ends; the ones still running are cancelled by run()."""
    for task in tasks:
        if task.done() and not task.cancelled() and (error := task.exception()) is not None:
            raise error
