"""The hostile-input corpus: manifests and file trees an attacker, or a very unlucky
user, hands to migrator. Each case runs through the real CLI (`python -m migrator`).

What every case must show:

- no traceback, ever;
- a manifest or tree that cannot be planned exits 2 with one line,
  `migrator: FILE:LINE: field: what is wrong`;
- a file a glob matches but does not take (a symbolic link, a FIFO, a device, a
  socket) lets `plan` exit 0, with one documented `plan.skipped` warning per file,
  and it appears nowhere in the plan;
- an existing ledger is left byte for byte as it was (`--ledger` names a copy of a
  real ledger, checksummed before and after);
- what changes between plan and upload (a file replaced by a FIFO, a device, a link,
  a folder, or deleted) fails that item alone (exit 1) without hanging the run and
  without sending what took its place; the other items are uploaded.

The tests run as root: where a permission would stop nobody, the case is built
another way that stops root too (a loop of links). A folder that cannot be read is
no longer a bad manifest: test_sources_cli.py shows it fails as one item.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import socket
import sqlite3
import stat
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web
from conftest import REPO_ROOT, Finished, ledger_states, run_cli, web_server

from migrator.connect import open_origins
from migrator.emulator import Emulator
from migrator.ledger import Ledger
from migrator.manifest import load_manifest
from migrator.model import ItemState, ItemUpdate, Method, SourceKind

pytestmark = pytest.mark.timeout(60)

USAGE, FAILED = 2, 1
IS_ROOT = os.geteuid() == 0
PASSWORD = "hunter2-not-for-logs"


# -- a job folder, its ledger, and how a case is run -----------------------------------------


@dataclass(frozen=True, slots=True)
class Job:
    """A case's folder: the manifest goes in `folder`, the ledger is a copy of a real one."""

    folder: Path
    ledger: Path

    @property
    def manifest(self) -> Path:
        return self.folder / "job.yaml"

    def write(self, sources: list[dict[str, Any]] | str, **top: Any) -> Path:
        """job.yaml for the embedded target; `sources` as YAML text, or a list to dump."""
        document: dict[str, Any] = {
            "version": 1,
            "name": "hostile",
            "target": {"base_url": "embedded"},
            **top,
        }
        text = yaml.safe_dump(document, sort_keys=False)
        if isinstance(sources, str):
            text += "sources:\n" + sources
        else:
            text += yaml.safe_dump({"sources": sources}, sort_keys=False)
        self.manifest.write_text(text, encoding="utf-8")
        return self.manifest

    def data(self, *names: str) -> Path:
        """Small files under data/ (folders made); returns data/."""
        for name in names:
            path = self.folder / "data" / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(f"the file {name}\n", encoding="utf-8")
        (self.folder / "data").mkdir(exist_ok=True)
        return self.folder / "data"


@pytest.fixture(scope="module")
def ledger_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real ledger holding one done item, made once for the module."""
    path = tmp_path_factory.mktemp("ledger") / "job.sqlite"

    async def make() -> None:
        async with await Ledger.open(path) as ledger:
            ledger.put_item(
                ItemUpdate(
                    target="embedded",
                    upload_path="",
                    file_name="kept.txt",
                    source="/somewhere/kept.txt",
                    kind=SourceKind.FILE,
                    state=ItemState.DONE,
                    size=5,
                    method=Method.BASE64,
                    download_url="http://127.0.0.1:9/files/kept.txt",
                    uploaded_at=time.time(),
                    expires_at=time.time() + 3600,
                )
            )

    asyncio.run(make())
    return path


@pytest.fixture
def job(tmp_path: Path, ledger_template: Path) -> Job:
    folder = tmp_path / "job"
    folder.mkdir()
    ledger = tmp_path / "state" / "job.sqlite"
    ledger.parent.mkdir()
    shutil.copy(ledger_template, ledger)
    return Job(folder, ledger)


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def no_traceback(result: Finished) -> None:
    assert "Traceback" not in result.stdout + result.stderr, result.stderr


def skip_warnings(result: Finished) -> list[str]:
    """The stderr lines, each a `plan.skipped` warning (and nothing else)."""
    no_traceback(result)
    lines = result.stderr.strip().splitlines()
    assert all("level=warning event=plan.skipped " in line for line in lines), result.stderr
    return lines


# -- the corpus: each case builds a job and says what must come out --------------------------

Build = Callable[[Job], list[str]]  # makes the case; returns the CLI arguments after `plan`


@dataclass(frozen=True, slots=True)
class Case:
    build: Build
    expected: str  # in the one error line (exit 2), or in every warning (exit 0)
    code: int = USAGE
    skipped: int = 0  # exit 0: how many plan.skipped warnings


CASES: dict[str, Case] = {}


def case(
    name: str, expected: str, *, code: int = USAGE, skipped: int = 0
) -> Callable[[Build], Build]:
    def register(build: Build) -> Build:
        assert name not in CASES, name
        CASES[name] = Case(build, expected, code, skipped)
        return build

    return register


def manifest_text(job: Job, text: str) -> list[str]:
    job.manifest.write_text(text, encoding="utf-8")
    return [str(job.manifest)]


VALID_HEAD = "version: 1\nname: hostile\ntarget: {base_url: embedded}\n"
ONE_URL = "sources:\n  - url: http://127.0.0.1:9/a.png\n"


# YAML bombs, deep nesting, tags, garbage.


def _laughs(levels: int, fan: int) -> str:
    """A flow list defining anchors l0..l<levels-1>, each `fan` aliases of the one before:
    `fan ** levels` strings, were the aliases ever expanded."""
    items = ['&l0 "lol"']
    for i in range(1, levels):
        items.append(f"&l{i} [{', '.join([f'*l{i - 1}'] * fan)}]")
    return "[" + ", ".join(items) + "]"


@case("billion-laughs-in-a-name", "name: expected a single value, got a list")
def _(job: Job) -> list[str]:
    text = f"version: 1\nname: {_laughs(10, 10)}\ntarget: {{base_url: embedded}}\n" + ONE_URL
    return manifest_text(job, text)


@case("billion-laughs-as-the-one-source", "sources[0]: expected a mapping")
def _(job: Job) -> list[str]:
    return manifest_text(job, VALID_HEAD + f"sources: [{_laughs(10, 10)}]\n")


@case("anchors-doubling-thirty-times-in-a-file-name", "expected a single value, got a list")
def _(job: Job) -> list[str]:
    return manifest_text(job, VALID_HEAD + ONE_URL + f"    file_name: {_laughs(30, 2)}\n")


@case("a-long-pattern-aliased-a-thousand-times", "exclude: is longer than any path can be")
def _(job: Job) -> list[str]:
    job.data("a.txt")
    aliases = ", ".join(["*long"] * 1000)
    exclude = f'[&long "{"a" * 5000}", {aliases}]'
    return manifest_text(
        job, VALID_HEAD + f"sources:\n  - glob: data/*.txt\n    exclude: {exclude}\n"
    )


@case("nested-a-thousand-deep", "nested too deeply")
def _(job: Job) -> list[str]:
    return manifest_text(job, "[" * 1000 + "]" * 1000 + "\n")


@case("a-deep-mapping-under-a-valid-head", "nested too deeply")
def _(job: Job) -> list[str]:
    return manifest_text(job, VALID_HEAD + "sources: " + "{a: " * 1000 + "1" + "}" * 1000 + "\n")


@case("python-object-apply-on-the-target", "target: unsupported YAML tag")
def _(job: Job) -> list[str]:
    pwned = job.folder / "pwned"
    text = (
        "version: 1\nname: hostile\n"
        f"target: !!python/object/apply:os.system ['touch {pwned}']\n" + ONE_URL
    )
    return manifest_text(job, text)


@case("python-object-new-on-the-target", "target: unsupported YAML tag")
def _(job: Job) -> list[str]:
    text = "version: 1\nname: hostile\ntarget: !!python/object/new:os.system {base_url: x}\n"
    return manifest_text(job, text + ONE_URL)


@case("python-name-tag-on-a-scalar", "name: unsupported YAML tag")
def _(job: Job) -> list[str]:
    text = "version: 1\nname: !!python/name:os.system ''\ntarget: {base_url: embedded}\n"
    return manifest_text(job, text + ONE_URL)


@case("python-tuple-as-the-sources", "sources: unsupported YAML tag")
def _(job: Job) -> list[str]:
    return manifest_text(job, VALID_HEAD + "sources: !!python/tuple [{url: http://h/a}]\n")


@case("binary-tag-as-a-name", "name: expected a string")
def _(job: Job) -> list[str]:
    text = "version: 1\nname: !!binary aGVsbG8=\ntarget: {base_url: embedded}\n" + ONE_URL
    return manifest_text(job, text)


@case("random-binary-garbage", "not UTF-8")
def _(job: Job) -> list[str]:
    job.manifest.write_bytes(bytes((i * 167 + 13) % 256 for i in range(4096)))
    return [str(job.manifest)]


@case("utf-16-text", "not UTF-8")
def _(job: Job) -> list[str]:
    job.manifest.write_bytes((VALID_HEAD + ONE_URL).encode("utf-16"))
    return [str(job.manifest)]


@case("a-nul-byte-in-the-text", "a character YAML does not allow: #x0000")
def _(job: Job) -> list[str]:
    return manifest_text(job, VALID_HEAD + "sources:\n  - url: http://h/a\x00\n")


@case("an-escape-sequence-in-the-text", "a character YAML does not allow: #x001b")
def _(job: Job) -> list[str]:
    return manifest_text(job, VALID_HEAD + "\x1b[2J\x1b]0;owned\x07" + ONE_URL)


@case("a-key-of-half-a-megabyte", "YAML syntax error")
def _(job: Job) -> list[str]:
    return manifest_text(job, VALID_HEAD + ONE_URL + "k" * 500_000 + ": 1\n")


@case("a-name-of-half-a-megabyte", "'kkkkkkkkkk")
def _(job: Job) -> list[str]:
    text = f"version: 1\nname: {'k' * 500_000}\ntarget: {{base_url: embedded}}\n"
    return manifest_text(job, text + ONE_URL)


@case("larger-than-four-mib", "larger than 4 MiB")
def _(job: Job) -> list[str]:
    return manifest_text(job, "#" * (4 * 1024 * 1024 + 1))


@case("only-comments", "the manifest is empty")
def _(job: Job) -> list[str]:
    return manifest_text(job, "# nothing\n# at all\n")


@case("two-documents", "single document")
def _(job: Job) -> list[str]:
    return manifest_text(job, VALID_HEAD + ONE_URL + "---\n" + VALID_HEAD + ONE_URL)


@case("a-fifo-as-the-manifest", "the manifest is empty")
def _(job: Job) -> list[str]:
    os.mkfifo(job.manifest)  # nobody writes to it: it must not hang
    return [str(job.manifest)]


@case("dev-null-as-the-manifest", "the manifest is empty")
def _(job: Job) -> list[str]:
    job.manifest.symlink_to("/dev/null")
    return [str(job.manifest)]


@case("a-loop-of-links-as-the-manifest", "Too many levels of symbolic links")
def _(job: Job) -> list[str]:
    job.manifest.symlink_to(job.manifest)
    return [str(job.manifest)]


# Numbers too large for a float.


@case("ttl-of-400-nines", "settings.ttl: a number of 400 digits is too long")
def _(job: Job) -> list[str]:
    return manifest_text(job, VALID_HEAD + ONE_URL + f"settings:\n  ttl: {'9' * 400}\n")


@case("ttl-of-1e400", "settings.ttl: '1.0e+400' is too large a number")
def _(job: Job) -> list[str]:
    return manifest_text(job, VALID_HEAD + ONE_URL + "settings:\n  ttl: 1.0e+400\n")


@case("refresh-within-of-400-digit-days", "settings.refresh_within:")
def _(job: Job) -> list[str]:
    return manifest_text(job, VALID_HEAD + ONE_URL + f"settings:\n  refresh_within: {'9' * 400}d\n")


@case("concurrency-of-5000-digits", "settings.concurrency:")
def _(job: Job) -> list[str]:
    return manifest_text(job, VALID_HEAD + ONE_URL + f"settings:\n  concurrency: {'7' * 5000}\n")


@case("retries-of-infinity", "settings.retries: expected a whole number, got inf")
def _(job: Job) -> list[str]:
    return manifest_text(job, VALID_HEAD + ONE_URL + "settings:\n  retries: .inf\n")


@case("base64-max-of-400-digit-kib", "settings.base64_max:")
def _(job: Job) -> list[str]:
    return manifest_text(job, VALID_HEAD + ONE_URL + f"settings:\n  base64_max: {'9' * 400}KiB\n")


@case("bwlimit-of-400-nines", "settings.bwlimit: a number of 400 digits is too large")
def _(job: Job) -> list[str]:
    return manifest_text(job, VALID_HEAD + ONE_URL + f"settings:\n  bwlimit: {'9' * 400}\n")


@case("tps-limit-of-nan", "settings.tps_limit: '.nan' is not a number")
def _(job: Job) -> list[str]:
    return manifest_text(job, VALID_HEAD + ONE_URL + "settings:\n  tps_limit: .nan\n")


# Names: '..', NUL, control characters, Unicode that normalises to one name.


@case("a-file-name-of-dot-dot", "file name must not contain a '..' segment")
def _(job: Job) -> list[str]:
    job.write([{"url": "http://127.0.0.1:9/a.png", "file_name": ".."}])
    return [str(job.manifest)]


@case("a-file-name-climbing-out", "contains '/'")
def _(job: Job) -> list[str]:
    job.write([{"url": "http://127.0.0.1:9/a.png", "file_name": "../../etc/passwd"}])
    return [str(job.manifest)]


@case("an-upload-path-climbing-out", "must not contain a '..' segment")
def _(job: Job) -> list[str]:
    job.write([{"url": "http://127.0.0.1:9/a.png", "upload_path": "x/../../.."}])
    return [str(job.manifest)]


@case("dot-dot-after-a-wildcard", "'..' may appear only before the first wildcard")
def _(job: Job) -> list[str]:
    job.data("a.txt")
    job.write([{"glob": "data/**/../../*.txt"}])
    return [str(job.manifest)]


@case("a-nul-in-a-path", "a path cannot contain a NUL character")
def _(job: Job) -> list[str]:
    job.write([{"path": "./data/a\x00.txt"}])
    return [str(job.manifest)]


@case("a-nul-in-a-file-name", "contains a control character")
def _(job: Job) -> list[str]:
    job.write([{"url": "http://127.0.0.1:9/a.png", "file_name": "a\x00b.png"}])
    return [str(job.manifest)]


@case("a-bell-in-an-upload-path", "contains a control character")
def _(job: Job) -> list[str]:
    job.write([{"url": "http://127.0.0.1:9/a.png", "upload_path": "ding\x07"}])
    return [str(job.manifest)]


@case("a-lone-surrogate-in-a-url", "holds a lone surrogate")
def _(job: Job) -> list[str]:
    return manifest_text(job, VALID_HEAD + 'sources:\n  - url: "http://h/\\udc80.png"\n')


@case("a-newline-in-a-file-name-in-the-tree", "contains a control character")
def _(job: Job) -> list[str]:
    job.data("bad\nname.txt")
    job.write([{"glob": "data/*.txt"}])
    return [str(job.manifest)]


@case("a-terminal-escape-in-a-file-name-in-the-tree", "bad\\x1b]0;owned\\x07.txt")
def _(job: Job) -> list[str]:
    job.data("bad\x1b]0;owned\x07.txt")
    job.write([{"glob": "data/*.txt"}])
    return [str(job.manifest)]


@case("a-file-name-that-is-not-utf-8", "is not valid UTF-8")
def _(job: Job) -> list[str]:
    data = job.data("fine.txt")
    with open(os.fsencode(data) + b"/caf\xe9.txt", "wb") as latin1:
        latin1.write(b"named in latin-1\n")
    job.write([{"glob": "data/*.txt"}])
    return [str(job.manifest)]


@case("a-backslash-in-a-file-name-in-the-tree", "contains a backslash")
def _(job: Job) -> list[str]:
    job.data("win\\dows.txt")
    job.write([{"glob": "data/*.txt"}])
    return [str(job.manifest)]


@case("a-file-name-of-300-bytes", "longer than 255 bytes")
def _(job: Job) -> list[str]:
    job.write([{"url": "http://127.0.0.1:9/a.png", "file_name": "é" * 150}])
    return [str(job.manifest)]


@case("two-files-equal-in-unicode-nfc", "lands on 'caf")
def _(job: Job) -> list[str]:
    job.data("caf\u00e9.txt", "cafe\u0301.txt")
    job.write([{"glob": "data/*.txt"}])
    return [str(job.manifest)]


@case("a-file-name-equal-in-nfc-to-a-path-source", "as does sources[0]")
def _(job: Job) -> list[str]:
    job.data("\u00c5ngstr\u00f6m.txt")
    sources = [
        {"path": "data/\u00c5ngstr\u00f6m.txt"},
        {"url": "http://127.0.0.1:9/x.txt", "file_name": "A\u030angstro\u0308m.txt"},
    ]
    job.write(sources)
    return [str(job.manifest)]


# Paths the system cannot take, and folders that cannot be read (even by root).


@case("a-path-through-a-home-that-does-not-exist", "no such user")
def _(job: Job) -> list[str]:
    job.write([{"path": "~no-such-user-anywhere/a.txt"}])
    return [str(job.manifest)]


@case("a-glob-root-that-is-a-loop-of-links", "Too many levels of symbolic links")
def _(job: Job) -> list[str]:
    (job.folder / "loop").symlink_to("loop")
    job.write([{"glob": "loop/*.txt"}])
    return [str(job.manifest)]


@case("a-glob-root-that-is-a-file", "is not a directory")
def _(job: Job) -> list[str]:
    job.data("a.txt")
    job.write([{"glob": "data/a.txt/*.txt"}])
    return [str(job.manifest)]


@case("a-path-source-that-is-a-fifo", "is not a regular file (a FIFO)")
def _(job: Job) -> list[str]:
    os.mkfifo(job.data() / "pipe.txt")
    job.write([{"path": "data/pipe.txt"}])
    return [str(job.manifest)]


@case("a-path-source-linking-to-dev-null", "is not a regular file (a character device)")
def _(job: Job) -> list[str]:
    (job.data() / "null.txt").symlink_to("/dev/null")
    job.write([{"path": "data/null.txt"}])
    return [str(job.manifest)]


@case("a-path-source-that-is-a-loop-of-links", "Too many levels of symbolic links")
def _(job: Job) -> list[str]:
    (job.data() / "loop.txt").symlink_to("loop.txt")
    job.write([{"path": "data/loop.txt"}])
    return [str(job.manifest)]


@case("a-path-source-that-is-a-folder", "is a folder; use glob")
def _(job: Job) -> list[str]:
    job.data("a.txt")
    job.write([{"path": "data"}])
    return [str(job.manifest)]


@case("a-url-list-that-is-a-fifo", "is not a regular file (a FIFO)")
def _(job: Job) -> list[str]:
    os.mkfifo(job.folder / "urls.txt")
    job.write([{"url_list": "urls.txt"}])
    return [str(job.manifest)]


@case("a-url-list-of-binary-garbage", "cannot read")
def _(job: Job) -> list[str]:
    (job.folder / "urls.txt").write_bytes(b"http://h/a\n\xff\xfe\x00garbage\n")
    job.write([{"url_list": "urls.txt"}])
    return [str(job.manifest)]


@case("a-url-list-line-with-a-terminal-escape", "urls.txt:2: sources[0].url_list:")
def _(job: Job) -> list[str]:
    (job.folder / "urls.txt").write_text("http://127.0.0.1:9/a\nhttp://h/\x1b[2Jb\n")
    job.write([{"url_list": "urls.txt"}])
    return [str(job.manifest)]


# Credentials in URLs never leave the ledger.


@case("credentials-in-a-refused-url", "'ftp://example.com/a.png' has ftp")
def _(job: Job) -> list[str]:
    job.write([{"url": f"ftp://user:{PASSWORD}@example.com/a.png"}])
    return [str(job.manifest)]


@case("credentials-in-two-colliding-urls", "http://127.0.0.1:9/b/x.png lands on 'x.png'")
def _(job: Job) -> list[str]:
    job.write([
        {"url": f"http://user:{PASSWORD}@127.0.0.1:9/a/x.png"},
        {"url": f"http://user:{PASSWORD}@127.0.0.1:9/b/x.png"},
    ])  # fmt: skip
    return [str(job.manifest)]


# Output paths that would destroy the ledger.


@case("log-file-on-the-ledger", "--log-file: ", code=USAGE)
def _(job: Job) -> list[str]:
    job.write([{"url": "http://127.0.0.1:9/a.png"}])
    return ["--log-file", str(job.ledger), "RUN"]


@case("log-file-on-the-ledger-wal", "is the ledger's write-ahead log")
def _(job: Job) -> list[str]:
    job.write([{"url": "http://127.0.0.1:9/a.png"}])
    return ["--log-file", f"{job.ledger}-wal", "RUN"]


@case("metrics-file-on-the-ledger-lock", "--metrics-file: ")
def _(job: Job) -> list[str]:
    job.write([{"url": "http://127.0.0.1:9/a.png"}])
    return ["--metrics-file", f"{job.ledger}.lock", "RUN"]


@case("log-file-through-a-link-to-the-ledger-folder", "leads to the ledger's shared-memory")
def _(job: Job) -> list[str]:
    job.write([{"url": "http://127.0.0.1:9/a.png"}])
    (job.folder / "logs").symlink_to(job.ledger.parent, target_is_directory=True)
    return ["--log-file", str(job.folder / "logs" / "job.sqlite-shm"), "RUN"]


@case("an-output-on-the-ledger", "outputs.jsonl: ")
def _(job: Job) -> list[str]:
    job.write([{"url": "http://127.0.0.1:9/a.png"}], outputs={"jsonl": str(job.ledger)})
    return [str(job.manifest)]


@case("export-output-on-the-ledger", "--output: ")
def _(job: Job) -> list[str]:
    job.write([{"url": "http://127.0.0.1:9/a.png"}])
    return ["--output", str(job.ledger), "EXPORT"]


# Flags with numbers no clock can hold.


@case("refresh-within-400-nines", "--within: '99999999999")
def _(job: Job) -> list[str]:
    job.write([{"url": "http://127.0.0.1:9/a.png"}])
    return ["--within", "9" * 400, "REFRESH"]


@case("download-within-a-century-and-a-day", "--within: '36501d' is too long")
def _(job: Job) -> list[str]:
    job.write([{"url": "http://127.0.0.1:9/a.png"}])
    return ["--within", "36501d", "--dest", str(job.folder / "dest"), "DOWNLOAD"]


# Trees with links, loops, FIFOs, devices and sockets: skipped, each reported.


@case("a-link-to-etc-passwd", "a symbolic link: not followed", code=0, skipped=1)
def _(job: Job) -> list[str]:
    (job.data("a.txt") / "passwd.txt").symlink_to("/etc/passwd")
    job.write([{"glob": "data/*.txt"}])
    return [str(job.manifest)]


@case("a-link-to-the-process-environment", "a symbolic link: not followed", code=0, skipped=1)
def _(job: Job) -> list[str]:
    (job.data("a.txt") / "notes.txt").symlink_to("/proc/self/environ")
    job.write([{"glob": "data/*.txt"}])
    return [str(job.manifest)]


@case("following-a-link-out-of-the-root", "outside the glob's root", code=0, skipped=2)
def _(job: Job) -> list[str]:
    data = job.data("a.txt")
    (data / "passwd.txt").symlink_to("/etc/passwd")
    (data / "key.txt").symlink_to("../../state/job.sqlite")
    job.write([{"glob": "data/*.txt", "follow_symlinks": True}])
    return [str(job.manifest)]


@case("following-dev-null-through-a-link", "outside the glob's root", code=0, skipped=1)
def _(job: Job) -> list[str]:
    (job.data("a.txt") / "null.txt").symlink_to("/dev/null")
    job.write([{"glob": "data/*.txt", "follow_symlinks": True}])
    return [str(job.manifest)]


@case("a-loop-of-two-links", "broken symbolic link (or a loop", code=0, skipped=2)
def _(job: Job) -> list[str]:
    data = job.data("a.txt")
    (data / "one.txt").symlink_to("two.txt")
    (data / "two.txt").symlink_to("one.txt")
    job.write([{"glob": "data/*.txt", "follow_symlinks": True}])
    return [str(job.manifest)]


@case("a-folder-linking-to-its-parent", "a symbolic link to a folder", code=0, skipped=1)
def _(job: Job) -> list[str]:
    data = job.data("a.txt", "sub/b.txt")
    (data / "sub" / "up").symlink_to("..", target_is_directory=True)
    job.write([{"glob": "data/**", "follow_symlinks": True}])
    return [str(job.manifest)]


@case("a-fifo-in-the-tree", "a FIFO, not a regular file", code=0, skipped=1)
def _(job: Job) -> list[str]:
    os.mkfifo(job.data("a.txt") / "pipe.txt")
    job.write([{"glob": "data/*.txt"}])
    return [str(job.manifest)]


@case("a-link-to-a-fifo-inside-the-root", "a symbolic link to a FIFO", code=0, skipped=1)
def _(job: Job) -> list[str]:
    data = job.data("a.txt")
    os.mkfifo(data / "pipe")
    (data / "pipe.txt").symlink_to("pipe")
    job.write([{"glob": "data/*.txt", "follow_symlinks": True}])
    return [str(job.manifest)]


@case("a-socket-in-the-tree", "a socket, not a regular file", code=0, skipped=1)
def _(job: Job) -> list[str]:
    data = job.data("a.txt")
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(data / "sock.txt"))
    listener.close()  # the socket file stays
    job.write([{"glob": "data/*.txt"}])
    return [str(job.manifest)]


@case("a-device-in-the-tree", "a character device, not a regular file", code=0, skipped=1)
def _(job: Job) -> list[str]:
    data = job.data("a.txt")
    if not IS_ROOT:
        pytest.skip("mknod of a device needs root")
    os.mknod(data / "zero.txt", 0o600 | stat.S_IFCHR, os.makedev(1, 5))  # /dev/zero
    job.write([{"glob": "data/*.txt"}])
    return [str(job.manifest)]


@case("a-skipped-fifo-with-a-terminal-escape-in-its-name", "\\x1b[2J", code=0, skipped=1)
def _(job: Job) -> list[str]:
    os.mkfifo(job.data("a.txt") / "evil\x1b[2J.txt")
    job.write([{"glob": "data/*.txt"}])
    return [str(job.manifest)]


@case("a-skipped-fifo-whose-name-is-not-utf-8", "\\udcff", code=0, skipped=1)
def _(job: Job) -> list[str]:
    data = job.data("a.txt")
    os.mkfifo(os.fsencode(data) + b"/\xff.txt")
    job.write([{"glob": "data/*.txt"}])
    return [str(job.manifest)]


COMMANDS = {"RUN": "run", "EXPORT": "export", "REFRESH": "refresh", "DOWNLOAD": "download"}


@pytest.mark.parametrize("name", CASES, ids=list(CASES))
async def test_every_hostile_input_gets_one_clear_line_and_leaves_the_ledger(
    job: Job, name: str
) -> None:
    case_ = CASES[name]
    args = case_.build(job)
    command = COMMANDS.get(args[-1], "plan")
    if command != "plan":
        args = [str(job.manifest), *args[:-1]]
    before = digest(job.ledger)

    result = await run_cli(command, *args, "--ledger", str(job.ledger), cwd=job.folder)

    assert result.code == case_.code, result.stderr
    assert "\x1b" not in result.stdout + result.stderr  # nothing steers the terminal
    if case_.code == USAGE:
        line = result.one_error_line()
        assert case_.expected in line, line
        assert PASSWORD not in line
    else:
        warnings = skip_warnings(result)
        assert len(warnings) == case_.skipped, result.stderr
        assert all(case_.expected in w for w in warnings), result.stderr
        assert f"skipped: {case_.skipped} file" in result.stdout
    assert digest(job.ledger) == before
    assert not (job.folder / "pwned").exists()


def test_the_corpus_holds_at_least_sixty_cases() -> None:
    assert len(CASES) >= 60


async def test_a_skipped_file_appears_nowhere_in_the_plan(job: Job) -> None:
    data = job.data("a.txt")
    (data / "passwd.txt").symlink_to("/etc/passwd")
    os.mkfifo(data / "pipe.txt")
    job.write([{"glob": "data/*.txt"}])

    result = await run_cli(
        "plan", str(job.manifest), "--format", "json", "--ledger", str(job.ledger)
    )

    assert result.code == 0, result.stderr
    assert "passwd" not in result.stdout and "pipe" not in result.stdout
    assert '"skipped": 2' in result.stdout


async def test_a_followed_link_inside_the_root_is_planned_under_its_own_name(job: Job) -> None:
    data = job.data("real/a.txt")
    (data / "alias.txt").symlink_to("real/a.txt")
    job.write([{"glob": "data/*.txt", "follow_symlinks": True}])

    result = await run_cli("plan", str(job.manifest), "--ledger", str(job.ledger))

    assert result.code == 0, result.stderr
    assert result.stderr == ""
    assert f" /alias.txt <- {data / 'real' / 'a.txt'}\n" in result.stdout


async def test_credentials_in_a_source_url_stay_in_the_ledger_alone(tmp_path: Path) -> None:
    async def origin(request: web.Request) -> web.Response:
        return web.Response(body=b"pixel", headers={"ETag": '"v1"'})

    async with web_server(origin) as base:
        url = base.replace("http://", f"http://user:{PASSWORD}@") + "/a.png"
        job = Job(tmp_path / "job", tmp_path / "job" / "ledger.sqlite")
        job.folder.mkdir()
        manifest = job.write(
            [{"url": url}], ledger="ledger.sqlite", outputs={"jsonl": "out/map.jsonl"}
        )
        shown = f"{base}/a.png"

        plans = [await run_cli("plan", str(manifest), *fmt) for fmt in ([], ["--format", "json"])]
        ran = await run_cli("run", str(manifest), "--no-progress", "--log-format", "json")
        exported = await run_cli("export", str(manifest), "--format", "csv")
        status = await run_cli("status", str(manifest), "--format", "json")

    for result in (*plans, ran, exported, status):
        assert result.code == 0, result.stderr
        assert PASSWORD not in result.stdout + result.stderr
    assert all(shown in plan.stdout for plan in plans)
    assert shown in exported.stdout
    log = (job.folder / "ledger.log").read_text(encoding="utf-8")
    assert shown in log and PASSWORD not in log
    assert PASSWORD not in (job.folder / "out" / "map.jsonl").read_text(encoding="utf-8")
    with sqlite3.connect(job.ledger) as db:
        assert db.execute("SELECT source FROM items").fetchall() == [(url,)]


# -- what changes between plan and upload -----------------------------------------------------


@dataclass
class Gate:
    """A loopback proxy in front of a real emulator that holds the first upload until
    the test has done its harm: by then the run has planned every file."""

    emulator: Emulator
    arrived: asyncio.Event
    go: asyncio.Event
    base_url: str = ""


@pytest.fixture
async def gate(emulator: Emulator) -> AsyncIterator[Gate]:
    state = Gate(emulator, asyncio.Event(), asyncio.Event())

    async with aiohttp.ClientSession() as session:

        async def forward(request: web.Request) -> web.Response:
            if not state.arrived.is_set():
                state.arrived.set()
                await asyncio.wait_for(state.go.wait(), 20)
            headers = {
                k: v
                for k, v in request.headers.items()
                if k.lower() in ("authorization", "content-type")
            }
            async with session.request(
                request.method,
                emulator.base_url + request.path_qs,
                headers=headers,
                data=await request.read(),
            ) as answer:
                body = await answer.read()
                keep = {k: v for k, v in answer.headers.items() if k in ("Content-Type", "Date")}
                return web.Response(status=answer.status, body=body, headers=keep)

        async with web_server(forward) as base:
            state.base_url = base
            yield state


Harm = Callable[[Path], None]


def _to_fifo(path: Path) -> None:
    path.unlink()
    os.mkfifo(path)


def _to_link(target: str) -> Harm:
    def harm(path: Path) -> None:
        path.unlink()
        path.symlink_to(target)

    return harm


def _to_folder(path: Path) -> None:
    path.unlink()
    path.mkdir()


def _to_device(path: Path) -> None:
    path.unlink()
    os.mknod(path, 0o600 | stat.S_IFCHR, os.makedev(1, 5))  # /dev/zero: never ends


HARMS: dict[str, tuple[Harm, str]] = {
    "replaced-by-a-fifo": (_to_fifo, "is now a FIFO, not a regular file: refused"),
    "replaced-by-a-link-to-etc-passwd": (_to_link("/etc/passwd"), "is now a symbolic link"),
    "replaced-by-a-link-to-the-environment": (_to_link("/proc/self/environ"), "symbolic link"),
    "replaced-by-a-folder": (_to_folder, "is now a folder, not a regular file"),
    "deleted": (Path.unlink, "source file is gone"),
}
if IS_ROOT:
    HARMS["replaced-by-dev-zero"] = (_to_device, "is now a character device")


@pytest.mark.parametrize("size", [100, 50_000], ids=["base64", "stream"])
@pytest.mark.parametrize("harm", HARMS, ids=list(HARMS))
async def test_a_file_changed_between_plan_and_upload_fails_alone_without_hanging(
    tmp_path: Path, gate: Gate, api_key: str, harm: str, size: int
) -> None:
    data = tmp_path / "job" / "data"
    data.mkdir(parents=True)
    (data / "a.txt").write_bytes(b"a" * 100)
    victim = data / "b.txt"
    victim.write_bytes(b"b" * size)
    manifest = Job(tmp_path / "job", tmp_path / "job" / "ledger.sqlite").write(
        [{"glob": "data/*.txt"}],
        ledger="ledger.sqlite",
        settings={"concurrency": 1, "retries": 1, "base64_max": "1KiB"},
    )
    manifest.write_text(manifest.read_text().replace("embedded", gate.base_url), encoding="utf-8")
    do_harm, expected = HARMS[harm]

    running = asyncio.create_task(run_cli("run", str(manifest), "--no-progress", key=api_key))
    await asyncio.wait_for(gate.arrived.wait(), 20)  # a.txt in flight, b.txt planned
    do_harm(victim)
    gate.go.set()
    result = await running

    no_traceback(result)
    assert result.code == FAILED, result.stderr
    assert "run: 1 uploaded, 0 skipped, 1 failed" in result.stdout
    assert expected in result.stderr
    assert ledger_states(tmp_path / "job" / "ledger.sqlite") == {"a.txt": "done", "b.txt": "failed"}
    assert [r.file_name for r in gate.emulator.requests if r.status == 200] == ["a.txt"]


async def test_a_file_whose_bytes_changed_before_upload_is_recorded_as_sent(
    tmp_path: Path, gate: Gate, api_key: str
) -> None:
    data = tmp_path / "job" / "data"
    data.mkdir(parents=True)
    (data / "a.txt").write_bytes(b"a" * 100)
    (data / "b.txt").write_bytes(b"old bytes")
    job = Job(tmp_path / "job", tmp_path / "job" / "ledger.sqlite")
    manifest = job.write(
        [{"glob": "data/*.txt"}], ledger="ledger.sqlite", settings={"concurrency": 1}
    )
    manifest.write_text(manifest.read_text().replace("embedded", gate.base_url), encoding="utf-8")

    running = asyncio.create_task(run_cli("run", str(manifest), "--no-progress", key=api_key))
    await asyncio.wait_for(gate.arrived.wait(), 20)
    (data / "b.txt").write_bytes(b"new bytes")
    gate.go.set()
    result = await running

    assert result.code == 0, result.stderr
    with sqlite3.connect(job.ledger) as db:
        [(sha256,)] = db.execute("SELECT sha256 FROM items WHERE file_name = 'b.txt'").fetchall()
    assert sha256 == hashlib.sha256(b"new bytes").hexdigest()


# -- the embedded demo origin -----------------------------------------------------------------


@pytest.fixture
def demo_job(tmp_path: Path) -> Iterator[Path]:
    """An embedded job whose folder holds a key file, a dotfile, a ledger and data."""
    folder = tmp_path / "demo"
    (folder / "data").mkdir(parents=True)
    (folder / "data" / "pixel.png").write_bytes(b"png")
    (folder / "data" / "other.png").write_bytes(b"not named")
    (folder / ".env").write_text("KIE_API_KEY=secret\n")
    (folder / "kie.key").write_text("secret-key\n")
    (folder / "kie.key").chmod(0o600)
    (folder / ".migrator").mkdir()
    (folder / ".migrator" / "demo.sqlite").write_bytes(b"SQLite format 3\0")
    (folder / "urls.txt").write_text("${EMBEDDED_ORIGIN}/data/other.png\n")
    document = {
        "version": 1,
        "name": "demo",
        "target": {"base_url": "embedded", "api_key_file": "./kie.key"},
        "sources": [
            {"url": "${EMBEDDED_ORIGIN}/data/pixel.png"},
            {"url": "${EMBEDDED_ORIGIN}/kie.key", "file_name": "stolen.key"},
            {"url": "${EMBEDDED_ORIGIN}/.env", "file_name": "stolen.env"},
            {"url": "${EMBEDDED_ORIGIN}/.migrator/demo.sqlite", "file_name": "stolen.sqlite"},
            {"url_list": "urls.txt"},
        ],
    }
    (folder / "demo.yaml").write_text(yaml.safe_dump(document), encoding="utf-8")
    yield folder / "demo.yaml"


async def fetch_status(session: aiohttp.ClientSession, url: str) -> tuple[int, bytes]:
    async with session.get(url) as response:
        return response.status, await response.read()


async def test_the_demo_origin_serves_only_what_the_manifest_names(demo_job: Path) -> None:
    manifest = load_manifest(demo_job, environ={})
    async with (
        open_origins(manifest, concurrency=2) as origins,
        aiohttp.ClientSession() as session,
    ):
        base = origins.url_vars["EMBEDDED_ORIGIN"]
        answers = {
            path: await fetch_status(session, base + path)
            for path in (
                "/data/pixel.png",
                "/data/other.png",
                "/data/./pixel.png",
                "/demo.yaml",
                "/urls.txt",
                "/kie.key",
                "/.env",
                "/.migrator/demo.sqlite",
                "/data/../kie.key",
                "/%2e%2e/%2e%2e/etc/passwd",
            )
        }

    assert answers["/data/pixel.png"] == (200, b"png")
    assert answers["/data/other.png"] == (200, b"not named")  # a url_list line names it
    assert answers["/data/./pixel.png"] == (200, b"png")
    for path in ("/demo.yaml", "/urls.txt", "/kie.key", "/.env", "/.migrator/demo.sqlite"):
        assert answers[path][0] == 404, path
    assert answers["/data/../kie.key"][0] == 404
    assert answers["/%2e%2e/%2e%2e/etc/passwd"][0] == 404


async def test_the_demo_origin_never_serves_the_ledger_even_when_named(tmp_path: Path) -> None:
    folder = tmp_path / "demo"
    (folder / "state").mkdir(parents=True)
    (folder / "state" / "demo.sqlite").write_bytes(b"SQLite format 3\0")
    (folder / "state" / "demo.sqlite-wal").write_bytes(b"wal")
    (folder / "state" / "demo.log").write_text("{}\n")
    (folder / "link.png").symlink_to("state/demo.sqlite")
    named = ["state/demo.sqlite", "state/demo.sqlite-wal", "state/demo.log", "link.png"]
    document = {
        "version": 1,
        "name": "demo",
        "target": {"base_url": "embedded"},
        "ledger": "state/demo.sqlite",
        "sources": [
            {"url": f"${{EMBEDDED_ORIGIN}}/{path}", "file_name": f"f{i}"}
            for i, path in enumerate(named)
        ],
    }
    (folder / "demo.yaml").write_text(yaml.safe_dump(document), encoding="utf-8")
    manifest = load_manifest(folder / "demo.yaml", environ={})

    async with (
        open_origins(manifest, concurrency=2) as origins,
        aiohttp.ClientSession() as session,
    ):
        base = origins.url_vars["EMBEDDED_ORIGIN"]
        statuses = [(await fetch_status(session, f"{base}/{path}"))[0] for path in named]

    assert statuses == [404, 404, 404, 404]


async def test_the_quickstart_still_runs_through_the_demo_origin(tmp_path: Path) -> None:
    shutil.copytree(REPO_ROOT / "sample_manifests", tmp_path / "samples")

    result = await run_cli("run", str(tmp_path / "samples" / "quickstart.yaml"), "--no-progress")

    assert result.code == 0, result.stderr
    assert "run: 8 uploaded, 0 skipped, 0 failed" in result.stdout
