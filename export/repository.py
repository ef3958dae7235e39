"""The versioned model repository (layout and metadata.json: docs/ARCHITECTURE.md).

```
DIR/<model>/<version>/  model.onnx  weights.pt  metadata.json
```

Writing: `VersionWriter` builds a version in `DIR/<model>/.tmp-<version>-<random>/` and `commit`
renames it into place, so a reader sees a complete version or none, and a failure (or a kill) leaves
at most a `.tmp-*` directory that every reader ignores. `rename(2)` refuses to replace a non-empty
directory and every committed version holds metadata.json, so a version is never overwritten, even
by two exporters racing for the same number (the loser gets `VersionExists`, or takes the next number
when it did not ask for a specific one).

Reading (the service uses only these): `scan`, `read_version`, `load_metadata`, `verify_files`,
`verify_file`, `latest`, `sha256_file`. What metadata.json must say: export.metadata.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from export.errors import IntegrityError, MetadataError, RepositoryError, VersionExists

# The schema and the file names it fixes live in export.metadata. The names re-exported here
# ("X as X") are the repository's public API used across the repo: the service reads
# repository.WEIGHTS_FILE, the tests call repository.validate_metadata.
from export.metadata import FILE_RE, NAME_RE, is_imported, is_int
from export.metadata import METADATA as METADATA
from export.metadata import ONNX_FILE as ONNX_FILE
from export.metadata import WEIGHTS_FILE as WEIGHTS_FILE
from export.metadata import validate_metadata as validate_metadata
from export.preprocessing import Preprocessing

log = logging.getLogger(__name__)

TMP_PREFIX = ".tmp-"
_VERSION_RE = re.compile(r"^[1-9][0-9]{0,17}$")
_COMMIT_ATTEMPTS = 20


def sha256_file(path: str | os.PathLike[str], chunk_bytes: int = 1 << 20) -> str:
    """The hex sha256 of a file, read in chunks. Lives here, torch-free, so that reading a repository
    (the serving process) never imports PyTorch."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class ModelVersion:
    """One committed version directory and its (validated) metadata.json."""

    name: str
    version: int
    path: Path  # DIR/<name>/<version>
    metadata: dict[str, Any] = field(compare=False, hash=False, repr=False)

    @property
    def key(self) -> tuple[str, int]:
        return (self.name, self.version)

    @property
    def onnx_path(self) -> Path:
        return self.path / ONNX_FILE

    @property
    def weights_path(self) -> Path:
        return self.path / WEIGHTS_FILE

    @property
    def metadata_path(self) -> Path:
        return self.path / METADATA

    @property
    def architecture(self) -> str:
        return str(self.metadata["architecture"])

    @property
    def input_shape(self) -> tuple[int, int, int]:
        c, h, w = (int(d) for d in self.metadata["input"]["shape"])
        return (c, h, w)

    @property
    def dtype(self) -> str:
        """ "float32" or "float16": the ONNX model's input and output element type."""
        return str(self.metadata["input"]["dtype"])

    @property
    def num_classes(self) -> int:
        return int(self.metadata["num_classes"])

    @property
    def labels(self) -> tuple[str, ...]:
        return tuple(self.metadata["labels"])

    @property
    def preprocessing(self) -> Preprocessing:
        return Preprocessing.from_dict(self.metadata["preprocessing"])

    @property
    def capabilities(self) -> dict[str, bool]:
        return {str(k): bool(v) for k, v in self.metadata["capabilities"].items()}

    @property
    def trained(self) -> bool:
        return bool(self.metadata["trained"])

    @property
    def fp16(self) -> bool:
        return bool(self.metadata["fp16"])

    @property
    def imported(self) -> bool:
        """An ONNX model imported with `python -m export import`: no weights.pt, no PyTorch module."""
        return is_imported(self.metadata)

    @property
    def build_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for `export.models.build(architecture, ...)` that rebuild the module
        weights.pt belongs to (e.g. GoogLeNet's transform_input); {} when absent."""
        return dict(self.metadata.get("build_kwargs") or {})


def load_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and validate a metadata.json (`path` is the file or its version directory)."""
    path = Path(path)
    if path.is_dir():
        path = path / METADATA
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise MetadataError(f"{path} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise MetadataError(f"{path} cannot be read: {getattr(e, 'strerror', None) or e}") from None
    try:
        meta = json.loads(text)
    except json.JSONDecodeError as e:
        raise MetadataError(
            f"{path} is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}"
        ) from None
    return validate_metadata(meta, str(path))


def read_version(directory: str | os.PathLike[str]) -> ModelVersion:
    """Read and validate one committed version directory `DIR/<name>/<version>`.

    Raises MetadataError when its metadata.json is missing or invalid, or names another model or
    version than the directory it lies in. File hashes are not checked here: see `verify_files`.
    """
    directory = Path(directory)
    if not _VERSION_RE.match(directory.name):
        raise MetadataError(f"{directory} is not a version directory (DIR/<model>/<positive integer>)")
    meta = load_metadata(directory / METADATA)
    name, version = directory.parent.name, int(directory.name)
    if meta["name"] != name or meta["version"] != version:
        raise MetadataError(
            f"{directory / METADATA} says {meta['name']}:{meta['version']} but lies in {name}/{version}"
        )
    return ModelVersion(name=name, version=version, path=directory, metadata=meta)


def _require_root(root: Path) -> None:
    if not root.exists():
        raise RepositoryError(f"repository {root} does not exist")
    if not root.is_dir():
        raise RepositoryError(f"repository {root} is not a directory")


def _version_dirs(model_dir: Path) -> list[Path]:
    try:
        entries = list(model_dir.iterdir())
    except OSError as e:
        raise RepositoryError(f"cannot list {model_dir}: {e.strerror or e}") from None
    return [p for p in entries if _VERSION_RE.match(p.name) and p.is_dir()]


def scan(root: str | os.PathLike[str], *, strict: bool = False) -> list[ModelVersion]:
    """Every committed version under `root`, sorted by (name, version).

    `.tmp-*` build directories, hidden entries and names that are not model names or positive
    integers are ignored. A version whose metadata.json is missing or invalid is skipped with a
    logged warning naming the file, so one broken version does not hide the others; `strict=True`
    raises MetadataError instead. File hashes are not checked here: see `verify_files`.
    Raises RepositoryError if `root` is missing or not a directory.
    """
    root = Path(root)
    _require_root(root)
    found: list[ModelVersion] = []
    for model_dir in sorted(root.iterdir()):
        if not NAME_RE.match(model_dir.name) or not model_dir.is_dir():
            continue
        for directory in sorted(_version_dirs(model_dir), key=lambda p: int(p.name)):
            try:
                found.append(read_version(directory))
            except RepositoryError as e:
                if strict:
                    raise
                log.warning("skipping %s: %s", directory, e)
    return found


def verify_files(version: ModelVersion) -> None:
    """Check every file metadata.json lists: present, same size, same sha256.

    Raises IntegrityError naming the first bad file and what is wrong with it.
    """
    for fname in version.metadata["files"]:
        verify_file(version, fname)


def verify_file(version: ModelVersion, fname: str) -> None:
    """Check one file metadata.json lists (present, same size, same sha256); IntegrityError if not."""
    entry = version.metadata["files"].get(fname)
    path = version.path / fname
    if entry is None:
        raise IntegrityError(f"{path} is not listed in {version.metadata_path}")
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise IntegrityError(f"{path} is missing (listed in {version.metadata_path})") from None
    except OSError as e:
        raise IntegrityError(f"{path} cannot be read: {e.strerror or e}") from None
    if size != entry["bytes"]:
        raise IntegrityError(f"{path} has {size} bytes, metadata.json says {entry['bytes']}")
    try:
        digest = sha256_file(path)
    except OSError as e:
        raise IntegrityError(f"{path} cannot be read: {e.strerror or e}") from None
    if digest != entry["sha256"]:
        raise IntegrityError(
            f"{path} sha256 {digest[:16]}... differs from metadata.json's {entry['sha256'][:16]}..."
        )


def latest(versions: Iterable[ModelVersion], name: str) -> ModelVersion | None:
    """The highest version of model `name` among `versions`, or None if there is none."""
    mine = [v for v in versions if v.name == name]
    return max(mine, key=lambda v: v.version) if mine else None


def existing_versions(root: str | os.PathLike[str], name: str) -> list[int]:
    """Version numbers taken in DIR/<name>: every integer directory, valid metadata or not."""
    model_dir = Path(root) / name
    if not model_dir.is_dir():
        return []
    return sorted(int(p.name) for p in _version_dirs(model_dir))


def next_version(root: str | os.PathLike[str], name: str) -> int:
    """1 + the highest version number taken (a broken version's number is never reused)."""
    return max(existing_versions(root, name), default=0) + 1


# --- writing ----------------------------------------------------------------------------------


def check_name(name: str) -> str:
    if not NAME_RE.match(name):
        raise RepositoryError(
            f"model name {name!r} is not allowed: use letters, digits, '_', '.', '-', starting with a "
            "letter or digit (at most 100 characters)"
        )
    return name


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def file_entry(path: Path) -> dict[str, Any]:
    return {"sha256": sha256_file(path), "bytes": path.stat().st_size}


class VersionWriter:
    """Builds one version of model `name` under `root`; use as a context manager.

    Write files into `writer.path` (the `.tmp-*` directory), then `commit(metadata)`. Leaving the
    `with` block without a commit (an exception, a failed verification) removes the directory.
    `version=None` takes `next_version` at commit time; an explicit version that exists raises
    VersionExists here already, before any work is spent.
    """

    def __init__(self, root: str | os.PathLike[str], name: str, version: int | None = None) -> None:
        self.root = Path(root)
        self.name = check_name(name)
        if version is not None and not (is_int(version) and 1 <= version < 10**18):
            raise RepositoryError(f"version must be a positive integer, got {version!r}")
        self.requested = version
        self.committed: ModelVersion | None = None
        model_dir = self.root / name
        # Directories made here are removed again by abort() if still empty: a failed export leaves
        # the repository as it found it.
        self._created: list[Path] = []
        try:
            if self.root.exists() and not self.root.is_dir():
                raise RepositoryError(f"repository {self.root} is not a directory")
            for directory in (*reversed(model_dir.parents), model_dir):
                if not directory.exists():
                    directory.mkdir(exist_ok=True)
                    self._created.append(directory)
            if not model_dir.is_dir():
                raise RepositoryError(f"{model_dir} exists and is not a directory")
            if version is not None and (model_dir / str(version)).exists():
                raise VersionExists(f"{name} version {version} already exists in {self.root}")
            label = version if version is not None else next_version(self.root, name)
            self.path = model_dir / f"{TMP_PREFIX}{label}-{secrets.token_hex(4)}"
            self.path.mkdir()
        except RepositoryError:
            self._remove_created()
            raise
        except OSError as e:
            self._remove_created()
            raise RepositoryError(f"repository {self.root} is not writable: {e.strerror or e}") from None

    def __enter__(self) -> VersionWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self.committed is None:
            self.abort()

    def abort(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
        self._remove_created()

    def _remove_created(self) -> None:
        for directory in reversed(self._created):
            try:
                directory.rmdir()  # only if empty: another exporter may be using it by now
            except OSError:
                break
        self._created = []

    def commit(self, metadata: dict[str, Any]) -> ModelVersion:
        """Hash the files, write metadata.json, validate it, rename into place. Returns the version.

        `metadata` gets `name`, `version` and `files` filled in here.
        """
        if self.committed is not None:
            raise RepositoryError(f"{self.name} version {self.committed.version} is already committed")
        try:
            files = {}
            for p in sorted(self.path.iterdir()):
                if p.name == METADATA:
                    continue
                if not p.is_file() or not FILE_RE.match(p.name):
                    raise RepositoryError(f"{p} is not a plain file; a version holds plain files only")
                _fsync_file(p)
                files[p.name] = file_entry(p)
            for _ in range(_COMMIT_ATTEMPTS):
                version = self.requested if self.requested is not None else next_version(self.root, self.name)
                meta = dict(metadata, name=self.name, version=version, files=files)
                validate_metadata(meta, f"metadata for {self.name}:{version}")
                meta_path = self.path / METADATA
                meta_path.write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
                _fsync_file(meta_path)
                target = self.root / self.name / str(version)
                try:
                    # Fails (ENOTEMPTY/EEXIST) if the target is a committed version: never overwritten.
                    os.rename(self.path, target)
                except OSError as e:
                    if not target.exists() or e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                        raise
                    if self.requested is not None:
                        raise VersionExists(
                            f"{self.name} version {version} already exists in {self.root}"
                        ) from None
                    log.info(
                        "%s version %d was taken concurrently; trying the next number", self.name, version
                    )
                    continue
                _fsync_dir(target.parent)
                self.path = target
                self.committed = ModelVersion(name=self.name, version=version, path=target, metadata=meta)
                return self.committed
            raise RepositoryError(
                f"could not claim a version number for {self.name} after {_COMMIT_ATTEMPTS} tries"
            )
        except RepositoryError:
            raise
        except OSError as e:
            raise RepositoryError(
                f"cannot write {self.name} to repository {self.root}: {e.strerror or e}"
            ) from None
