"""`migrator --version` and `--help` load only what parsing the command line needs, and
a plan of local files loads no HTTP library, nor does a re-run with nothing to send (and
no terminal), which loads no rich either (not even through structlog) and no PostgreSQL
back end.

Cron users pay the start-up at every run, and aiohttp, aiosqlite, rich and the emulator
are most of it; each command imports them when it runs, and `run` imports aiohttp only
at its first request. This checks imports, not time.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import migrator_env, write_file, write_manifest

from migrator.emulator import Emulator
from migrator.manifest import load_manifest
from migrator.model import Outcome
from migrator.runner import RunOptions, run_manifest

HEAVY = ("aiohttp", "aiosqlite", "rich", "structlog", "yaml", "asyncio", "migrator.emulator")

# Runs the command line as `python -m migrator ARG` does, then lists what got imported.
PROBE = """
import sys
from migrator.cli import main
try:
    main(sys.argv[1:])
except SystemExit:
    pass
print("\\n".join(sorted(sys.modules)), file=sys.stderr)
"""

# The same, for a command that prints and logs to stderr: the list goes to a file.
PROBE_TO_FILE = """
import sys
from pathlib import Path
from migrator.cli import main
code = main(sys.argv[2:])
Path(sys.argv[1]).write_text("\\n".join(sorted(sys.modules)))
sys.exit(code)
"""


def modules_loaded_by(*arguments: str) -> set[str]:
    done = subprocess.run(
        [sys.executable, "-c", PROBE, *arguments],
        env=migrator_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return set(done.stderr.split())


def heavy_among(modules: set[str]) -> list[str]:
    return sorted(m for m in modules if any(m == h or m.startswith(h + ".") for h in HEAVY))


@pytest.mark.parametrize("argument", ["--version", "--help"])
def test_version_and_help_import_no_network_storage_or_display_library(argument: str) -> None:
    loaded = modules_loaded_by(argument)
    assert "migrator.cli" in loaded
    assert heavy_among(loaded) == []


def test_the_probe_sees_what_a_command_imports(tmp_path: Path) -> None:
    # `status` of a missing manifest sets up logging (structlog) before it fails.
    loaded = modules_loaded_by("status", str(tmp_path / "missing.yaml"))
    assert "structlog" in heavy_among(loaded)


def test_a_plan_of_local_files_loads_no_http_library(tmp_path: Path) -> None:
    write_file(tmp_path / "a.txt", 100)
    manifest = write_manifest(tmp_path, "http://127.0.0.1:9", [{"glob": "./*.txt"}])
    loaded = modules_loaded_by("plan", str(manifest))
    assert "migrator.runner" in loaded
    assert [m for m in loaded if m == "aiohttp" or m.startswith("aiohttp.")] == []


async def test_a_re_run_with_nothing_to_send_loads_no_http_display_or_postgresql_library(
    job: Path, emulator: Emulator, api_key: str
) -> None:
    for name in ("a.txt", "b.txt"):
        write_file(job / name, 100)
    manifest = write_manifest(job, emulator.base_url, [{"glob": "./*.txt"}])
    first = await run_manifest(
        load_manifest(manifest, environ={}), RunOptions(), environ={"KIE_API_KEY": api_key}
    )
    assert first.count(Outcome.UPLOADED) == 2
    sent = len(emulator.requests)
    listing = job / "modules.txt"

    child = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        PROBE_TO_FILE,
        str(listing),
        "run",
        str(manifest),
        env={**migrator_env(), "KIE_API_KEY": api_key},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(child.communicate(), 60)

    assert child.returncode == 0, err.decode()
    assert "0 uploaded, 2 skipped" in out.decode()
    assert len(emulator.requests) == sent
    loaded = set(listing.read_text().split())
    assert "migrator.runner" in loaded
    unused = ("aiohttp", "rich", "pygments", "migrator.ledger_pg", "importlib.metadata")
    assert [m for m in loaded if any(m == u or m.startswith(u + ".") for u in unused)] == []
