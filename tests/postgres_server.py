"""A real PostgreSQL server for the tests, started in a temporary folder on 127.0.0.1.

The system's server binaries are used (Debian puts them in /usr/lib/postgresql/N/bin;
elsewhere they are on PATH). PostgreSQL refuses to run as root, so under root (CI) the
server runs as `nobody`, with its data folder handed to that user. When no server can be
started the fixture fails with the reason: a test suite that silently skips its database
tests proves nothing.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

UNPRIVILEGED_USER = "nobody"
START_TIMEOUT = 60


class NoPostgres(RuntimeError):
    """No PostgreSQL server could be found or started."""


def find_binaries() -> Path:
    """The folder holding initdb, pg_ctl and postgres: the newest system install first."""
    installed = Path("/usr/lib/postgresql").glob("*/bin")
    candidates = sorted(installed, key=lambda p: _version(p.parent.name), reverse=True)
    on_path = shutil.which("pg_ctl")
    if on_path:
        candidates.append(Path(on_path).parent)
    for folder in candidates:
        if all((folder / name).exists() for name in ("initdb", "pg_ctl", "postgres")):
            return folder
    raise NoPostgres(
        "no PostgreSQL server binaries (initdb, pg_ctl, postgres) in /usr/lib/postgresql/*/bin "
        "or on PATH: install the distribution's postgresql package"
    )


def _version(name: str) -> float:
    try:
        return float(name)
    except ValueError:
        return 0.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _drop_privileges() -> Callable[[], None] | None:
    """Under root, a preexec function that becomes `nobody`; otherwise None."""
    if os.geteuid() != 0:
        return None
    user = pwd.getpwnam(UNPRIVILEGED_USER)

    def become_user() -> None:
        os.setgroups([])
        os.setgid(user.pw_gid)
        os.setuid(user.pw_uid)

    return become_user


def _hand_over(folder: Path) -> None:
    if os.geteuid() == 0:
        user = pwd.getpwnam(UNPRIVILEGED_USER)
        os.chown(folder, user.pw_uid, user.pw_gid)


@dataclass
class PostgresServer:
    """One running server; `url(database)` is how clients reach it."""

    binaries: Path
    root: Path
    port: int
    user: str = "migrator"

    @property
    def data(self) -> Path:
        return self.root / "data"

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/{database}"

    def _run(self, *args: str) -> None:
        result = subprocess.run(
            [str(self.binaries / args[0]), *args[1:]],
            capture_output=True,
            text=True,
            timeout=START_TIMEOUT,
            preexec_fn=_drop_privileges(),
            cwd="/",
            check=False,
        )
        if result.returncode != 0:
            raise NoPostgres(f"{args[0]} failed: {(result.stderr or result.stdout).strip()}")

    def start(self) -> None:
        _hand_over(self.root)
        self._run(
            "initdb", "-D", str(self.data), "-U", self.user, "-A", "trust", "-E", "UTF8",
            "--no-sync", "--no-locale",
        )  # fmt: skip
        options = (
            f"-h 127.0.0.1 -p {self.port} -k {self.root} -c fsync=off "
            "-c synchronous_commit=off -c full_page_writes=off -c max_connections=200"
        )
        self._run(
            "pg_ctl", "-D", str(self.data), "-o", options, "-l", str(self.root / "server.log"),
            "-w", "-t", str(START_TIMEOUT), "start",
        )  # fmt: skip

    def stop(self) -> None:
        with contextlib.suppress(NoPostgres, subprocess.TimeoutExpired):
            self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")

    def log_tail(self, lines: int = 20) -> str:
        with contextlib.suppress(OSError):
            return "\n".join((self.root / "server.log").read_text().splitlines()[-lines:])
        return ""


@contextlib.contextmanager
def running_postgres() -> Iterator[PostgresServer]:
    """A fresh server for the duration of the block, removed afterwards."""
    binaries = find_binaries()
    root = Path(tempfile.mkdtemp(prefix="migrator-pg-"))
    server = PostgresServer(binaries, root, free_port())
    try:
        try:
            server.start()
        except NoPostgres as err:
            raise NoPostgres(f"{err}\n{server.log_tail()}") from None
        yield server
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)
