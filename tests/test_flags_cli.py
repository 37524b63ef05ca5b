"""The command line's conventions, through `python -m migrator`: timeouts and retries as
flags, a ledger that is not there, -q and -v, MIGRATOR_* variables and their precedence,
the API key's source, no abbreviations, short flags, examples, completion, --version."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import platform
import sqlite3
import subprocess
from importlib import metadata
from pathlib import Path

import pytest
from conftest import Finished, run_cli, write_file, write_manifest

from migrator.cli import build_parser
from migrator.emulator import Emulator
from migrator.flags import apply_environment

pytestmark = pytest.mark.timeout(60)

USAGE = 2


@pytest.fixture
def manifest(job: Path, emulator: Emulator) -> Path:
    """One small file to upload to the in-process emulator (settings.retries 0)."""
    write_file(job / "a.txt", 100)
    return write_manifest(job, emulator.base_url, [{"path": "./a.txt"}], retries=0)


async def run(manifest: Path, key: str | None, *args: str, **env: str) -> Finished:
    return await run_cli("run", str(manifest), "--no-progress", *args, key=key, env=env)


def uploads(emulator: Emulator) -> int:
    """Upload requests the emulator answered."""
    return len(emulator.requests)


def upload_outcomes(ledger: Path) -> list[str]:
    """The outcomes of the upload attempts the ledger recorded (link probes left out)."""
    query = "SELECT outcome FROM attempts WHERE method != 'probe' ORDER BY id"
    with contextlib.closing(sqlite3.connect(f"file:{ledger}?mode=ro", uri=True)) as conn:
        return [row[0] for row in conn.execute(query)]


# -- timeouts and retries ----------------------------------------------------------------


async def test_retries_on_the_command_line_beat_the_manifest(
    manifest: Path, emulator: Emulator, api_key: str
) -> None:
    emulator.inject_faults(500, 2)

    result = await run(manifest, api_key, "--retries", "2")

    assert result.code == 0, result.stderr
    assert "1 uploaded" in result.stdout
    assert uploads(emulator) == 3


async def test_retries_from_the_environment_beat_the_manifest(
    manifest: Path, emulator: Emulator, api_key: str
) -> None:
    emulator.inject_faults(500, 1)

    result = await run(manifest, api_key, MIGRATOR_RETRIES="1")

    assert result.code == 0, result.stderr
    assert uploads(emulator) == 2


async def test_a_flag_beats_its_environment_variable(
    manifest: Path, emulator: Emulator, api_key: str
) -> None:
    emulator.inject_faults(500, 1)

    result = await run(manifest, api_key, "--retries", "0", MIGRATOR_RETRIES="3")

    assert result.code == 1
    assert "1 failed" in result.stdout
    assert uploads(emulator) == 1


async def test_timeout_on_the_command_line_gives_up_on_a_slow_answer(
    job: Path, emulator: Emulator, api_key: str
) -> None:
    write_file(job / "a.txt", 100)
    manifest = write_manifest(job, emulator.base_url, [{"path": "./a.txt"}], timeout="2m")
    emulator.delay_stores(8, 1)  # the first answer comes after 8 s

    # 2 s, not less: the retry, answered at once, must fit in it on a loaded CI box too
    result = await run(manifest, api_key, "--timeout", "2s", "--retries", "1")

    assert result.code == 0, result.stderr
    assert upload_outcomes(job / "ledger.sqlite") == ["retry", "ok"]  # given up after 2 s


BAD_FLAGS = {
    "timeout zero": (["--timeout", "0"], "--timeout"),
    "timeout words": (["--timeout", "a while"], "--timeout"),
    "connect timeout zero": (["--connect-timeout", "0s"], "--connect-timeout"),
    "retries negative": (["--retries", "-1"], "--retries"),
    "retries too many": (["--retries", "51"], "--retries"),
    "stats zero": (["--stats", "0s"], "--stats"),
    "stats words": (["--stats", "often"], "--stats"),
    "grace words": (["--grace", "soon"], "--grace"),
    "lease zero": (["--lease", "0s"], "--lease"),
    "lease over a day": (["--lease", "2d"], "--lease: must be a duration from 1s to 1d"),
    "abbreviation": (["--dry"], "unrecognized arguments: --dry"),
    "quiet and verbose": (["-q", "-v"], "not allowed with"),
}


@pytest.mark.parametrize("case", BAD_FLAGS, ids=list(BAD_FLAGS))
async def test_a_bad_flag_exits_2_with_one_line_naming_it(
    manifest: Path, emulator: Emulator, api_key: str, case: str
) -> None:
    args, expected = BAD_FLAGS[case]

    result = await run(manifest, api_key, *args)

    assert result.code == USAGE
    assert expected in result.one_error_line()
    assert uploads(emulator) == 0
    assert not (manifest.parent / "ledger.sqlite").exists()


# -- a ledger that is not there ----------------------------------------------------------


LEDGER_COMMANDS = {
    "status": [],
    "export": [],
    "refresh": [],
    "download": ["--dest", "{dest}"],
    "verify": [],
}


@pytest.mark.parametrize("command", LEDGER_COMMANDS)
async def test_a_mistyped_ledger_exits_2_and_creates_nothing(
    manifest: Path, tmp_path: Path, api_key: str, command: str
) -> None:
    typo = tmp_path / "ledgr.sqlite"
    extra = [a.format(dest=tmp_path / "dest") for a in LEDGER_COMMANDS[command]]

    result = await run_cli(command, str(manifest), "--ledger", str(typo), *extra, key=api_key)

    assert result.code == USAGE
    assert result.one_error_line().startswith(f"migrator: no ledger at {typo} (from --ledger)")
    assert not typo.exists()
    assert not (tmp_path / "dest").exists()


async def test_a_lost_ledger_dir_exits_2_naming_the_variable(
    manifest: Path, tmp_path: Path
) -> None:
    empty = tmp_path / "elsewhere"
    empty.mkdir()

    result = await run_cli("status", str(manifest), env={"MIGRATOR_LEDGER_DIR": str(empty)})

    assert result.code == USAGE
    line = result.one_error_line()
    assert f"no ledger at {empty / 'job.sqlite'} (from MIGRATOR_LEDGER_DIR)" in line
    assert list(empty.iterdir()) == []


async def test_run_still_creates_a_new_ledger(manifest: Path, tmp_path: Path, api_key: str) -> None:
    fresh = tmp_path / "new" / "job.sqlite"

    result = await run(manifest, api_key, "--ledger", str(fresh))

    assert result.code == 0, result.stderr
    assert fresh.is_file()
    status = await run_cli("status", str(manifest), "--ledger", str(fresh))
    assert status.code == 0, status.stderr


# -- quiet and verbose -------------------------------------------------------------------


async def test_quiet_prints_nothing_when_all_went_well(
    manifest: Path, emulator: Emulator, api_key: str
) -> None:
    result = await run_cli("run", str(manifest), "-q", key=api_key)

    assert (result.code, result.stdout, result.stderr) == (0, "", "")
    assert uploads(emulator) == 1


async def test_quiet_says_on_stderr_when_items_failed(
    manifest: Path, emulator: Emulator, api_key: str
) -> None:
    emulator.inject_faults(400, 1)

    result = await run_cli("run", str(manifest), "-q", key=api_key)

    assert result.code == 1
    assert result.stdout == ""
    assert result.one_error_line().startswith("migrator: run: 0 uploaded, 0 skipped, 1 failed")


async def test_verbose_shows_retries_and_items_on_the_console(
    manifest: Path, emulator: Emulator, api_key: str
) -> None:
    emulator.inject_faults(500, 1)

    result = await run(manifest, api_key, "-v", "--retries", "1")

    assert result.code == 0, result.stderr
    assert "run.attempt" in result.stderr
    assert "outcome=retry" in result.stderr
    assert "upload.done" in result.stderr


async def test_retries_that_keep_failing_become_warnings_without_verbose(
    manifest: Path, emulator: Emulator, api_key: str
) -> None:
    emulator.inject_faults(500, 3)

    result = await run(manifest, api_key, "--retries", "3")

    assert result.code == 0, result.stderr
    warned = [line for line in result.stderr.splitlines() if "run.attempt" in line]
    assert len(warned) == 1, result.stderr  # the third failure; the first two stay in the log
    assert "level=warning" in warned[0]
    assert "attempt=3" in warned[0]


# -- the environment ---------------------------------------------------------------------


async def test_an_environment_variable_sets_a_switch(
    manifest: Path, emulator: Emulator, api_key: str
) -> None:
    result = await run(manifest, api_key, MIGRATOR_DRY_RUN="yes")

    assert result.code == 0, result.stderr
    assert result.stdout.startswith("dry run:")
    assert uploads(emulator) == 0


BAD_ENVIRONMENT = {
    "MIGRATOR_CONCURRENCY": "many",
    "MIGRATOR_TPS_LIMIT": "fast",
    "MIGRATOR_DRY_RUN": "maybe",
    "MIGRATOR_GRACE": "soon",
    "MIGRATOR_LOG_FORMAT": "xml",
    "MIGRATOR_LEASE": "soon",
}


@pytest.mark.parametrize("variable", BAD_ENVIRONMENT)
async def test_a_bad_environment_value_exits_2_naming_the_variable(
    manifest: Path, emulator: Emulator, api_key: str, variable: str
) -> None:
    value = BAD_ENVIRONMENT[variable]

    result = await run(manifest, api_key, **{variable: value})

    assert result.code == USAGE
    assert f"{variable}: {value!r}" in result.one_error_line()
    assert uploads(emulator) == 0


def key_file(folder: Path, key: str) -> Path:
    path = folder / "kie.key"
    path.write_text(key + "\n", encoding="utf-8")
    path.chmod(0o600)
    return path


async def test_the_key_in_the_environment_wins_over_the_key_file(
    job: Path, emulator: Emulator, api_key: str
) -> None:
    write_file(job / "a.txt", 100)
    stale = key_file(job, "stale-key-0000000000")
    manifest = write_manifest(job, emulator.base_url, [{"path": "./a.txt"}])
    _add_to_target(manifest, f"api_key_file: {stale}")

    result = await run(manifest, api_key)

    assert result.code == 0, result.stderr
    assert "1 uploaded" in result.stdout


async def test_a_rejected_key_from_the_environment_is_named_by_its_variable(
    manifest: Path,
) -> None:
    result = await run(manifest, "wrong-key-123456789")

    assert result.code == 3
    line = result.one_error_line()
    assert "the key came from the environment variable KIE_API_KEY" in line
    assert "wrong-key-123456789" not in result.stdout + result.stderr


async def test_a_rejected_key_from_a_file_is_named_by_its_file(
    job: Path, emulator: Emulator
) -> None:
    write_file(job / "a.txt", 100)
    wrong = key_file(job, "wrong-key-in-a-file")
    manifest = write_manifest(job, emulator.base_url, [{"path": "./a.txt"}])
    _add_to_target(manifest, f"api_key_file: {wrong}")

    result = await run(manifest, None)

    assert result.code == 3
    assert f"the key came from the API key file {wrong}" in result.one_error_line()
    assert "wrong-key-in-a-file" not in result.stdout + result.stderr


async def test_a_key_pasted_into_api_key_env_is_refused_without_echo(
    job: Path, emulator: Emulator, api_key: str
) -> None:
    write_file(job / "a.txt", 100)
    manifest = write_manifest(job, emulator.base_url, [{"path": "./a.txt"}])
    _add_to_target(manifest, "api_key_env: sk-live-4f9a2b7c")

    result = await run(manifest, api_key)

    assert result.code == USAGE
    assert "target.api_key_env: must name an environment variable" in result.one_error_line()
    assert "sk-live-4f9a2b7c" not in result.stdout + result.stderr
    assert uploads(emulator) == 0


def _add_to_target(manifest: Path, line: str) -> None:
    """One more `key: value` under the manifest's `target:` (write_manifest's YAML)."""
    text = manifest.read_text(encoding="utf-8")
    manifest.write_text(text.replace("target:\n", f"target:\n  {line}\n", 1), encoding="utf-8")


# -- conventions -------------------------------------------------------------------------


async def test_short_flags_stand_for_the_common_ones(
    manifest: Path, emulator: Emulator, api_key: str
) -> None:
    result = await run(manifest, api_key, "-n", "-c", "2", "--grace", "5s")

    assert result.code == 0, result.stderr
    assert result.stdout.startswith("dry run:")
    assert uploads(emulator) == 0


COMMANDS = sorted(build_parser()._subparsers._group_actions[0].choices)  # type: ignore[union-attr]


@pytest.mark.parametrize("command", ["", *COMMANDS])
async def test_every_help_ends_with_examples(command: str) -> None:
    result = await run_cli(*filter(None, [command, "--help"]))

    assert result.code == 0
    examples = result.stdout.split("examples:\n", 1)[1]
    assert f"migrator {command}".strip() in examples  # EXAMPLES in cli.py names each


async def test_version_names_migrator_python_and_aiohttp() -> None:
    result = await run_cli("--version")

    assert result.code == 0
    lines = result.stdout.splitlines()
    assert lines[0].startswith("migrator ")
    assert lines[1].startswith(f"Python {platform.python_version()}")
    assert lines[2] == f"aiohttp {metadata.version('aiohttp')}"


def every_flag() -> dict[str, list[str]]:
    """Each command's option strings, as the parser has them."""
    subparsers = build_parser()._subparsers._group_actions[0]  # type: ignore[union-attr]
    return {
        name: [option for action in sub._actions for option in action.option_strings]
        for name, sub in subparsers.choices.items()
    }


async def test_bash_completion_parses_and_names_every_command_and_flag(tmp_path: Path) -> None:
    result = await run_cli("completion", "bash")
    script = tmp_path / "migrator.bash"
    script.write_text(result.stdout, encoding="utf-8")

    checked = await asyncio.to_thread(
        subprocess.run, ["bash", "-n", str(script)], capture_output=True, timeout=10
    )

    assert result.code == 0
    assert checked.returncode == 0, checked.stderr
    for command, flags in every_flag().items():
        assert command in result.stdout
        for flag in flags:
            assert flag in result.stdout, (command, flag)


@pytest.mark.parametrize(
    ("words", "expected"),
    [
        ("migrator ru", ["run"]),
        ("migrator run --dr", ["--dry-run"]),
        ("migrator status --format ", ["table", "json"]),
        ("migrator completion z", ["zsh"]),
    ],
)
async def test_bash_completion_completes(tmp_path: Path, words: str, expected: list[str]) -> None:
    result = await run_cli("completion", "bash")
    script = tmp_path / "migrator.bash"
    script.write_text(result.stdout, encoding="utf-8")
    parts = words.split(" ")
    program = (
        f"source {script}\n"
        f"COMP_WORDS=({' '.join(repr(p) for p in parts)})\n"
        f"COMP_CWORD={len(parts) - 1}\n"
        "_migrator\n"
        'printf "%s\\n" "${COMPREPLY[@]}"\n'
    )

    done = await asyncio.to_thread(
        subprocess.run, ["bash", "-c", program], capture_output=True, text=True, timeout=10
    )

    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == expected


@pytest.mark.parametrize("shell", ["zsh", "fish"])
async def test_zsh_and_fish_completion_name_every_command_and_long_flag(shell: str) -> None:
    result = await run_cli("completion", shell)

    assert result.code == 0
    for command, flags in every_flag().items():
        assert command in result.stdout
        for flag in flags:
            name = flag if shell == "zsh" else flag.lstrip("-")
            assert name in result.stdout, (command, flag)


# -- the environment's rule for repeatable flags (none of today's commands has one) ------


def parse_with(environ: dict[str, str], *argv: str) -> list[str] | None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--include", action="append")
    given = apply_environment(parser, environ)
    parsed = parser.parse_args(argv)
    given.fill(parsed)
    included: list[str] | None = parsed.include
    return included


def test_a_repeatable_flag_takes_its_variable_when_not_given() -> None:
    assert parse_with({"MIGRATOR_INCLUDE": "*.png"}) == ["*.png"]


def test_a_repeatable_flag_given_replaces_its_variable() -> None:
    assert parse_with({"MIGRATOR_INCLUDE": "*.png"}, "--include", "*.jpg") == ["*.jpg"]
