"""Peak memory of the emulator while it receives one large streamed upload.

Starts `python -m migrator emulator` as a subprocess, streams a multipart upload of
--size bytes (default 1GiB) generated on the fly with chunked transfer encoding, then
reads the emulator's peak RSS (VmHWM in /proc/<pid>/status). Prints

    emulator peak RSS (VmHWM): 61.3 MB for a 1073741824 byte upload

and exits 1 when the peak is at or above --limit (default 150MB), 2 on any other failure.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from migrator.units import parse_size  # noqa: E402

API_KEY = "benchmark-key"
BOUNDARY = "emulator-rss-benchmark-boundary"
BLOCK = 1024 * 1024


def peak_rss_bytes(pid: int) -> int:
    """VmHWM of a live process, in bytes (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/{pid}/status has no VmHWM line")


async def multipart_body(size: int) -> AsyncIterator[bytes]:
    """`uploadPath`, `fileName` and a `file` part of `size` bytes, yielded in 1 MiB blocks."""
    yield (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="uploadPath"\r\n\r\nbench\r\n'
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="fileName"\r\n\r\nbig.bin\r\n'
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="big.bin"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()
    block = os.urandom(BLOCK)
    sent = 0
    while sent < size:
        piece = block[: min(BLOCK, size - sent)]
        sent += len(piece)
        yield piece
    yield f"\r\n--{BOUNDARY}--\r\n".encode()


async def upload(base_url: str, size: int) -> int:
    """Stream the upload; returns the fileSize the emulator reports."""
    headers = {
        "Authorization": f"Bearer {API_KEY}",
        "Content-Type": f"multipart/form-data; boundary={BOUNDARY}",
    }
    timeout = aiohttp.ClientTimeout(total=600)
    async with (
        aiohttp.ClientSession(timeout=timeout) as session,
        session.post(
            f"{base_url}/api/file-stream-upload", data=multipart_body(size), headers=headers
        ) as resp,
    ):
        body = await resp.json()
        if resp.status != 200 or not body.get("success"):
            raise RuntimeError(f"upload failed: HTTP {resp.status} {body}")
        return int(body["data"]["fileSize"])


async def measure(size: int) -> int:
    """Run an emulator subprocess, upload `size` bytes, return its peak RSS in bytes."""
    with tempfile.TemporaryDirectory(prefix="emulator-rss-") as data_dir:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "migrator",
            "emulator",
            "--port",
            "0",
            "--data-dir",
            data_dir,
            "--api-key",
            API_KEY,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
            env=env,
        )
        try:
            assert process.stdout is not None
            line = (await asyncio.wait_for(process.stdout.readline(), 15)).decode()
            if not line.startswith("emulator listening on "):
                raise RuntimeError(f"emulator did not start: {line!r}")
            received = await upload(line.rsplit(" ", 1)[1].strip(), size)
            if received != size:
                raise RuntimeError(f"emulator stored {received} bytes, sent {size}")
            return peak_rss_bytes(process.pid)
        finally:
            if process.returncode is None:
                process.terminate()
                await process.wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="1GiB", help="upload size (default 1GiB)")
    parser.add_argument("--limit", default="150MB", help="peak RSS that fails (default 150MB)")
    args = parser.parse_args()
    size, limit = parse_size(args.size), parse_size(args.limit)
    try:
        peak = asyncio.run(measure(size))
    except (RuntimeError, OSError, aiohttp.ClientError, TimeoutError) as err:
        print(f"emulator_rss: {err}", file=sys.stderr)
        return 2
    print(f"emulator peak RSS (VmHWM): {peak / 1e6:.1f} MB for a {size} byte upload", flush=True)
    if peak >= limit:
        print(f"emulator_rss: peak RSS is at or above the {limit / 1e6:.0f} MB limit")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
