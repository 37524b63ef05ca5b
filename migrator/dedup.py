"""Identical content crosses the wire once (`settings.dedup`, on by default).

Within a job, a local file above base64_max whose size and sha256 equal those of an
item the service holds (done, its link not expired, not found dead) is uploaded as a
server-side copy: a URL upload of that item's link, which the service fetches from
itself, instead of its bytes. Only a file whose size another local file of the plan
shares is hashed before it is sent (`check_plan` notes those sizes), so a tree
without duplicates reads nothing twice.

Two files with the same bytes in flight at once: the second waits for the first and
copies its fresh link. Waiting holds one worker for the length of one upload; both
sending would move the bytes twice, which is what this is here to avoid. A copy that
fails (the link died) falls back to sending the bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from migrator.clock import ServiceClock
from migrator.ledger import BaseLedger
from migrator.logs import get_logger
from migrator.model import Method, PlanItem, SourceKind
from migrator.transfer import sha256_of

COPY_MARGIN = 600.0  # seconds a link must still live to be copied: the fetch takes time

log = get_logger("migrator.dedup")


@dataclass(frozen=True, slots=True)
class Content:
    """Bytes, as far as dedup tells them apart."""

    size: int
    sha256: str


@dataclass(slots=True)
class Claim:
    """What one item learnt before it is sent, and the link it got once it was."""

    content: Content | None = None  # hashed before sending; None: not worth it
    original: str | None = None  # a link serving the same bytes: copy it
    link: str | None = None  # the link this item now has with `content`'s bytes


def worth_hashing(item: PlanItem, shared_sizes: frozenset[int]) -> bool:
    """A local file streamed by size (not a named method) whose size another file of the
    plan has (pure)."""
    return (
        item.kind is SourceKind.FILE
        and item.method is Method.STREAM
        and not item.method_forced
        and item.size in shared_sizes
    )


class Contents:
    """One run's knowledge of the bytes the service holds, by content."""

    def __init__(
        self, ledger: BaseLedger, target: str, clock: ServiceClock, shared_sizes: frozenset[int]
    ) -> None:
        self.ledger = ledger
        self.target = target
        self.clock = clock
        self.shared_sizes = shared_sizes
        self.hashed = 0  # files read to hash them before sending
        self.copied = 0  # items copied on the service instead of sent
        self.bytes_saved = 0
        self._in_flight: dict[Content, asyncio.Future[str | None]] = {}

    @contextlib.asynccontextmanager
    async def claim(self, item: PlanItem) -> AsyncIterator[Claim]:
        """Hash the item when its size is shared; find the same bytes on the service, or
        in flight (then wait for them); else lead: later items with these bytes wait
        for this one's link (`Claim.link`, set by the caller once it is done)."""
        content = await self._content_of(item) if worth_hashing(item, self.shared_sizes) else None
        if content is None:
            yield Claim()
            return
        while (first := self._in_flight.get(content)) is not None:
            link = await asyncio.shield(first)
            if link is not None:
                yield Claim(content, link)
                return
        async with self._leading(content) as claim:
            claim.original = await self._held(content, item)
            yield claim

    def copied_one(self, size: int) -> None:
        self.copied += 1
        self.bytes_saved += size

    def note(self) -> str | None:
        """What dedup did, for the operator; None when it did nothing."""
        if not self.hashed:
            return None
        return (
            f"dedup: {self.copied} files copied on the service from identical uploads "
            f"({self.bytes_saved} bytes not sent); {self.hashed} files hashed to find them"
        )

    @contextlib.asynccontextmanager
    async def _leading(self, content: Content) -> AsyncIterator[Claim]:
        done: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()
        self._in_flight[content] = done
        claim = Claim(content)
        try:
            yield claim
        finally:
            del self._in_flight[content]
            done.set_result(claim.link)  # None: the ones waiting try for themselves

    async def _content_of(self, item: PlanItem) -> Content | None:
        """The file's size and sha256, when it still is the file that was planned."""
        self.hashed += 1
        try:
            digest = await asyncio.to_thread(_hash_if_unchanged, item)
        except OSError:
            digest = None  # the upload attempt will say what is wrong with the file
        log.info("dedup.hashed", item=item.source, size=item.size, same=digest is not None)
        if digest is None or item.size is None:
            return None
        return Content(item.size, digest)

    async def _held(self, content: Content, item: PlanItem) -> str | None:
        """The link of another done item with these bytes, alive for a while yet."""
        row = await self.ledger.find_content(
            self.target,
            content.size,
            content.sha256,
            alive_at=self.clock.now() + COPY_MARGIN,
            other_than=item.key,
        )
        return None if row is None else row.download_url


def _hash_if_unchanged(item: PlanItem) -> str | None:
    """sha256 of the file, or None when its size or mtime is not the planned one
    (before or after reading it): the hash would not describe what the row records."""
    path = Path(item.source)
    planned = (item.size, item.mtime_ns)
    if _identity(path) != planned:
        return None
    digest = sha256_of(path)
    return digest if _identity(path) == planned else None


def _identity(path: Path) -> tuple[int, int]:
    info = path.stat()
    return info.st_size, info.st_mtime_ns
