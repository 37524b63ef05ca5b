"""The Kubernetes units in jobs/kubernetes/: valid against the API's own schema (checked
offline, strictly: a misspelt field fails), and saying what migrator understands."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from conftest import REPO_ROOT

from migrator.shard import SHARD_ENV, Shard, chosen_shard

UNITS = REPO_ROOT / "jobs" / "kubernetes"
OLDEST_KUBERNETES = "1.29.0"  # the first with backoffLimitPerIndex on by default


def documents(name: str) -> list[dict[str, Any]]:
    with (UNITS / name).open(encoding="utf-8") as handle:
        return [doc for doc in yaml.safe_load_all(handle) if doc]


def check(document: dict[str, Any]) -> None:
    kubernetes_validate.validate(document, OLDEST_KUBERNETES, strict=True)


def the(kind: str, name: str) -> dict[str, Any]:
    (found,) = [doc for doc in documents(name) if doc["kind"] == kind]
    return found


def container(job: dict[str, Any]) -> dict[str, Any]:
    (only,) = job["spec"]["template"]["spec"]["containers"]
    return only


def env(job: dict[str, Any]) -> list[dict[str, Any]]:
    return list(container(job)["env"])


@pytest.mark.parametrize(
    "name", sorted(path.name for path in UNITS.glob("*.yaml")), ids=lambda name: name
)
def test_every_unit_passes_the_kubernetes_schema(name: str) -> None:
    for document in documents(name):
        check(document)


def misspelt(job: dict[str, Any]) -> None:
    job["spec"]["completionsMode"] = job["spec"].pop("completionMode")


def mistyped(job: dict[str, Any]) -> None:
    job["spec"]["parallelism"] = "four"


def without_containers(job: dict[str, Any]) -> None:
    del job["spec"]["template"]["spec"]["containers"]


@pytest.mark.parametrize("breaking", [misspelt, mistyped, without_containers])
def test_the_schema_check_fails_on_a_broken_unit(breaking: Any) -> None:
    broken = copy.deepcopy(the("Job", "indexed-job.yaml"))
    breaking(broken)
    with pytest.raises(kubernetes_validate.ValidationError):
        check(broken)


def test_the_indexed_job_gives_pod_k_shard_k_of_its_completions() -> None:
    job = the("Job", "indexed-job.yaml")
    count = job["spec"]["completions"]
    assert job["spec"]["completionMode"] == "Indexed"
    names = [variable["name"] for variable in env(job)]
    assert names.index("JOB_COMPLETION_INDEX") < names.index(SHARD_ENV)  # $(...) sees it
    (index,) = [v for v in env(job) if v["name"] == "JOB_COMPLETION_INDEX"]
    assert "job-completion-index" in index["valueFrom"]["fieldRef"]["fieldPath"]
    (shard,) = [v["value"] for v in env(job) if v["name"] == SHARD_ENV]
    for k in range(count):
        expanded = shard.replace("$(JOB_COMPLETION_INDEX)", str(k))
        assert chosen_shard(None, {SHARD_ENV: expanded}) == Shard(k, count)


def test_the_merge_job_folds_the_indexed_jobs_shards() -> None:
    count = the("Job", "indexed-job.yaml")["spec"]["completions"]
    (script,) = container(the("Job", "shard-merge-job.yaml"))["args"]
    words = script.split()
    assert words[:4] == ["exec", "migrator", "ledger", "merge"]
    assert words[5].endswith(f".shard-*-of-{count}.sqlite")
    claims = {
        volume["persistentVolumeClaim"]["claimName"]
        for name in ("indexed-job.yaml", "shard-merge-job.yaml")
        for volume in the("Job", name)["spec"]["template"]["spec"]["volumes"]
        if "persistentVolumeClaim" in volume
    }
    assert claims == {the("PersistentVolumeClaim", "indexed-job.yaml")["metadata"]["name"]}


def test_the_worker_job_runs_n_workers_on_the_postgresql_ledger_of_a_secret() -> None:
    job = the("Job", "worker-job.yaml")
    assert job["spec"]["parallelism"] > 1
    assert "completions" not in job["spec"]
    assert container(job)["args"] == ["run", "/etc/migrator/job.yaml"]
    (ledger,) = [v for v in env(job) if v["name"] == "MIGRATOR_LEDGER"]
    assert set(ledger["valueFrom"]["secretKeyRef"]) == {"name", "key"}


def test_units_are_found() -> None:
    names = {path.name for path in Path(UNITS).glob("*.yaml")}
    assert {"cronjob.yaml", "indexed-job.yaml", "worker-job.yaml"} <= names
