"""The plan: method choice, glob walking, the offline check, and lazy expansion with probes."""

from __future__ import annotations

import asyncio
import io
import json
import os
import socket
import stat
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from migrator.errors import ManifestError
from migrator.logs import configure_logging
from migrator.manifest import load_manifest
from migrator.methods import choose_method
from migrator.model import MIB, Manifest, Method, PlanItem, Settings, SourceKind
from migrator.plan import (
    FOLDER_PART,
    KEEP_BYTES,
    GlobFile,
    PlanCheck,
    RemoteInfo,
    Skipped,
    check_plan,
    expand,
    expand_batches,
    probe_remote,
    walk_glob,
)

SAMPLES = Path(__file__).resolve().parents[1] / "sample_manifests"
SETTINGS = Settings(base64_max=64 * 1024, url_max=MIB)
FILE, URL = SourceKind.FILE, SourceKind.URL


# -- choose_method ----------------------------------------------------------------------------


def test_local_file_of_exactly_base64_max_goes_by_base64() -> None:
    assert choose_method(FILE, SETTINGS.base64_max, Method.AUTO, SETTINGS) is Method.BASE64


def test_local_file_one_byte_over_base64_max_streams() -> None:
    assert choose_method(FILE, SETTINGS.base64_max + 1, Method.AUTO, SETTINGS) is Method.STREAM


def test_an_empty_local_file_streams_since_empty_base64_data_reads_as_missing() -> None:
    assert choose_method(FILE, 0, Method.AUTO, SETTINGS) is Method.STREAM


def test_local_file_of_unknown_size_streams() -> None:
    assert choose_method(FILE, None, Method.AUTO, SETTINGS) is Method.STREAM


def test_remote_file_of_exactly_url_max_goes_by_url() -> None:
    assert choose_method(URL, SETTINGS.url_max, Method.AUTO, SETTINGS) is Method.URL


def test_remote_file_one_byte_over_url_max_is_streamed_through() -> None:
    assert choose_method(URL, SETTINGS.url_max + 1, Method.AUTO, SETTINGS) is Method.STREAM


def test_remote_file_of_unknown_size_goes_by_url() -> None:
    assert choose_method(URL, None, Method.AUTO, SETTINGS) is Method.URL


def test_a_requested_method_wins_over_the_size() -> None:
    assert choose_method(FILE, 10, Method.STREAM, SETTINGS) is Method.STREAM
    assert choose_method(FILE, 5 * MIB, Method.BASE64, SETTINGS) is Method.BASE64
    assert choose_method(URL, 50 * MIB, Method.URL, SETTINGS) is Method.URL
    assert choose_method(URL, 10, Method.STREAM, SETTINGS) is Method.STREAM


def test_forced_base64_up_to_exactly_10_mib_is_allowed() -> None:
    assert choose_method(FILE, 10 * MIB, Method.BASE64, SETTINGS) is Method.BASE64


@pytest.mark.parametrize(
    ("kind", "size", "requested", "reason"),
    [
        (FILE, 10 * MIB + 1, Method.BASE64, "base64 is refused above 10 MiB"),
        (URL, 100 * MIB + 1, Method.URL, "url is refused above 100 MiB"),
        (URL, 10, Method.BASE64, "base64 is refused for remote files"),
        (FILE, 10, Method.URL, "url applies to remote sources only"),
    ],
)
def test_forced_methods_that_are_refused(
    kind: SourceKind, size: int, requested: Method, reason: str
) -> None:
    with pytest.raises(ValueError, match=reason):
        choose_method(kind, size, requested, SETTINGS)


# -- walk_glob --------------------------------------------------------------------------------


def make_tree(root: Path, *files: str) -> None:
    for name in files:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")


def walked(root: Path, pattern: str, *exclude: str) -> list[str]:
    return [relative for relative, _ in walk_glob(root, pattern, exclude)]


def walked_following(root: Path, pattern: str) -> list[str]:
    return [relative for relative, _ in walk_glob(root, pattern, follow_symlinks=True)]


@pytest.fixture
def scanned(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every folder `walk_glob` lists (os.scandir observed, not replaced)."""
    seen: list[str] = []
    real = os.scandir

    def observed(path: str) -> Iterator[os.DirEntry[str]]:
        seen.append(Path(path).name)
        return real(path)

    monkeypatch.setattr("migrator.plan.os.scandir", observed)
    return seen


def test_double_star_matches_zero_folders(tmp_path: Path) -> None:
    make_tree(tmp_path, "a/b.txt", "a/x/b.txt", "a/x/y/b.txt", "c/b.txt")
    assert walked(tmp_path, "a/**/b.txt") == ["a/b.txt", "a/x/b.txt", "a/x/y/b.txt"]


def test_walk_order_is_by_name_at_every_level(tmp_path: Path) -> None:
    make_tree(tmp_path, "b.txt", "a/z.txt", "a/b.txt", "c.txt", "B.txt")
    assert walked(tmp_path, "**") == ["B.txt", "a/b.txt", "a/z.txt", "b.txt", "c.txt"]


def test_star_matches_hidden_files_like_rsync(tmp_path: Path) -> None:
    make_tree(tmp_path, ".env", "a.txt")
    assert walked(tmp_path, "*") == [".env", "a.txt"]


def test_question_mark_and_classes(tmp_path: Path) -> None:
    make_tree(tmp_path, "a1.txt", "a12.txt", "b1.txt", "c1.txt")
    assert walked(tmp_path, "a?.txt") == ["a1.txt"]
    assert walked(tmp_path, "[ab]1.txt") == ["a1.txt", "b1.txt"]


def test_exclude_is_matched_below_the_root(tmp_path: Path) -> None:
    make_tree(tmp_path, "keep.jpg", "skip.tmp.jpg", "sub/skip.tmp.jpg")
    assert walked(tmp_path, "**/*.jpg", "*.tmp.jpg") == ["keep.jpg", "sub/skip.tmp.jpg"]


def test_an_excluded_folder_is_not_entered(tmp_path: Path, scanned: list[str]) -> None:
    make_tree(tmp_path, "a/thumbs/t.jpg", "a/thumbs/deep/t.jpg", "a/p.jpg", "thumbs/t.jpg")
    assert walked(tmp_path, "**/*.jpg", "**/thumbs/**") == ["a/p.jpg"]
    assert "thumbs" not in scanned
    assert "deep" not in scanned


def test_a_pattern_without_double_star_does_not_descend_deeper(
    tmp_path: Path, scanned: list[str]
) -> None:
    make_tree(tmp_path, "x/a.txt", "x/deeper/b.txt")
    assert walked(tmp_path, "*/*.txt") == ["x/a.txt"]
    assert "deeper" not in scanned


def test_symlinked_folders_are_not_followed(tmp_path: Path) -> None:
    make_tree(tmp_path, "real/a.txt")
    (tmp_path / "real" / "loop").symlink_to(tmp_path, target_is_directory=True)
    assert walked(tmp_path, "**") == ["real/a.txt"]


def skips_of(root: Path, pattern: str, *, follow: bool = False) -> dict[str, str]:
    """The files a walk skipped (relative to root), each with its reason."""
    seen: list[Skipped] = []
    list(walk_glob(root, pattern, follow_symlinks=follow, on_skip=seen.append))
    return {str(Path(s.path).relative_to(root)): s.reason for s in seen}


def test_symlinks_are_not_followed_by_default_and_each_is_reported(tmp_path: Path) -> None:
    make_tree(tmp_path, "tree/a.txt")
    (tmp_path / "tree" / "link.txt").symlink_to(tmp_path / "tree" / "a.txt")
    (tmp_path / "tree" / "environ.txt").symlink_to("/proc/self/environ")
    (tmp_path / "tree" / "broken.txt").symlink_to(tmp_path / "missing.txt")

    assert walked(tmp_path / "tree", "*.txt") == ["a.txt"]
    skipped = skips_of(tmp_path / "tree", "*.txt")
    assert set(skipped) == {"broken.txt", "environ.txt", "link.txt"}
    assert all("not followed" in why for why in skipped.values())


def test_follow_symlinks_takes_links_inside_the_root_as_the_real_file(tmp_path: Path) -> None:
    make_tree(tmp_path, "tree/real/a.txt")
    (tmp_path / "tree" / "link.txt").symlink_to("real/a.txt")

    files = list(walk_glob(tmp_path / "tree", "**", follow_symlinks=True))

    assert files == [
        GlobFile("link.txt", str(tmp_path / "tree" / "real" / "a.txt")),
        GlobFile("real/a.txt", str(tmp_path / "tree" / "real" / "a.txt")),
    ]


def test_follow_symlinks_never_leaves_the_root(tmp_path: Path) -> None:
    make_tree(tmp_path, "tree/a.txt", "secret.key")
    tree = tmp_path / "tree"
    (tree / "passwd.txt").symlink_to("/etc/passwd")
    (tree / "environ.txt").symlink_to("/proc/self/environ")
    (tree / "up.txt").symlink_to("../secret.key")
    (tree / "null.txt").symlink_to("/dev/null")

    assert walked_following(tree, "*.txt") == ["a.txt"]
    skipped = skips_of(tree, "*.txt", follow=True)
    assert set(skipped) == {"environ.txt", "null.txt", "passwd.txt", "up.txt"}
    assert all("outside the glob's root" in why for why in skipped.values())


def test_a_link_inside_the_root_to_a_fifo_is_still_refused(tmp_path: Path) -> None:
    make_tree(tmp_path, "a.txt")
    os.mkfifo(tmp_path / "pipe")
    (tmp_path / "pipe.txt").symlink_to("pipe")

    assert walked_following(tmp_path, "*.txt") == ["a.txt"]
    assert skips_of(tmp_path, "*.txt", follow=True) == {
        "pipe.txt": "a symbolic link to a FIFO, not a regular file"
    }


def test_links_to_folders_are_never_followed_even_when_asked(tmp_path: Path) -> None:
    make_tree(tmp_path, "tree/real/a.txt", "elsewhere/b.txt")
    (tmp_path / "tree" / "inside").symlink_to("real", target_is_directory=True)
    (tmp_path / "tree" / "outside").symlink_to(tmp_path / "elsewhere", target_is_directory=True)

    assert walked_following(tmp_path / "tree", "**") == ["real/a.txt"]
    assert skips_of(tmp_path / "tree", "**", follow=True) == {
        "inside": "a symbolic link to a folder: never followed",
        "outside": "a symbolic link to a folder: never followed",
    }


def test_loops_and_broken_links_are_skipped_and_reported(tmp_path: Path) -> None:
    make_tree(tmp_path, "a.txt")
    (tmp_path / "one.txt").symlink_to("two.txt")
    (tmp_path / "two.txt").symlink_to("one.txt")
    (tmp_path / "self.txt").symlink_to("self.txt")
    (tmp_path / "broken.txt").symlink_to("missing.txt")

    assert walked_following(tmp_path, "*.txt") == ["a.txt"]
    skipped = skips_of(tmp_path, "*.txt", follow=True)
    assert set(skipped) == {"broken.txt", "one.txt", "self.txt", "two.txt"}
    assert all("broken symbolic link" in why for why in skipped.values())


def test_fifos_and_sockets_are_skipped_and_reported(tmp_path: Path) -> None:
    make_tree(tmp_path, "a.txt")
    os.mkfifo(tmp_path / "fifo.txt")
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(str(tmp_path / "socket.txt"))
        assert walked(tmp_path, "*.txt") == ["a.txt"]
        assert skips_of(tmp_path, "*.txt") == {
            "fifo.txt": "a FIFO, not a regular file",
            "socket.txt": "a socket, not a regular file",
        }


@pytest.mark.skipif(os.geteuid() != 0, reason="mknod of a device needs root")
def test_a_device_in_the_tree_is_skipped_and_reported(tmp_path: Path) -> None:
    make_tree(tmp_path, "a.txt")
    os.mknod(tmp_path / "null.txt", 0o600 | stat.S_IFCHR, os.makedev(1, 3))

    assert walked(tmp_path, "*.txt") == ["a.txt"]
    assert skips_of(tmp_path, "*.txt") == {"null.txt": "a character device, not a regular file"}


def test_only_what_the_pattern_matches_is_reported(tmp_path: Path) -> None:
    make_tree(tmp_path, "a.jpg")
    os.mkfifo(tmp_path / "fifo.txt")
    (tmp_path / "link.txt").symlink_to("a.jpg")

    assert skips_of(tmp_path, "*.jpg") == {}


def test_walk_is_lazy(tmp_path: Path, scanned: list[str]) -> None:
    make_tree(tmp_path, "a/1.txt", "b/2.txt", "c/3.txt")
    walk = walk_glob(tmp_path, "**/*.txt")
    assert next(walk)[0] == "a/1.txt"
    assert "c" not in scanned


# -- check_plan -------------------------------------------------------------------------------

HEAD = "version: 1\nname: job\ntarget:\n  base_url: https://api.example.com\n"


def manifest_in(folder: Path, sources: str, head: str = HEAD) -> Manifest:
    path = folder / "job.yaml"
    path.write_text(head + "sources:\n" + sources)
    return load_manifest(path, environ={})


def plan_problems(manifest: Manifest) -> list[str]:
    with pytest.raises(ManifestError) as caught:
        check_plan(manifest)
    return [str(p) for p in caught.value.problems]


def test_check_plan_counts_items_and_local_bytes(tmp_path: Path) -> None:
    make_tree(tmp_path, "p/a.txt", "p/sub/b.txt")
    (tmp_path / "urls.txt").write_text("https://e.example/1\n# skip\n\nhttps://e.example/2\n")
    sources = "  - glob: 'p/**'\n  - url_list: urls.txt\n  - url: https://e.example/3\n"
    assert check_plan(manifest_in(tmp_path, sources)) == PlanCheck(
        items=5, local_files=2, remote_files=3, local_bytes=2
    )


def test_check_plan_notes_the_sizes_large_local_files_share_for_dedup(tmp_path: Path) -> None:
    for name, size in [("a", 5000), ("b", 5000), ("c", 6000), ("d", 100), ("e", 100)]:
        (tmp_path / f"{name}.bin").write_bytes(b"x" * size)
    head = HEAD + "settings:\n  base64_max: 1000\n"
    check = check_plan(manifest_in(tmp_path, "  - glob: '*.bin'\n", head))
    assert check.shared_sizes == {5000}  # 100 is below base64_max: sent as it is
    off = check_plan(manifest_in(tmp_path, "  - glob: '*.bin'\n", head + "  dedup: false\n"))
    assert off.shared_sizes == frozenset()


def test_check_plan_counts_skipped_files_and_logs_a_warning_for_each(tmp_path: Path) -> None:
    make_tree(tmp_path, "p/a.txt")
    os.mkfifo(tmp_path / "p" / "fifo.txt")
    (tmp_path / "p" / "passwd.txt").symlink_to("/etc/passwd")
    console = io.StringIO()
    configure_logging(log_file=None, console="json", stream=console)
    try:
        check = check_plan(manifest_in(tmp_path, "  - glob: 'p/*.txt'\n"))
    finally:
        configure_logging(log_file=None, console="none")

    assert check == PlanCheck(items=1, local_files=1, remote_files=0, local_bytes=1, skipped=2)
    events = [json.loads(line) for line in console.getvalue().splitlines()]
    assert [(e["event"], e["level"], Path(e["path"]).name) for e in events] == [
        ("plan.skipped", "warning", "fifo.txt"),
        ("plan.skipped", "warning", "passwd.txt"),
    ]
    assert events[1]["why"] == "a symbolic link: not followed (see follow_symlinks)"


async def test_a_path_source_that_is_a_link_is_planned_as_the_file_it_names(
    tmp_path: Path,
) -> None:
    make_tree(tmp_path, "real/report-2024.pdf")
    (tmp_path / "report.pdf").symlink_to("real/report-2024.pdf")

    [item] = await collect(manifest_in(tmp_path, "  - path: report.pdf\n"))

    assert (item.source, item.file_name) == (str(tmp_path / "real/report-2024.pdf"), "report.pdf")


async def test_a_followed_link_lands_under_its_own_name(tmp_path: Path) -> None:
    make_tree(tmp_path, "p/real/a.txt")
    (tmp_path / "p" / "alias.txt").symlink_to("real/a.txt")
    sources = "  - glob: 'p/*.txt'\n    follow_symlinks: true\n"

    [item] = await collect(manifest_in(tmp_path, sources))

    assert (item.source, item.file_name) == (str(tmp_path / "p/real/a.txt"), "alias.txt")


def test_names_equal_in_unicode_nfc_collide(tmp_path: Path) -> None:
    make_tree(tmp_path, "p/caf\u00e9.txt", "p/cafe\u0301.txt")
    [problem] = plan_problems(manifest_in(tmp_path, "  - glob: 'p/*'\n"))
    assert "lands on" in problem
    assert "as does sources[0]" in problem


def test_a_control_character_in_a_file_name_is_shown_escaped(tmp_path: Path) -> None:
    make_tree(tmp_path, "p/bad\x1b[2Jname.txt")
    [problem] = plan_problems(manifest_in(tmp_path, "  - glob: 'p/*'\n"))
    assert "\x1b" not in problem
    assert "bad\\x1b[2Jname.txt" in problem


def test_glob_files_colliding_with_a_path_source_name_both(tmp_path: Path) -> None:
    make_tree(tmp_path, "one/a.txt", "two/a.txt")
    sources = "  - path: one/a.txt\n  - glob: 'two/*.txt'\n"
    [problem] = plan_problems(manifest_in(tmp_path, sources))
    assert f"job.yaml:7: sources[1]: {tmp_path}/two/a.txt lands on 'a.txt'" in problem
    assert f"as does sources[0] (line 6, {tmp_path}/one/a.txt)" in problem


def test_files_of_two_folders_landing_in_one_place_each_collide(tmp_path: Path) -> None:
    make_tree(tmp_path, *(f"{folder}/{n}.txt" for folder in ("one", "two") for n in range(10)))
    sources = "  - glob: 'one/*.txt'\n  - glob: 'two/*.txt'\n"
    problems = plan_problems(manifest_in(tmp_path, sources))
    assert len(problems) == 10
    assert f"sources[1]: {tmp_path}/two/0.txt lands on '0.txt'" in problems[0]
    assert f"as does sources[0] (line 6, {tmp_path}/one/0.txt)" in problems[0]


def test_two_globs_keep_their_trees_and_do_not_collide(tmp_path: Path) -> None:
    make_tree(tmp_path, "one/x/a.txt", "two/y/a.txt")
    sources = "  - glob: 'one/**'\n  - glob: 'two/**'\n"
    assert check_plan(manifest_in(tmp_path, sources)).items == 2


def test_a_collision_inside_a_url_list_names_both_lines(tmp_path: Path) -> None:
    (tmp_path / "urls.txt").write_text("https://a.example/x.png\nhttps://b.example/x.png\n")
    [problem] = plan_problems(manifest_in(tmp_path, "  - url_list: urls.txt\n"))
    assert problem.startswith(f"{tmp_path}/urls.txt:2: sources[0].url_list: ")
    assert f"as does sources[0] (line 6, {tmp_path}/urls.txt:1 https://a.example/x.png)" in problem


def test_three_sources_on_one_name_give_two_problems(tmp_path: Path) -> None:
    sources = "".join(f"  - url: https://{h}.example/x.png\n" for h in "abc")
    problems = plan_problems(manifest_in(tmp_path, sources))
    assert len(problems) == 2
    assert all("as does sources[0]" in p for p in problems)


def test_a_file_name_the_service_cannot_take_is_refused(tmp_path: Path) -> None:
    make_tree(tmp_path, "p/back\\slash.txt", "p/fine.txt")
    [problem] = plan_problems(manifest_in(tmp_path, "  - glob: 'p/*'\n"))
    assert "backslash" in problem


def test_problems_are_capped_with_a_count_of_the_rest(tmp_path: Path) -> None:
    make_tree(tmp_path, *(f"p/bad{i:03d}\\.txt" for i in range(130)))
    problems = plan_problems(manifest_in(tmp_path, "  - glob: 'p/*'\n"))
    assert len(problems) == 101
    assert problems[-1].endswith("... and 30 more problems")


def test_check_plan_keeps_its_entries_only_when_they_fit_in_keep_bytes(tmp_path: Path) -> None:
    make_tree(tmp_path, "p/a.txt", "p/b.txt", "p/c.txt")
    manifest = manifest_in(tmp_path, "  - glob: 'p/*'\n")
    kept = check_plan(manifest, keep=1000).kept
    assert kept is not None
    assert [e.file_name for e in kept.entries()] == ["a.txt", "b.txt", "c.txt"]
    assert check_plan(manifest, keep=500).kept is None  # expand walks again instead
    assert check_plan(manifest).kept is None


# -- expand -----------------------------------------------------------------------------------


async def collect(
    manifest: Manifest, session: aiohttp.ClientSession | None = None, **kwargs: object
) -> list[PlanItem]:
    return [item async for item in expand(manifest, session=session, **kwargs)]  # type: ignore[arg-type]


async def test_expanding_what_check_plan_kept_gives_what_a_walk_gives_and_lists_no_folder(
    tmp_path: Path, scanned: list[str]
) -> None:
    make_tree(tmp_path, "p/a.txt", "p/sub/b.txt", "p/sub/deeper/c.bin")
    (tmp_path / "urls.txt").write_text("https://e.example/1\nhttps://e.example/2\n")
    sources = "  - glob: 'p/**'\n    upload_path: up\n  - url_list: urls.txt\n"
    manifest = manifest_in(tmp_path, sources)
    walked_items = await collect(manifest)
    check = check_plan(manifest, keep=100_000)
    scanned.clear()

    from_kept = await collect(manifest, kept=check.kept)

    assert from_kept == walked_items and len(from_kept) == 5
    assert scanned == []


async def test_a_folder_of_more_files_than_a_part_plans_as_a_walk_does(tmp_path: Path) -> None:
    count = FOLDER_PART + 2
    make_tree(tmp_path, *(f"p/{n:05d}.txt" for n in range(count)), "p/sub/z.txt")
    manifest = manifest_in(tmp_path, "  - glob: 'p/**'\n")
    walked_items = await collect(manifest)

    check = check_plan(manifest, keep=KEEP_BYTES)
    from_kept = await collect(manifest, kept=check.kept)

    assert check.items == count + 1
    assert from_kept == walked_items
    names = [item.file_name for item in from_kept]
    assert names[FOLDER_PART - 1 : FOLDER_PART + 1] == [
        f"{FOLDER_PART - 1:05d}.txt",
        f"{FOLDER_PART:05d}.txt",
    ]
    assert names[-1] == "z.txt"


async def test_a_folders_files_after_a_subfolder_are_planned_after_its_files(
    tmp_path: Path,
) -> None:
    make_tree(tmp_path, *(f"p/a{n}.txt" for n in range(10)), "p/m/x.txt", "p/z.txt")
    manifest = manifest_in(tmp_path, "  - glob: 'p/**'\n")
    check = check_plan(manifest, keep=KEEP_BYTES)

    items = await collect(manifest, kept=check.kept)

    expected = [*(f"a{n}.txt" for n in range(10)), "x.txt", "z.txt"]
    assert [item.file_name for item in items] == expected
    assert items[-2].source == str(tmp_path / "p/m/x.txt")


async def test_a_file_gone_before_its_stat_is_planned_in_its_place_with_no_size(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    names = [f"{n:02d}.txt" for n in range(12)]
    make_tree(tmp_path, *(f"p/{name}" for name in names))
    real_stat = os.stat

    def stat(path: str, **options: Any) -> os.stat_result:
        if os.fspath(path).endswith("05.txt"):
            raise FileNotFoundError(path)
        return real_stat(path, **options)

    monkeypatch.setattr("migrator.plan.os.stat", stat)
    manifest = manifest_in(tmp_path, "  - glob: 'p/*.txt'\n")
    check = check_plan(manifest, keep=KEEP_BYTES)

    items = await collect(manifest, kept=check.kept)

    assert (check.items, check.local_bytes) == (12, 11)
    assert [item.file_name for item in items] == names
    assert [item.size for item in items] == [1] * 5 + [None] + [1] * 6


async def test_a_batch_of_a_folders_files_gives_the_same_items_however_it_is_read(
    tmp_path: Path,
) -> None:
    make_tree(tmp_path, *(f"p/{n}.txt" for n in range(5)))
    manifest = manifest_in(tmp_path, "  - glob: 'p/*.txt'\n")
    check = check_plan(manifest, keep=KEEP_BYTES)

    [batch] = [b async for b in expand_batches(manifest, session=None, kept=check.kept)]

    items = list(batch)
    assert [item.file_name for item in items] == [f"{n}.txt" for n in range(5)]
    assert [batch[index] for index in range(len(batch))] == items
    assert (batch[-1], batch[1:3], batch.index(items[2])) == (items[-1], items[1:3], 2)


async def test_local_items_carry_size_mtime_and_the_full_upload_path(tmp_path: Path) -> None:
    make_tree(tmp_path, "photos/2024/may/a.jpg")
    head = HEAD + "  upload_path: migrations/assets\n"
    manifest = manifest_in(tmp_path, "  - glob: 'photos/**/*.jpg'\n    upload_path: pics\n", head)
    [item] = await collect(manifest)
    stat = (tmp_path / "photos/2024/may/a.jpg").stat()
    assert item == PlanItem(
        source=str(tmp_path / "photos/2024/may/a.jpg"),
        kind=SourceKind.FILE,
        upload_path="migrations/assets/pics/2024/may",
        file_name="a.jpg",
        size=1,
        method=Method.BASE64,
        mtime_ns=stat.st_mtime_ns,
    )


async def test_a_named_method_is_marked_forced(tmp_path: Path) -> None:
    make_tree(tmp_path, "a.txt")
    sources = "  - path: a.txt\n    method: stream\n    file_name: renamed.txt\n"
    [item] = await collect(manifest_in(tmp_path, sources))
    assert (item.method, item.method_forced, item.file_name) == (Method.STREAM, True, "renamed.txt")


async def test_without_a_session_remote_sizes_are_unknown(tmp_path: Path) -> None:
    [item] = await collect(manifest_in(tmp_path, "  - url: https://e.example/a%20b.png\n"))
    assert (item.size, item.method, item.file_name) == (None, Method.URL, "a_b.png")
    assert item.source == "https://e.example/a%20b.png"


# -- probing a loopback origin ----------------------------------------------------------------


@dataclass
class Origin:
    """A loopback web server whose routes answer probes in different ways."""

    base: str = ""
    requests: list[tuple[str, str, str | None]] = field(default_factory=list)
    in_flight: int = 0
    most_in_flight: int = 0
    release: asyncio.Event = field(default_factory=asyncio.Event)  # ends hanging requests


@pytest.fixture
async def origin() -> AsyncIterator[Origin]:
    state = Origin()

    def record(
        handler: Callable[[web.Request], web.StreamResponse],
    ) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def wrapped(request: web.Request) -> web.StreamResponse:
            state.requests.append((request.method, request.path, request.headers.get("Range")))
            return handler(request)

        return wrapped

    async def slow(request: web.Request) -> web.StreamResponse:
        state.requests.append((request.method, request.path, None))
        state.in_flight += 1
        state.most_in_flight = max(state.most_in_flight, state.in_flight)
        if request.path.startswith("/slow/"):
            await asyncio.sleep(0.2)
        else:
            await state.release.wait()
        state.in_flight -= 1
        return web.Response(headers={"Content-Length": "7"})

    app = web.Application()
    app.router.add_route("HEAD", "/sized.bin", record(sized_head))
    app.router.add_route("HEAD", "/no-head.bin", record(lambda _: web.Response(status=405)))
    app.router.add_route("GET", "/no-head.bin", record(ranged_get))
    app.router.add_route("HEAD", "/no-range.bin", record(lambda _: web.Response(status=405)))
    app.router.add_route("GET", "/no-range.bin", record(lambda _: web.Response(body=b"z" * 4096)))
    app.router.add_route("HEAD", "/moved.bin", record(moved))
    app.router.add_route("HEAD", "/slow/{n}", slow)
    app.router.add_route("HEAD", "/hang.bin", slow)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    state.base = f"http://127.0.0.1:{runner.addresses[0][1]}"
    yield state
    state.release.set()
    await runner.cleanup()


def sized_head(_: web.Request) -> web.StreamResponse:
    headers = {"ETag": '"v1"', "Last-Modified": "Wed, 21 Oct 2015 07:28:00 GMT"}
    return web.Response(body=b"s" * 2048, headers=headers)


def ranged_get(request: web.Request) -> web.StreamResponse:
    if request.headers.get("Range") != "bytes=0-0":
        return web.Response(status=400)
    headers = {"Content-Range": "bytes 0-0/5000000", "ETag": '"ranged"'}
    return web.Response(status=206, body=b"r", headers=headers)


def moved(_: web.Request) -> web.StreamResponse:
    raise web.HTTPFound("/sized.bin")


def dead_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/gone.bin"


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


async def test_head_with_a_length_gives_size_etag_and_last_modified(
    origin: Origin, session: aiohttp.ClientSession
) -> None:
    info = await probe_remote(session, origin.base + "/sized.bin")
    assert info == RemoteInfo(2048, '"v1"', "Wed, 21 Oct 2015 07:28:00 GMT")
    assert origin.requests == [("HEAD", "/sized.bin", None)]


async def test_head_refused_then_a_one_byte_range_tells_the_total(
    origin: Origin, session: aiohttp.ClientSession
) -> None:
    info = await probe_remote(session, origin.base + "/no-head.bin")
    assert info == RemoteInfo(5_000_000, '"ranged"', None)
    assert origin.requests == [("HEAD", "/no-head.bin", None), ("GET", "/no-head.bin", "bytes=0-0")]


async def test_an_origin_ignoring_range_gives_its_content_length(
    origin: Origin, session: aiohttp.ClientSession
) -> None:
    assert (await probe_remote(session, origin.base + "/no-range.bin")).size == 4096


async def test_redirects_are_followed(origin: Origin, session: aiohttp.ClientSession) -> None:
    assert (await probe_remote(session, origin.base + "/moved.bin")).size == 2048


async def test_a_missing_file_has_unknown_size(
    origin: Origin, session: aiohttp.ClientSession
) -> None:
    assert await probe_remote(session, origin.base + "/missing.bin") == RemoteInfo()


async def test_a_dead_origin_has_unknown_size(session: aiohttp.ClientSession) -> None:
    assert await probe_remote(session, dead_url()) == RemoteInfo()


async def test_a_hanging_origin_times_out_to_unknown_size(
    origin: Origin, session: aiohttp.ClientSession
) -> None:
    info = await probe_remote(session, origin.base + "/hang.bin", probe_timeout=0.3)
    assert info == RemoteInfo()


async def test_expand_chooses_methods_from_probed_sizes(
    tmp_path: Path, origin: Origin, session: aiohttp.ClientSession
) -> None:
    sources = (
        f"  - url: {origin.base}/sized.bin\n  - url: {origin.base}/no-head.bin\n"
        f"  - url: {dead_url()}\n"
    )
    head = HEAD + "settings:\n  url_max: 1MiB\n"
    items = await collect(manifest_in(tmp_path, sources, head), session)
    assert [(i.file_name, i.size, i.method) for i in items] == [
        ("sized.bin", 2048, Method.URL),
        ("no-head.bin", 5_000_000, Method.STREAM),
        ("gone.bin", None, Method.URL),
    ]
    assert items[0].etag == '"v1"'


async def test_expand_probes_in_a_bounded_window_keeping_manifest_order(
    tmp_path: Path, origin: Origin, session: aiohttp.ClientSession
) -> None:
    make_tree(tmp_path, "local.txt")
    urls = "".join(f"  - url: {origin.base}/slow/{n}.bin\n" for n in range(7))
    sources = urls + "  - path: local.txt\n" + f"  - url: {origin.base}/slow/last.bin\n"
    items = await collect(manifest_in(tmp_path, sources), session, probe_concurrency=3)
    names = [i.file_name for i in items]
    assert names == [f"{n}.bin" for n in range(7)] + ["local.txt", "last.bin"]
    assert origin.most_in_flight == 3
    assert all(i.size == 7 for i in items if i.kind is SourceKind.URL)


async def test_one_slow_answer_holds_up_no_other_probe(
    tmp_path: Path, origin: Origin, session: aiohttp.ClientSession
) -> None:
    urls = f"  - url: {origin.base}/hang.bin\n"
    urls += "".join(f"  - url: {origin.base}/slow/{n}.bin\n" for n in range(12))
    expansion = asyncio.create_task(
        collect(manifest_in(tmp_path, urls), session, probe_concurrency=4)
    )
    for _ in range(200):  # at most 10 s: 12 answers of 0.2 s, 3 at a time, take 0.8 s
        others = [r for r in origin.requests if r[1].startswith("/slow/")]
        if len(others) == 12 and origin.in_flight == 1:
            break
        await asyncio.sleep(0.05)
    # Every other probe was asked and answered while the first still hangs.
    assert (len(others), origin.in_flight) == (12, 1)
    assert not expansion.done()
    origin.release.set()
    items = await expansion
    assert [i.file_name for i in items] == ["hang.bin", *(f"{n}.bin" for n in range(12))]
    assert origin.most_in_flight == 4


async def test_a_forced_url_method_over_100_mib_stops_the_expansion(
    tmp_path: Path, aiohttp_huge_origin: str, session: aiohttp.ClientSession
) -> None:
    sources = f"  - url: {aiohttp_huge_origin}/huge.iso\n    method: url\n"
    with pytest.raises(ManifestError, match="url is refused above 100 MiB"):
        await collect(manifest_in(tmp_path, sources), session)


@pytest.fixture
async def aiohttp_huge_origin() -> AsyncIterator[str]:
    async def huge(_: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Length": str(200 * MIB)})
        return response

    app = web.Application()
    app.router.add_route("HEAD", "/huge.iso", huge)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    await runner.cleanup()


# -- the quickstart against a demo origin -----------------------------------------------------


@pytest.fixture
async def demo_origin() -> AsyncIterator[str]:
    """Serves sample_manifests/ read-only, as the embedded mode's demo origin does."""
    app = web.Application()
    app.router.add_static("/", SAMPLES)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    await runner.cleanup()


async def test_quickstart_exercises_every_method(
    demo_origin: str, session: aiohttp.ClientSession
) -> None:
    manifest = load_manifest(SAMPLES / "quickstart.yaml", environ={})
    items = await collect(manifest, session, url_vars={"EMBEDDED_ORIGIN": demo_origin})
    by_place = {(i.kind, i.upload_path, i.file_name): i.method for i in items}
    assert by_place[(FILE, "quickstart", "hello.txt")] is Method.BASE64
    assert by_place[(FILE, "quickstart", "large.log")] is Method.STREAM
    assert by_place[(URL, "quickstart/remote", "pixel.png")] is Method.URL
    assert by_place[(URL, "quickstart/remote", "large.log")] is Method.STREAM


async def test_url_vars_are_used_to_probe_but_items_keep_the_template(
    demo_origin: str, session: aiohttp.ClientSession
) -> None:
    manifest = load_manifest(SAMPLES / "quickstart.yaml", environ={})
    items = await collect(manifest, session, url_vars={"EMBEDDED_ORIGIN": demo_origin})
    remote = [i for i in items if i.kind is URL]
    assert [i.source for i in remote] == [
        "${EMBEDDED_ORIGIN}/data/pixel.png",
        "${EMBEDDED_ORIGIN}/data/large.log",
    ]
    assert [i.size for i in remote] == [
        (SAMPLES / "data/pixel.png").stat().st_size,
        (SAMPLES / "data/large.log").stat().st_size,
    ]
