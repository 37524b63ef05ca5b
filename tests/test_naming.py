"""Pure naming rules: uploadPath joining, names from URLs, name checks, URL checks, globs."""

from __future__ import annotations

import hashlib

import pytest

from migrator.naming import (
    check_name,
    check_upload_path,
    check_url,
    compile_glob,
    glob_depth,
    join_upload_path,
    name_from_url,
    split_glob,
    substitute_url,
)


def url_hash(url: str) -> str:
    return hashlib.sha256(url.encode()).hexdigest()[:12]


# -- join_upload_path -------------------------------------------------------------------------


def test_join_upload_path_joins_the_three_parts_with_slashes() -> None:
    assert join_upload_path("migrations", "photos", "2024/may") == "migrations/photos/2024/may"


def test_join_upload_path_drops_empty_segments_and_outer_slashes() -> None:
    assert join_upload_path("/migrations/", "", "//a//b/") == "migrations/a/b"


def test_join_upload_path_of_nothing_is_empty() -> None:
    assert join_upload_path("", None, "") == ""


def test_join_upload_path_keeps_dotdot_for_check_name_to_refuse() -> None:
    assert join_upload_path("a", "../b", "") == "a/../b"


# -- name_from_url ----------------------------------------------------------------------------


def test_name_from_url_is_the_last_path_segment() -> None:
    assert name_from_url("https://example.com/images/logo.png") == "logo.png"


def test_name_from_url_ignores_query_and_fragment() -> None:
    assert name_from_url("https://example.com/a/report.pdf?v=2#page=3") == "report.pdf"


def test_name_from_url_percent_decodes_then_replaces_unsafe_characters() -> None:
    assert name_from_url("https://example.com/intro%20video%20(final).mp4") == (
        "intro_video__final_.mp4"
    )


def test_name_from_url_keeps_non_ascii_letters() -> None:
    assert name_from_url("https://example.com/%C3%A9t%C3%A9-photo.jpg") == "été-photo.jpg"


def test_name_from_url_replaces_an_encoded_slash() -> None:
    assert name_from_url("https://example.com/a%2Fb.txt") == "a_b.txt"


def test_name_from_url_without_a_segment_is_a_hash_of_the_url() -> None:
    url = "https://example.com/"
    assert name_from_url(url) == f"url-{url_hash(url)}"


def test_name_from_url_of_a_dotdot_segment_is_a_hash() -> None:
    url = "https://example.com/a/.."
    assert name_from_url(url) == f"url-{url_hash(url)}"


def test_name_from_url_too_long_is_a_hash_keeping_the_extension() -> None:
    url = "https://example.com/" + "x" * 300 + ".pdf"
    assert name_from_url(url) == f"url-{url_hash(url)}.pdf"


# -- check_name / check_upload_path -----------------------------------------------------------


def test_check_name_accepts_a_plain_name() -> None:
    assert check_name("migrations/photos", "a b é.jpg") is None


@pytest.mark.parametrize(
    ("upload_path", "file_name", "expected"),
    [
        ("a/../b", "x.txt", "'..'"),
        ("/abs", "x.txt", "absolute"),
        ("a", "", "empty"),
        ("a", "..", "'..'"),
        ("a", "x\ny", "control character"),
        ("a\\b", "x", "backslash"),
        ("a", "dir/x", "contains '/'"),
        ("a", "x" * 256, "longer than 255"),
        ("a//b", "x", "empty segment"),
    ],
)
def test_check_name_refuses(upload_path: str, file_name: str, expected: str) -> None:
    reason = check_name(upload_path, file_name)
    assert reason is not None
    assert expected in reason


def test_check_name_counts_length_in_utf8_bytes() -> None:
    assert check_name("", "é" * 127) is None
    assert check_name("", "é" * 128) is not None


def test_check_upload_path_accepts_a_trailing_slash() -> None:
    assert check_upload_path("photos/2024/") is None


def test_check_upload_path_refuses_a_leading_slash() -> None:
    assert "absolute" in (check_upload_path("/photos") or "")


# -- check_url / substitute_url ---------------------------------------------------------------


def test_check_url_accepts_http_and_https() -> None:
    assert check_url("http://example.com/a", embedded=False) is None
    assert check_url("HTTPS://example.com/a", embedded=False) is None


def test_check_url_refuses_ftp() -> None:
    assert "only http:// and https://" in (check_url("ftp://example.com/a", embedded=False) or "")


def test_check_url_refuses_a_url_without_host() -> None:
    assert "no host" in (check_url("https:///path", embedded=False) or "")


def test_check_url_refuses_a_bad_port() -> None:
    assert "not a valid URL" in (check_url("http://example.com:99999/a", embedded=False) or "")


def test_embedded_origin_is_accepted_for_an_embedded_target() -> None:
    assert check_url("${EMBEDDED_ORIGIN}/data/x.png", embedded=True) is None


def test_embedded_origin_is_refused_for_a_real_target() -> None:
    reason = check_url("${EMBEDDED_ORIGIN}/data/x.png", embedded=False)
    assert "only available when target.base_url is embedded" in (reason or "")


def test_embedded_origin_must_open_the_url() -> None:
    reason = check_url("https://example.com/${EMBEDDED_ORIGIN}", embedded=True)
    assert "may only open the URL" in (reason or "")


def test_unknown_variables_are_refused() -> None:
    assert "unknown variable" in (check_url("${HOME}/x", embedded=True) or "")


def test_substitute_url_fills_known_variables_only() -> None:
    url = "${EMBEDDED_ORIGIN}/a/${OTHER}"
    result = substitute_url(url, {"EMBEDDED_ORIGIN": "http://127.0.0.1:8080"})
    assert result == "http://127.0.0.1:8080/a/${OTHER}"


# -- globs ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "root", "relative"),
    [
        ("./photos/**/*.jpg", "./photos", "**/*.jpg"),
        ("*.txt", ".", "*.txt"),
        ("/srv/data/*/x", "/srv/data", "*/x"),
        ("/*.txt", "/", "*.txt"),
        ("data/file.txt", "data", "file.txt"),
        ("a/b[12]/c", "a", "b[12]/c"),
    ],
)
def test_split_glob_takes_the_longest_prefix_without_wildcards(
    pattern: str, root: str, relative: str
) -> None:
    assert split_glob(pattern) == (root, relative)


@pytest.mark.parametrize(
    ("pattern", "path", "matches"),
    [
        ("*.jpg", "a.jpg", True),
        ("*.jpg", "dir/a.jpg", False),
        ("*.jpg", ".hidden.jpg", True),
        ("a/**/b", "a/b", True),
        ("a/**/b", "a/x/y/b", True),
        ("a/**/b", "ab", False),
        ("**/*.jpg", "a.jpg", True),
        ("**/*.jpg", "x/y/a.jpg", True),
        ("**", "x/y/z", True),
        ("x/**", "x/", True),
        ("x/**", "xy/z", False),
        ("file?.txt", "file1.txt", True),
        ("file?.txt", "file12.txt", False),
        ("file?.txt", "file/.txt", False),
        ("[ab].txt", "a.txt", True),
        ("[ab].txt", "c.txt", False),
        ("[!ab].txt", "c.txt", True),
        ("[!ab].txt", "a.txt", False),
        ("[a-c]x", "bx", True),
        ("[]]x", "]x", True),
        ("a[b", "a[b", True),
        ("a+b(c).txt", "a+b(c).txt", True),
    ],
)
def test_compile_glob(pattern: str, path: str, matches: bool) -> None:
    assert bool(compile_glob(pattern).fullmatch(path)) is matches


def test_glob_depth_is_bounded_without_double_star() -> None:
    assert glob_depth("*.txt") == 0
    assert glob_depth("*/x/*.txt") == 2


def test_glob_depth_is_unbounded_with_double_star() -> None:
    assert glob_depth("a/**/*.txt") is None
