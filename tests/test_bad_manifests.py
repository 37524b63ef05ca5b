"""A corpus of bad manifests: each is refused with a message naming file, line and field.

Each case is loaded (and, when it loads, checked with `check_plan`, which walks globs
and reads URL lists) in a folder holding a few data files.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from migrator.errors import ManifestError, ManifestProblem
from migrator.manifest import load_manifest
from migrator.plan import check_plan

HEAD = "version: 1\nname: job\ntarget:\n  base_url: https://api.example.com\n"  # lines 1-4
ONE_SOURCE = "sources:\n  - path: ./data/a.txt\n"  # lines 5-6


def with_settings(body: str) -> str:
    """HEAD + one source + `settings:` on line 7, `body` from line 8."""
    return HEAD + ONE_SOURCE + "settings:\n" + body


def with_sources(body: str) -> str:
    """HEAD + `sources:` on line 5, `body` from line 6."""
    return HEAD + "sources:\n" + body


CASES: list[tuple[str, str, str, int, str | None]] = [
    # (id, manifest text, expected part of the message, line, field)
    ("yaml-unclosed-quote", 'version: 1\nname: "job\n', "YAML syntax error", 3, None),
    ("yaml-bad-indent", HEAD + "  nested: [1\n", "YAML syntax error", 6, None),
    ("tab-indentation", "version: 1\ntarget:\n\tbase_url: x\n", "tabs", 3, None),
    ("two-documents", "version: 1\n---\nname: job\n", "single document", 2, None),
    ("top-level-list", "- version: 1\n", "expected a mapping", 1, None),
    ("duplicate-top-key", HEAD + ONE_SOURCE + "name: other\n", "first given on line 2", 7, "name"),
    (
        "duplicate-source-key",
        with_sources("  - path: ./data/a.txt\n    path: ./data/b.txt\n"),
        "duplicate key",
        7,
        "sources[0].path",
    ),
    (
        "unknown-top-key",
        HEAD + ONE_SOURCE + "setings:\n  concurrency: 2\n",
        "did you mean 'settings'",
        7,
        "setings",
    ),
    (
        "unknown-target-key",
        HEAD + "  upload_pth: x\n" + ONE_SOURCE,
        "did you mean 'upload_path'",
        5,
        "target.upload_pth",
    ),
    (
        "unknown-setting",
        with_settings("  concurency: 2\n"),
        "did you mean 'concurrency'",
        8,
        "settings.concurency",
    ),
    (
        "unknown-source-key",
        with_sources("  - path: ./data/a.txt\n    filename: x.txt\n"),
        "did you mean 'file_name'",
        7,
        "sources[0].filename",
    ),
    (
        "string-concurrency",
        with_settings("  concurrency: eight\n"),
        "expected a whole number",
        8,
        "settings.concurrency",
    ),
    (
        "boolean-retries",
        with_settings("  retries: yes\n"),
        "boolean",
        8,
        "settings.retries",
    ),
    (
        "list-where-mapping",
        "version: 1\nname: job\ntarget:\n  - https://api.example.com\n" + ONE_SOURCE,
        "expected a mapping",
        4,
        "target",
    ),
    (
        "sources-not-a-list",
        HEAD + "sources:\n  path: ./data/a.txt\n",
        "expected a list of sources",
        6,
        "sources",
    ),
    ("bad-size", with_settings("  base64_max: 12 parsecs\n"), "unknown unit", 8, None),
    ("bad-duration", with_settings("  ttl: 3 fortnights\n"), "not a duration", 8, "settings.ttl"),
    ("negative-retries", with_settings("  retries: -1\n"), "between 0 and 50", 8, None),
    ("negative-size", with_settings("  base64_max: -5\n"), "cannot be negative", 8, None),
    ("concurrency-zero", with_settings("  concurrency: 0\n"), "between 1 and 256", 8, None),
    ("concurrency-too-high", with_settings("  concurrency: 1000\n"), "between 1 and 256", 8, None),
    ("base64-max-over-10mib", with_settings("  base64_max: 11MiB\n"), "at most 10MiB", 8, None),
    ("url-max-over-100mib", with_settings("  url_max: 1GiB\n"), "at most 100MiB", 8, None),
    ("ttl-zero", with_settings("  ttl: 0s\n"), "longer than zero", 8, "settings.ttl"),
    ("tps-limit-zero", with_settings("  tps_limit: 0\n"), "more than 0", 8, "settings.tps_limit"),
    ("tps-limit-word", with_settings("  tps_limit: fast\n"), "requests per second", 8, None),
    ("bwlimit-zero", with_settings("  bwlimit: 0\n"), "more than 0 bytes", 8, "settings.bwlimit"),
    ("bwlimit-unit", with_settings("  bwlimit: 8 parsecs\n"), "unknown unit", 8, None),
    (
        "refresh-within-not-below-ttl",
        with_settings("  ttl: 12h\n  refresh_within: 12h\n"),
        "must be shorter than settings.ttl",
        9,
        "settings.refresh_within",
    ),
    ("version-2", HEAD.replace("version: 1", "version: 2") + ONE_SOURCE, "version 2", 1, None),
    ("version-string", HEAD.replace("version: 1", "version: '1'") + ONE_SOURCE, "'1'", 1, None),
    ("missing-version", HEAD.replace("version: 1\n", "") + ONE_SOURCE, "required", 1, "version"),
    ("custom-tag", HEAD.replace("name: job", "name: !secret job") + ONE_SOURCE, "tag", 2, None),
    ("missing-name", HEAD.replace("name: job\n", "") + ONE_SOURCE, "required", 1, "name"),
    ("bad-name", HEAD.replace("job", "Nightly Job") + ONE_SOURCE, "not a job name", 2, "name"),
    ("name-starts-with-dot", HEAD.replace("job", ".job") + ONE_SOURCE, "not a job name", 2, None),
    ("missing-target", "version: 1\nname: job\n" + ONE_SOURCE, "required", 1, "target"),
    (
        "missing-base-url",
        "version: 1\nname: job\ntarget:\n  upload_path: x\n" + ONE_SOURCE,
        "required",
        4,
        "target.base_url",
    ),
    (
        "base-url-without-scheme",
        HEAD.replace("https://api.example.com", "api.example.com") + ONE_SOURCE,
        "or write: embedded",
        4,
        "target.base_url",
    ),
    (
        "api-key-env-not-a-name",
        HEAD + "  api_key_env: sk-live-1234\n" + ONE_SOURCE,
        "must name an environment variable",
        5,
        "target.api_key_env",
    ),
    (
        "api-key-in-manifest",
        HEAD + "  api_key: sk-live-1234\n" + ONE_SOURCE,
        "never goes in a manifest",
        5,
        "target.api_key",
    ),
    (
        "target-upload-path-absolute",
        HEAD + "  upload_path: /root\n" + ONE_SOURCE,
        "absolute",
        5,
        "target.upload_path",
    ),
    ("empty-sources", HEAD + "sources: []\n", "lists no sources", 5, "sources"),
    (
        "source-with-two-kinds",
        with_sources("  - path: ./data/a.txt\n    url: https://example.com/a.txt\n"),
        "names path and url",
        6,
        "sources[0]",
    ),
    ("source-with-no-kind", with_sources("  - upload_path: x\n"), "names no source", 6, None),
    (
        "ftp-url",
        with_sources("  - url: ftp://example.com/a.png\n"),
        "only http:// and https://",
        6,
        "sources[0].url",
    ),
    (
        "missing-file",
        with_sources("  - path: ./data/missing.txt\n"),
        "does not exist",
        6,
        "sources[0].path",
    ),
    ("path-is-a-folder", with_sources("  - path: ./data\n"), "is a folder", 6, None),
    (
        "glob-root-missing",
        with_sources("  - glob: './nowhere/**/*.jpg'\n"),
        "does not exist",
        6,
        "sources[0].glob",
    ),
    (
        "glob-dotdot-after-wildcard",
        with_sources("  - glob: './data/*/../x'\n"),
        "before the first wildcard",
        6,
        None,
    ),
    (
        "empty-glob-that-must-match",
        with_sources("  - glob: './empty/*.txt'\n    require_match: true\n"),
        "matches no files",
        6,
        "sources[0].glob",
    ),
    (
        "collision-path-and-glob",
        with_sources("  - path: ./data/a.txt\n  - glob: './data/*.txt'\n"),
        "lands on 'a.txt', as does sources[0] (line 6, ",
        7,
        "sources[1]",
    ),
    (
        "collision-two-urls",
        with_sources("  - url: https://one.example/x.png\n  - url: https://two.example/x.png\n"),
        "https://two.example/x.png lands on 'x.png', as does sources[0] (line 6, https://one",
        7,
        None,
    ),
    (
        "dotdot-in-upload-path",
        with_sources("  - path: ./data/a.txt\n    upload_path: ../escape\n"),
        "'..'",
        7,
        "sources[0].upload_path",
    ),
    (
        "file-name-with-slash",
        with_sources("  - path: ./data/a.txt\n    file_name: dir/a.txt\n"),
        "contains '/'",
        7,
        "sources[0].file_name",
    ),
    (
        "file-name-on-glob",
        with_sources("  - glob: './data/*.txt'\n    file_name: one.txt\n"),
        "names many files",
        7,
        "sources[0].file_name",
    ),
    (
        "file-name-on-url-list",
        with_sources("  - url_list: ./urls_good.txt\n    file_name: one.txt\n"),
        "names many files",
        7,
        None,
    ),
    (
        "base64-over-10mib",
        with_sources("  - path: ./big.bin\n    method: base64\n"),
        "refused above 10 MiB",
        6,
        "sources[0].method",
    ),
    (
        "base64-over-10mib-in-glob",
        with_sources("  - glob: './*.bin'\n    method: base64\n"),
        "refused above 10 MiB",
        6,
        "sources[0]",
    ),
    (
        "base64-for-a-url",
        with_sources("  - url: https://example.com/a.png\n    method: base64\n"),
        "base64 is refused for remote files",
        7,
        "sources[0].method",
    ),
    (
        "url-method-for-a-path",
        with_sources("  - path: ./data/a.txt\n    method: url\n"),
        "url applies to remote sources only (url and url_list)",
        7,
        None,
    ),
    (
        "unknown-method",
        with_sources("  - path: ./data/a.txt\n    method: fast\n"),
        "not a method",
        7,
        None,
    ),
    (
        "exclude-on-a-path",
        with_sources("  - path: ./data/a.txt\n    exclude: ['*.tmp']\n"),
        "only glob sources take exclude",
        7,
        None,
    ),
    (
        "embedded-origin-with-a-real-target",
        with_sources("  - url: '${EMBEDDED_ORIGIN}/data/a.txt'\n"),
        "only available when target.base_url is embedded",
        6,
        "sources[0].url",
    ),
    (
        "same-output-twice",
        HEAD + ONE_SOURCE + "outputs:\n  jsonl: out/m.txt\n  csv: out/m.txt\n",
        "same file as outputs.jsonl",
        9,
        "outputs.csv",
    ),
    # Numbers too large for a float: a problem to fix, never a crash nor infinity.
    ("ttl-of-400-nines", with_settings(f"  ttl: {'9' * 400}\n"), "too long", 8, "settings.ttl"),
    ("ttl-1e400", with_settings("  ttl: 1.0e+400\n"), "too large a number", 8, "settings.ttl"),
    ("ttl-nan", with_settings("  ttl: .nan\n"), "not a number", 8, "settings.ttl"),
    ("ttl-infinity", with_settings("  ttl: .inf\n"), "too large a number", 8, "settings.ttl"),
    (
        "ttl-of-400-digit-days",
        with_settings(f"  ttl: {'9' * 400}d\n"),
        "too large a number",
        8,
        "settings.ttl",
    ),
    ("ttl-past-a-century", with_settings("  ttl: 36501d\n"), "at most 36500d", 8, None),
    (
        "concurrency-of-5000-digits",
        with_settings(f"  concurrency: {'9' * 5000}\n"),
        "too large a number",
        8,
        "settings.concurrency",
    ),
    (
        "concurrency-of-400-digits",
        with_settings(f"  concurrency: {'9' * 400}\n"),
        "got a number of 400 digits",
        8,
        "settings.concurrency",
    ),
    (
        "bwlimit-of-400-digits",
        with_settings(f"  bwlimit: {'9' * 400}\n"),
        "too large (at most 8 PiB)",
        8,
        "settings.bwlimit",
    ),
    (
        "bwlimit-of-400-digit-mib",
        with_settings(f"  bwlimit: {'9' * 400}MiB\n"),
        "too large a number",
        8,
        "settings.bwlimit",
    ),
    ("bwlimit-1e400", with_settings("  bwlimit: 1.0e+400\n"), "too large a number", 8, None),
    ("tps-limit-of-400-digits", with_settings(f"  tps_limit: {'9' * 400}\n"), "at most", 8, None),
    (
        "version-of-5000-digits",
        f"version: {'1' * 5000}\nname: job\n",
        "too large a number",
        1,
        "version",
    ),
    # Tags: nothing in a manifest is ever constructed as a Python object.
    (
        "python-object-on-a-mapping",
        "version: 1\nname: job\ntarget: !!python/object:os.system {base_url: embedded}\n",
        "unsupported YAML tag",
        3,
        "target",
    ),
    (
        "python-tuple-as-sources",
        HEAD + "sources: !!python/tuple [{path: ./data/a.txt}]\n",
        "unsupported YAML tag",
        5,
        "sources",
    ),
    (
        "python-apply-on-a-scalar",
        HEAD + "sources:\n  - path: !!python/name:os.getcwd ''\n",
        "unsupported YAML tag",
        6,
        "sources[0].path",
    ),
    # Paths the operating system cannot take.
    (
        "nul-in-a-path",
        with_sources('  - path: "./data/a\\0.txt"\n'),
        "NUL character",
        6,
        "sources[0].path",
    ),
    (
        "nul-in-a-glob",
        with_sources('  - glob: "./da\\0ta/*.txt"\n'),
        "NUL character",
        6,
        "sources[0].glob",
    ),
    (
        "home-of-no-such-user",
        with_sources("  - path: ~no-such-user-here/a.txt\n"),
        "no such user",
        6,
        "sources[0].path",
    ),
    (
        "path-longer-than-any-path",
        with_sources(f"  - path: ./{'a' * 5000}.txt\n"),
        "longer than any path can be (4096 bytes)",
        6,
        "sources[0].path",
    ),
    (
        "glob-longer-than-any-path",
        with_sources(f"  - glob: ./data/{'*a' * 2500}.txt\n"),
        "longer than any path can be (4096 bytes)",
        6,
        "sources[0].glob",
    ),
    (
        "exclude-longer-than-any-path",
        with_sources(f"  - glob: ./data/*.txt\n    exclude: ['{'a' * 5000}']\n"),
        "longer than any path can be (4096 bytes)",
        7,
        "sources[0].exclude",
    ),
    (
        "path-with-a-name-longer-than-the-system-allows",
        with_sources(f"  - path: ./{'a' * 300}.txt\n"),
        "File name too long",
        6,
        "sources[0].path",
    ),
    (
        "glob-root-with-a-name-longer-than-the-system-allows",
        with_sources(f"  - glob: ./{'a' * 300}/*.txt\n"),
        "cannot be read: File name too long",
        6,
        "sources[0].glob",
    ),
    (
        "lone-surrogate-in-a-path",
        with_sources('  - path: "./data/\\ud800.txt"\n'),
        "lone surrogate",
        6,
        "sources[0].path",
    ),
    (
        "nul-byte-in-the-text",
        HEAD + "sources:\n  - path: ./data/a.txt\x00\n",
        "a character YAML does not allow: #x0000",
        6,
        None,
    ),
    (
        "control-character-in-a-url",
        with_sources('  - url: "https://example.com/a\\x1b[2J.png"\n'),
        "control character",
        6,
        "sources[0].url",
    ),
    # follow_symlinks is a glob's, and a boolean.
    (
        "follow-symlinks-on-a-path",
        with_sources("  - path: ./data/a.txt\n    follow_symlinks: true\n"),
        "only glob sources take follow_symlinks",
        7,
        "sources[0].follow_symlinks",
    ),
    (
        "follow-symlinks-not-a-boolean",
        with_sources("  - glob: ./data/*.txt\n    follow_symlinks: sometimes\n"),
        "expected true or false",
        7,
        "sources[0].follow_symlinks",
    ),
    # dedup is a boolean; immutable is a URL source's, and a boolean; copy is recorded only.
    (
        "dedup-not-a-boolean",
        with_settings("  dedup: sometimes\n"),
        "expected true or false",
        8,
        "settings.dedup",
    ),
    (
        "immutable-on-a-path",
        with_sources("  - path: ./data/a.txt\n    immutable: true\n"),
        "only url and url_list sources take immutable",
        7,
        "sources[0].immutable",
    ),
    (
        "immutable-not-a-boolean",
        with_sources("  - url: https://example.com/a.png\n    immutable: 1\n"),
        "expected true or false",
        7,
        "sources[0].immutable",
    ),
    (
        "method-copy",
        with_sources("  - path: ./data/a.txt\n    method: copy\n"),
        "'copy' is not a method; use one of auto, base64, stream, url",
        7,
        "sources[0].method",
    ),
    # An output over the ledger would destroy it.
    (
        "output-on-the-ledger",
        HEAD + "ledger: l.sqlite\n" + ONE_SOURCE + "outputs:\n  jsonl: l.sqlite\n",
        "is the ledger:",
        9,
        "outputs.jsonl",
    ),
    (
        "output-on-the-ledger-wal",
        HEAD + "ledger: l.sqlite\n" + ONE_SOURCE + "outputs:\n  csv: ./l.sqlite-wal\n",
        "write-ahead log",
        9,
        "outputs.csv",
    ),
    (
        "output-on-the-ledger-shm",
        HEAD + "ledger: l.sqlite\n" + ONE_SOURCE + "outputs:\n  json: out/../l.sqlite-shm\n",
        "shared-memory file",
        9,
        "outputs.json",
    ),
    (
        "metrics-on-the-default-ledger-lock",
        HEAD + ONE_SOURCE + "outputs:\n  metrics: .migrator/job.sqlite.lock\n",
        "the ledger's lock",
        8,
        "outputs.metrics",
    ),
    (
        "metrics-push-not-a-url",
        HEAD + ONE_SOURCE + "outputs:\n  metrics_push: pushgateway:9091\n",
        "not an http(s) URL",
        8,
        "outputs.metrics_push",
    ),
]


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "a.txt").write_text("a")
    (tmp_path / "data" / "b.txt").write_text("b")
    (tmp_path / "empty").mkdir()
    with (tmp_path / "big.bin").open("wb") as big:
        big.truncate(10 * 1024 * 1024 + 1)  # sparse: one byte over the base64 limit
    (tmp_path / "urls_good.txt").write_text("https://example.com/a\n")
    return tmp_path


def problems_of(workdir: Path, text: str) -> tuple[Path, ManifestError]:
    path = workdir / "job.yaml"
    path.write_text(text)
    with pytest.raises(ManifestError) as caught:
        manifest = load_manifest(path, environ={})
        check_plan(manifest)
    return path, caught.value


@pytest.mark.parametrize(
    ("text", "expected", "line", "field"),
    [pytest.param(*case[1:], id=case[0]) for case in CASES],
)
def test_bad_manifest_is_refused_with_its_location(
    workdir: Path, text: str, expected: str, line: int, field: str | None
) -> None:
    path, error = problems_of(workdir, text)
    matching = [p for p in error.problems if expected in p.message]
    assert matching, f"no problem says {expected!r}: {error}"
    problem = matching[0]
    assert (problem.file, problem.line) == (str(path), line)
    if field is not None:
        assert problem.field == field
    assert f"{path}:{line}: " in str(error)


def test_the_corpus_holds_at_least_thirty_distinct_cases() -> None:
    assert len({case[0] for case in CASES}) == len(CASES) >= 30


def test_a_bad_url_in_a_list_is_located_in_the_list_file(workdir: Path) -> None:
    (workdir / "urls.txt").write_text("https://example.com/a\n\n# note\nftp://example.com/b\n")
    _, error = problems_of(workdir, with_sources("  - url_list: ./urls.txt\n"))
    assert error.problems == [
        ManifestProblem(
            str(workdir / "urls.txt"),
            4,
            "sources[0].url_list",
            "'ftp://example.com/b' has ftp; only http:// and https:// URLs can be migrated",
        )
    ]


def test_embedded_origin_in_a_list_needs_an_embedded_target(workdir: Path) -> None:
    (workdir / "urls.txt").write_text("${EMBEDDED_ORIGIN}/data/a.txt\n")
    _, error = problems_of(workdir, with_sources("  - url_list: ./urls.txt\n"))
    assert error.problems[0].line == 1
    assert "only available when target.base_url is embedded" in error.problems[0].message


def test_a_url_list_with_no_urls_is_refused(workdir: Path) -> None:
    (workdir / "urls.txt").write_text("# nothing yet\n\n")
    _, error = problems_of(workdir, with_sources("  - url_list: ./urls.txt\n"))
    assert "lists no usable URLs" in str(error)


def test_a_url_list_that_does_not_exist_is_refused_at_load(workdir: Path) -> None:
    _, error = problems_of(workdir, with_sources("  - url_list: ./nope.txt\n"))
    assert error.problems[0].field == "sources[0].url_list"
    assert "does not exist" in error.problems[0].message


def test_every_problem_is_reported_at_once(workdir: Path) -> None:
    text = (
        "version: 3\nname: Bad Name\ntarget:\n  base_url: ftp://x\n"
        "settings:\n  concurrency: 0\nsources: []\n"
    )
    _, error = problems_of(workdir, text)
    assert [p.line for p in error.problems] == [1, 2, 4, 6, 7]


def test_the_key_is_never_echoed_in_a_message(workdir: Path) -> None:
    text = HEAD + "  api_key: sk-live-secret\n  api_key_env: sk-live-secret\n" + ONE_SOURCE
    _, error = problems_of(workdir, text)
    assert len(error.problems) == 2
    assert "sk-live-secret" not in str(error)


def test_a_missing_manifest_is_one_problem(tmp_path: Path) -> None:
    with pytest.raises(ManifestError) as caught:
        load_manifest(tmp_path / "nope.yaml")
    assert caught.value.problems == [
        ManifestProblem(str(tmp_path / "nope.yaml"), None, None, "no such manifest file")
    ]


def test_a_folder_is_not_a_manifest(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="is a directory"):
        load_manifest(tmp_path)


def test_an_empty_manifest_is_refused(tmp_path: Path) -> None:
    (tmp_path / "empty.yaml").write_text("# only a comment\n")
    with pytest.raises(ManifestError, match="the manifest is empty"):
        load_manifest(tmp_path / "empty.yaml")


def test_a_manifest_that_is_not_utf8_is_refused(tmp_path: Path) -> None:
    (tmp_path / "latin1.yaml").write_bytes("name: caf\xe9\n".encode("latin-1"))
    with pytest.raises(ManifestError, match="not UTF-8"):
        load_manifest(tmp_path / "latin1.yaml")
