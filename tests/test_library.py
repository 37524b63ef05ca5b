"""migrator used from Python: a small public surface, silent until told, light to import."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO_ROOT, migrator_env, write_file, write_manifest

import migrator

pytestmark = pytest.mark.timeout(60)


def readme_snippet() -> str:
    """The Python block of the README's "Using it from Python" section."""
    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Using it from Python", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.DOTALL)
    assert match is not None, "the README lost its Python example"
    return match.group(1)


def python(code: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=cwd,
        env=migrator_env(),
        capture_output=True,
        text=True,
        timeout=50,
    )


def test_the_readme_example_runs_and_prints_only_what_it_prints_itself(tmp_path: Path) -> None:
    for name in ("a.txt", "b.txt", "c.txt"):
        write_file(tmp_path / "data" / name, 100)
    write_manifest(tmp_path, "embedded", [{"glob": "./data/*.txt"}])

    done = python(readme_snippet(), tmp_path)

    assert (done.returncode, done.stderr) == (0, "")
    assert done.stdout == "3 0\n"


def test_a_failing_run_logs_nothing_anywhere_before_configure_logging(tmp_path: Path) -> None:
    write_file(tmp_path / "data" / "a.txt", 100)
    manifest = write_manifest(tmp_path, "embedded", [{"path": "./data/missing.txt"}])
    code = (
        "import asyncio, migrator\n"
        f"m = migrator.load_manifest(__import__('pathlib').Path({str(manifest)!r}),"
        " check_sources=False)\n"
        "s = asyncio.run(migrator.run_manifest(m))\n"
        "raise SystemExit(int(s.exit_code))\n"
    )

    done = python(code, tmp_path)

    assert done.returncode == 1  # the item failed: a warning the CLI would log
    assert (done.stdout, done.stderr) == ("", "")
    assert not list(tmp_path.rglob("*.log"))


def test_every_public_name_is_importable_from_the_package() -> None:
    for name in migrator.__all__:
        assert getattr(migrator, name) is not None, name


def test_the_package_ships_a_py_typed_marker() -> None:
    assert (Path(migrator.__file__).parent / "py.typed").is_file()


@pytest.mark.parametrize("module", ["client", "transfer", "ledger", "plan", "runner", "command"])
def test_the_client_side_never_imports_the_emulator_or_a_web_server(
    module: str, tmp_path: Path
) -> None:
    code = (
        f"import sys, migrator.{module}\n"
        "loaded = [m for m in ('migrator.emulator', 'aiohttp.web') if m in sys.modules]\n"
        "print(','.join(loaded))\n"
    )
    done = python(code, tmp_path)
    assert (done.returncode, done.stdout.strip()) == (0, "")


def test_importing_the_package_loads_none_of_its_modules(tmp_path: Path) -> None:
    code = (
        "import sys, migrator\nprint(sorted(m for m in sys.modules if m.startswith('migrator.')))\n"
    )
    done = python(code, tmp_path)
    assert done.stdout.strip() == "[]"
