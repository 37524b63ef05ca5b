"""Small local files read whole, several per trip to a thread (transfer.WholeFiles)."""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path

import pytest

from migrator.errors import PermanentError, SourceGoneError
from migrator.transfer import READ_BATCH, WholeFiles


def _files(folder: Path, count: int) -> list[Path]:
    paths = []
    for number in range(count):
        path = folder / f"f{number}.bin"
        path.write_bytes(f"file {number} ".encode() * (number + 1))
        paths.append(path)
    return paths


async def test_each_read_gets_its_own_file_its_mtime_and_its_hash(tmp_path: Path) -> None:
    files, paths = WholeFiles(), _files(tmp_path, 5)
    digests = [hashlib.sha256() for _ in paths]
    wholes = await asyncio.gather(
        *(files.read(str(p), 1024, d) for p, d in zip(paths, digests, strict=True))
    )
    for path, digest, whole in zip(paths, digests, wholes, strict=True):
        assert whole == (path.read_bytes(), path.stat().st_mtime_ns)
        assert digest.hexdigest() == hashlib.sha256(path.read_bytes()).hexdigest()


async def test_reads_asked_for_in_one_turn_of_the_loop_share_one_trip(tmp_path: Path) -> None:
    files, paths = WholeFiles(), _files(tmp_path, 10)
    await asyncio.gather(*(files.read(str(p), 1024, hashlib.sha256()) for p in paths))
    assert files.trips == 1


async def test_a_trip_reads_at_most_a_batch_of_files(tmp_path: Path) -> None:
    files, paths = WholeFiles(lanes=1), _files(tmp_path, READ_BATCH + 1)
    await asyncio.gather(*(files.read(str(p), 1 << 20, hashlib.sha256()) for p in paths))
    assert files.trips == 2


async def test_a_file_past_the_limit_is_not_read(tmp_path: Path) -> None:
    (path,) = _files(tmp_path, 1)
    assert await WholeFiles().read(str(path), 3, hashlib.sha256()) is None


async def test_a_missing_file_fails_its_own_read_only(tmp_path: Path) -> None:
    files, (path,) = WholeFiles(), _files(tmp_path, 1)
    good, gone = await asyncio.gather(
        files.read(str(path), 1024, hashlib.sha256()),
        files.read(str(tmp_path / "gone.bin"), 1024, hashlib.sha256()),
        return_exceptions=True,
    )
    assert good == (path.read_bytes(), path.stat().st_mtime_ns)
    assert isinstance(gone, SourceGoneError)


async def test_a_link_in_place_of_the_file_is_refused(tmp_path: Path) -> None:
    (path,) = _files(tmp_path, 1)
    link = tmp_path / "link.bin"
    link.symlink_to(path)
    with pytest.raises(PermanentError, match="symbolic link"):
        await WholeFiles().read(str(link), 1024, hashlib.sha256())


async def test_a_read_given_up_meanwhile_leaves_the_others_theirs(tmp_path: Path) -> None:
    files, paths = WholeFiles(), _files(tmp_path, 3)
    reads = [asyncio.create_task(files.read(str(p), 1024, hashlib.sha256())) for p in paths]
    await asyncio.sleep(0)
    reads[1].cancel()
    first, _, last = await asyncio.gather(*reads, return_exceptions=True)
    assert first == (paths[0].read_bytes(), paths[0].stat().st_mtime_ns)
    assert last == (paths[2].read_bytes(), paths[2].stat().st_mtime_ns)
    assert await files.read(str(paths[1]), 1024, hashlib.sha256()) is not None


def _big_files(folder: Path, count: int) -> list[Path]:
    """Files enough to keep a trip out for a few turns of the loop."""
    paths = []
    for number in range(count):
        path = folder / f"big{number}.bin"
        path.write_bytes(bytes([number]) * (256 * 1024))
        paths.append(path)
    return paths


async def _reads_in_three_turns(files: WholeFiles, folder: Path) -> None:
    """A trip of big files, then two small reads, each asked in a turn of its own."""
    first = [files.read(str(p), 1 << 20, hashlib.sha256()) for p in _big_files(folder, 32)]
    reads = [asyncio.ensure_future(asyncio.gather(*first))]
    for path in _files(folder, 2):
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        reads.append(asyncio.ensure_future(files.read(str(path), 1024, hashlib.sha256())))
    await asyncio.gather(*reads)


async def test_reads_asked_while_a_trip_is_out_wait_for_it_and_go_together(
    tmp_path: Path,
) -> None:
    files = WholeFiles(lanes=4, stall=60.0)
    await _reads_in_three_turns(files, tmp_path)
    assert files.trips == 2


async def test_a_trip_out_past_the_stall_limit_lets_waiting_reads_take_another_lane(
    tmp_path: Path,
) -> None:
    files = WholeFiles(lanes=4, stall=0.0)
    await _reads_in_three_turns(files, tmp_path)
    assert files.trips == 3
