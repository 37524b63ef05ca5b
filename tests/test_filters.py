"""The command line's filters and brace patterns, as pure functions (migrator.filters)."""

from __future__ import annotations

import pytest

from migrator.filters import Filters
from migrator.naming import compile_glob, split_glob


@pytest.mark.parametrize(
    ("pattern", "path", "matches"),
    [
        ("*.{jpg,png}", "a.jpg", True),
        ("*.{jpg,png}", "a.png", True),
        ("*.{jpg,png}", "a.gif", False),
        ("*.{jpg,png}", "a.{jpg,png}", False),
        ("{a,b{c,d}}.txt", "bd.txt", True),  # nested
        ("x{,-old}.txt", "x.txt", True),  # an empty alternative
        ("x{,-old}.txt", "x-old.txt", True),
        ("{x}.txt", "{x}.txt", True),  # no comma: literal, as in the shell
        ("{a,b.txt", "{a,b.txt", True),  # never closed: literal
        ("**/*.{JPG,jpg}", "2024/05/a.JPG", True),
        ("{2023,2024}/*.jpg", "2024/a.jpg", True),
        ("{2023,2024}/*.jpg", "2022/a.jpg", False),
        ("*.{j*g,png}", "a.jpeg", True),  # each alternative is a pattern
        ("*.{j*g,png}", "a/b.jpeg", False),  # within one segment
    ],
)
def test_brace_patterns_match_one_of_their_alternatives(
    pattern: str, path: str, matches: bool
) -> None:
    assert bool(compile_glob(pattern).fullmatch(path)) is matches


def test_a_brace_is_a_wildcard_where_the_glob_root_ends() -> None:
    assert split_glob("./{photos,videos}/*.jpg") == (".", "{photos,videos}/*.jpg")
    assert split_glob("./data/*.{jpg,png}") == ("./data", "*.{jpg,png}")


def test_no_filters_take_everything() -> None:
    filters = Filters()
    assert filters.takes_path("any/thing.bin")
    assert filters.takes_stat(0, 0)


@pytest.mark.parametrize(
    ("pattern", "path", "taken"),
    [
        ("*.jpg", "a.jpg", True),
        ("*.jpg", "2024/05/a.jpg", True),  # no leading '/': matches at any depth
        ("*.jpg", "a.jpg.txt", False),
        ("/*.jpg", "a.jpg", True),  # a leading '/': anchored at the source's root
        ("/*.jpg", "2024/a.jpg", False),
        ("2024/*.jpg", "photos/2024/a.jpg", True),  # the end of the path, whole segments
        ("2024/*.jpg", "x2024/a.jpg", False),
        ("*.{jpg,png}", "sub/a.png", True),
    ],
)
def test_an_include_is_matched_against_the_end_of_the_relative_path(
    pattern: str, path: str, taken: bool
) -> None:
    assert Filters(include=(pattern,)).takes_path(path) is taken


def test_any_include_takes_a_file() -> None:
    filters = Filters(include=("*.jpg", "*.png"))
    assert filters.takes_path("a.jpg")
    assert filters.takes_path("b.png")
    assert not filters.takes_path("c.gif")


def test_excludes_win_over_includes_whatever_their_order() -> None:
    filters = Filters(include=("*.jpg",), exclude=("cache/**",))
    assert filters.takes_path("2024/a.jpg")
    assert not filters.takes_path("cache/a.jpg")
    assert not filters.takes_path("deep/cache/a.jpg")
    assert not filters.takes_path("a.png")


def test_an_exclude_alone_takes_everything_else() -> None:
    filters = Filters(exclude=("*.tmp",))
    assert filters.takes_path("a.txt")
    assert not filters.takes_path("x/a.tmp")


def test_size_limits_are_inclusive() -> None:
    filters = Filters(min_size=10, max_size=20)
    assert [filters.takes_stat(n, 0) for n in (9, 10, 20, 21)] == [False, True, True, False]


def test_max_age_takes_files_modified_since_the_moment() -> None:
    filters = Filters(modified_since=1000.0)
    assert filters.takes_stat(1, 1000 * 10**9)
    assert not filters.takes_stat(1, 999 * 10**9)


def test_a_file_that_could_not_be_stated_is_taken() -> None:
    # Its upload says what is wrong with it; a filter must not hide it.
    assert Filters(min_size=10, modified_since=1.0).takes_stat(None, None)
