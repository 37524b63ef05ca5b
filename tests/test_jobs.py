"""The ready-made units in jobs/: systemd units that start where only what they name
exists, and the Kubernetes CronJob that runs its commands in turn in one pod."""

from __future__ import annotations

import asyncio
import configparser
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import (
    REPO_ROOT,
    TEST_API_KEY,
    Gateway,
    Origin,
    migrator_env,
    write_file,
    write_manifest,
)

from migrator.emulator import Emulator

pytestmark = pytest.mark.timeout(90)
SYSTEMD = REPO_ROOT / "jobs" / "systemd"
CRONJOB = REPO_ROOT / "jobs" / "kubernetes" / "cronjob.yaml"


# -- systemd ------------------------------------------------------------------------------


def service_section(unit: Path) -> configparser.SectionProxy:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(unit.read_text())
    return parser["Service"]


def test_every_read_write_path_but_the_state_directory_is_optional() -> None:
    service = service_section(SYSTEMD / "migrator@.service")
    made_by_systemd = {f"/var/lib/{name}" for name in service["StateDirectory"].split()}

    paths = service["ReadWritePaths"].split()

    required = [path for path in paths if not path.startswith("-")]
    assert required and set(required) <= made_by_systemd
    assert "-/srv/migrator" in paths


def test_the_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    """Where systemd-analyze exists (CI without it still checks the unit's shape above)."""
    analyze = shutil.which("systemd-analyze")
    units = [tmp_path / f"migrator@{command}.service" for command in ("run", "refresh")]
    for unit in units:
        shutil.copy(SYSTEMD / "migrator@.service", unit)
    for timer in SYSTEMD.glob("*.timer"):
        shutil.copy(timer, tmp_path / timer.name)
    timers = sorted(tmp_path.glob("*.timer"))
    assert len(timers) == 3
    if analyze is None:
        return
    checked = subprocess.run(
        [analyze, "verify", "--man=no", *map(str, units + timers)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert (checked.returncode, checked.stderr) == (0, "")


# -- Kubernetes -----------------------------------------------------------------------------


def kubernetes_documents() -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(CRONJOB.read_text()) if doc]


def pod_spec(cronjob: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    return spec


def claims_of(cronjob: dict[str, Any]) -> set[str]:
    volumes = pod_spec(cronjob)["volumes"]
    return {
        v["persistentVolumeClaim"]["claimName"] for v in volumes if "persistentVolumeClaim" in v
    }


def test_only_one_cronjob_mounts_the_read_write_once_ledger_claim() -> None:
    documents = kubernetes_documents()
    rwo = {
        doc["metadata"]["name"]
        for doc in documents
        if doc["kind"] == "PersistentVolumeClaim" and "ReadWriteOnce" in doc["spec"]["accessModes"]
    }
    cronjobs = [doc for doc in documents if doc["kind"] == "CronJob"]

    mounting = [job for job in cronjobs if claims_of(job) & rwo]

    assert len(mounting) == 1
    assert mounting[0]["spec"]["concurrencyPolicy"] == "Forbid"


def the_pod_script() -> tuple[list[str], dict[str, str]]:
    """The CronJob's container command line and its plain env values."""
    [cronjob] = [doc for doc in kubernetes_documents() if doc["kind"] == "CronJob"]
    [container] = pod_spec(cronjob)["containers"]
    env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    return [*container["command"], *container["args"]], env


def pod_environment(tmp_path: Path, manifest: Path, gateway_url: str) -> dict[str, str]:
    """The pod's environment, with `migrator` on PATH running this checkout."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    shim = bin_dir / "migrator"
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m migrator "$@"\n')
    shim.chmod(0o755)
    _, pod_env = the_pod_script()
    env = migrator_env()
    env.update(pod_env)
    env.update(
        {
            "PATH": f"{bin_dir}{os.pathsep}{env['PATH']}",
            "MANIFEST": str(manifest),
            "MIGRATOR_LEDGER_DIR": str(tmp_path / "ledgers"),
            "MIGRATOR_METRICS_PUSH": gateway_url,
            "KIE_API_KEY": TEST_API_KEY,
            "NO_PROXY": "127.0.0.1",
        }
    )
    return env


async def start_pod(env: dict[str, str]) -> asyncio.subprocess.Process:
    command, _ = the_pod_script()
    return await asyncio.create_subprocess_exec(
        *command,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


async def test_the_cronjob_runs_then_refreshes_and_pushes_the_metrics_of_both(
    job: Path, emulator: Emulator, gateway: Gateway, tmp_path: Path
) -> None:
    for i in range(3):
        write_file(job / f"f{i}.txt", 100, seed=i)
    manifest = write_manifest(job, emulator.base_url, [{"glob": "./*.txt"}], name="nightly")

    pod = await start_pod(pod_environment(tmp_path, manifest, gateway.url))
    out, err = await asyncio.wait_for(pod.communicate(), 60)

    assert pod.returncode == 0, err.decode()
    assert out.decode().splitlines()[0].startswith("run: 3 uploaded")
    assert out.decode().splitlines()[1].startswith("refresh: ")
    assert [group["command"] for _, _, group in gateway.pushes] == ["run", "refresh"]
    assert (
        gateway.group(job="migrator", migration="nightly", command="refresh")[
            "migrator_items", (("state", "done"),)
        ]
        == 3
    )


async def test_a_sigterm_to_the_pod_reaches_migrator_and_no_later_command_starts(
    job: Path, emulator: Emulator, origin: Origin, gateway: Gateway, tmp_path: Path
) -> None:
    origin.files["slow.bin"] = bytes(range(256)) * 1200
    origin.slow.add("slow.bin")
    manifest = write_manifest(
        job, emulator.base_url, [{"url": origin.url("slow.bin")}], url_max="100KiB"
    )
    pod = await start_pod(pod_environment(tmp_path, manifest, gateway.url))
    deadline = time.monotonic() + 30
    while "slow.bin" not in origin.gets:  # the run's stream-through is in flight
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)

    pod.send_signal(signal.SIGTERM)
    await asyncio.sleep(0.2)
    origin.release.set()  # the item in flight finishes within the grace period
    out, err = await asyncio.wait_for(pod.communicate(), 60)

    assert pod.returncode == 143, err.decode()
    assert "finishing 1 upload" in err.decode()  # migrator itself got the signal
    assert [group["command"] for _, _, group in gateway.pushes] == ["run"]
    assert "refresh" not in out.decode()
