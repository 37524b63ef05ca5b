"""Properties over generated manifests: whatever a YAML document holds, loading it
gives a `Manifest` or a `ManifestError` whose every problem is located, never any
other exception (no crash, no traceback for the user)."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from migrator.errors import ManifestError
from migrator.manifest import MANIFEST_KEYS, load_manifest
from migrator.model import Manifest

SETTINGS = settings(
    max_examples=150,
    deadline=None,
    database=None,  # nothing written into the checkout
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

# Plain scalars no Python value dumps to: put in the text after yaml.safe_dump.
BIG_INT, BIG_FLOAT = "BIG_INT_HERE", "BIG_FLOAT_HERE"
_UNDUMPABLE = {BIG_INT: "9" * 5000, BIG_FLOAT: "1.0e+400"}


def as_yaml(document: object) -> str:
    text = yaml.safe_dump(document, allow_unicode=True)
    for marker, plain in _UNDUMPABLE.items():
        text = text.replace(marker, plain)
    return text


# Values of every kind YAML can carry, hostile ones favoured: numbers too large for a
# float, infinities, control characters, lone surrogates, '..', '~user', variables.
_TEXT = st.text(max_size=30)  # any characters but lone surrogates (YAML cannot dump them)
_HOSTILE_TEXT = st.sampled_from(
    [
        "",
        " ",
        "..",
        "../../etc/passwd",
        "~no-such-user/x",
        "/dev/null",
        "/proc/self/environ",
        "a\x00b",
        "\x1b[2J",
        "${EMBEDDED_ORIGIN}/x.png",
        "${OTHER}/x",
        "http://user:pass@127.0.0.1:9/a.png",
        "https://example.com/",
        "ftp://example.com/a",
        "embedded",
        "9" * 400,
        "9" * 400 + "d",
        "1e400",
        "8193TiB",
        "36501d",
        "1h30m",
        "64KiB",
        "auto",
        "base64",
        "*.txt",
        "**",
        "caf\u00e9",
        "cafe\u0301",
    ]
)
_NUMBERS = st.one_of(
    st.integers(),
    st.integers(min_value=10**300, max_value=10**1000),
    st.floats(allow_nan=True, allow_infinity=True),
)
_SCALARS = st.one_of(
    st.none(), st.booleans(), _NUMBERS, _TEXT, _HOSTILE_TEXT, st.sampled_from(list(_UNDUMPABLE))
)
_KEYS = st.sampled_from(sorted({key for keys in MANIFEST_KEYS.values() for key in keys}))
_VALUES = st.recursive(
    _SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.one_of(_TEXT, _KEYS), inner, max_size=4)
    ),
    max_leaves=12,
)


@st.composite
def manifests(draw: st.DrawFn) -> dict[Any, Any]:
    """A manifest-shaped document: mostly the right keys, with any values in them."""
    document: dict[Any, Any] = {}
    for key in ("version", "name", "target", "sources"):
        if draw(st.integers(0, 9)):  # a required key is sometimes missing
            document[key] = draw(_VALUES)
    if draw(st.booleans()):
        document["version"] = 1
        document["name"] = draw(st.sampled_from(["job", "Bad Name", "a" * 200]))
    if draw(st.booleans()):
        document["target"] = draw(
            st.dictionaries(st.sampled_from(MANIFEST_KEYS["target"]), _VALUES, max_size=4)
        )
    if draw(st.booleans()):
        document["settings"] = draw(
            st.dictionaries(st.sampled_from(MANIFEST_KEYS["settings"]), _VALUES, max_size=6)
        )
    if draw(st.booleans()):
        source = st.dictionaries(st.sampled_from(MANIFEST_KEYS["sources[]"]), _VALUES, max_size=4)
        document["sources"] = draw(st.lists(source, max_size=4))
    document.update(draw(st.dictionaries(st.one_of(_KEYS, _TEXT), _VALUES, max_size=3)))
    return document


@pytest.fixture
def folder() -> Iterator[Path]:
    with tempfile.TemporaryDirectory() as name:
        path = Path(name)
        (path / "data").mkdir()
        (path / "data" / "a.txt").write_text("a")
        yield path


def located_or_loaded(path: Path) -> Manifest | ManifestError:
    """Load `path`; anything but a Manifest or a ManifestError fails the property."""
    try:
        return load_manifest(path, environ={})
    except ManifestError as err:
        return err


@given(document=manifests())
@settings(SETTINGS, max_examples=400)
def test_any_generated_manifest_loads_or_is_refused_with_file_and_line(
    folder: Path, document: dict[Any, Any]
) -> None:
    path = folder / "job.yaml"
    path.write_text(as_yaml(document), encoding="utf-8")

    result = located_or_loaded(path)

    if isinstance(result, ManifestError):
        assert result.problems
        for problem in result.problems:
            if problem.message.startswith("... and "):
                continue  # the count of problems past the first hundred
            assert problem.file == str(path)
            assert isinstance(problem.line, int) and problem.line >= 1, problem
            assert str(problem).startswith(f"{path}:{problem.line}: ")
            assert not any(ch < " " for ch in str(problem)), problem  # one line, no escapes


@given(text=st.text(max_size=300))
@SETTINGS
def test_any_text_at_all_loads_or_is_refused_naming_the_file(folder: Path, text: str) -> None:
    path = folder / "job.yaml"
    path.write_bytes(text.encode("utf-8", errors="surrogatepass"))

    result = located_or_loaded(path)

    if isinstance(result, ManifestError):
        assert result.problems
        assert all(str(problem).startswith(str(path)) for problem in result.problems)


@given(data=st.binary(max_size=300))
@SETTINGS
def test_any_bytes_at_all_load_or_are_refused_naming_the_file(folder: Path, data: bytes) -> None:
    path = folder / "job.yaml"
    path.write_bytes(data)

    result = located_or_loaded(path)

    if isinstance(result, ManifestError):
        assert all(str(problem).startswith(str(path)) for problem in result.problems)
