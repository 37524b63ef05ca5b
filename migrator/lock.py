"""The run lock: one migrator run per ledger at a time.

`flock` on `<ledger>.lock`: the kernel drops the lock when the process dies,
even by SIGKILL, so a crashed run never leaves a stale lock behind. The file
itself stays (removing it would race with a run that just opened it); it holds
the pid of the current holder, for the message the next run shows.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path
from types import TracebackType

from migrator.errors import LockHeldError, ledger_os_error


def lock_path_for(ledger: Path) -> Path:
    """`<ledger>.lock`, beside the ledger."""
    return ledger.with_name(ledger.name + ".lock")


def _read_pid(fd: int) -> int | None:
    with contextlib.suppress(OSError, ValueError):
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        return int(text) if text else None
    return None


class RunLock:
    """An exclusive, non-blocking lock on a ledger, held for the length of a run."""

    def __init__(self, path: Path) -> None:
        self.ledger = Path(path)
        self.path = lock_path_for(self.ledger)
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> None:
        """Take the lock, or raise LockHeldError naming the pid that holds it."""
        if self._fd is not None:
            return
        fd = self._open()
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_pid(fd)
            os.close(fd)
            who = f"pid {holder}" if holder is not None else "pid unknown"
            raise LockHeldError(
                f"another migrator run holds the lock on {self.ledger} ({who}); "
                "wait for it or stop it"
            ) from None
        except OSError as err:
            os.close(fd)
            raise ledger_os_error(f"cannot lock the ledger {self.ledger}", err) from None
        self._fd = fd
        with contextlib.suppress(OSError):  # the pid only helps the message; a full disk
            os.ftruncate(fd, 0)  # must not leave a held lock behind
            os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)

    def release(self) -> None:
        """Let go of the lock (closing the descriptor releases the flock)."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
        os.close(fd)

    def _open(self) -> int:
        try:
            if not self.path.parent.is_dir():
                self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            return os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as err:
            raise ledger_os_error(f"cannot create the lock file {self.path}", err) from None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()
