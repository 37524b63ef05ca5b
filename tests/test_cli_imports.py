"""`migrator --version` and `--help` load only what parsing the command line needs.

Cron users pay the start-up at every run, and aiohttp, aiosqlite, rich and the emulator
are most of it; each command imports them when it runs. This checks imports, not time.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import migrator_env

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
