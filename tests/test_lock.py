"""The run lock: one run per ledger, released by the kernel however the holder dies."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from migrator.errors import LockHeldError
from migrator.lock import RunLock, lock_path_for

REPO = Path(__file__).resolve().parents[1]

# Takes the lock, says so, then waits for stdin to close (or to be killed).
HOLDER = """
import sys
from pathlib import Path
from migrator.lock import RunLock
lock = RunLock(Path(sys.argv[1]))
lock.acquire()
print("locked", flush=True)
sys.stdin.read()
"""

# Tries once, prints what happened.
CONTENDER = """
import sys
from pathlib import Path
from migrator.errors import LockHeldError
from migrator.lock import RunLock
try:
    RunLock(Path(sys.argv[1])).acquire()
except LockHeldError as err:
    print("held:", err)
else:
    print("acquired")
"""


def python(script: str, ledger: Path, **kwargs: object) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(  # type: ignore[call-overload, no-any-return]
        [sys.executable, "-c", script, str(ledger)], env=env, text=True, **kwargs
    )


@pytest.fixture
def ledger(tmp_path: Path) -> Path:
    return tmp_path / "state" / "job.ledger.sqlite"


@pytest.fixture
def holder(ledger: Path) -> Iterator[subprocess.Popen[str]]:
    proc = python(HOLDER, ledger, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "locked"
    yield proc
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=10)


def contend(ledger: Path) -> str:
    proc = python(CONTENDER, ledger, stdout=subprocess.PIPE)
    out, _ = proc.communicate(timeout=30)
    return str(out).strip()


def test_lock_file_sits_beside_the_ledger_and_is_private(ledger: Path) -> None:
    with RunLock(ledger):
        path = lock_path_for(ledger)
        assert path == ledger.parent / "job.ledger.sqlite.lock"
        assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_a_second_process_is_refused_while_the_lock_is_held(ledger: Path) -> None:
    with RunLock(ledger):
        answer = contend(ledger)
    assert answer.startswith("held: another migrator run holds the lock on")
    assert str(ledger) in answer
    assert f"(pid {os.getpid()})" in answer
    assert "wait for it or stop it" in answer


def test_the_lock_is_refused_while_another_process_holds_it(
    ledger: Path, holder: subprocess.Popen[str]
) -> None:
    with pytest.raises(LockHeldError, match=rf"\(pid {holder.pid}\)"):
        RunLock(ledger).acquire()


def test_a_killed_holder_leaves_no_stale_lock(ledger: Path, holder: subprocess.Popen[str]) -> None:
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=10)
    lock = RunLock(ledger)
    lock.acquire()
    assert lock.held
    lock.release()


def test_a_released_lock_can_be_taken_by_another_process(ledger: Path) -> None:
    with RunLock(ledger):
        pass
    assert contend(ledger) == "acquired"


def test_a_second_lock_in_the_same_process_is_refused(ledger: Path) -> None:
    with RunLock(ledger), pytest.raises(LockHeldError):
        RunLock(ledger).acquire()
