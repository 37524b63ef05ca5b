"""Uploads whose answer never came: wait for them to land, then believe only the link.

With overwrite semantics an upload the client gave up on (a read timeout, a cut
connection, a gateway's 502, a kill) can still land later, and replace what a retry
put under the same name: the link the ledger recorded then answers 404. Such items
are marked uncertain when it happens; before the first item of the next uploading
command, and after the last item of this one, their links are probed once the
`settle` delay has passed since. A link that answers is believed again; a dead one
is recorded dead, and uploaded again (by this `run` when found at its start).
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from migrator.errors import Interrupted, UploadError
from migrator.logs import get_logger
from migrator.model import LINKED_STATES, ItemState, ItemUpdate, LedgerItem, Outcome
from migrator.transfer import LinkCheck, Step, check_link

if TYPE_CHECKING:
    from migrator.command import CommandSession

log = get_logger("migrator.settle")


def link_verdict(check: LinkCheck, recorded_size: int | None) -> Outcome:
    """What a probe says of a link (pure): alive, dead, or serving another size."""
    if check.gone:
        return Outcome.DEAD
    if recorded_size is not None and check.size is not None and check.size != recorded_size:
        return Outcome.MISMATCH
    return Outcome.ALIVE


async def settle_uncertain(session: CommandSession) -> str | None:
    """Probe the links of uncertain uploads once they had `settle` seconds to land;
    returns a note for the operator when there were any."""
    target = session.target_id
    rows = [
        row async for row in session.ledger.iter_items(target, states=LINKED_STATES, uncertain=True)
    ]
    if not rows:
        return None
    newest = max(row.uncertain_at or 0.0 for row in rows)
    wait = newest + session.manifest.settings.settle - session.clock.now()
    if wait > 0 and not await session.sleep(wait):
        return None
    gate = asyncio.Semaphore(session.workers)

    async def check(row: LedgerItem) -> Outcome | None:
        async with gate:
            return await _check_one(session, row)

    verdicts = await asyncio.gather(*(check(row) for row in rows))
    dead = sum(verdict in (Outcome.DEAD, Outcome.MISMATCH) for verdict in verdicts)
    log.info("settle.checked", items=len(rows), dead=dead)
    if not dead:
        return None
    return (
        f"{dead} of {len(rows)} uploads whose answer was uncertain were replaced by a late "
        "upload: their links are recorded dead, and uploaded again"
    )


async def _check_one(session: CommandSession, row: LedgerItem) -> Outcome | None:
    url = row.download_url or ""
    attempts = session.attempts(row.upload_path, row.file_name, row.source)
    step = Step("probe", url, lambda meter: check_link(session.conn, url))
    try:
        verdict = link_verdict(await attempts.one(step), row.size)
    except (UploadError, Interrupted):
        return None  # no evidence: still uncertain, checked again next time
    now = session.clock.now()
    if verdict is Outcome.ALIVE:
        session.ledger.put_item(ItemUpdate.link_alive(row, now))
    else:
        state = ItemState.DEAD if verdict is Outcome.DEAD else ItemState.MISMATCH
        reason = "a late upload replaced it: its link no longer serves the item"
        session.ledger.put_item(ItemUpdate.link_dead(row, state, reason, now))
        log.warning("link.dead", item=row.source, url=url, found_by="settle")
    return verdict
