"""migrator: a batch migration job runner for the kie.ai File Upload API.

The public surface, for use from Python (the CLI is a thin layer over it):

    from migrator import load_manifest, run_manifest, RunOptions
    summary = asyncio.run(run_manifest(load_manifest(Path("job.yaml"))))

Names are loaded on first use, so `import migrator` (and `migrator --version`) stays
light. Nothing is logged or printed until `configure_logging` is called.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_PUBLIC = {
    "load_manifest": "migrator.manifest",
    "Manifest": "migrator.model",
    "run_manifest": "migrator.runner",
    "RunOptions": "migrator.runner",
    "refresh": "migrator.refresh",
    "RefreshOptions": "migrator.refresh",
    "download": "migrator.download",
    "DownloadOptions": "migrator.download",
    "CommandOptions": "migrator.command",
    "CommandSummary": "migrator.command",
    "Observer": "migrator.command",
    "Outcome": "migrator.model",
    "configure_logging": "migrator.logs",
    "flush_logs": "migrator.logs",
    "ExitCode": "migrator.errors",
    "MigratorError": "migrator.errors",
    "StopReason": "migrator.errors",
}

__all__ = [
    "CommandOptions",
    "CommandSummary",
    "DownloadOptions",
    "ExitCode",
    "Manifest",
    "MigratorError",
    "Observer",
    "Outcome",
    "RefreshOptions",
    "RunOptions",
    "StopReason",
    "__version__",
    "configure_logging",
    "download",
    "flush_logs",
    "load_manifest",
    "refresh",
    "run_manifest",
]

if TYPE_CHECKING:
    from migrator.command import CommandOptions, CommandSummary, Observer
    from migrator.download import DownloadOptions, download
    from migrator.errors import ExitCode, MigratorError, StopReason
    from migrator.logs import configure_logging, flush_logs
    from migrator.manifest import load_manifest
    from migrator.model import Manifest, Outcome
    from migrator.refresh import RefreshOptions, refresh
    from migrator.runner import RunOptions, run_manifest


def __getattr__(name: str) -> Any:
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'migrator' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
