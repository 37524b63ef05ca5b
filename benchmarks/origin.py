"""A loopback web server that serves one folder read-only: the origin of URL items.

    python benchmarks/origin.py --root DIR [--port 0]
    python benchmarks/origin.py --synthetic BYTES [--port 0]

Prints `origin listening on http://127.0.0.1:PORT` once it listens, and serves GET and
HEAD (with Content-Length) until SIGINT or SIGTERM. No access log. With --synthetic,
every path answers BYTES bytes (its own path first), so a list of a million URLs needs
no million files on disk.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from pathlib import Path

from aiohttp import web


def synthetic(size: int) -> web.Application:
    async def answer(request: web.Request) -> web.Response:
        body = request.path.encode()[:size].ljust(size, b".")
        return web.Response(body=body, content_type="application/octet-stream")

    app = web.Application()
    app.router.add_get("/{tail:.*}", answer)  # and HEAD, with the same Content-Length
    return app


async def serve(root: Path | None, host: str, port: int, size: int = 0) -> None:
    if root is None:
        app = synthetic(size)
    else:
        app = web.Application()
        app.router.add_static("/", root, show_index=False, follow_symlinks=False)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, host, port, backlog=1024)
    await site.start()
    bound = runner.addresses[0]
    print(f"origin listening on http://{bound[0]}:{bound[1]}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--root", type=Path, help="the folder to serve")
    what.add_argument("--synthetic", type=int, metavar="BYTES", help="any path: BYTES bytes")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    root = args.root.resolve() if args.root is not None else None
    asyncio.run(serve(root, args.host, args.port, args.synthetic or 0))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
