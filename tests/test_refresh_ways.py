"""Where a refresh takes an item's bytes from, and how long an upload lives (pure)."""

from __future__ import annotations

from dataclasses import replace

from migrator.model import HOUR, ItemState, LedgerItem, Method, Settings, SourceKind, UploadReceipt
from migrator.refresh import refresh_ways
from migrator.transfer import upload_lifetime

NOW = 1_800_000_000.0
SETTINGS = Settings(base64_max=1024, url_max=10_000)


def row(**fields: object) -> LedgerItem:
    base = LedgerItem(
        id=1,
        target="https://service.test",
        upload_path="up",
        file_name="a.bin",
        source="/data/a.bin",
        kind=SourceKind.FILE,
        size=500,
        mtime_ns=1,
        etag=None,
        last_modified=None,
        sha256=None,
        method=Method.BASE64,
        state=ItemState.DONE,
        download_url="https://files.test/up/a.bin",
        file_id="f1",
        uploaded_at=NOW - 70 * HOUR,
        expires_at=NOW + 2 * HOUR,
        attempts=1,
        last_error=None,
    )
    return replace(base, **fields)  # type: ignore[arg-type]


def ways(item: LedgerItem, *, local_unchanged: bool = True) -> list[tuple[str, Method]]:
    found = refresh_ways(item, local_unchanged=local_unchanged, now=NOW, settings=SETTINGS)
    return [(rung.send.source, rung.send.method) for rung in found]


def rungs(item: LedgerItem, *, local_unchanged: bool = True) -> list[str]:
    found = refresh_ways(item, local_unchanged=local_unchanged, now=NOW, settings=SETTINGS)
    return [rung.name for rung in found]


def test_an_unchanged_local_file_comes_first_by_its_size_method() -> None:
    assert ways(row())[0] == ("/data/a.bin", Method.BASE64)


def test_a_changed_local_file_is_never_used() -> None:
    assert ways(row(), local_unchanged=False) == [("https://files.test/up/a.bin", Method.URL)]


def test_a_live_link_is_copied_by_the_service_itself() -> None:
    assert ("https://files.test/up/a.bin", Method.URL) in ways(row())


def test_a_live_link_above_url_max_is_streamed_through() -> None:
    big = row(size=20_000)
    assert ways(big, local_unchanged=False) == [("https://files.test/up/a.bin", Method.STREAM)]


def test_an_expired_link_is_not_offered() -> None:
    assert ways(row(expires_at=NOW - 1), local_unchanged=False) == []


def test_once_its_link_is_dead_a_url_source_is_streamed_through_from_its_origin() -> None:
    remote = row(source="https://origin.test/a.bin", kind=SourceKind.URL, expires_at=NOW - 1)
    assert ways(remote) == [("https://origin.test/a.bin", Method.STREAM)]


def test_the_service_expiry_is_trusted_when_the_answer_has_it() -> None:
    receipt = UploadReceipt("https://f", uploaded_at=NOW - 5, expires_at=NOW + 10 * HOUR)
    assert upload_lifetime(receipt, NOW, ttl=72 * HOUR) == (NOW - 5, NOW + 10 * HOUR)


def test_without_expires_at_the_upload_lives_ttl_from_its_upload_time() -> None:
    receipt = UploadReceipt("https://f", uploaded_at=NOW - 5)
    assert upload_lifetime(receipt, NOW, ttl=HOUR) == (NOW - 5, NOW - 5 + HOUR)


def test_without_any_time_the_upload_lives_ttl_from_when_the_answer_came() -> None:
    assert upload_lifetime(UploadReceipt("https://f"), NOW, ttl=HOUR) == (NOW, NOW + HOUR)


def test_while_its_link_lives_the_service_copy_comes_before_the_origin() -> None:
    remote = row(source="https://origin.test/a.bin", kind=SourceKind.URL)
    assert ways(remote) == [
        ("https://files.test/up/a.bin", Method.URL),
        ("https://origin.test/a.bin", Method.STREAM),
    ]


def test_a_link_found_dead_is_never_offered_though_its_expiry_is_ahead() -> None:
    assert rungs(row(state=ItemState.DEAD)) == ["local"]


def test_a_downloaded_copy_comes_after_the_service_copy_and_before_the_origin() -> None:
    remote = row(
        source="https://origin.test/a.bin",
        kind=SourceKind.URL,
        sha256="ab" * 32,
        downloaded_path="/home/a.bin",
    )
    assert rungs(remote) == ["copy", "download", "origin"]
    assert ways(remote)[1] == ("/home/a.bin", Method.BASE64)


def test_a_download_without_a_recorded_hash_is_not_offered() -> None:
    assert "download" not in rungs(row(downloaded_path="/home/a.bin", sha256=None))


def test_with_nothing_left_the_ladder_is_empty() -> None:
    assert rungs(row(expires_at=NOW - 1), local_unchanged=False) == []
