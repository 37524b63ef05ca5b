"""`migrator init`: a commented starter manifest, written where asked, never over a file.

The starter is `migrator/starter.yaml`, with the job named after the file it is
written to. The package also ships the sample manifests (`samples()`: the repository's
`sample_manifests/`, linked as `migrator/samples`).
"""

from __future__ import annotations

import os
from importlib.resources import files
from importlib.resources.abc import Traversable
from pathlib import Path

from migrator.errors import UsageError
from migrator.manifest import is_job_name
from migrator.outputs import write_error

STARTER = "starter.yaml"
DEFAULT_FILE = "job.yaml"
PLACEHOLDER_NAME = "my-job"
STARTER_MODE = 0o644


def samples() -> Traversable:
    """The sample manifests shipped inside the package."""
    return files("migrator") / "samples"


def starter_text(name: str) -> str:
    """The starter manifest for a job called `name` (a valid job name)."""
    text = (files("migrator") / STARTER).read_text(encoding="utf-8")
    return text.replace(PLACEHOLDER_NAME, name)


def job_name_for(path: Path) -> str:
    """The file's stem when it is a valid job name (`nightly-assets.yaml`), else my-job."""
    stem = path.stem.lower()
    return stem if is_job_name(stem) else PLACEHOLDER_NAME


def write_starter(path: Path) -> Path:
    """Write the starter at `path` (or `path`/job.yaml for a folder); returns where.

    Never replaces a file: one that exists is a UsageError, as is a folder that does not."""
    if path.is_dir():
        path = path / DEFAULT_FILE
    text = starter_text(job_name_for(path))
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, STARTER_MODE)
    except FileExistsError:
        raise UsageError(f"{path} already exists: not overwritten (name another file)") from None
    except OSError as err:
        raise write_error(path, err) from None
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(text)
    return path
