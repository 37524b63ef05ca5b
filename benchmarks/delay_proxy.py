"""A delaying TCP proxy on loopback: a WAN's round trip time, without a WAN.

    python benchmarks/delay_proxy.py --target 127.0.0.1:8080 --rtt 50 [--jitter 5] [--port 0]

Prints `proxy listening on http://127.0.0.1:PORT` once it listens, then forwards every
connection to --target until SIGINT or SIGTERM. What it adds, per connection:

- every chunk, in each direction, is held for one one-way delay (rtt / 2), plus a
  uniform random jitter in [-jitter, +jitter] when asked; a direction never reorders
  its bytes, so a chunk that drew a short delay waits for the one before it;
- the first chunk from the client is held one more round trip: the TCP handshake that
  a real path costs before the client may send, which a loopback connect does not.
  So a request on a new connection costs two round trips, a request on a kept-alive
  connection one, as on a real network.

Bandwidth is not limited beyond a window: at most --window bytes wait in each
direction (back-pressure past that), so one connection moves at most window / delay.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import signal
import sys
from dataclasses import dataclass

READ_SIZE = 256 * 1024


@dataclass(frozen=True, slots=True)
class Delay:
    """How long each chunk waits, in seconds."""

    one_way: float
    jitter: float = 0.0
    handshake: bool = True

    def draw(self) -> float:
        if self.jitter <= 0:
            return self.one_way
        return max(0.0, self.one_way + random.uniform(-self.jitter, self.jitter))


async def _pipe(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    delay: Delay,
    not_before: float,
    window: int,
) -> None:
    """Copy reader to writer, each chunk delivered `delay` after it arrived (or after
    the loop time `not_before`, when it arrived earlier), in order."""
    loop = asyncio.get_running_loop()
    slots = max(1, window // READ_SIZE)
    queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue(maxsize=slots)

    async def read() -> None:
        last = 0.0
        try:
            while True:
                chunk = await reader.read(READ_SIZE)
                due = max(max(loop.time(), not_before) + delay.draw(), last)
                last = due
                await queue.put((due, chunk))
                if not chunk:
                    return
        except (ConnectionError, OSError):
            await queue.put((last, b""))

    async def write() -> None:
        while True:
            due, chunk = await queue.get()
            wait = due - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            if not chunk:
                if writer.can_write_eof():
                    with contextlib.suppress(OSError):
                        writer.write_eof()
                return
            writer.write(chunk)
            await writer.drain()

    reading = asyncio.create_task(read())
    try:
        await write()
    finally:
        reading.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reading


async def _serve_one(
    client_reader: asyncio.StreamReader,
    client_writer: asyncio.StreamWriter,
    target: tuple[str, int],
    delay: Delay,
    window: int,
) -> None:
    loop = asyncio.get_running_loop()
    accepted = loop.time()
    try:
        upstream_reader, upstream_writer = await asyncio.open_connection(*target)
    except OSError:
        client_writer.close()
        return
    # The client may send at once on loopback; on a real path it waits one round trip
    # for the handshake. Its first bytes arrive no earlier than that.
    handshake = 2 * delay.one_way if delay.handshake else 0.0
    pipes = [
        asyncio.create_task(
            _pipe(client_reader, upstream_writer, delay, accepted + handshake, window)
        ),
        asyncio.create_task(_pipe(upstream_reader, client_writer, delay, accepted, window)),
    ]
    try:
        # Both directions to their end, or until one fails (a reset): then close both.
        await asyncio.wait(pipes, return_when=asyncio.FIRST_EXCEPTION)
    finally:
        for task in pipes:
            task.cancel()
        await asyncio.gather(*pipes, return_exceptions=True)
        for writer in (upstream_writer, client_writer):
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()


async def serve(host: str, port: int, target: tuple[str, int], delay: Delay, window: int) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    server = await asyncio.start_server(
        lambda r, w: _serve_one(r, w, target, delay, window), host, port, backlog=1024
    )
    bound = server.sockets[0].getsockname()
    print(f"proxy listening on http://{bound[0]}:{bound[1]}", flush=True)
    async with server:
        await stop.wait()


def _target(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not HOST:PORT")
    return host, int(port)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", type=_target, required=True, help="HOST:PORT to forward to")
    parser.add_argument("--rtt", type=float, default=50.0, help="round trip time, ms (default 50)")
    parser.add_argument("--jitter", type=float, default=0.0, help="± ms per chunk (default 0)")
    parser.add_argument("--no-handshake", action="store_true", help="no round trip on connect")
    parser.add_argument("--window", type=int, default=16 * 1024 * 1024, help="bytes (16 MiB)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    delay = Delay(args.rtt / 2000, args.jitter / 1000, handshake=not args.no_handshake)
    try:
        asyncio.run(serve(args.host, args.port, args.target, delay, args.window))
    except OSError as err:
        print(f"delay_proxy: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
