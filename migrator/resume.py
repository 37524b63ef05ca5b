"""Whether a planned item needs uploading, given what the ledger holds (pure).

The rule a re-run lives by: an item is skipped when it is done *for this target*,
its source is unchanged, and its upload does not expire within `refresh_within`
(judged on the service's clock: `now` is the service's time). An item whose link
was found dead, or that was lost, is uploaded again as soon as its source is there.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from enum import StrEnum
from typing import Protocol, overload

from migrator.model import ItemState, LedgerItem, PlanItem, SourceKind


class Decision(StrEnum):
    NEW = "new"  # the ledger has never seen this target name
    RETRY = "retry"  # seen, but not done (failed, interrupted, pending)
    DEAD = "dead"  # done once, but its link was found dead or serving other bytes
    LOST = "lost"  # gone from the service with no source left, and now a source is back
    CHANGED = "changed"  # done, but the source is not what was uploaded
    EXPIRING = "expiring"  # done and unchanged, but expires within refresh_within
    VERIFY = "verify"  # done, same size; --checksum: compare sha256 (mtime may differ)
    UNCHANGED = "unchanged"  # done, unchanged, alive: nothing to do

    @property
    def needs_upload(self) -> bool:
        return self not in (Decision.UNCHANGED, Decision.VERIFY)


class Recorded(Protocol):
    """What deciding reads of a ledger row: a `LedgerItem`, or the lighter `ledger.Found`."""

    @property
    def state(self) -> ItemState: ...
    @property
    def source(self) -> str: ...
    @property
    def kind(self) -> SourceKind: ...
    @property
    def size(self) -> int | None: ...
    @property
    def mtime_ns(self) -> int | None: ...
    @property
    def etag(self) -> str | None: ...
    @property
    def last_modified(self) -> str | None: ...
    @property
    def sha256(self) -> str | None: ...
    @property
    def expires_at(self) -> float | None: ...


def decide(
    item: PlanItem,
    row: Recorded | None,
    *,
    now: float,
    refresh_within: float,
    checksum: bool = False,
) -> Decision:
    """Compare one planned item with its ledger row."""
    if row is None:
        return Decision.NEW
    if row.state in (ItemState.DEAD, ItemState.MISMATCH):
        return Decision.DEAD
    if row.state is ItemState.LOST:
        return Decision.LOST
    if row.state is not ItemState.DONE:
        return Decision.RETRY
    by_bytes = checksum and item.kind is SourceKind.FILE and row.sha256 is not None
    if source_changed(item, row) and not (by_bytes and only_mtime_changed(item, row)):
        return Decision.CHANGED
    if row.expires_at is None or row.expires_at - now <= refresh_within:
        return Decision.EXPIRING
    return Decision.VERIFY if by_bytes else Decision.UNCHANGED


Entry = tuple[PlanItem, Decision, LedgerItem | None]
"""A planned item, its decision, and its ledger row when there is work to do on it."""


class DecidedBatch(Sequence[Entry]):
    """A batch of the plan joined with the ledger, held as the batch itself (its
    `LocalItems` columns, for one), the decisions in its order, and the rows of the
    items with work: an `Entry` is made only when one is asked for."""

    __slots__ = ("decisions", "items", "keys", "rows")

    def __init__(
        self,
        items: Sequence[PlanItem],
        decisions: Sequence[Decision],
        keys: Sequence[tuple[str, str]],
        rows: Mapping[tuple[str, str], LedgerItem],
    ) -> None:
        self.items = items
        self.decisions = decisions
        self.keys = keys  # each item's key, in order
        self.rows = rows

    def __len__(self) -> int:
        return len(self.items)

    @overload
    def __getitem__(self, index: int) -> Entry: ...
    @overload
    def __getitem__(self, index: slice) -> Sequence[Entry]: ...
    def __getitem__(self, index: int | slice) -> Entry | Sequence[Entry]:
        if isinstance(index, slice):
            return [self._entry(i) for i in range(*index.indices(len(self.items)))]
        return self._entry(range(len(self.items))[index])

    def __iter__(self) -> Iterator[Entry]:
        rows = self.rows
        for item, decision, key in zip(self.items, self.decisions, self.keys, strict=True):
            yield item, decision, rows.get(key) if rows else None

    def _entry(self, index: int) -> Entry:
        row = self.rows.get(self.keys[index]) if self.rows else None
        return self.items[index], self.decisions[index], row


def only_mtime_changed(item: PlanItem, row: Recorded) -> bool:
    """The same local file at the same size, touched (a `cp` without `-p`, a restore,
    a checkout): with --checksum its bytes decide, as in rsync and rclone."""
    return (
        item.kind is SourceKind.FILE
        and item.source == row.source
        and row.kind is SourceKind.FILE
        and item.size == row.size
        and item.mtime_ns != row.mtime_ns
    )


def source_changed(item: PlanItem, row: Recorded) -> bool:
    """True when the bytes at the source may differ from those uploaded."""
    if item.source != row.source or item.kind is not row.kind:
        return True
    if item.kind is SourceKind.FILE:
        return item.size != row.size or item.mtime_ns != row.mtime_ns
    return _remote_changed(item, row)


def _remote_changed(item: PlanItem, row: Recorded) -> bool:
    # Trust the strongest validator both sides have; an origin that tells nothing
    # (no ETag, no Last-Modified, no length) is taken as unchanged.
    if item.etag and row.etag:
        return item.etag != row.etag
    if item.last_modified and row.last_modified:
        return item.last_modified != row.last_modified
    if item.size is not None and row.size is not None:
        return item.size != row.size
    return False
