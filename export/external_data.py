"""Where an ONNX tensor's external data may live: a plain file inside the model's own folder.

One rule for the two places that open a user's model files: `python -m export import`
(export/importing.py) before it copies a graph and its data into a version, and the server
(service/engine/session.py) before ONNX Runtime reads a version's model.onnx. A `location` that
could read anything else (an absolute path, `..`, a symlink on the way, a missing file, a device) is
refused with the reason, which each caller words into its own error.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath, PureWindowsPath


class UnsafeLocation(ValueError):
    """A location outside the folder, or not a regular file in it; str() says why."""


def confined_file(folder: Path, location: str) -> Path:
    """The resolved regular file `location` names inside `folder` (itself resolved)."""
    if not location:
        raise UnsafeLocation("an empty location")
    if "\x00" in location:
        raise UnsafeLocation("a location with a NUL byte")
    # Judge the location as both POSIX and Windows paths: "..\\x" or "C:x" must not slip through.
    posix, windows = PurePosixPath(location), PureWindowsPath(location)
    if posix.is_absolute() or windows.is_absolute() or windows.drive or location.startswith(("/", "\\")):
        raise UnsafeLocation("an absolute path")
    if ".." in posix.parts or ".." in windows.parts:
        raise UnsafeLocation("a path with '..'")
    candidate = folder / posix
    # No symlink anywhere between the folder and the file (a link could be swapped after this check).
    part = candidate
    while part != folder:
        if part.is_symlink():
            raise UnsafeLocation(f"a path through the symlink {part.relative_to(folder)}")
        part = part.parent
    try:
        resolved = candidate.resolve(strict=True)
    except (FileNotFoundError, RuntimeError):
        raise UnsafeLocation("a file that does not exist") from None
    if not resolved.is_relative_to(folder):
        raise UnsafeLocation("a path outside the model folder")
    if not resolved.is_file():
        raise UnsafeLocation("something that is not a regular file")
    return resolved
