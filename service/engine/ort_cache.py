"""An on-disk cache of ONNX Runtime's optimized graphs, so a restart skips graph optimization.

ONNX Runtime can save the graph it optimized (`SessionOptions.optimized_model_filepath`), and a
session opened on that file with optimizations off serves the same graph without redoing them. What
that saves is small on ORT 1.31 with 2 CPU cores: ResNet-50's session 0.16 -> 0.09 s, VGG-19's 1.6 s
unchanged (reading the weights and prepacking them dominate, and neither is cached); a miss costs
0.2-0.9 s more for writing the entry. Hence Settings.ort_cache_dir is off by default. ORT's docs
warn that a saved graph is only valid for the options, execution provider and hardware that made
it: at level `all` the CPU layout transformer rewrites convolutions into NCHWc blocks whose width
depends on the CPU's vector unit. So an entry is keyed by everything that shapes the graph (see
`cache_key`), and a different key never reads another key's entry.

An entry is two files named by the key's digest: `<digest>.onnx` (what ORT wrote) and
`<digest>.json` (the full key and the .onnx's size). Both are written to temporary names, synced and
moved into place with os.replace, so a process starting beside another never reads half a file; an
entry whose .onnx does not match its .json, or that ORT cannot open, is removed and rewritten.

Trust (SECURITY.md, "How models are trusted", item 5): an entry is a model the server will run, derived
from a model.onnx whose sha256 was checked. The cache directory must be owned by the server's uid and
not writable by group or others (as ssh demands of ~/.ssh), and so must each entry, else it is not
used: nobody but the server's own user can then plant or swap an entry. The entry's content is not
hashed again at every start: on 2 cores that costs 0.5 s for VGG-19's 550 MB, more than a hit saves.

Every failure of the cache (a directory that cannot be made or written, a corrupt entry, a full
disk) is logged with its reason and the model is served from model.onnx as without a cache.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import platform
import stat
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnxruntime as ort

from service.engine.providers import ProviderChoice

log = logging.getLogger(__name__)

# Bump when the entry layout or the meaning of a key changes: old entries then simply miss.
CACHE_FORMAT = 1
# Temporary files older than this are leftovers of a process killed mid-write, never a live writer
# (writing VGG-19's 550 MB entry takes seconds).
_STALE_TMP_S = 3600.0
_TMP_SUFFIX = ".tmp"


@functools.cache
def hardware_fingerprint() -> str:
    """What the CPU offers, as far as ORT's graph rewrites can depend on it: the architecture and
    the CPU feature flags (Linux /proc/cpuinfo), so a cache on a volume shared by different
    machines never hands an AVX-512 layout to an AVX2 CPU."""
    flags = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            if line.startswith(("flags", "Features")):  # x86 / arm64
                flags = " ".join(sorted(line.split(":", 1)[-1].split()))
                break
    return f"{platform.machine()} {platform.processor()} {flags}".strip()


def cache_key(model_sha256: str, options: ort.SessionOptions, provider: ProviderChoice) -> dict[str, Any]:
    """Everything the optimized graph depends on. Thread counts, spinning and logging do not
    change the graph and are left out, so bench and serve settings share an entry."""
    return {
        "format": CACHE_FORMAT,
        "model_sha256": model_sha256,
        "onnxruntime": ort.__version__,
        "providers": provider.session_providers(),
        "graph_optimization_level": str(options.graph_optimization_level),
        "hardware": hardware_fingerprint(),
    }


def key_digest(key: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True)
class CachedSession:
    session: ort.InferenceSession
    outcome: str  # for the "loaded" log line: hit, miss (written), miss (not written: why), ...


class OptimizedModelCache:
    """A checked, writable cache directory. Build it with `open`, which returns None (and logs why)
    when the cache cannot be used."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    @classmethod
    def open(cls, directory: Path | None, *, why_off: str = "") -> OptimizedModelCache | None:
        """The cache in `directory` (created 0700 if missing), or None when it is off (`directory`
        None; `why_off` says why) or unusable: not creatable, not writable, not owned by this uid,
        or writable by group or others. Logs one line either way."""
        if directory is None:
            log.info("ONNX Runtime graph cache off (%s)", why_off or "no directory")
            return None
        try:
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            problem = _unsafe_directory(directory)
            if problem is None:
                _probe_writable(directory)
        except OSError as exc:
            problem = f"it cannot be created or written: {exc.strerror or exc}"
        if problem is not None:
            log.warning(
                "ONNX Runtime graph cache skipped: %s %s; every model's graph is optimized at start",
                directory,
                problem,
            )
            return None
        cache = cls(directory)
        cache._remove_stale_temporaries()
        log.info("ONNX Runtime graph cache in %s", directory)
        return cache

    def session(
        self,
        model_path: Path,
        model_sha256: str,
        options: ort.SessionOptions,
        provider: ProviderChoice,
    ) -> CachedSession:
        """An InferenceSession for model_path: from the cached optimized graph when there is a
        valid entry (a hit), else from model_path, saving its optimized graph (a miss). Errors
        loading model_path itself propagate; the cache's own failures are logged and bypassed."""
        key = cache_key(model_sha256, options, provider)
        digest = key_digest(key)
        entry, sidecar = self._paths(digest)
        reason = self._check_entry(entry, sidecar, key)
        if reason is None:
            session, reason = self._open_entry(entry, options, provider)
            if session is not None:
                if session.get_providers()[0] == provider.name:
                    return CachedSession(session, "hit")
                # The entry is sound, but a graph made for the provider asked must not run on a
                # fallback (CUDA's fusions on CPU): serve model.onnx, keep the entry for next time.
                fallback = session.get_providers()[0]
                del session
                return CachedSession(
                    _create(model_path, options, provider), f"skipped (fell back to {fallback})"
                )
        if reason != "absent":
            log.warning(
                "ONNX Runtime graph cache: entry %s for %s is unusable (%s); rebuilding it",
                entry.name,
                model_path,
                reason,
            )
            self._discard(entry, sidecar)
        return self._build(model_path, options, provider, key, entry, sidecar)

    # --- internals -------------------------------------------------------------------------------

    def _paths(self, digest: str) -> tuple[Path, Path]:
        # 32 hex digits (128 bits) name an entry; the .json's full key settles any doubt.
        return self.directory / f"{digest[:32]}.onnx", self.directory / f"{digest[:32]}.json"

    def _check_entry(self, entry: Path, sidecar: Path, key: dict[str, Any]) -> str | None:
        """None when entry is complete and matches its sidecar, else why not ("absent": no entry)."""
        try:
            record = json.loads(sidecar.read_text())
        except FileNotFoundError:
            return "absent"
        except (OSError, ValueError) as exc:
            return f"unreadable record: {exc}"
        if not isinstance(record, dict) or record.get("key") != json.loads(json.dumps(key)):
            return "its record is for another key"
        try:
            st = entry.lstat()
        except OSError as exc:
            return f"unreadable: {exc.strerror or exc}"
        problem = _untrusted(st)
        if problem is not None:
            return problem
        if st.st_size != record.get("bytes"):
            return f"{st.st_size} bytes, its record says {record.get('bytes')}"
        return None

    def _open_entry(
        self, entry: Path, options: ort.SessionOptions, provider: ProviderChoice
    ) -> tuple[ort.InferenceSession | None, str]:
        level = options.graph_optimization_level
        # The graph is already optimized: running the optimizers again is the cost being saved, and
        # ORT's layout rewrites must not be applied twice.
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        try:
            return _create(entry, options, provider), ""
        except Exception as exc:  # noqa: BLE001 - ORT raises its own types; model.onnx still loads
            return None, f"onnxruntime cannot open it: {str(exc)[:300]}"
        finally:
            options.graph_optimization_level = level

    def _build(
        self,
        model_path: Path,
        options: ort.SessionOptions,
        provider: ProviderChoice,
        key: dict[str, Any],
        entry: Path,
        sidecar: Path,
    ) -> CachedSession:
        try:
            fd, tmp_name = tempfile.mkstemp(dir=self.directory, prefix=f".{entry.stem}-", suffix=_TMP_SUFFIX)
            os.close(fd)
        except OSError as exc:
            return CachedSession(_create(model_path, options, provider), f"miss (not written: {exc})")
        tmp = Path(tmp_name)
        options.optimized_model_filepath = tmp_name
        try:
            session = _create(model_path, options, provider)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        finally:
            options.optimized_model_filepath = ""
        if session.get_providers()[0] != provider.name:
            # Optimized for the fallback provider: storing it under the asked provider's key would
            # hand a CPU graph to the next start that gets CUDA.
            tmp.unlink(missing_ok=True)
            return CachedSession(session, f"miss (not written: fell back to {session.get_providers()[0]})")
        try:
            self._commit(tmp, key, entry, sidecar)
        except OSError as exc:
            log.warning("ONNX Runtime graph cache: cannot write %s: %s", entry, exc)
            tmp.unlink(missing_ok=True)
            return CachedSession(session, f"miss (not written: {exc.strerror or exc})")
        return CachedSession(session, "miss (written)")

    def _commit(self, tmp: Path, key: dict[str, Any], entry: Path, sidecar: Path) -> None:
        record = {"key": key, "bytes": tmp.stat().st_size}
        fd, record_tmp = tempfile.mkstemp(dir=self.directory, prefix=f".{sidecar.stem}-", suffix=_TMP_SUFFIX)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(record, f, indent=1, sort_keys=True)
                f.flush()
                os.fsync(f.fileno())
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())  # the data reaches the disk before its name does
            # The .onnx first: a reader that sees the new record finds the new graph; one that pairs
            # an old record with the new graph sees a sha256 mismatch and rebuilds, never misloads.
            os.replace(tmp, entry)
            os.replace(record_tmp, sidecar)
        except BaseException:
            Path(record_tmp).unlink(missing_ok=True)
            raise

    def _discard(self, entry: Path, sidecar: Path) -> None:
        for path in (sidecar, entry):
            with contextlib.suppress(OSError):
                path.unlink(missing_ok=True)

    def _remove_stale_temporaries(self) -> None:
        cutoff = time.time() - _STALE_TMP_S
        for path in self.directory.glob(f".*{_TMP_SUFFIX}"):
            with contextlib.suppress(OSError):
                if path.stat().st_mtime < cutoff:
                    path.unlink()


def _create(path: Path, options: ort.SessionOptions, provider: ProviderChoice) -> ort.InferenceSession:
    return ort.InferenceSession(os.fspath(path), options, providers=provider.session_providers())


def _unsafe_directory(directory: Path) -> str | None:
    """Why `directory` cannot hold trusted entries, or None. Follows a symlink to the directory (a
    linked ~/.cache is common); what counts is who can write the directory the entries live in."""
    st = directory.stat()
    if not stat.S_ISDIR(st.st_mode):
        return "is not a directory"
    return _untrusted(st)


def _untrusted(st: os.stat_result) -> str | None:
    """Why a file or directory with this stat may hold something the server's user did not write."""
    if not (stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode)):
        return "is not a regular file"
    if hasattr(os, "geteuid") and st.st_uid != os.geteuid():
        return f"is owned by uid {st.st_uid}, not this process's uid {os.geteuid()}"
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"is writable by group or others (mode {stat.S_IMODE(st.st_mode):o}); chmod go-w it"
    return None


def _probe_writable(directory: Path) -> None:
    # A real write, not os.access: access() says yes to root on a read-only bind mount's
    # permissions and knows nothing of a full disk.
    fd, name = tempfile.mkstemp(dir=directory, prefix=".probe-", suffix=_TMP_SUFFIX)
    os.close(fd)
    os.unlink(name)
