"""The export stage's errors. Each carries the exit status `python -m export` ends with.

Every message is one line that names the problem and the thing it is about (a file, a model, a
flag), so the CLI can print `error: <message>` and nothing else.
"""

from __future__ import annotations


class ExportError(Exception):
    """Base class; `exit_code` is the CLI's exit status for it."""

    exit_code = 1


class UsageError(ExportError):
    """A bad argument: an out-of-range number, a bad name, an architecture that cannot do this."""

    exit_code = 2


class CheckpointError(ExportError):
    """A checkpoint that is missing, unreadable, unsafe (pickled code) or for another architecture."""

    exit_code = 3


class VerificationError(ExportError):
    """The exported ONNX model failed the checker or disagrees with PyTorch beyond the bound."""

    exit_code = 4


class RepositoryError(ExportError):
    """The model repository cannot be written or read as the layout in docs/ARCHITECTURE.md says."""

    exit_code = 5


class VersionExists(RepositoryError):
    """The requested model version is already in the repository (versions are never overwritten)."""


class MetadataError(RepositoryError):
    """A metadata.json that is missing, not JSON, or not schema version 1."""


class IntegrityError(RepositoryError):
    """A file listed in metadata.json is missing or its size or sha256 differs."""
