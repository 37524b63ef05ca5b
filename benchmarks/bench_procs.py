"""Child processes for compare.py: one measured run, and the servers it talks to.

`measure` runs one command through launch.py, in a session of its own, and reads what
the launcher saw when it reaped the command with os.wait4: the command's wall time,
the user + system CPU of the command and of every descendant it waited for (xargs'
curls, say), and ru_maxrss, the peak resident set of the largest single process among
them (for `xargs -P 16 curl`, one curl, not the sum of sixteen). A command that
outlives its timeout is killed with its whole process group and marked so.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
TAIL = 64 * 1024
LAUNCHER = Path(__file__).resolve().parent / "launch.py"


@dataclass(frozen=True, slots=True)
class Sample:
    """One run of one command."""

    wall: float  # seconds, spawn to reap
    cpu: float  # user + system seconds of the process tree
    max_rss: int  # bytes, the largest single process of the tree
    returncode: int
    timed_out: bool
    stdout: str  # the last 64 KiB of each
    stderr: str


def measure(
    argv: Sequence[str],
    *,
    env: Mapping[str, str],
    timeout: float,
    cwd: Path | None = None,
) -> Sample:
    with (
        tempfile.TemporaryFile() as out,
        tempfile.TemporaryFile() as err,
        tempfile.NamedTemporaryFile("r", suffix=".usage") as usage,
    ):
        launcher = subprocess.Popen(
            [sys.executable, "-S", "-I", str(LAUNCHER), usage.name, *argv],
            env=dict(env),
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            start_new_session=True,
        )
        timed_out = False
        try:
            launcher.wait(timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
        finally:  # on a timeout, and on Ctrl-C: the command and all it started
            if launcher.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(launcher.pid, signal.SIGKILL)
                launcher.wait()
        fields = usage.read().split()
        wall, cpu, max_rss = (float(x) for x in fields[:3]) if fields else (timeout, 0.0, 0.0)
        return Sample(
            wall=wall,
            cpu=cpu,
            max_rss=int(max_rss),
            returncode=int(fields[3]) if fields else launcher.returncode,
            timed_out=timed_out,
            stdout=_tail(out),
            stderr=_tail(err),
        )


def _tail(handle: IO[bytes]) -> str:
    """The last TAIL bytes a child wrote (a plan of 200,000 rows writes megabytes)."""
    size = handle.seek(0, os.SEEK_END)
    handle.seek(max(0, size - TAIL))
    return handle.read().decode("utf-8", errors="replace")


def cpu_seconds(pid: int) -> float:
    """User + system CPU a live process has used so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime


def emulator_argv(data_dir: Path, *, port: int = 0) -> list[str]:
    """`migrator emulator` keeping its files in `data_dir`; its key comes from KIE_API_KEY,
    never a command line. Run it as a Server: it prints `listening on URL` once it listens."""
    argv = [sys.executable, "-m", "migrator", "emulator", "--port", str(port)]
    return [*argv, "--data-dir", str(data_dir)]


class Server:
    """A long-lived helper process that prints `... listening on URL` once it listens."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        *,
        env: Mapping[str, str],
        log: Path,
        start_timeout: float = 30.0,
    ) -> None:
        self.name = name
        self.log = log
        self._log = log.open("ab")
        self.process = subprocess.Popen(
            list(argv),
            env=dict(env),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
        )
        self.url = self._await_url(start_timeout)

    def _await_url(self, timeout: float) -> str:
        assert self.process.stdout is not None
        found: list[str] = []
        reader = threading.Thread(
            target=lambda: found.append(self.process.stdout.readline()),  # type: ignore[union-attr]
            daemon=True,
        )
        reader.start()
        reader.join(timeout)
        match = re.search(r"listening on (\S+)", found[0]) if found else None
        if match is None:
            self.stop()
            raise RuntimeError(
                f"{self.name} did not start within {timeout:g} s: {found[:1]!r} "
                f"(its stderr is in {self._log.name})"
            )
        return match.group(1).rstrip("/")

    @property
    def address(self) -> str:
        """HOST:PORT of the URL."""
        return self.url.split("://", 1)[1]

    def cpu_seconds(self) -> float:
        return cpu_seconds(self.process.pid)

    def log_size(self) -> int:
        return self.log.stat().st_size

    def log_since(self, offset: int) -> str:
        """What the server wrote to its stderr after `offset`."""
        with self.log.open("rb") as handle:
            handle.seek(offset)
            return handle.read().decode("utf-8", errors="replace")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        if self.process.stdout is not None:
            self.process.stdout.close()
        self._log.close()
