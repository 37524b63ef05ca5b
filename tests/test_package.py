"""The package people install: kie-migrator's wheel, its version, `migrator init`, the
Containerfile that builds from the wheel."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml
from conftest import REPO_ROOT, run_cli

import migrator
from migrator.manifest import load_manifest

pytestmark = pytest.mark.timeout(180)
SAMPLES = REPO_ROOT / "sample_manifests"


def sample_files() -> dict[str, bytes]:
    """The repository's sample manifests and their data, as the package ships them."""
    skipped = {"out", ".migrator"}  # what running the quickstart from a clone leaves
    return {
        str(path.relative_to(SAMPLES)): path.read_bytes()
        for path in SAMPLES.rglob("*")
        if path.is_file() and not skipped & set(path.relative_to(SAMPLES).parts)
    }


def build_wheel(tmp_path: Path) -> zipfile.ZipFile:
    """The wheel built offline from a copy of this checkout, with the leftovers of a
    quickstart run (a ledger, outputs) in the samples folder: they must not ship."""
    tree = tmp_path / "tree"
    tree.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(REPO_ROOT / name, tree / name)
    ignore = shutil.ignore_patterns("__pycache__", "out", ".migrator")
    shutil.copytree(REPO_ROOT / "migrator", tree / "migrator", symlinks=True, ignore=ignore)
    shutil.copytree(SAMPLES, tree / "sample_manifests", ignore=ignore)
    (tree / "sample_manifests" / ".migrator").mkdir()
    (tree / "sample_manifests" / ".migrator" / "quickstart.sqlite").write_bytes(b"ledger")
    (tree / "sample_manifests" / "out").mkdir()
    (tree / "sample_manifests" / "out" / "quickstart.jsonl").write_text("{}\n")
    env = {**os.environ, "PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    pip_wheel = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation"]
    subprocess.run(
        [*pip_wheel, "-w", str(tmp_path / "dist"), str(tree)],
        check=True,
        capture_output=True,
        env=env,
        timeout=150,
    )
    [wheel] = (tmp_path / "dist").glob("*.whl")
    return zipfile.ZipFile(wheel)


def test_the_wheel_is_kie_migrator_with_the_samples_schema_license_and_command(
    tmp_path: Path,
) -> None:
    with build_wheel(tmp_path) as wheel:
        names = set(wheel.namelist())
        dist_info = f"kie_migrator-{migrator.__version__}.dist-info"
        metadata = wheel.read(f"{dist_info}/METADATA").decode()
        entry_points = wheel.read(f"{dist_info}/entry_points.txt").decode()
        shipped = {
            name.removeprefix("migrator/samples/"): wheel.read(name)
            for name in names
            if name.startswith("migrator/samples/")
        }
        schema = wheel.read("migrator/manifest.schema.json")

    assert "Name: kie-migrator" in metadata.splitlines()
    assert f"Version: {migrator.__version__}" in metadata.splitlines()
    assert "License-Expression: MIT" in metadata.splitlines()
    assert f"{dist_info}/licenses/LICENSE" in names
    assert {"migrator/py.typed", "migrator/starter.yaml"} <= names
    assert re.search(r"^migrator = migrator\.cli:entry$", entry_points, re.MULTILINE)
    assert shipped == sample_files()  # byte for byte, and no ledger or output
    assert schema == (REPO_ROOT / "migrator" / "manifest.schema.json").read_bytes()


def test_the_package_reads_its_samples_from_the_repository_folder() -> None:
    assert (REPO_ROOT / "migrator" / "samples").resolve() == SAMPLES.resolve()


def test_the_version_is_written_once_and_migrator_version_says_it() -> None:
    pyproject = (REPO_ROOT / "pyproject.toml").read_text()
    assert re.search(r'^dynamic = \["version"\]$', pyproject, re.MULTILINE)
    assert 'version = { attr = "migrator.__version__" }' in pyproject
    shown = subprocess.run(
        [sys.executable, "-m", "migrator", "--version"],
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO_ROOT,
        timeout=30,
    )
    assert shown.stdout.split()[:2] == ["migrator", migrator.__version__]


def test_the_changelog_has_an_unreleased_section_and_the_first_release() -> None:
    headings = re.findall(r"^## (.+)$", (REPO_ROOT / "CHANGELOG.md").read_text(), re.MULTILINE)
    assert headings[0] == "[Unreleased]"
    assert any(heading.startswith("[0.1.0] - ") for heading in headings)


def test_the_license_file_is_the_license_pyproject_names() -> None:
    assert 'license = "MIT"' in (REPO_ROOT / "pyproject.toml").read_text()
    assert (REPO_ROOT / "LICENSE").read_text().startswith("MIT License\n")


# -- migrator init ---------------------------------------------------------------------------


async def test_init_writes_a_starter_named_after_its_file_that_loads(tmp_path: Path) -> None:
    done = await run_cli("init", "nightly-assets.yaml", cwd=tmp_path)

    assert done.code == 0, done.stderr
    assert "nightly-assets.yaml" in done.stdout
    written = tmp_path / "nightly-assets.yaml"
    assert written.read_text().startswith("# A migrator job")
    manifest = load_manifest(written, environ={}, check_sources=False)
    assert manifest.name == "nightly-assets"
    assert manifest.target.upload_path == "migrations/nightly-assets"


async def test_init_into_a_folder_writes_job_yaml(tmp_path: Path) -> None:
    done = await run_cli("init", str(tmp_path))

    assert done.code == 0, done.stderr
    assert yaml.safe_load((tmp_path / "job.yaml").read_text())["name"] == "job"


async def test_init_never_replaces_a_file(tmp_path: Path) -> None:
    (tmp_path / "job.yaml").write_text("mine\n")

    done = await run_cli("init", cwd=tmp_path)

    assert done.code == 2
    assert (
        done.one_error_line()
        == "migrator: job.yaml already exists: not overwritten (name another file)"
    )
    assert (tmp_path / "job.yaml").read_text() == "mine\n"


async def test_init_into_a_folder_that_does_not_exist_is_one_line(tmp_path: Path) -> None:
    done = await run_cli("init", str(tmp_path / "missing" / "job.yaml"))

    assert done.code == 2
    assert "No such file or directory" in done.one_error_line()


# -- the Containerfile --------------------------------------------------------------------


def test_the_containerfile_installs_the_wheel_in_a_second_stage_as_a_non_root_user() -> None:
    lines = [
        line.strip()
        for line in (REPO_ROOT / "jobs" / "kubernetes" / "Containerfile").read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    stages = [i for i, line in enumerate(lines) if line.startswith("FROM ")]
    assert len(stages) == 2
    build, final = lines[stages[0] : stages[1]], lines[stages[1] :]
    assert any(line.startswith("RUN pip wheel") for line in build)
    assert not any(line.startswith("COPY") for line in final)  # no source in the image
    assert any("--no-index --find-links /wheels kie-migrator" in line for line in final)
    [user] = [line for line in final if line.startswith("USER ")]
    assert user.split()[1].split(":")[0] not in ("0", "root")
    assert final[-1] == 'ENTRYPOINT ["migrator"]'
