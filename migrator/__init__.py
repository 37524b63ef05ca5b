"""migrator: a batch migration job runner for the kie.ai File Upload API."""

__version__ = "0.1.0"
