"""`resume.decide`: what a re-run does with each planned item, given its ledger row (pure)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from migrator.model import HOUR, ItemState, LedgerItem, Method, PlanItem, SourceKind
from migrator.resume import Decision, decide

NOW = 1_800_000_000.0
WITHIN = 12 * HOUR

FILE_ITEM = PlanItem(
    source="/data/a.txt",
    kind=SourceKind.FILE,
    upload_path="mig",
    file_name="a.txt",
    size=100,
    method=Method.BASE64,
    mtime_ns=1_000,
)
URL_ITEM = PlanItem(
    source="http://origin/a.bin",
    kind=SourceKind.URL,
    upload_path="mig",
    file_name="a.bin",
    size=500,
    method=Method.URL,
    etag='"v1"',
    last_modified="Mon, 01 Jan 2024 00:00:00 GMT",
)


def row_for(item: PlanItem, **changes: object) -> LedgerItem:
    """A done, unchanged, long-lived ledger row for `item`, with `changes` applied."""
    row = LedgerItem(
        id=1,
        target="http://service",
        upload_path=item.upload_path,
        file_name=item.file_name,
        source=item.source,
        kind=item.kind,
        size=item.size,
        mtime_ns=item.mtime_ns,
        etag=item.etag,
        last_modified=item.last_modified,
        sha256="ab" * 32,
        method=item.method,
        state=ItemState.DONE,
        download_url="http://service/files/x/a",
        file_id="x",
        uploaded_at=NOW - HOUR,
        expires_at=NOW + 71 * HOUR,
        attempts=1,
        last_error=None,
    )
    return replace(row, **changes)  # type: ignore[arg-type]


def decide_now(item: PlanItem, row: LedgerItem | None, *, checksum: bool = False) -> Decision:
    return decide(item, row, now=NOW, refresh_within=WITHIN, checksum=checksum)


def test_an_item_the_ledger_never_saw_is_new() -> None:
    assert decide_now(FILE_ITEM, None) is Decision.NEW


@pytest.mark.parametrize("state", [ItemState.PENDING, ItemState.FAILED, ItemState.INTERRUPTED])
def test_an_item_not_done_is_retried(state: ItemState) -> None:
    assert decide_now(FILE_ITEM, row_for(FILE_ITEM, state=state)) is Decision.RETRY


@pytest.mark.parametrize("state", [ItemState.DEAD, ItemState.MISMATCH])
def test_an_item_whose_link_was_found_dead_is_uploaded_again(state: ItemState) -> None:
    decision = decide_now(FILE_ITEM, row_for(FILE_ITEM, state=state))
    assert decision is Decision.DEAD
    assert decision.needs_upload


def test_a_lost_item_whose_source_is_back_is_uploaded_again() -> None:
    decision = decide_now(FILE_ITEM, row_for(FILE_ITEM, state=ItemState.LOST))
    assert decision is Decision.LOST
    assert decision.needs_upload


def test_a_done_unchanged_live_file_is_skipped() -> None:
    assert decide_now(FILE_ITEM, row_for(FILE_ITEM)) is Decision.UNCHANGED


def test_a_file_of_another_size_is_changed() -> None:
    assert decide_now(FILE_ITEM, row_for(FILE_ITEM, size=99)) is Decision.CHANGED


def test_a_file_with_another_mtime_is_changed() -> None:
    assert decide_now(FILE_ITEM, row_for(FILE_ITEM, mtime_ns=2_000)) is Decision.CHANGED


def test_another_source_landing_on_the_same_name_is_changed() -> None:
    assert decide_now(FILE_ITEM, row_for(FILE_ITEM, source="/data/other.txt")) is Decision.CHANGED


def test_a_done_item_expiring_within_refresh_within_is_uploaded_again() -> None:
    row = row_for(FILE_ITEM, expires_at=NOW + WITHIN - 1)
    assert decide_now(FILE_ITEM, row) is Decision.EXPIRING


def test_a_done_item_without_expiry_is_uploaded_again() -> None:
    assert decide_now(FILE_ITEM, row_for(FILE_ITEM, expires_at=None)) is Decision.EXPIRING


def test_a_done_item_expiring_after_refresh_within_is_skipped() -> None:
    row = row_for(FILE_ITEM, expires_at=NOW + WITHIN + 1)
    assert decide_now(FILE_ITEM, row) is Decision.UNCHANGED


def test_checksum_asks_to_verify_a_file_that_looks_unchanged() -> None:
    assert decide_now(FILE_ITEM, row_for(FILE_ITEM), checksum=True) is Decision.VERIFY


def test_checksum_cannot_verify_without_a_recorded_sha256() -> None:
    row = row_for(FILE_ITEM, sha256=None)
    assert decide_now(FILE_ITEM, row, checksum=True) is Decision.UNCHANGED


def test_checksum_does_not_apply_to_remote_sources() -> None:
    assert decide_now(URL_ITEM, row_for(URL_ITEM), checksum=True) is Decision.UNCHANGED


def test_checksum_asks_to_verify_a_touched_file_of_the_same_size() -> None:
    touched = replace(FILE_ITEM, mtime_ns=(FILE_ITEM.mtime_ns or 0) + 1)
    assert decide_now(touched, row_for(FILE_ITEM), checksum=True) is Decision.VERIFY


def test_without_checksum_a_touched_file_is_changed() -> None:
    touched = replace(FILE_ITEM, mtime_ns=(FILE_ITEM.mtime_ns or 0) + 1)
    assert decide_now(touched, row_for(FILE_ITEM)) is Decision.CHANGED


def test_checksum_takes_a_file_of_another_size_as_changed() -> None:
    resized = replace(FILE_ITEM, size=(FILE_ITEM.size or 0) + 1, mtime_ns=1)
    assert decide_now(resized, row_for(FILE_ITEM), checksum=True) is Decision.CHANGED


def test_checksum_still_uploads_a_touched_file_that_expires_soon() -> None:
    touched = replace(FILE_ITEM, mtime_ns=(FILE_ITEM.mtime_ns or 0) + 1)
    row = row_for(FILE_ITEM, expires_at=NOW + 1)
    assert decide_now(touched, row, checksum=True) is Decision.EXPIRING


def test_only_verify_and_unchanged_need_no_upload() -> None:
    assert {d for d in Decision if not d.needs_upload} == {Decision.UNCHANGED, Decision.VERIFY}


def test_a_remote_file_with_another_etag_is_changed() -> None:
    assert decide_now(URL_ITEM, row_for(URL_ITEM, etag='"v2"')) is Decision.CHANGED


def test_a_matching_etag_wins_over_a_different_last_modified() -> None:
    row = row_for(URL_ITEM, last_modified="Tue, 02 Jan 2024 00:00:00 GMT")
    assert decide_now(URL_ITEM, row) is Decision.UNCHANGED


def test_without_etags_a_different_last_modified_is_changed() -> None:
    item = replace(URL_ITEM, etag=None)
    row = row_for(item, last_modified="Tue, 02 Jan 2024 00:00:00 GMT")
    assert decide_now(item, row) is Decision.CHANGED


def test_without_validators_a_different_remote_size_is_changed() -> None:
    item = replace(URL_ITEM, etag=None, last_modified=None)
    assert decide_now(item, row_for(item, size=501)) is Decision.CHANGED


def test_a_remote_file_whose_origin_tells_nothing_is_taken_as_unchanged() -> None:
    item = replace(URL_ITEM, etag=None, last_modified=None, size=None)
    assert decide_now(item, row_for(item, size=500)) is Decision.UNCHANGED
