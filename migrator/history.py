"""One item's history: `migrator show MANIFEST ITEM`.

An item is named as the manifest names its source (a path, relative or absolute, or
a URL, with or without its credentials) or by where it lands (`upload_path/file_name`).
What comes out hides credentials as every other view does: a source URL without its
`user:password@`, links and errors with those of any URL in them removed.
"""

from __future__ import annotations

import difflib
import os
import posixpath
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from migrator.clock import service_time
from migrator.errors import UsageError
from migrator.ledger import AttemptRow, BaseLedger, open_ledger
from migrator.model import LedgerItem, Manifest, Method, SourceKind
from migrator.naming import hide_credentials, join_upload_path, printable, without_credentials
from migrator.outputs import export_record
from migrator.units import iso_utc

SUGGESTIONS = 3
UPLOADS = frozenset(method.value for method in (Method.BASE64, Method.STREAM, Method.URL))
SUGGEST_AMONG = 20_000  # names compared for a did-you-mean; a bigger ledger gets none


@dataclass(frozen=True, slots=True)
class ItemHistory:
    """An item's current row and every attempt the ledger recorded for it."""

    item: LedgerItem
    attempts: tuple[AttemptRow, ...]
    now: float  # on the service's clock, as the ledger last measured it

    @property
    def expired(self) -> bool:
        return self.item.expires_at is not None and self.item.expires_at < self.now

    @property
    def link(self) -> str | None:
        """The current link, credentials hidden."""
        url = self.item.download_url
        return None if url is None else hide_credentials(url)

    @property
    def linking_attempt(self) -> int | None:
        """The id of the upload that made the current link: the last one that worked. The
        ledger keeps no earlier link; an item settled by a probe has none to point at."""
        if not self.item.has_link:
            return None
        uploads = [a.id for a in self.attempts if a.outcome == "ok" and a.method in UPLOADS]
        return uploads[-1] if uploads else None

    def as_dict(self) -> dict[str, Any]:
        linking = self.linking_attempt
        return {
            **export_record(self.item),
            "download_url": self.link,
            "expired": self.expired,
            "history": [
                attempt_record(a, self.item if a.id == linking else None) for a in self.attempts
            ],
        }


def attempt_record(attempt: AttemptRow, linked: LedgerItem | None = None) -> dict[str, Any]:
    """One attempt as `show --format json` gives it, its error without credentials;
    `linked`: the attempt made that item's current link, given with its expiry."""
    link = None if linked is None or linked.download_url is None else linked.download_url
    return {
        "at": iso_utc(attempt.started_at),
        "run": attempt.run_id,
        "command": attempt.command,
        "method": attempt.method,
        "attempt": attempt.attempt,
        "outcome": attempt.outcome,
        "http_status": attempt.http_status,
        "duration": None if attempt.duration is None else round(attempt.duration, 3),
        "bytes": attempt.bytes_sent,
        "error": None if attempt.error is None else hide_credentials(attempt.error),
        "link": None if link is None else hide_credentials(link),
        "expires_at": None if linked is None else iso_utc(linked.expires_at),
    }


async def item_history(manifest: Manifest, name: str) -> list[ItemHistory]:
    """The history of every item `name` names (one, unless a source was named twice).
    UsageError (exit 2) when the ledger holds none, with the closest names it holds."""
    async with await open_ledger(manifest, readonly=True) as ledger:
        items = await find_items(ledger, manifest, name)
        if not items:
            raise UsageError(await _unknown(ledger, manifest, name))
        _offset, now = await service_time(ledger)
        return [ItemHistory(item, tuple(await ledger.attempts_of(item.id)), now) for item in items]


async def find_items(ledger: BaseLedger, manifest: Manifest, name: str) -> list[LedgerItem]:
    """The items `name` stands for: by source first, then by target name."""
    target = manifest.target.base_url
    for source in _source_spellings(manifest, name):
        found = await ledger.with_source(target, source)
        if found:
            return found
    if "://" in name:
        shown = without_credentials(name)
        return [
            item
            async for item in ledger.iter_items(target, kind=SourceKind.URL)
            if without_credentials(item.source) == shown
        ]
    for upload_path, file_name in _key_spellings(manifest, name):
        item = await ledger.get(target, upload_path, file_name)
        if item is not None:
            return [item]
    return []


def _source_spellings(manifest: Manifest, name: str) -> list[str]:
    """`name` as the ledger may hold it: as given, and a path made absolute from here
    and from the manifest's folder, with its links followed (path sources are)."""
    if "://" in name:
        return [name]
    spellings = [name]
    for base in (Path.cwd(), manifest.base_dir):
        path = base / Path(name).expanduser()
        spellings += [os.path.normpath(path), os.path.realpath(path)]
    return list(dict.fromkeys(spellings))


def _key_spellings(manifest: Manifest, name: str) -> list[tuple[str, str]]:
    """`upload_path/file_name`, whole or below the target's own upload_path."""
    key = name.strip("/")
    keys = [key, join_upload_path(manifest.target.upload_path, key)]
    return [(posixpath.dirname(k), posixpath.basename(k)) for k in dict.fromkeys(keys)]


async def _unknown(ledger: BaseLedger, manifest: Manifest, name: str) -> str:
    message = f"no item {printable(without_credentials(name))} in the ledger of {manifest.path}"
    close = await _close_names(ledger, manifest.target.base_url, name)
    return message + (f"; did you mean {' or '.join(close)}?" if close else "")


async def _close_names(ledger: BaseLedger, target: str, name: str) -> list[str]:
    """Target names of the ledger close to `name`, when the ledger is small enough to
    compare with all of them cheaply."""
    count, _ = await ledger.count_items(target)
    if not count or count > SUGGEST_AMONG:
        return []
    keys = [join_upload_path(path, file) async for path, file in ledger.iter_keys(target)]
    wanted = name.strip("/")
    close = difflib.get_close_matches(wanted, keys, n=SUGGESTIONS, cutoff=0.6)
    if not close:  # a path typed for a name: compare the last parts
        tail = posixpath.basename(wanted)
        close = [k for k in keys if posixpath.basename(k) == tail][:SUGGESTIONS]
    return [printable(k) for k in close]
