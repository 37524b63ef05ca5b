"""`migrator verify`: ask every recorded link whether it still serves its bytes.

An operation over the command core that sends no upload. Each link is asked with a
HEAD, or a one-byte ranged GET where HEAD is refused, and its status and size are
compared with the ledger: 404/410 is recorded `dead`, another size `mismatch`,
each with when it was found (on the service's clock), and a link found serving its
bytes again is `done` again. `refresh` and `run` then upload the dead ones again
from whatever copy is left.

Links that die before their stated expiry are measured: how long after upload, and
how long before `expires_at`, which says whether `refresh_within` is long enough.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from migrator.clock import ServiceClock
from migrator.command import (
    CommandOptions,
    CommandSession,
    CommandSummary,
    Observer,
    Totals,
    execute,
)
from migrator.errors import Interrupted, UploadError
from migrator.ledger import BaseLedger, open_ledger
from migrator.lifetimes import DEATHS_FACT, Deaths
from migrator.logs import get_logger
from migrator.model import LINKED_STATES, ItemState, ItemUpdate, LedgerItem, Manifest, Outcome
from migrator.settle import link_verdict
from migrator.transfer import LinkCheck, Step, check_link

log = get_logger("migrator.verify")


@dataclass(frozen=True, slots=True)
class Sample:
    """Probe a sample: `count` items chosen at random, or each item with `fraction`."""

    count: int | None = None
    fraction: float | None = None

    @classmethod
    def parse(cls, text: str) -> Sample:
        """`500` or `5%` (pure); ValueError with the reason."""
        value = text.strip()
        try:
            if value.endswith("%"):
                percent = float(value[:-1])
                if not 0 < percent <= 100:
                    raise ValueError
                return cls(fraction=percent / 100)
            count = int(value)
            if count < 1:
                raise ValueError
            return cls(count=count)
        except ValueError:
            raise ValueError(f"{text!r} is not a sample (a count such as 500, or 5%)") from None


@dataclass(frozen=True, slots=True)
class VerifyOptions(CommandOptions):
    within: float | None = None  # only links that expire within this; None: all
    sample: Sample | None = None  # None: every link


async def verify(
    manifest: Manifest,
    options: VerifyOptions | None = None,
    observer: Observer | None = None,
    *,
    environ: Mapping[str, str] | None = None,
) -> CommandSummary:
    """Probe the recorded links; dead and mismatched ones are recorded as such."""
    opts = options or VerifyOptions()
    operation = VerifyOperation(manifest, opts)
    return await execute(operation, manifest, opts, observer, environ=environ)


@dataclass(slots=True)
class VerifyOperation:
    manifest: Manifest
    options: VerifyOptions
    deaths: Deaths = field(default_factory=Deaths)
    name: str = "verify"
    uses_api: bool = False
    needs_clock: bool = True

    async def prepare(self) -> None:
        """Nothing to check before the ledger opens."""

    async def totals(self, ledger: BaseLedger, clock: ServiceClock) -> Totals:
        target = self.manifest.target.base_url
        count, _bytes = await ledger.count_items(target, **self._filter(clock))
        sample = self.options.sample
        if sample is not None and sample.count is not None:
            count = min(count, sample.count)
        elif sample is not None and sample.fraction is not None:
            count = round(count * sample.fraction)
        return Totals(count, 0)

    def items(self, session: CommandSession) -> AsyncIterator[LedgerItem]:
        return self._rows(session.ledger, session.clock)

    async def handle(self, session: CommandSession, row: LedgerItem) -> None:
        url = row.download_url or ""
        session.observer.on_item_start(row.source)
        attempts = session.attempts(row.upload_path, row.file_name, row.source)
        step = Step("probe", url, lambda meter: check_link(session.conn, url))
        try:
            check = await attempts.one(step)
        except Interrupted:
            session.finish(row.source, Outcome.INTERRUPTED)
            return
        except UploadError as err:
            if session.is_fatal(err):
                session.stop_for(err)
            log.warning("verify.failed", item=row.source, error=str(err))
            session.finish(row.source, Outcome.FAILED, str(err))
            return
        self._record(session, row, check, attempts.made)

    async def preview(self, clock: ServiceClock) -> AsyncGenerator[tuple[str, str | None], None]:
        async with (
            await open_ledger(self.manifest, readonly=True) as ledger,
            contextlib.aclosing(self._rows(ledger, clock)) as rows,
        ):
            async for row in rows:
                yield row.source, "probe"

    async def conclude(self, session: CommandSession) -> list[str]:
        """Remember how early links died; say so when they did."""
        if self.deaths.count:
            await session.ledger.set_fact(DEATHS_FACT, self.deaths.as_dict())
        note = self.deaths.note(self.manifest.settings.refresh_within)
        return [note] if note else []

    def _record(
        self, session: CommandSession, row: LedgerItem, check: LinkCheck, attempts: int
    ) -> None:
        verdict = link_verdict(check, row.size)
        now = session.clock.now()
        if verdict is Outcome.ALIVE:
            session.ledger.put_item(ItemUpdate.link_alive(row, now))
            session.finish(row.source, verdict)
            return
        if verdict is Outcome.DEAD:
            state, reason = ItemState.DEAD, f"link answered HTTP {check.status}"
        else:
            state, reason = ItemState.MISMATCH, f"link serves {check.size} bytes, not {row.size}"
        found_at = row.dead_at if row.dead_at is not None else now
        update = ItemUpdate.link_dead(row, state, reason, now, attempts=attempts)
        session.ledger.put_item(update)
        if row.uploaded_at is not None and row.expires_at is not None:
            self.deaths = self.deaths.add(row.uploaded_at, found_at, row.expires_at)
        log.warning("link.dead", item=row.source, url=row.download_url, verdict=verdict)
        session.finish(row.source, verdict, reason)

    def _filter(self, clock: ServiceClock) -> dict[str, Any]:
        within = self.options.within
        return {
            "states": sorted(LINKED_STATES),
            "expiring_before": None if within is None else clock.now() + within,
        }

    async def _rows(
        self, ledger: BaseLedger, clock: ServiceClock
    ) -> AsyncGenerator[LedgerItem, None]:
        rows = ledger.iter_items(self.manifest.target.base_url, **self._filter(clock))
        sample = self.options.sample
        rng = random.Random(self.options.seed)
        if sample is not None and sample.count is not None:
            for row in await _reservoir(rows, sample.count, rng):
                yield row
            return
        async for row in rows:
            if row.download_url and (sample is None or rng.random() < (sample.fraction or 1)):
                yield row


async def _reservoir(
    rows: AsyncIterator[LedgerItem], size: int, rng: random.Random
) -> list[LedgerItem]:
    """`size` rows chosen uniformly at random from a stream of unknown length."""
    chosen: list[LedgerItem] = []
    seen = 0
    async for row in rows:
        if not row.download_url:
            continue
        seen += 1
        if len(chosen) < size:
            chosen.append(row)
        elif (slot := rng.randrange(seen)) < size:
            chosen[slot] = row
    return sorted(chosen, key=lambda row: row.id)
