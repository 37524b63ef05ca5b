"""The logging pipeline: JSON lines to a file, a console view, and secrets kept out of both."""

from __future__ import annotations

import io
import json
import os
import re
import stat
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import structlog

from migrator.connect import read_api_key
from migrator.errors import ConfigError, RetryableError
from migrator.logs import configure_logging, flush_logs, get_logger, redact_secrets
from migrator.model import Target

SECRET = "kie-SECRET-7d3f9a1b"


class Terminal(io.StringIO):
    """A console stream that says it is a TTY."""

    def isatty(self) -> bool:
        return True


@pytest.fixture(autouse=True)
def reset_logging() -> Iterator[None]:
    yield
    configure_logging(log_file=None, console="none")
    structlog.reset_defaults()


@pytest.fixture
def log_file(tmp_path: Path) -> Path:
    return tmp_path / "logs" / "run.jsonl"


def lines_of(path: Path) -> list[dict[str, Any]]:
    flush_logs()  # the file is buffered; a reader in the same process asks for its lines
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def fail_with_secret() -> None:
    url = "https://example.test/upload"
    raise RetryableError(f"cannot reach {url} with Bearer {SECRET}")


def log_everything_sensitive() -> None:
    log = get_logger()
    log.info("run.start", api_key=SECRET, header=f"Bearer {SECRET}")
    log.info("upload.attempt", request={"Authorization": f"Bearer {SECRET}", "url": "x"})
    log.warning("upload.failed", nested={"list": [f"a {SECRET} b", ("t", SECRET)]})
    log.warning("upload.failed", error=RetryableError(f"key {SECRET} refused"))
    try:
        fail_with_secret()
    except RetryableError:
        log.exception("upload.failed", item="a.png")
    try:
        fail_with_secret()
    except RetryableError as err:
        log.error("upload.failed", exc_info=err)


# -- the file ---------------------------------------------------------------------------------


def test_file_gets_one_json_object_per_line(log_file: Path) -> None:
    configure_logging(log_file=log_file, console="none")
    log = get_logger()
    log.info("run.start", run_id=7, items=3)
    log.info("upload.done", file_name="a.png", size=10)
    assert [line["event"] for line in lines_of(log_file)] == ["run.start", "upload.done"]


def test_file_lines_carry_timestamp_level_event_and_fields(log_file: Path) -> None:
    configure_logging(log_file=log_file, console="none")
    get_logger().warning("upload.failed", file_name="a.png", attempt=2)
    (line,) = lines_of(log_file)
    assert list(line)[:3] == ["timestamp", "level", "event"]
    assert (line["level"], line["event"]) == ("warning", "upload.failed")
    assert (line["file_name"], line["attempt"]) == ("a.png", 2)
    moment = datetime.fromisoformat(line["timestamp"].replace("Z", "+00:00"))
    assert moment.utcoffset() == UTC.utcoffset(None)


def test_the_timestamp_is_the_events_moment_in_utc_to_the_microsecond(log_file: Path) -> None:
    configure_logging(log_file=log_file, console="none")
    before = time.time()
    get_logger().info("upload.done")
    after = time.time()
    (line,) = lines_of(log_file)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{6})?Z", line["timestamp"])
    moment = datetime.fromisoformat(line["timestamp"].replace("Z", "+00:00")).timestamp()
    assert before - 1e-5 <= moment <= after + 1e-5  # to the microsecond, as floats allow


def test_file_gets_info_even_when_the_console_shows_only_warnings(log_file: Path) -> None:
    console = io.StringIO()
    configure_logging(log_file=log_file, console="auto", stream=console)
    get_logger().info("upload.done")
    assert [line["event"] for line in lines_of(log_file)] == ["upload.done"]
    assert console.getvalue() == ""


def test_events_below_the_level_are_dropped(log_file: Path) -> None:
    configure_logging(log_file=log_file, console="none", level="warning")
    get_logger().info("upload.attempt")
    get_logger().debug("upload.chunk")
    get_logger().error("run.failed")
    assert [line["event"] for line in lines_of(log_file)] == ["run.failed"]


def test_debug_level_lets_debug_events_through(log_file: Path) -> None:
    configure_logging(log_file=log_file, console="none", level="debug")
    get_logger().debug("upload.chunk", bytes=10)
    assert lines_of(log_file)[0]["event"] == "upload.chunk"


def test_file_traceback_is_structured_and_has_no_locals(log_file: Path) -> None:
    configure_logging(log_file=log_file, console="none")

    def fails() -> None:
        local_value = "a-local-that-must-not-be-logged"
        raise ValueError("boom " + local_value[:0])

    try:
        fails()
    except ValueError:
        get_logger().exception("upload.failed")
    (line,) = lines_of(log_file)
    assert line["level"] == "error"
    assert line["exception"][0]["exc_type"] == "ValueError"
    assert "a-local-that-must-not-be-logged" not in log_file.read_text(encoding="utf-8")


def test_named_logger_adds_its_name(log_file: Path) -> None:
    configure_logging(log_file=log_file, console="none")
    get_logger("migrator.runner").info("run.start")
    assert lines_of(log_file)[0]["logger"] == "migrator.runner"


def test_the_log_file_is_appended_to(log_file: Path) -> None:
    configure_logging(log_file=log_file, console="none")
    get_logger().info("run.start")
    configure_logging(log_file=log_file, console="none")
    get_logger().info("run.start")
    assert len(lines_of(log_file)) == 2


def unflushed_lines_of(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines()


def test_a_warning_reaches_the_file_at_once_with_the_lines_before_it(log_file: Path) -> None:
    configure_logging(log_file=log_file, console="none")
    get_logger().info("upload.done", file_name="a.png")
    get_logger().warning("upload.failed", file_name="b.png")
    events = [json.loads(line)["event"] for line in unflushed_lines_of(log_file)]
    assert events == ["upload.done", "upload.failed"]


def test_buffered_info_lines_reach_the_file_without_being_asked(log_file: Path) -> None:
    configure_logging(log_file=log_file, console="none")
    get_logger().info("upload.done", file_name="a.png")
    deadline = time.monotonic() + 10  # the timer writes every FLUSH_SECONDS (0.2 s)
    while not unflushed_lines_of(log_file) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(unflushed_lines_of(log_file)) == 1


def test_configuring_logging_again_writes_what_the_old_file_held(log_file: Path) -> None:
    configure_logging(log_file=log_file, console="none")
    get_logger().info("upload.done", file_name="a.png")
    configure_logging(log_file=None, console="none")
    assert len(unflushed_lines_of(log_file)) == 1


# -- the console --------------------------------------------------------------------------------


def test_auto_console_off_a_tty_shows_warnings_as_key_value_lines() -> None:
    console = io.StringIO()
    configure_logging(log_file=None, console="auto", stream=console)
    get_logger().info("upload.done")
    get_logger().warning("upload.failed", file_name="a b.png")
    (line,) = console.getvalue().splitlines()
    assert "level=warning event=upload.failed" in line
    assert 'file_name="a b.png"' in line


def test_auto_console_off_a_tty_shows_only_the_last_line_of_an_exception() -> None:
    console = io.StringIO()
    configure_logging(log_file=None, console="auto", stream=console)
    try:
        raise ValueError("disk full")
    except ValueError:
        get_logger().exception("run.failed")
    (line,) = console.getvalue().splitlines()
    assert 'exception="ValueError: disk full"' in line


def test_auto_console_on_a_tty_is_human_readable_from_info_up() -> None:
    console = Terminal()
    configure_logging(log_file=None, console="auto", stream=console)
    get_logger().info("upload.done", file_name="a.png")
    text = console.getvalue()
    assert "upload.done" in text
    assert "a.png" in text
    with pytest.raises(json.JSONDecodeError):
        json.loads(text)


def test_console_mode_shows_info_even_off_a_tty() -> None:
    console = io.StringIO()
    configure_logging(log_file=None, console="console", stream=console)
    get_logger().info("run.summary", done=3)
    assert "run.summary" in console.getvalue()


def test_warnings_console_on_a_tty_hides_info_and_shows_warnings_readably() -> None:
    console = Terminal()
    configure_logging(log_file=None, console="warnings", stream=console)
    get_logger().info("upload.done", file_name="a.png")
    get_logger().warning("upload.failed", file_name="b.png")
    text = console.getvalue()
    assert "upload.done" not in text
    assert "upload.failed" in text and "b.png" in text


def test_the_default_console_writes_to_stderr_as_it_is_when_the_event_comes(
    capsys: pytest.CaptureFixture[str],
) -> None:
    configure_logging(log_file=None, console="console")
    with capsys.disabled():
        swapped = io.StringIO()
        real, sys.stderr = sys.stderr, swapped
        try:
            get_logger().info("run.summary", done=3)
        finally:
            sys.stderr = real
    assert "run.summary" in swapped.getvalue()


def test_json_console_writes_json_lines() -> None:
    console = io.StringIO()
    configure_logging(log_file=None, console="json", stream=console)
    get_logger().info("run.summary", done=3)
    (line,) = console.getvalue().splitlines()
    assert json.loads(line)["done"] == 3


def test_none_console_writes_nothing() -> None:
    console = Terminal()
    configure_logging(log_file=None, console="none", stream=console)
    get_logger().error("run.failed")
    assert console.getvalue() == ""


# -- secrets --------------------------------------------------------------------------------------


def test_a_secret_never_reaches_the_file(log_file: Path) -> None:
    configure_logging(log_file=log_file, console="none", secrets=[SECRET])
    log_everything_sensitive()
    flush_logs()
    text = log_file.read_text(encoding="utf-8")
    assert SECRET not in text
    assert "***" in text
    assert len(lines_of(log_file)) == 6


@pytest.mark.parametrize("stream", [io.StringIO, Terminal])
@pytest.mark.parametrize("mode", ["auto", "console", "json"])
def test_a_secret_never_reaches_the_console(mode: str, stream: type[io.StringIO]) -> None:
    console = stream()
    configure_logging(log_file=None, console=mode, secrets=[SECRET], stream=console)
    log_everything_sensitive()
    assert SECRET not in console.getvalue()
    assert "***" in console.getvalue()


def test_the_traceback_in_the_file_is_kept_apart_from_the_secret(log_file: Path) -> None:
    configure_logging(log_file=log_file, console="none", secrets=[SECRET])
    try:
        fail_with_secret()
    except RetryableError:
        get_logger().exception("upload.failed")
    (line,) = lines_of(log_file)
    assert line["exception"][0]["exc_value"].endswith("with Bearer ***")


def test_sensitive_keys_are_dropped_at_any_depth(log_file: Path) -> None:
    configure_logging(log_file=log_file, console="none")
    get_logger().info("upload.attempt", token="t0k3n", headers={"Authorization": "Bearer x"})
    (line,) = lines_of(log_file)
    assert "token" not in line
    assert line["headers"] == {}


def test_configuring_twice_does_not_duplicate_lines(log_file: Path) -> None:
    first, second = io.StringIO(), io.StringIO()
    configure_logging(log_file=log_file, console="json", stream=first)
    configure_logging(log_file=log_file, console="json", stream=second)
    get_logger().info("run.start")
    assert len(lines_of(log_file)) == 1
    assert first.getvalue() == ""
    assert len(second.getvalue().splitlines()) == 1


def test_a_logger_bound_before_reconfiguring_follows_the_new_setup(log_file: Path) -> None:
    configure_logging(log_file=None, console="none")
    bound = get_logger().bind(run_id=1)
    configure_logging(log_file=log_file, console="none", secrets=[SECRET])
    bound.info("run.start", note=SECRET)
    (line,) = lines_of(log_file)
    assert (line["run_id"], line["note"]) == (1, "***")


# -- redact_secrets on its own ---------------------------------------------------------------------


def redact(event: dict[str, Any], secrets: list[str]) -> dict[str, Any]:
    result = redact_secrets(secrets)(None, "info", event)
    assert isinstance(result, dict)
    return result


def test_redaction_reaches_nested_values() -> None:
    event = {"event": "x", "a": {"b": [f"1{SECRET}2", {"c": (SECRET,)}]}}
    assert redact(event, [SECRET]) == {"event": "x", "a": {"b": ["1***2", {"c": ["***"]}]}}


def test_redaction_turns_other_objects_into_redacted_text() -> None:
    assert redact({"p": Path(f"/keys/{SECRET}")}, [SECRET]) == {"p": "/keys/***"}


def test_redaction_renders_a_raw_exception_to_redacted_text() -> None:
    event = {"event": "x", "exc_info": ValueError(f"bad {SECRET}")}
    result = redact(event, [SECRET])
    assert "exc_info" not in result
    assert result["exception"].endswith("ValueError: bad ***")


@pytest.mark.parametrize("key", ["authorization", "Authorization", "api_key", "API-KEY", "token"])
def test_redaction_drops_sensitive_keys(key: str) -> None:
    assert redact({"event": "x", key: "anything", "password": "p"}, []) == {"event": "x"}


def test_secrets_shorter_than_four_characters_are_not_redacted() -> None:
    assert redact({"event": "abc"}, ["abc"]) == {"event": "abc"}


def test_a_longer_secret_containing_a_shorter_one_is_redacted_whole() -> None:
    assert redact({"v": "xx-abcd-1234-yy"}, ["abcd", "abcd-1234"]) == {"v": "xx-***-yy"}


# -- configuration errors ----------------------------------------------------------------------


def test_unknown_level_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="unknown log level 'loud'"):
        configure_logging(log_file=None, level="loud")


def test_unknown_console_mode_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="unknown console log mode"):
        configure_logging(log_file=None, console="fancy")


def test_unwritable_log_file_is_a_config_error(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match="cannot write the log file"):
        configure_logging(log_file=blocker / "run.jsonl", console="none")


def test_a_log_file_that_cannot_be_written_is_reported_once_and_never_stops_the_caller(
    capsys: pytest.CaptureFixture[str],
) -> None:
    configure_logging(log_file=Path("/dev/full"), console="none")
    for _ in range(3):
        get_logger().info("upload.done", file_name="a.png")
        flush_logs()
    errors = capsys.readouterr().err.splitlines()
    assert len(errors) == 1
    assert "cannot write the log file /dev/full" in errors[0]


# -- a library's manners ------------------------------------------------------------------------


def test_a_key_migrator_reads_is_redacted_though_no_secret_was_configured(log_file: Path) -> None:
    key = "kie-READ-ONLY-BY-MIGRATOR-42"
    configure_logging(log_file=log_file, console="none")  # no secrets given
    read_api_key(Target("https://api.example"), {"KIE_API_KEY": key})

    get_logger().warning("upload.failed", error=f"rejected Bearer {key}", echo={"k": key})

    text = log_file.read_text(encoding="utf-8")
    assert key not in text
    assert "rejected Bearer ***" in text


def test_with_no_sink_configured_migrator_events_go_nowhere(
    capsys: pytest.CaptureFixture[str],
) -> None:
    configure_logging(log_file=None, console="none")
    get_logger().error("run.failed", reason="nobody asked to hear it")
    assert capsys.readouterr() == ("", "")


def test_a_program_that_configures_structlog_for_itself_never_sees_migrator_events() -> None:
    configure_logging(log_file=None, console="none")
    with structlog.testing.capture_logs() as captured:
        get_logger().warning("upload.failed", file_name="a.png")
        structlog.get_logger().info("their.own.event")
    assert [event["event"] for event in captured] == ["their.own.event"]


# -- permissions and credentials --------------------------------------------------------------


def test_a_new_log_file_is_0600_in_a_new_folder_of_0700(tmp_path: Path) -> None:
    log_file = tmp_path / ".migrator" / "job.log"
    configure_logging(log_file=log_file, console="none")
    get_logger().info("run.start")

    assert stat.S_IMODE(log_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(log_file.parent.stat().st_mode) == 0o700


def test_a_new_log_file_is_0600_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        configure_logging(log_file=tmp_path / "job.log", console="none")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "job.log").stat().st_mode) == 0o600


def test_an_existing_log_file_keeps_its_mode(tmp_path: Path) -> None:
    log_file = tmp_path / "shared.log"
    log_file.write_text("")
    log_file.chmod(0o640)
    configure_logging(log_file=log_file, console="none")
    assert stat.S_IMODE(log_file.stat().st_mode) == 0o640


def test_credentials_in_a_url_never_reach_the_log(log_file: Path) -> None:
    configure_logging(log_file=log_file, console="none")
    log = get_logger()
    log.warning("upload.failed", item="https://user:hunter2@example.com/a.png")
    log.warning("upload.failed", error="origin http://user:hunter2@example.com/b failed")
    try:
        raise RetryableError("fetch of https://user:hunter2@example.com/c failed")
    except RetryableError:
        log.exception("upload.failed")

    text = log_file.read_text(encoding="utf-8")
    assert "hunter2" not in text
    assert [e.get("item") for e in lines_of(log_file)][:1] == ["https://example.com/a.png"]
    assert "https://example.com/c" in text
