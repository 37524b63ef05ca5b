"""Pure naming rules: uploadPath joining, names from URLs, name checks, URL checks, globs."""

from __future__ import annotations

import hashlib
import stat

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from migrator.naming import (
    check_name,
    check_upload_path,
    check_url,
    collision_key,
    compile_glob,
    file_type,
    glob_depth,
    hide_credentials,
    join_upload_path,
    name_from_url,
    names_pass,
    printable,
    split_glob,
    substitute_url,
    without_credentials,
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


# Names from the characters each rule is about: separators, dots, controls, a backslash,
# surrogates, and letters of one and of two UTF-8 bytes (for the 255-byte limit).
_NAME_CHARACTERS = st.sampled_from(["a", ".", "/", "\\", "\n", "\x85", "\ud800", "é", " "])
_NAMES = st.lists(
    st.text(_NAME_CHARACTERS, max_size=4) | st.just("é" * 128), min_size=1, max_size=5
)


@given(_NAMES, st.sampled_from(["", "up/load", "a/../b"]))
@example(["a", "b" * 80], "")
@example(["a", "é" * 127], "up")
@example(["a", ".."], "")
def test_names_pass_when_check_name_finds_nothing_wrong_with_any(
    names: list[str], upload_path: str
) -> None:
    expected = all(check_name(upload_path, name) is None for name in names)
    assert names_pass(upload_path, names) == expected


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


# -- credentials, control characters, collisions ---------------------------------------------


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("https://user:secret@example.com/a.png", "https://example.com/a.png"),
        ("http://user@example.com:8080/a?b=c#d", "http://example.com:8080/a?b=c#d"),
        ("https://u:p@ss@example.com/x", "https://example.com/x"),  # '@' in the password
        ("https://example.com/a@b.png", "https://example.com/a@b.png"),  # '@' in the path
        ("https://example.com/a.png", "https://example.com/a.png"),
        ("${EMBEDDED_ORIGIN}/data/a.png", "${EMBEDDED_ORIGIN}/data/a.png"),
        ("/data/local@file.txt", "/data/local@file.txt"),  # a local path is no URL
        ("http://u:p@[::1/x", "http://[::1/x"),  # not even a valid URL
    ],
)
def test_without_credentials_shows_the_url_without_user_and_password(url: str, shown: str) -> None:
    assert without_credentials(url) == shown


def test_hide_credentials_removes_them_from_every_url_in_a_message() -> None:
    text = "origin https://u:secret@a.example/x failed; then 'http://v:pw@b.example/y'"
    assert hide_credentials(text) == "origin https://a.example/x failed; then 'http://b.example/y'"


def test_hide_credentials_leaves_mail_addresses_and_plain_text_alone() -> None:
    text = "mail ops@example.com about https://example.com/a@b"
    assert hide_credentials(text) == text


def test_a_refused_url_is_named_without_its_credentials() -> None:
    reason = check_url("ftp://user:secret@example.com/a", embedded=False)
    assert reason is not None
    assert "secret" not in reason
    assert "ftp://example.com/a" in reason


def test_a_url_with_a_control_character_is_refused() -> None:
    assert check_url("https://example.com/a\x00b", embedded=False) == (
        "'https://example.com/a\\x00b' contains a control character"
    )


def test_printable_escapes_line_breaks_and_terminal_escapes() -> None:
    assert printable("a\nb\x1b[2Jc\x7f") == "a\\nb\\x1b[2Jc\\x7f"
    assert printable("café ünïcode") == "café ünïcode"


def test_names_equal_in_nfc_share_a_collision_key() -> None:
    assert collision_key("p", "caf\u00e9.txt") == collision_key("p", "cafe\u0301.txt")
    assert collision_key("p", "a.txt") != collision_key("p", "A.txt")


@pytest.mark.parametrize(
    ("mode", "words"),
    [
        (stat.S_IFREG, "a regular file"),
        (stat.S_IFIFO, "a FIFO"),
        (stat.S_IFSOCK, "a socket"),
        (stat.S_IFCHR, "a character device"),
        (stat.S_IFBLK, "a block device"),
        (stat.S_IFLNK, "a symbolic link"),
        (stat.S_IFDIR, "a folder"),
    ],
)
def test_file_type_names_each_kind_of_file(mode: int, words: str) -> None:
    assert file_type(mode | 0o644) == words
