"""The JSON Schema of the manifest (migrator/manifest.schema.json), for editors: it
accepts every sample, names exactly the keys migrator reads, and refuses what
migrator refuses."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from conftest import REPO_ROOT

from migrator.errors import ManifestError
from migrator.manifest import MANIFEST_KEYS, load_manifest

SCHEMA_PATH = REPO_ROOT / "migrator" / "manifest.schema.json"
SAMPLES = [
    *sorted((REPO_ROOT / "sample_manifests").glob("*.yaml")),
    REPO_ROOT / "migrator" / "starter.yaml",
]
Document = dict[str, Any]


@pytest.fixture(scope="module")
def validator() -> jsonschema.Draft202012Validator:
    schema = json.loads(SCHEMA_PATH.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


@pytest.mark.parametrize("sample", SAMPLES, ids=[path.name for path in SAMPLES])
def test_every_sample_manifest_and_the_starter_are_valid_under_the_schema(
    validator: jsonschema.Draft202012Validator, sample: Path
) -> None:
    validator.validate(yaml.safe_load(sample.read_text()))


def test_the_schema_names_exactly_the_keys_migrator_reads() -> None:
    schema = json.loads(SCHEMA_PATH.read_text())
    properties = {
        "": schema["properties"],
        "target": schema["properties"]["target"]["properties"],
        "outputs": schema["properties"]["outputs"]["properties"],
        "settings": schema["properties"]["settings"]["properties"],
        "sources[]": schema["$defs"]["source"]["properties"],
    }
    assert {where: sorted(keys) for where, keys in properties.items()} == {
        where: sorted(keys) for where, keys in MANIFEST_KEYS.items()
    }


def a_good_manifest() -> Document:
    document: Document = yaml.safe_load((REPO_ROOT / "sample_manifests" / "glob.yaml").read_text())
    return document


def changed(change: Callable[[Document], object]) -> Document:
    document = copy.deepcopy(a_good_manifest())
    change(document)
    return document


BAD: dict[str, Document] = {
    "a-misspelt-key": changed(lambda d: d.update(setings={"concurrency": 2})),
    "concurrency-0": changed(lambda d: d.update(settings={"concurrency": 0})),
    "version-2": changed(lambda d: d.update(version=2)),
    "a-name-with-spaces": changed(lambda d: d.update(name="Nightly Job")),
    "no-sources": changed(lambda d: d.update(sources=[])),
    "two-kinds-in-one-source": changed(lambda d: d["sources"][0].update(url="https://a.test/x")),
    "an-unknown-method": changed(lambda d: d["sources"][0].update(method="ftp")),
    "a-glob-with-a-file-name": changed(lambda d: d["sources"][0].update(file_name="x.md")),
    "a-url-with-exclude": changed(
        lambda d: d["sources"].append({"url": "https://a.test/x", "exclude": ["*"]})
    ),
    "a-metrics-push-that-is-no-url": changed(
        lambda d: d.update(outputs={"metrics_push": "gw:9091"})
    ),
}


@pytest.mark.parametrize("document", BAD.values(), ids=BAD.keys())
def test_what_migrator_refuses_the_schema_refuses(
    validator: jsonschema.Draft202012Validator, document: Document, tmp_path: Path
) -> None:
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(document))
    with pytest.raises(ManifestError):
        load_manifest(path, environ={}, check_sources=False)

    assert not validator.is_valid(document)


def test_the_unchanged_document_of_the_refusals_is_valid(
    validator: jsonschema.Draft202012Validator,
) -> None:
    validator.validate(a_good_manifest())
