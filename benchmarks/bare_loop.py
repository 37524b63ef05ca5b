"""The floor migrator is measured against: a bare aiohttp loop, no ledger, no log.

    KIE_API_KEY=... python benchmarks/bare_loop.py --base-url URL --items LIST [--concurrency 16]

One ClientSession, an asyncio.Semaphore of --concurrency, one task per item of LIST
(see upload_items.py). Each item is posted the way migrator posts it: a local file up
to --base64-max as base64 JSON, a larger one as a multipart stream read from disk a
MiB at a time in a thread, the next read running while the last is sent (as migrator
reads it), with an exact Content-Length, a URL as a URL upload. No retry, no
hashing, no record. Prints `bare: N uploaded, M failed, B bytes in S s` and exits 1
when any item failed.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import BinaryIO

import aiohttp
from upload_items import (
    BASE64_ENDPOINT,
    STREAM_ENDPOINT,
    URL_ENDPOINT,
    Item,
    answer_problem,
    base64_body,
    multipart,
    read_items,
    url_body,
)

READ = 1024 * 1024


def _size(path: str) -> int:
    return Path(path).stat().st_size


def _read(path: str) -> bytes:
    with open(path, "rb") as handle:
        return handle.read()


async def _file_body(path: str, preamble: bytes, epilogue: bytes) -> AsyncIterator[bytes]:
    loop = asyncio.get_running_loop()
    handle: BinaryIO = await asyncio.to_thread(open, path, "rb")
    try:
        yield preamble
        reading = loop.run_in_executor(None, handle.read, READ)
        while chunk := await reading:
            reading = loop.run_in_executor(None, handle.read, READ)
            yield chunk
        yield epilogue
    finally:
        handle.close()  # after a read still running: a buffered file closes under its lock


async def upload(
    session: aiohttp.ClientSession, base_url: str, key: str, item: Item, base64_max: int
) -> tuple[int, str | None]:
    """One item; returns (bytes of the file sent, the problem or None)."""
    headers = {"Authorization": f"Bearer {key}", "Accept": "application/json"}
    size: int | None = None
    body: bytes | AsyncIterator[bytes]
    if item.is_url:
        endpoint, body = URL_ENDPOINT, url_body(item)
        headers["Content-Type"] = "application/json"
    else:
        size = _size(item.source)
        if size <= base64_max:
            endpoint, body = BASE64_ENDPOINT, base64_body(_read(item.source), item)
            headers["Content-Type"] = "application/json"
        else:
            form = multipart(item)
            endpoint, body = STREAM_ENDPOINT, _file_body(item.source, form.preamble, form.epilogue)
            headers["Content-Type"] = form.content_type
            headers["Content-Length"] = str(form.length(size))
    try:
        async with session.post(base_url + endpoint, data=body, headers=headers) as response:
            answer = await response.read()
            return size or 0, answer_problem(response.status, answer, size)
    except (aiohttp.ClientError, TimeoutError) as err:
        return 0, f"{type(err).__name__}: {err}"


async def run(base_url: str, key: str, items: list[Item], concurrency: int, base64_max: int) -> int:
    gate = asyncio.Semaphore(concurrency)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=15, sock_read=120)
    connector = aiohttp.TCPConnector(limit=concurrency)
    started = time.perf_counter()

    async def one(item: Item) -> tuple[int, str | None]:
        async with gate:
            return await upload(session, base_url, key, item, base64_max)

    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        results = await asyncio.gather(*(one(item) for item in items))
    took = time.perf_counter() - started
    problems = [problem for _, problem in results if problem is not None]
    sent = sum(size for size, problem in results if problem is None)
    for problem in problems[:5]:
        print(f"bare: {problem}", file=sys.stderr)
    print(
        f"bare: {len(results) - len(problems)} uploaded, {len(problems)} failed, "
        f"{sent} bytes in {took:.2f} s"
    )
    return 1 if problems else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", required=True)
    parser.add_argument("--items", type=Path, required=True, help="the item list")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--base64-max", type=int, default=1024 * 1024, help="bytes (1 MiB)")
    args = parser.parse_args()
    key = os.environ.get("KIE_API_KEY", "")
    if not key:
        print("bare: set KIE_API_KEY", file=sys.stderr)
        return 2
    items = read_items(args.items)
    return asyncio.run(
        run(args.base_url.rstrip("/"), key, items, args.concurrency, args.base64_max)
    )


if __name__ == "__main__":
    raise SystemExit(main())
