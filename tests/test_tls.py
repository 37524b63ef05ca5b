"""HTTPS to a service whose certificate a private CA signed, through the real CLI.

The CA and the server's certificate are made at test time (trustme); the emulator
serves HTTPS on 127.0.0.1 with them. Verification is never turned off: without the
CA the run stops with one line and exit 69; with it (target.ca_bundle,
MIGRATOR_CA_BUNDLE or SSL_CERT_FILE) the file is uploaded.
"""

from __future__ import annotations

import hashlib
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
import trustme
from aiohttp import web
from conftest import (
    DIRECT,
    Finished,
    ledger_rows,
    load,
    run_cli,
    serving_gateway,
    web_server,
    write_file,
    write_manifest,
)

from migrator.connect import connector_trust
from migrator.emulator import Emulator
from migrator.model import Target

pytestmark = pytest.mark.timeout(90)

UNAVAILABLE, USAGE = 69, 2


@pytest.fixture
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def server_tls(ca: trustme.CA) -> ssl.SSLContext:
    """A server's TLS with a certificate for 127.0.0.1 the test CA signed."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    return context


@pytest.fixture
async def tls_emulator(
    tmp_path: Path, api_key: str, server_tls: ssl.SSLContext
) -> AsyncIterator[Emulator]:
    """The emulator over HTTPS, its certificate signed by the test CA."""
    async with Emulator(tmp_path / "tls-data", api_key, ssl_context=server_tls) as emulator:
        yield emulator


@pytest.fixture
def ca_file(job: Path, ca: trustme.CA) -> Path:
    path = job / "company-ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return path


def manifest_for(job: Path, emulator: Emulator, **target: str) -> Path:
    write_file(job / "a.txt", 100)
    manifest = write_manifest(job, emulator.base_url, [{"path": "a.txt"}])
    if target:
        text = manifest.read_text(encoding="utf-8")
        extra = "".join(f"  {key}: {value}\n" for key, value in target.items())
        manifest.write_text(text.replace("target:\n", "target:\n" + extra), encoding="utf-8")
    return manifest


async def run(manifest: Path, api_key: str, env: dict[str, str] | None = None) -> Finished:
    return await run_cli("run", str(manifest), "--no-progress", key=api_key, env=env)


async def test_an_untrusted_certificate_stops_the_run_with_one_line_and_exit_69(
    job: Path, tls_emulator: Emulator, api_key: str
) -> None:
    assert tls_emulator.base_url.startswith("https://127.0.0.1:")
    manifest = manifest_for(job, tls_emulator)

    result = await run(manifest, api_key)

    assert result.code == UNAVAILABLE, result.stderr
    line = result.one_error_line()
    assert f"TLS certificate of {tls_emulator.base_url} is not trusted: " in line
    assert "set target.ca_bundle" in line
    assert tls_emulator.requests == []  # the handshake failed: nothing reached the service


async def test_target_ca_bundle_trusts_a_private_ca(
    job: Path, tls_emulator: Emulator, api_key: str, ca_file: Path
) -> None:
    manifest = manifest_for(job, tls_emulator, ca_bundle=ca_file.name)

    result = await run(manifest, api_key)

    assert result.code == 0, result.stderr
    assert "run: 1 uploaded" in result.stdout
    assert [r.file_name for r in tls_emulator.requests] == ["a.txt"]


async def test_a_file_streamed_over_https_in_several_reads_arrives_whole(
    job: Path, tls_emulator: Emulator, api_key: str, ca_file: Path
) -> None:
    manifest = manifest_for(job, tls_emulator, ca_bundle=ca_file.name)
    data = write_file(job / "a.txt", 3 * 1024 * 1024 + 5)  # streamed, in pieces of reads

    result = await run(manifest, api_key)

    assert result.code == 0, result.stderr
    (request,) = tls_emulator.requests
    assert (request.endpoint, request.size) == ("stream", len(data))
    row = (await ledger_rows(load(manifest)))["a.txt"]
    assert row.sha256 == hashlib.sha256(data).hexdigest()
    trusting = ssl.create_default_context(cafile=str(ca_file))
    async with (
        aiohttp.ClientSession() as session,
        session.get(str(row.download_url), ssl=trusting) as response,
    ):
        assert await response.read() == data


@pytest.mark.parametrize("variable", ["MIGRATOR_CA_BUNDLE", "SSL_CERT_FILE"])
async def test_a_ca_named_in_the_environment_is_trusted(
    job: Path, tls_emulator: Emulator, api_key: str, ca_file: Path, variable: str
) -> None:
    # SSL_CERT_FILE replaces the system's list, as OpenSSL reads it; ours adds to it.
    manifest = manifest_for(job, tls_emulator)

    result = await run(manifest, api_key, env={variable: str(ca_file)})

    assert result.code == 0, result.stderr
    assert "run: 1 uploaded" in result.stdout


async def test_a_ca_bundle_that_holds_no_certificate_is_one_line_and_exit_2(
    job: Path, tls_emulator: Emulator, api_key: str
) -> None:
    (job / "not-a-ca.pem").write_text("hello\n", encoding="utf-8")
    manifest = manifest_for(job, tls_emulator, ca_bundle="not-a-ca.pem")

    result = await run(manifest, api_key)

    assert result.code == USAGE, result.stderr
    assert "holds no PEM certificate" in result.one_error_line()
    assert tls_emulator.requests == []


async def test_a_missing_ca_bundle_is_one_line_and_exit_2_before_the_ledger_is_made(
    job: Path, tls_emulator: Emulator, api_key: str
) -> None:
    manifest = manifest_for(job, tls_emulator)

    result = await run(manifest, api_key, env={"MIGRATOR_CA_BUNDLE": str(job / "gone.pem")})

    assert result.code == USAGE, result.stderr
    assert "cannot read the CA bundle" in result.one_error_line()
    assert not (job / "ledger.sqlite").exists()


async def test_downloads_trust_the_same_ca(
    job: Path, tmp_path: Path, tls_emulator: Emulator, api_key: str, ca_file: Path
) -> None:
    manifest = manifest_for(job, tls_emulator, ca_bundle=ca_file.name)
    assert (await run(manifest, api_key)).code == 0
    dest = tmp_path / "dest"

    result = await run_cli("download", str(manifest), "--dest", str(dest), "--no-progress")

    assert result.code == 0, result.stderr
    assert (dest / "mig" / "a.txt").read_bytes() == (job / "a.txt").read_bytes()


@pytest.fixture
async def tls_origin(server_tls: ssl.SSLContext) -> AsyncIterator[str]:
    """An HTTPS origin on 127.0.0.1 serving /pixel.bin, its certificate from the test CA."""

    async def serve(request: web.Request) -> web.Response:
        return web.Response(body=b"p" * 75, content_type="application/octet-stream")

    async with web_server(serve, ssl_context=server_tls) as url:
        yield f"{url}/pixel.bin"


async def test_origins_trust_the_ca_bundle_too(
    job: Path, emulator: Emulator, api_key: str, ca_file: Path, tls_origin: str
) -> None:
    # The service cannot fetch the URL (it does not trust the CA); this machine streams
    # it through, and its origin session trusts target.ca_bundle.
    manifest = write_manifest(job, emulator.base_url, [{"url": tls_origin}])
    text = manifest.read_text(encoding="utf-8")
    manifest.write_text(text.replace("target:\n", f"target:\n  ca_bundle: {ca_file.name}\n"))

    result = await run(manifest, api_key)

    assert result.code == 0, result.stderr
    assert [r.endpoint for r in emulator.requests] == ["url", "stream"]


async def test_an_untrusted_origin_fails_its_item_with_the_reason(
    job: Path, emulator: Emulator, api_key: str, tls_origin: str
) -> None:
    manifest = write_manifest(job, emulator.base_url, [{"url": tls_origin}])

    result = await run(manifest, api_key)

    assert result.code == 1, result.stderr
    assert "its TLS certificate is not trusted" in result.stderr


async def test_the_metrics_push_trusts_the_ca_bundle_too(
    job: Path, tls_emulator: Emulator, api_key: str, server_tls: ssl.SSLContext, ca_file: Path
) -> None:
    manifest = manifest_for(job, tls_emulator, ca_bundle=ca_file.name)

    async with serving_gateway(server_tls) as gateway:
        result = await run_cli(
            "run",
            str(manifest),
            "--no-progress",
            "--metrics-push",
            gateway.url,
            key=api_key,
            env=DIRECT,
        )

    assert result.code == 0, result.stderr
    assert "metrics.push_failed" not in result.stderr
    assert [group["command"] for _, _, group in gateway.pushes] == ["run"]


def test_without_a_ca_of_its_own_a_connection_verifies_with_aiohttps_context() -> None:
    # aiohttp loaded the system's certificates (or SSL_CERT_FILE's) at its import: not
    # loaded a second time. That it verifies: the untrusted certificate above.
    assert connector_trust(Target("http://127.0.0.1:8080")) is True


def test_a_ca_bundle_gets_a_context_that_trusts_it(ca_file: Path) -> None:
    trusted = connector_trust(Target("https://127.0.0.1:8443", ca_bundle=ca_file))

    assert isinstance(trusted, ssl.SSLContext)
    assert trusted.verify_mode == ssl.CERT_REQUIRED
    ca_der = ssl.PEM_cert_to_DER_cert(ca_file.read_text(encoding="ascii"))
    assert ca_der in trusted.get_ca_certs(binary_form=True)
