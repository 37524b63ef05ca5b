"""Metrics for Prometheus: the `migration` label, and pushes to a Pushgateway.

The gateway here is a loopback aiohttp server speaking the Pushgateway's push API
(PUT /metrics/job/<job>{/<label>/<value>}, the text format, 400 for a body it cannot
parse); what arrived is parsed with prometheus_client's own text parser.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from conftest import DIRECT, Gateway, closed_port, run_cli, samples_of, write_file, write_manifest

from migrator.emulator import Emulator

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def manifest(job: Path, emulator: Emulator) -> Path:
    for name in ("a.txt", "b.txt"):
        write_file(job / name, 300)
    return write_manifest(job, emulator.base_url, [{"glob": "./*.txt"}], name="nightly")


def add_outputs(manifest: Path, outputs: dict[str, str]) -> None:
    document = yaml.safe_load(manifest.read_text())
    manifest.write_text(yaml.safe_dump({**document, "outputs": outputs}))


async def test_the_metrics_file_labels_the_migration_not_the_job(
    manifest: Path, api_key: str, tmp_path: Path
) -> None:
    prom = tmp_path / "migrator.prom"

    ran = await run_cli(
        "run", str(manifest), "--no-progress", "--metrics-file", str(prom), key=api_key
    )

    assert ran.code == 0, ran.stderr
    values = samples_of(prom.read_text())
    assert (
        values["migrator_items", (("command", "run"), ("migration", "nightly"), ("state", "done"))]
        == 2
    )
    assert not any("job" in dict(labels) for _, labels in values)


async def test_a_run_pushes_its_metrics_into_its_own_group(
    manifest: Path, gateway: Gateway, api_key: str
) -> None:
    ran = await run_cli(
        "run",
        str(manifest),
        "--no-progress",
        "--metrics-push",
        gateway.url,
        key=api_key,
        env=DIRECT,
    )

    assert ran.code == 0, ran.stderr
    assert [method for method, _, _ in gateway.pushes] == ["PUT"]
    values = gateway.group(job="migrator", migration="nightly", command="run")
    assert values["migrator_items", (("state", "done"),)] == 2
    assert values["migrator_last_run_exit_code", ()] == 0
    assert values["migrator_failures", ()] == 0


async def test_outputs_metrics_push_pushes_every_command_into_its_own_group(
    manifest: Path, gateway: Gateway, api_key: str
) -> None:
    add_outputs(manifest, {"metrics_push": gateway.url})

    ran = await run_cli("run", str(manifest), "--no-progress", key=api_key, env=DIRECT)
    refreshed = await run_cli("refresh", str(manifest), "--no-progress", key=api_key, env=DIRECT)

    assert (ran.code, refreshed.code) == (0, 0), ran.stderr + refreshed.stderr
    for command in ("run", "refresh"):
        values = gateway.group(job="migrator", migration="nightly", command=command)
        assert values["migrator_items", (("state", "done"),)] == 2


async def test_an_unreachable_gateway_is_a_warning_that_hides_its_credentials(
    manifest: Path, api_key: str
) -> None:
    url = f"http://pusher:hunter2-secret@127.0.0.1:{closed_port()}"

    ran = await run_cli("run", str(manifest), "--no-progress", "--metrics-push", url, key=api_key)

    assert ran.code == 0, ran.stderr
    assert "metrics.push_failed" in ran.stderr
    assert f"127.0.0.1:{url.rsplit(':', 1)[1]}" in ran.stderr
    assert "hunter2" not in ran.stderr + ran.stdout
    assert "run: 2 uploaded" in ran.stdout


async def test_a_gateway_refusing_the_push_is_a_warning_with_its_answer(
    manifest: Path, gateway: Gateway, api_key: str
) -> None:
    gateway.refuse = True

    ran = await run_cli(
        "run",
        str(manifest),
        "--no-progress",
        "--metrics-push",
        gateway.url,
        key=api_key,
        env=DIRECT,
    )

    assert ran.code == 0, ran.stderr
    assert "answered 400: pushed metrics are invalid" in ran.stderr


async def test_a_metrics_push_that_is_not_an_http_url_is_refused_before_anything_runs(
    manifest: Path, api_key: str, emulator: Emulator
) -> None:
    ran = await run_cli(
        "run", str(manifest), "--metrics-push", "pushgateway:9091/metrics", key=api_key
    )

    assert ran.code == 2
    assert "--metrics-push: " in ran.one_error_line()
    assert emulator.requests == []
