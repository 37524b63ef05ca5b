"""Loading good manifests: values, defaults, paths, the ledger's place, the samples."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from migrator.errors import ManifestError
from migrator.manifest import (
    LEDGER_DIR_ENV,
    MANIFEST_KEYS,
    ledger_clash,
    load_manifest,
    output_clash,
)
from migrator.model import (
    EMBEDDED,
    GIB,
    HOUR,
    KIB,
    MIB,
    GlobSource,
    Method,
    Outputs,
    PathSource,
    Settings,
    SourceOptions,
    UrlListSource,
    UrlSource,
)
from migrator.plan import check_plan
from migrator.units import parse_duration, parse_size

SAMPLES = Path(__file__).resolve().parents[1] / "sample_manifests"
MINIMAL = """\
version: 1
name: nightly-assets
target:
  base_url: https://kieai.redpandaai.co/
sources:
  - path: ./data/report.pdf
"""


@pytest.fixture
def job(tmp_path: Path) -> Path:
    """A folder with data files and the minimal manifest at job/job.yaml."""
    folder = tmp_path / "job"
    (folder / "data").mkdir(parents=True)
    (folder / "data" / "report.pdf").write_bytes(b"%PDF-1.4")
    (folder / "photos" / "2024").mkdir(parents=True)
    (folder / "photos" / "2024" / "a.jpg").write_bytes(b"jpg")
    (folder / "urls.txt").write_text("https://example.com/a.png\n")
    (folder / "job.yaml").write_text(MINIMAL)
    return folder


def write(folder: Path, text: str) -> Path:
    path = folder / "job.yaml"
    path.write_text(text)
    return path


def with_settings(lines: str) -> str:
    return MINIMAL + "settings:\n" + lines


# -- values and defaults ----------------------------------------------------------------------


def test_minimal_manifest_takes_every_default(job: Path) -> None:
    manifest = load_manifest(job / "job.yaml", environ={})
    assert manifest.name == "nightly-assets"
    assert manifest.version == 1
    assert manifest.settings == Settings()
    assert manifest.outputs == Outputs()
    assert manifest.target.api_key_env == "KIE_API_KEY"
    assert manifest.target.api_key_file is None
    assert manifest.target.upload_path == ""


def test_base_url_loses_its_trailing_slash(job: Path) -> None:
    manifest = load_manifest(job / "job.yaml", environ={})
    assert manifest.target.base_url == "https://kieai.redpandaai.co"


def test_embedded_base_url_is_kept_as_the_word(job: Path) -> None:
    path = write(job, MINIMAL.replace("https://kieai.redpandaai.co/", "embedded"))
    manifest = load_manifest(path, environ={})
    assert manifest.target.base_url == EMBEDDED
    assert manifest.target.is_embedded


def test_path_source_is_absolute_and_located(job: Path) -> None:
    manifest = load_manifest(job / "job.yaml", environ={})
    assert manifest.sources == (PathSource(path=job / "data" / "report.pdf", line=6),)


def test_paths_are_relative_to_the_manifest_not_the_current_folder(
    job: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    manifest = load_manifest(Path("../job/job.yaml"), environ={})
    assert manifest.path == job / "job.yaml"
    assert manifest.sources[0] == PathSource(path=job / "data" / "report.pdf", line=6)


def test_target_keys_are_read(job: Path) -> None:
    text = MINIMAL.replace(
        "  base_url: https://kieai.redpandaai.co/\n",
        "  base_url: http://127.0.0.1:9000\n  api_key_env: MY_KEY\n"
        "  api_key_file: ./secrets/kie.key\n  upload_path: migrations/assets/\n",
    )
    target = load_manifest(write(job, text), environ={}).target
    assert target.base_url == "http://127.0.0.1:9000"
    assert target.api_key_env == "MY_KEY"
    assert target.api_key_file == job / "secrets" / "kie.key"
    assert target.upload_path == "migrations/assets"


def test_outputs_become_absolute(job: Path) -> None:
    text = MINIMAL + "outputs:\n  jsonl: out/m.jsonl\n  metrics: /var/lib/node/migrator.prom\n"
    outputs = load_manifest(write(job, text), environ={}).outputs
    assert outputs == Outputs(
        jsonl=job / "out" / "m.jsonl", metrics=Path("/var/lib/node/migrator.prom")
    )


def test_every_setting_is_read(job: Path) -> None:
    text = with_settings(
        "  concurrency: 32\n  base64_max: 64KiB\n  url_max: 10MB\n  retries: 0\n"
        "  ttl: 3d\n  refresh_within: 15m\n  tps_limit: 12.5\n  bwlimit: 8MiB/s\n"
    )
    settings = load_manifest(write(job, text), environ={}).settings
    assert settings == Settings(
        concurrency=32,
        base64_max=64 * KIB,
        url_max=10_000_000,
        retries=0,
        ttl=72 * HOUR,
        refresh_within=15 * 60.0,
        tps_limit=12.5,
        bwlimit=8 * MIB,
    )


@pytest.mark.parametrize(
    ("written", "size"),
    [("512", 512), ("64KiB", 64 * KIB), ("1MiB", MIB), ("10MB", 10_000_000), ("0", 0)],
)
def test_size_forms(job: Path, written: str, size: int) -> None:
    settings = load_manifest(write(job, with_settings(f"  base64_max: {written}\n")), environ={})
    assert settings.settings.base64_max == size


def test_a_gib_size_is_parsed_and_refused_above_the_url_limit(job: Path) -> None:
    with pytest.raises(ManifestError, match=f"got {2 * GIB} bytes"):
        load_manifest(write(job, with_settings("  url_max: 2GiB\n")), environ={})


@pytest.mark.parametrize(
    ("written", "seconds"),
    [("90s", 90.0), ("15m", 900.0), ("12h", 12 * HOUR), ("1h30m", 5400.0), ("600", 600.0)],
)
def test_duration_forms(job: Path, written: str, seconds: float) -> None:
    text = with_settings(f"  ttl: 3d\n  refresh_within: {written}\n")
    assert load_manifest(write(job, text), environ={}).settings.refresh_within == seconds


def test_sizes_are_exact_up_to_8_pib() -> None:
    assert parse_size("8192TiB") == 2**53
    assert parse_size("1.5KiB") == 1536
    with pytest.raises(ValueError, match="too large"):
        parse_size("8193TiB")
    with pytest.raises(ValueError, match="not a whole number"):
        parse_size("0.1B")


@pytest.mark.parametrize("written", ["9" * 400, 10**400, "1" + "0" * 41 + "s", 1e308, "36501d"])
def test_a_duration_too_long_for_any_clock_is_refused_not_infinite(written: object) -> None:
    with pytest.raises(ValueError, match=r"too long|too large"):
        parse_duration(written)  # type: ignore[arg-type]


def test_durations_up_to_a_century_are_kept() -> None:
    assert parse_duration("36500d") == 36500 * 24 * HOUR
    assert parse_duration("1.5h") == 1.5 * HOUR


def test_ttl_in_days(job: Path) -> None:
    text = with_settings("  ttl: 3d\n")
    assert load_manifest(write(job, text), environ={}).settings.ttl == 3 * 24 * HOUR


def test_source_options_are_read(job: Path) -> None:
    text = MINIMAL + "    file_name: q1.pdf\n    upload_path: /reports/\n    method: stream\n"
    with pytest.raises(ManifestError, match="absolute"):
        load_manifest(write(job, text), environ={})
    source = load_manifest(write(job, text.replace("/reports/", "reports/")), environ={})
    assert source.sources[0].options == SourceOptions(
        file_name="q1.pdf", upload_path="reports", method=Method.STREAM
    )


def test_glob_source_is_split_into_root_and_pattern(job: Path) -> None:
    text = MINIMAL.replace(
        "  - path: ./data/report.pdf\n",
        '  - glob: "./photos/**/*.jpg"\n    exclude: ["./**/thumbs/**", "*.tmp"]\n',
    )
    source = load_manifest(write(job, text), environ={}).sources[0]
    assert source == GlobSource(
        pattern="./photos/**/*.jpg",
        root=job / "photos",
        relative_pattern="**/*.jpg",
        exclude=("**/thumbs/**", "*.tmp"),
        line=6,
    )


def test_globs_do_not_follow_symlinks_unless_told(job: Path) -> None:
    text = MINIMAL + "  - glob: 'photos/**'\n  - glob: 'data/*'\n    follow_symlinks: true\n"
    first, second = load_manifest(write(job, text), environ={}).sources[1:]
    assert isinstance(first, GlobSource) and isinstance(second, GlobSource)
    assert (first.follow_symlinks, second.follow_symlinks) == (False, True)


def test_dedup_is_on_unless_turned_off(job: Path) -> None:
    assert load_manifest(write(job, MINIMAL), environ={}).settings.dedup is True
    manifest = load_manifest(write(job, with_settings("  dedup: false\n")), environ={})
    assert manifest.settings.dedup is False


def test_url_sources_are_taken_as_changing_unless_said_immutable(job: Path) -> None:
    (job / "urls.txt").write_text("https://example.com/a.png\n")
    text = MINIMAL + "  - url: https://example.com/b.png\n  - url_list: urls.txt\n"
    text += "    immutable: true\n"
    _, url, url_list = load_manifest(write(job, text), environ={}).sources
    assert isinstance(url, UrlSource) and isinstance(url_list, UrlListSource)
    assert (url.immutable, url_list.immutable) == (False, True)


def test_a_path_source_may_be_a_symlink_leading_anywhere(job: Path, tmp_path: Path) -> None:
    (tmp_path / "elsewhere.pdf").write_bytes(b"%PDF")
    (job / "data" / "linked.pdf").symlink_to(tmp_path / "elsewhere.pdf")
    text = MINIMAL.replace("report.pdf", "linked.pdf")
    [source] = load_manifest(write(job, text), environ={}).sources
    assert source == PathSource(path=job / "data" / "linked.pdf", line=6)


def test_a_path_source_linking_to_a_fifo_is_refused(job: Path) -> None:
    os.mkfifo(job / "data" / "pipe")
    (job / "data" / "linked.pdf").symlink_to("pipe")
    with pytest.raises(ManifestError, match=r"is not a regular file \(a FIFO\)"):
        load_manifest(write(job, MINIMAL.replace("report.pdf", "linked.pdf")), environ={})


def test_exclude_may_be_a_single_pattern(job: Path) -> None:
    text = MINIMAL.replace(
        "  - path: ./data/report.pdf\n", '  - glob: "./photos/**"\n    exclude: "*.tmp"\n'
    )
    source = load_manifest(write(job, text), environ={}).sources[0]
    assert isinstance(source, GlobSource)
    assert source.exclude == ("*.tmp",)


def test_url_and_url_list_sources(job: Path) -> None:
    text = MINIMAL.replace(
        "  - path: ./data/report.pdf\n",
        "  - url: https://example.com/a.png\n    method: url\n  - url_list: urls.txt\n",
    )
    sources = load_manifest(write(job, text), environ={}).sources
    assert sources == (
        UrlSource(
            url="https://example.com/a.png", options=SourceOptions(method=Method.URL), line=6
        ),
        UrlListSource(path=job / "urls.txt", line=8),
    )


def test_embedded_origin_is_kept_untouched_for_an_embedded_target(job: Path) -> None:
    text = MINIMAL.replace("https://kieai.redpandaai.co/", "embedded").replace(
        "  - path: ./data/report.pdf\n", '  - url: "${EMBEDDED_ORIGIN}/data/report.pdf"\n'
    )
    source = load_manifest(write(job, text), environ={}).sources[0]
    assert source == UrlSource(url="${EMBEDDED_ORIGIN}/data/report.pdf", line=6)


def test_ledger_clash_names_every_file_of_the_ledger() -> None:
    ledger = Path("/j/.migrator/job.sqlite")
    for name, words in [
        ("job.sqlite", "is the ledger:"),
        ("job.sqlite-wal", "is the ledger's write-ahead log:"),
        ("job.sqlite-shm", "is the ledger's shared-memory file:"),
        ("job.sqlite-journal", "is the ledger's journal:"),
        ("job.sqlite.lock", "is the ledger's lock:"),
    ]:
        assert words in (ledger_clash(ledger.parent / name, ledger) or ""), name
    assert ledger_clash(Path("/j/.migrator/job.log"), ledger) is None
    assert ledger_clash(Path("/j/job.sqlite"), ledger) is None


def test_an_output_reaching_the_ledger_through_a_link_is_refused(tmp_path: Path) -> None:
    ledger = tmp_path / "state" / "job.sqlite"
    ledger.parent.mkdir()
    ledger.write_bytes(b"SQLite format 3\0")
    (tmp_path / "out").symlink_to(ledger.parent, target_is_directory=True)
    (tmp_path / "hard.sqlite").hardlink_to(ledger)

    assert "leads to the ledger's lock" in (
        output_clash(tmp_path / "out" / "job.sqlite.lock", ledger) or ""
    )
    assert "hard link to the ledger" in (output_clash(tmp_path / "hard.sqlite", ledger) or "")
    assert output_clash(tmp_path / "out" / "mapping.jsonl", ledger) is None


def test_loading_writes_nothing(job: Path) -> None:
    before = sorted(p.relative_to(job) for p in job.rglob("*"))
    load_manifest(job / "job.yaml", environ={})
    assert sorted(p.relative_to(job) for p in job.rglob("*")) == before


# -- where the ledger lives -------------------------------------------------------------------


def test_ledger_defaults_beside_the_manifest(job: Path) -> None:
    manifest = load_manifest(job / "job.yaml", environ={})
    assert manifest.ledger == job / ".migrator" / "nightly-assets.sqlite"


def test_ledger_key_is_relative_to_the_manifest(job: Path) -> None:
    path = write(job, MINIMAL + "ledger: state/jobs.sqlite\n")
    assert load_manifest(path, environ={}).ledger == job / "state" / "jobs.sqlite"


def test_ledger_dir_environment_wins_over_the_ledger_key(job: Path, tmp_path: Path) -> None:
    path = write(job, MINIMAL + "ledger: state/jobs.sqlite\n")
    manifest = load_manifest(path, environ={LEDGER_DIR_ENV: str(tmp_path / "ledgers")})
    assert manifest.ledger == tmp_path / "ledgers" / "nightly-assets.sqlite"


def test_ledger_override_wins_over_the_environment(job: Path, tmp_path: Path) -> None:
    path = write(job, MINIMAL + "ledger: state/jobs.sqlite\n")
    manifest = load_manifest(
        path,
        ledger_override=tmp_path / "cli.sqlite",
        environ={LEDGER_DIR_ENV: str(tmp_path / "ledgers")},
    )
    assert manifest.ledger == tmp_path / "cli.sqlite"


def test_relative_override_and_environment_are_taken_from_the_current_folder(
    job: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    by_cli = load_manifest(job / "job.yaml", ledger_override=Path("cli.sqlite"), environ={})
    by_env = load_manifest(job / "job.yaml", environ={LEDGER_DIR_ENV: "ledgers"})
    assert by_cli.ledger == tmp_path / "cli.sqlite"
    assert by_env.ledger == tmp_path / "ledgers" / "nightly-assets.sqlite"


def test_an_empty_ledger_dir_environment_is_ignored(job: Path) -> None:
    manifest = load_manifest(job / "job.yaml", environ={LEDGER_DIR_ENV: ""})
    assert manifest.ledger == job / ".migrator" / "nightly-assets.sqlite"


# -- the sample manifests ---------------------------------------------------------------------


@pytest.mark.parametrize("sample", sorted(SAMPLES.glob("*.yaml")), ids=lambda p: p.name)
def test_every_sample_manifest_loads_and_passes_the_plan_check(sample: Path) -> None:
    manifest = load_manifest(sample, environ={})
    assert check_plan(manifest).items > 0


def test_the_samples_cover_every_source_kind() -> None:
    names = {p.name for p in SAMPLES.glob("*.yaml")}
    assert {"quickstart.yaml", "local_file.yaml", "glob.yaml", "url.yaml"} <= names
    assert {"url_list.yaml", "reference.yaml"} <= names


def test_the_reference_manifest_names_every_key() -> None:
    text = (SAMPLES / "reference.yaml").read_text()
    written = {line.strip().lstrip("#- ").split(":", 1)[0] for line in text.splitlines()}
    every_key = {(where, key) for where, keys in MANIFEST_KEYS.items() for key in keys}
    assert {(where, key) for where, key in every_key if key not in written} == set()
    assert "follow_symlinks" in MANIFEST_KEYS["sources[]"]


def test_the_sample_data_stays_small() -> None:
    total = sum(p.stat().st_size for p in (SAMPLES / "data").rglob("*") if p.is_file())
    assert MIB < total < 3 * MIB
