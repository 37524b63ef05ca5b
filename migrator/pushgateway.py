"""The metrics pushed to a Prometheus Pushgateway: the convention for batch jobs.

A Kubernetes CronJob has no node exporter reading a textfile on its volume, so it
pushes instead: `PUT <gateway>/metrics/job/migrator/migration/<name>/command/<command>`
with the Prometheus text format. Each command has its own group, because a PUT
replaces its whole group: a `refresh` must not erase what the last `run` said. The
grouping labels are left out of the body; the Pushgateway adds them to every sample.

A push that fails is the caller's warning, never a failed command: the ledger and
the uploads are what matter, and the next command pushes again.
"""

from __future__ import annotations

import ssl
from urllib.parse import quote, urlsplit

from migrator.naming import hide_credentials, without_credentials

PUSH_JOB = "migrator"
PUSH_TIMEOUT = 10.0  # seconds for the whole push: a gateway that hangs must not hold the job
GROUPING_LABELS = frozenset({"migration", "command"})
_MAX_REASON = 200


class PushError(Exception):
    """The Pushgateway could not be reached or refused the metrics (one line)."""


def check_push_url(url: str) -> str | None:
    """What is wrong with `url` as a Pushgateway address, or None (pure)."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - a port out of range raises here
    except ValueError:
        return f"{without_credentials(url)!r} is not a URL"
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return (
            f"{without_credentials(url)!r} is not an http(s) URL, such as http://pushgateway:9091"
        )
    if parts.query or parts.fragment:
        return f"{without_credentials(url)!r}: give the gateway's address, without ? or #"
    return None


def push_url(gateway: str, migration: str, command: str) -> str:
    """Where the metrics of `command` on `migration` go (pure)."""
    group = (
        f"job/{PUSH_JOB}/migration/{quote(migration, safe='')}/command/{quote(command, safe='')}"
    )
    return f"{gateway.rstrip('/')}/metrics/{group}"


async def push_metrics(
    gateway: str, migration: str, command: str, text: str, *, trust: ssl.SSLContext | bool = True
) -> None:
    """PUT `text` (the Prometheus text format) into this command's group.

    Credentials in `gateway` (`https://user:pass@host`) are sent as basic auth and
    never appear in an error. Honours HTTPS_PROXY/NO_PROXY; `trust` is what HTTPS
    trusts (the job's, so a private CA serves the gateway as it serves the service).
    Raises PushError."""
    import aiohttp  # here, not at import: the CLI's --help stays fast

    url = push_url(gateway, migration, command)
    shown = without_credentials(gateway)
    timeout = aiohttp.ClientTimeout(total=PUSH_TIMEOUT)
    headers = {"Content-Type": "text/plain; version=0.0.4; charset=utf-8"}
    try:
        async with (
            aiohttp.ClientSession(timeout=timeout, trust_env=True) as session,
            session.put(url, data=text.encode(), headers=headers, ssl=trust) as answer,
        ):
            if answer.status >= 300:
                body = (await answer.text(errors="replace")).strip()
                reason = " ".join(body.split())[:_MAX_REASON] or answer.reason or ""
                raise PushError(f"{shown} answered {answer.status}: {hide_credentials(reason)}")
    except TimeoutError:
        raise PushError(f"{shown} did not answer within {PUSH_TIMEOUT:g}s") from None
    except aiohttp.ClientError as err:
        reason = hide_credentials(str(err) or type(err).__name__)
        raise PushError(f"cannot reach {shown}: {reason}") from None
