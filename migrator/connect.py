"""Everything a command needs to talk to the target: the key, the HTTP sessions, the client.

`connect()` is the one place that turns a manifest's `target:` into a live
`transfer.Connection`. For `base_url: embedded` it also starts the emulator in-process
(data under the ledger's folder, on the same loopback port as last time when it is
free, so links recorded by an earlier run keep working) and a read-only demo origin
serving the files the manifest names under `${EMBEDDED_ORIGIN}` (`DemoFiles`). The
emulator and aiohttp's server are imported only then: the client side never loads them.

The HTTP sessions (and aiohttp itself, and the TLS context) are opened at the first
request a command makes, not before: a re-run with nothing to send makes none.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import posixpath
import secrets
import ssl
import stat
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import unquote, urlsplit

from migrator.client import UploadClient
from migrator.clock import ServiceClock
from migrator.errors import ConfigError
from migrator.logs import register_secret
from migrator.manifest import ledger_files
from migrator.model import Manifest, Target, UrlListSource, UrlSource
from migrator.naming import EMBEDDED_ORIGIN
from migrator.pacer import Pacer
from migrator.plan import OpenSession, iter_url_list
from migrator.transfer import Connection, Http, Limits

if TYPE_CHECKING:
    import aiohttp
    from yarl import URL

    from migrator.emulator import Emulator

EMBEDDED_ORIGIN_VAR = "EMBEDDED_ORIGIN"
MAX_KEY_FILE = 64 * 1024  # a key is short; more than this is not a key file
EMBEDDED_REQUESTS_KEPT = 100  # nobody reads the embedded emulator's request log


def read_api_key(target: Target, environ: Mapping[str, str] | None = None) -> str:
    """The key from the environment variable target.api_key_env names, or else from
    target.api_key_file: the environment wins over the manifest, as for every flag.
    Every key read is registered for redaction: no log line ever carries it."""
    key = _env_key(target, environ)
    if key:
        return register_secret(_checked_key(key, key_source(target, environ)))
    if target.api_key_file is not None:
        return register_secret(_read_key_file(target.api_key_file))
    raise ConfigError(
        f"no API key: set the environment variable {target.api_key_env} "
        "or target.api_key_file in the manifest"
    )


def key_source(target: Target, environ: Mapping[str, str] | None = None) -> str:
    """Where `read_api_key` takes the key from, for messages (never the key itself)."""
    if _env_key(target, environ) or target.api_key_file is None:
        return f"the environment variable {target.api_key_env}"
    return f"the API key file {target.api_key_file}"


def _env_key(target: Target, environ: Mapping[str, str] | None) -> str:
    env = os.environ if environ is None else environ
    return env.get(target.api_key_env, "").strip()


def _read_key_file(path: Path) -> str:
    try:
        info = path.stat()
        if not stat.S_ISREG(info.st_mode):  # a FIFO would block the read for ever
            raise ConfigError(f"the API key file {path} is not a regular file")
        with path.open("rb") as handle:
            data = handle.read(MAX_KEY_FILE)
    except OSError as err:
        raise ConfigError(f"cannot read the API key file {path}: {err.strerror}") from None
    if info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(f"the API key file {path} is readable by others; run: chmod 600 {path}")
    try:
        key = data.decode("utf-8-sig").strip()
    except UnicodeDecodeError:
        raise ConfigError(f"the API key file {path} is not text") from None
    if not key:
        raise ConfigError(f"the API key file {path} is empty")
    return _checked_key(key, f"the API key file {path}")


def _checked_key(key: str, where: str) -> str:
    """A key must fit in an Authorization header: one word of printable ASCII.
    The message never shows the key, not even a part of it."""
    if not all("!" <= ch <= "~" for ch in key):
        raise ConfigError(
            f"the API key in {where} has spaces, line breaks or other characters a key "
            "cannot have (one word of printable ASCII expected)"
        )
    return key


def embedded_dir(manifest: Manifest) -> Path:
    """Where the embedded emulator keeps its files: beside the ledger."""
    return manifest.ledger.parent / f"{manifest.name}.embedded"


@dataclass(frozen=True, slots=True)
class Origins:
    """Where remote sources are fetched from; no API key involved."""

    session: OpenSession  # opened at the first call: a plan of local files loads no aiohttp
    url_vars: Mapping[str, str]  # substitutions for URL sources (${EMBEDDED_ORIGIN})
    connections: int  # the session's limit, for probes


@contextlib.asynccontextmanager
async def open_origins(manifest: Manifest, *, concurrency: int) -> AsyncIterator[Origins]:
    """A session for origins, opened when first asked for, and for an embedded target
    the demo origin it names."""
    async with contextlib.AsyncExitStack() as stack:
        url_vars: dict[str, str] = {}
        if manifest.target.is_embedded:
            url_vars[EMBEDDED_ORIGIN_VAR] = await _start_demo_origin(manifest, stack)
        lock = asyncio.Lock()
        opened: list[aiohttp.ClientSession] = []

        async def session() -> aiohttp.ClientSession:
            async with lock:
                if not opened:
                    origin_session = _origin_session(manifest, concurrency)
                    opened.append(await stack.enter_async_context(origin_session))
            return opened[0]

        yield Origins(session, url_vars, _origin_connections(concurrency))


@contextlib.asynccontextmanager
async def connect(
    manifest: Manifest,
    *,
    concurrency: int,
    api_key: str | None,
    pacer: Pacer | None = None,
    clock: ServiceClock | None = None,
) -> AsyncIterator[Connection]:
    """The connection of one command: the embedded emulator started when asked, and
    the HTTP sessions opened at its first request (closed on the way out either way).

    `api_key` None: a command that only reads links (download, verify); its
    connection has no API client. An embedded target makes its own key.
    """
    async with contextlib.AsyncExitStack() as stack:
        url_vars: dict[str, str] = {}
        if manifest.target.is_embedded:
            api_key = register_secret(secrets.token_urlsafe(24))
            base_url = await _start_embedded(manifest, api_key, stack)
            url_vars[EMBEDDED_ORIGIN_VAR] = await _start_demo_origin(manifest, stack)
        else:
            base_url = manifest.target.base_url.rstrip("/")
        service_clock = clock or ServiceClock()
        settings = manifest.settings
        sessions = _Sessions(manifest, concurrency, base_url, api_key, service_clock, stack)
        yield Connection(
            target_id=manifest.target.base_url,
            base_url=base_url,
            http=sessions.http,
            url_vars=url_vars,
            pacer=pacer or Pacer(),
            clock=service_clock,
            limits=Limits(
                settings.timeout, settings.min_rate, settings.max_size, settings.base64_max
            ),
            private_origins=settings.allow_private_origins,
            origin_connections=_origin_connections(concurrency),
        )


class _Sessions:
    """A connection's HTTP side, opened by the first request of any worker (the others
    wait for it) and closed with the connection: the same sessions, proxy settings,
    CA bundle and timeouts as if opened up front, and no aiohttp until then."""

    def __init__(
        self,
        manifest: Manifest,
        concurrency: int,
        base_url: str,
        api_key: str | None,
        clock: ServiceClock,
        stack: contextlib.AsyncExitStack,
    ) -> None:
        self._manifest = manifest
        self._concurrency = concurrency
        self._base_url = base_url
        self._api_key = api_key
        self._clock = clock
        self._stack = stack
        self._lock = asyncio.Lock()
        self._opened: Http | None = None

    async def http(self) -> Http:
        if self._opened is None:
            async with self._lock:
                if self._opened is None:
                    self._opened = await self._open()
        return self._opened

    async def _open(self) -> Http:
        manifest, concurrency, stack = self._manifest, self._concurrency, self._stack
        origins = await stack.enter_async_context(_origin_session(manifest, concurrency))
        if self._api_key is None:
            return Http(origins)
        settings = manifest.settings
        api = await stack.enter_async_context(_api_session(manifest, concurrency, self._base_url))
        client = UploadClient(
            api,
            self._base_url,
            self._api_key,
            connect_timeout=settings.connect_timeout,
            read_timeout=settings.timeout,
            on_answer=self._clock.observe,
        )
        return Http(origins, client)


def connector_trust(target: Target) -> ssl.SSLContext | bool:
    """What an aiohttp connector verifies HTTPS with: `True`, aiohttp's own verifying
    context, when nothing is trusted besides the system's certificates (or
    SSL_CERT_FILE's and SSL_CERT_DIR's, as they were when aiohttp was imported: it
    loads them then); else `trust(target)`. Loading the same certificates a second time
    cost 0.05 to 0.3 s before the first request of every command, HTTP targets too."""
    if target.ca_bundle is None:
        return True
    return trust(target)


def trust(target: Target) -> ssl.SSLContext:
    """What HTTPS connections trust: the system's certificates (or SSL_CERT_FILE's, as
    OpenSSL reads it), and target.ca_bundle's (or $MIGRATOR_CA_BUNDLE's) besides.
    Verification is never turned off. One context a process for the same files: loading
    the system's certificates takes a tenth of a second, and every command asked thrice."""
    environ = os.environ
    cert_files = (environ.get("SSL_CERT_FILE"), environ.get("SSL_CERT_DIR"))
    return _trust(target.ca_bundle, cert_files)


@functools.lru_cache(maxsize=8)
def _trust(ca_bundle: Path | None, cert_files: tuple[str | None, str | None]) -> ssl.SSLContext:
    context = ssl.create_default_context()  # reads SSL_CERT_FILE / SSL_CERT_DIR itself
    if ca_bundle is not None:
        _load_ca_bundle(context, ca_bundle)
    return context


def check_ca_bundle(target: Target) -> None:
    """ConfigError when target.ca_bundle cannot be read or holds no certificate: before
    anything is written, without loading the system's certificates (`trust` does, at
    the first request)."""
    if target.ca_bundle is not None:
        _load_ca_bundle(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT), target.ca_bundle)


def _load_ca_bundle(context: ssl.SSLContext, ca_bundle: Path) -> None:
    try:
        context.load_verify_locations(cafile=ca_bundle)
    except ssl.SSLError:  # an OSError too: first
        raise ConfigError(f"the CA bundle {ca_bundle} holds no PEM certificate") from None
    except OSError as err:
        raise ConfigError(f"cannot read the CA bundle {ca_bundle}: {err.strerror or err}") from None


def _api_session(manifest: Manifest, concurrency: int, base_url: str) -> aiohttp.ClientSession:
    import aiohttp

    # One connection per worker; API calls get their own per-request timeouts.
    connector = aiohttp.TCPConnector(
        limit=concurrency, limit_per_host=concurrency, ssl=connector_trust(manifest.target)
    )
    # HTTPS_PROXY, HTTP_PROXY and NO_PROXY are honoured, as curl does. Read once here:
    # with trust_env, aiohttp reads them (and ~/.netrc) in two threads at every request.
    proxy, proxy_auth = _env_proxy(base_url)
    return aiohttp.ClientSession(
        connector=connector,
        timeout=aiohttp.ClientTimeout(total=None),
        proxy=proxy,
        proxy_auth=proxy_auth,
    )


def _env_proxy(url: str) -> tuple[URL | None, aiohttp.BasicAuth | None]:
    """The proxy the environment names for `url` and its credentials, or (None, None)."""
    from aiohttp.helpers import get_env_proxy_for_url
    from yarl import URL

    try:
        return get_env_proxy_for_url(URL(url))
    except LookupError:
        return None, None


def _origin_connections(concurrency: int) -> int:
    # Separate from the API session: a stream-through holds one origin connection and one
    # API connection at once, and sharing one pool of N could deadlock N workers.
    return concurrency * 2


def _origin_session(manifest: Manifest, concurrency: int) -> aiohttp.ClientSession:
    import aiohttp

    limit = _origin_connections(concurrency)
    connector = aiohttp.TCPConnector(limit=limit, ssl=connector_trust(manifest.target))
    settings = manifest.settings
    timeout = aiohttp.ClientTimeout(
        total=None, sock_connect=settings.connect_timeout, sock_read=settings.timeout
    )
    return aiohttp.ClientSession(
        connector=connector, timeout=timeout, trust_env=_environment_routes()
    )


def _environment_routes() -> bool:
    """Whether the environment can change an origin request: a proxy it names, or a netrc
    file's logins. aiohttp's trust_env asks both again at every request, in two threads
    (a plan's probe of a URL: two thread hops, half its CPU); when there is neither,
    nothing needs asking."""
    from aiohttp.helpers import netrc_from_env, proxies_from_env

    return bool(proxies_from_env()) or netrc_from_env() is not None


async def _start_embedded(
    manifest: Manifest, api_key: str, stack: contextlib.AsyncExitStack
) -> str:
    data_dir = embedded_dir(manifest)
    try:
        data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as err:
        raise ConfigError(
            f"cannot create {data_dir} for the embedded emulator: {err.strerror} "
            "(move the ledger with --ledger or MIGRATOR_LEDGER_DIR)"
        ) from None
    emulator = await _start_emulator(data_dir, api_key)
    stack.push_async_callback(emulator.stop)
    return emulator.base_url


async def _start_emulator(data_dir: Path, api_key: str) -> Emulator:
    """Start on the port of the last run when it is free, so its links stay valid."""
    from migrator.emulator import Emulator

    port_file = data_dir / "port"
    remembered = _read_port(port_file)
    emulator = Emulator(data_dir, api_key, port=remembered, keep_requests=EMBEDDED_REQUESTS_KEPT)
    try:
        await emulator.start()
    except ConfigError:  # the remembered port is taken: any free one will do
        if remembered == 0:
            raise
        emulator = Emulator(data_dir, api_key, port=0, keep_requests=EMBEDDED_REQUESTS_KEPT)
        await emulator.start()
    port = int(emulator.base_url.rsplit(":", 1)[1])
    if port != remembered:
        port_file.write_text(f"{port}\n", encoding="utf-8")
    return emulator


def _read_port(port_file: Path) -> int:
    try:
        return int(port_file.read_text(encoding="utf-8").strip())
    except (OSError, ValueError):
        return 0


async def _start_demo_origin(manifest: Manifest, stack: contextlib.AsyncExitStack) -> str:
    """Serve, read-only on loopback, the files the manifest's URL sources name under
    `${EMBEDDED_ORIGIN}` and nothing else: the demo's stand-in for a remote web server.
    Any local user can reach a loopback port; see `DemoFiles` for what is refused."""
    from aiohttp import web

    files = await asyncio.to_thread(DemoFiles.of, manifest)

    async def serve(request: web.Request) -> web.StreamResponse:
        file = await asyncio.to_thread(files.lookup, request.path)
        if file is None:
            raise web.HTTPNotFound()
        return web.FileResponse(file)

    app = web.Application()
    app.router.add_get("/{tail:.*}", serve)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    stack.push_async_callback(runner.cleanup)
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    return f"http://127.0.0.1:{port}"


@dataclass(frozen=True, slots=True)
class DemoFiles:
    """What the demo origin serves: the URL paths the manifest names under
    `${EMBEDDED_ORIGIN}`, each a regular file inside the manifest's folder. Never a
    dotfile or anything in a dot-folder (a key file, the default ledger folder
    `.migrator/`), never a file of the ledger or the embedded emulator, never the API
    key file, whatever the manifest names."""

    root: str  # the manifest's folder, real path
    named: frozenset[str]  # URL paths, decoded and normalised: `/data/a.png`
    refused_files: frozenset[str]  # real paths
    refused_folders: tuple[str, ...]  # real paths

    @classmethod
    def of(cls, manifest: Manifest) -> DemoFiles:
        """Read the manifest's URL sources and lists (a list that cannot be read names
        nothing; the plan says why)."""
        urls: list[str] = []
        for source in manifest.sources:
            if isinstance(source, UrlSource):
                urls.append(source.url)
            elif isinstance(source, UrlListSource):
                with contextlib.suppress(OSError, UnicodeDecodeError):
                    urls.extend(url for _, url in iter_url_list(source.path))
        named = (u[len(EMBEDDED_ORIGIN) :] for u in urls if u.startswith(EMBEDDED_ORIGIN))
        ledger = manifest.ledger
        files = [*ledger_files(ledger), ledger.with_suffix(".log")]
        if manifest.target.api_key_file is not None:
            files.append(manifest.target.api_key_file)
        root = os.path.realpath(manifest.base_dir)
        folders = [os.path.realpath(embedded_dir(manifest))]
        ledger_dir = os.path.realpath(ledger.parent)
        if not _within(ledger_dir, root):  # a folder of its own, not the manifest's
            folders.append(ledger_dir)
        return cls(
            root=root,
            named=frozenset(_url_path(rest) for rest in named),
            refused_files=frozenset(os.path.realpath(f) for f in files),
            refused_folders=tuple(folders),
        )

    def lookup(self, request_path: str) -> str | None:
        """The real file to serve for a request's (decoded) path, or None: 404."""
        path = posixpath.normpath("/" + request_path.lstrip("/"))
        if path not in self.named or any(part.startswith(".") for part in path.split("/")):
            return None
        real = os.path.realpath(Path(self.root, path.lstrip("/")))
        if not _within(self.root, real) or real in self.refused_files:
            return None
        if any(part.startswith(".") for part in Path(real).relative_to(self.root).parts):
            return None  # a named link into a dot-folder
        if any(_within(folder, real) for folder in self.refused_folders):
            return None
        try:
            return real if stat.S_ISREG(Path(real).stat().st_mode) else None
        except OSError:
            return None


def _url_path(rest: str) -> str:
    """`/data/a%20b.png?x=1` -> `/data/a b.png`, as the server sees a request's path."""
    return posixpath.normpath("/" + unquote(urlsplit(rest).path).lstrip("/"))


def _within(folder: str, path: str) -> bool:
    return os.path.commonpath([folder, path]) == folder
