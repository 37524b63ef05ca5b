"""Shared fixtures. Emulator fixtures: `api_key`, `emulator`, `emulator_process`."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from migrator.emulator import Emulator

REPO_ROOT = Path(__file__).resolve().parents[1]
TEST_API_KEY = "test-key-0123456789abcdef"


@pytest.fixture
def api_key() -> str:
    """The bearer key every emulator fixture accepts."""
    return TEST_API_KEY


@pytest.fixture
async def emulator(tmp_path: Path, api_key: str) -> AsyncIterator[Emulator]:
    """An in-process emulator on a free 127.0.0.1 port, data dir under tmp_path."""
    async with Emulator(tmp_path / "emulator-data", api_key) as emu:
        yield emu


@dataclass(frozen=True, slots=True)
class EmulatorProcess:
    """A `python -m migrator emulator` subprocess and where it listens."""

    process: asyncio.subprocess.Process
    base_url: str
    data_dir: Path


def migrator_env() -> dict[str, str]:
    """The environment for a `python -m migrator` child: this checkout first on the path."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    return env


async def start_emulator_process(data_dir: Path, api_key: str, *extra: str) -> EmulatorProcess:
    """Start the CLI emulator on port 0 and read its `listening on` line (15 s at most)."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "migrator",
        "emulator",
        "--port",
        "0",
        "--data-dir",
        str(data_dir),
        "--api-key",
        api_key,
        *extra,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
        env=migrator_env(),
    )
    assert process.stdout is not None
    try:
        line = (await asyncio.wait_for(process.stdout.readline(), 15)).decode()
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    assert line.startswith("emulator listening on http://"), f"unexpected first line: {line!r}"
    return EmulatorProcess(process, line.rsplit(" ", 1)[1].strip(), data_dir)


async def stop_emulator_process(emu: EmulatorProcess) -> None:
    if emu.process.returncode is None:
        emu.process.terminate()
        try:
            await asyncio.wait_for(emu.process.wait(), 10)
        except TimeoutError:
            emu.process.kill()
            await emu.process.wait()


@pytest.fixture
async def emulator_process(tmp_path: Path, api_key: str) -> AsyncIterator[EmulatorProcess]:
    """`python -m migrator emulator --port 0` as a subprocess; terminated at the end."""
    emu = await start_emulator_process(tmp_path / "emulator-process-data", api_key)
    try:
        yield emu
    finally:
        await stop_emulator_process(emu)
