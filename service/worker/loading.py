"""The child side of a gradient process, part one: the PyTorch models it computes with.

`load_models(config)` runs once in every gradient process (the pool's initializer, as
`functools.partial(load_models, config)` with `config = load_models_config(settings, dirs)`). It
reads each model version the server serves and proves it against its model.onnx (the parity
self-test), keeping only the verdict: the `LoadedModels` it returns builds a version's module from
weights.pt on the first job that needs it and keeps it, least recently used first out, within
settings.worker_model_memory_bytes (handlers.handle calls `LoadedModels.get`). torch is imported
inside the functions, so the serving process can import this module to build the config (and
record what the processes report, `LoadMetrics`) without loading PyTorch.

Why the verdict at start and the module later: the serving process must know at start which
versions it may offer for gradient RPCs (ModelInfo capabilities, FAILED_PRECONDITION
"parity_failed"), exactly as when every module was loaded at start; a verdict found on a first job
would change what ModelInfo says while the server runs. The verdict depends only on metadata.json
(which names the sha256 of weights.pt and model.onnx, and the build arguments) and this code, so
processes of one server share it through `config["verdict_dir"]`: the first process to reach a
version computes it, the others (and every replacement) read it. The test itself runs in a
short-lived process (parity.py, settings.worker_parity_process), so the gradient process, which
lives as long as the server, never imports ONNX Runtime nor keeps what the test allocated.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from export.preprocessing import Preprocessing
from service import memory
from service.errors import FailedPrecondition, NotFound
from service.worker.params import Limits

if TYPE_CHECKING:
    from torch import nn

    from export.repository import ModelVersion
    from service.settings import Settings

log = logging.getLogger(__name__)

Key = tuple[str, int]


@dataclass(frozen=True)
class TorchModel:
    """One loaded model version in a gradient process."""

    name: str
    version: int
    architecture: str
    module: nn.Module
    num_classes: int
    input_shape: tuple[int, int, int]
    preprocessing: Preprocessing
    capabilities: Mapping[str, bool]
    # metadata.json's "layers" (export.layers.addressable_layers at export); None for an export
    # made before it: handlers.layer_table then computes them from the module.
    layers: tuple[Mapping[str, Any], ...] | None = None


@dataclass(frozen=True)
class ModelLoad:
    """A gradient process built a version's module for a job (sent with the job's ctx.report; plain
    data). The serving process turns it into metrics (`LoadMetrics`)."""

    name: str
    version: int
    seconds: float  # weights.pt checked, read and built, on the device
    bytes: int  # the module's parameters and buffers
    evicted: tuple[tuple[str, int, int], ...]  # (name, version, bytes) dropped to make room first
    loaded_bytes: int  # every module the process holds now, this one included


@dataclass
class LoadedModels:
    """What `load_models` returns and `handle` gets: the models, the device and the caps.

    `models` holds the modules built so far, least recently used first; `offered` the versions that
    passed the parity self-test, whose module `get` builds on first use. A module built for a job
    stays until building another would take the modules' parameters and buffers past
    `memory_bytes` (0: no bound); then the least recently used ones are dropped first. One bigger
    than the bound alone is still built, alone. A process runs one job at a time and a job calls
    `get` once, before it computes, so the module of the job running is never the one dropped (and
    a dropped module a caller still holds lives on until the caller lets go). Modules given in
    `models` with no `offered` entry (tests) are never dropped: nothing could rebuild them.
    """

    models: dict[Key, TorchModel]
    device: str
    limits: Limits
    # Versions that failed the parity self-test, with the reason: never used for a job.
    refused: dict[Key, str] = field(default_factory=dict)
    offered: dict[Key, ModelVersion] = field(default_factory=dict)
    memory_bytes: int = 0
    sizes: dict[Key, int] = field(default_factory=dict)  # parameter + buffer bytes per built module

    def ready_summary(self) -> dict[str, Any]:
        """What the pool reports to the serving process with Ready (pool.ready_summary): the
        versions refused for gradient RPCs, as {"name:version": reason}."""
        return {"refused": {f"{n}:{v}": reason for (n, v), reason in self.refused.items()}}

    @property
    def loaded_bytes(self) -> int:
        """Parameter and buffer bytes of the modules built and kept now."""
        return sum(self.sizes.get(key, 0) for key in self.models)

    def get(self, name: str, version: int, report: Callable[[Any], None] | None = None) -> TorchModel:
        """The model for a job, its module built now if it is not yet (then `report(ModelLoad)`).

        version 0 (or less) is the latest version of `name` the gradient processes were given.
        Raises NotFound, or FailedPrecondition (reason "parity_failed") for a refused version.
        """
        if version <= 0:
            versions = [v for (n, v) in (*self.models, *self.offered, *self.refused) if n == name]
            if not versions:
                raise NotFound(f"model {name!r} is not loaded in the gradient workers")
            version = max(versions)
        key = (name, version)
        if key in self.refused:
            raise FailedPrecondition(
                f"model {name!r} version {version} is not offered for gradient RPCs: {self.refused[key]}",
                reason="parity_failed",
            )
        model = self.models.pop(key, None)
        if model is not None:
            self.models[key] = model  # most recently used: last
            return model
        if key not in self.offered:
            raise NotFound(f"model {name!r} version {version} is not loaded in the gradient workers")
        return self._build(key, report)

    def _build(self, key: Key, report: Callable[[Any], None] | None) -> TorchModel:
        version = self.offered[key]
        # Room first, from weights.pt's size: the bound holds while the new module is read too.
        evicted = self._evict_for(int(version.metadata["files"]["weights.pt"]["bytes"]))
        started = time.perf_counter()
        model = _build_model(version, self.device)
        seconds = time.perf_counter() - started
        self.models[key] = model
        self.sizes[key] = module_bytes(model.module)
        log.info(
            "%s:%d built for a job in %.2f s (%.1f MB; %.1f MB of modules held)",
            *key,
            seconds,
            self.sizes[key] / 1e6,
            self.loaded_bytes / 1e6,
        )
        if report is not None:
            report(ModelLoad(*key, seconds, self.sizes[key], evicted, self.loaded_bytes))
        return model

    def _evict_for(self, incoming: int) -> tuple[tuple[str, int, int], ...]:
        """Drop least recently used modules until `incoming` more bytes fit the bound (or none is
        left to drop); returns what was dropped."""
        evicted: list[tuple[str, int, int]] = []
        if self.memory_bytes <= 0:
            return ()
        while self.loaded_bytes + incoming > self.memory_bytes:
            key = next((k for k in self.models if k in self.offered), None)
            if key is None:
                break
            del self.models[key]
            evicted.append((*key, self.sizes.pop(key, 0)))
            log.info("%s:%d dropped (least recently used) to make room under the model memory bound", *key)
        if evicted:
            _release_memory()
        return tuple(evicted)


def module_bytes(module: nn.Module) -> int:
    """Bytes of a module's parameters and buffers (what its weights take, not its activations)."""
    tensors = [*module.parameters(), *module.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)


def _release_memory() -> None:
    """Collect dropped modules now and give glibc's free pages back to the system: freed tensors
    below malloc's mmap threshold stay in the heap otherwise, and RSS would not go down."""
    import gc

    gc.collect()
    memory.trim_heap()


class LoadMetrics:
    """The serving process's side of `ModelLoad`: the pool's `on_report(slot, report)`.

    Counts loads and evictions, observes load seconds, and keeps cnnserve_worker_model_bytes at the
    sum of the processes' last `loaded_bytes` (a process that is gone, report None, holds nothing).
    """

    def __init__(self) -> None:
        self._bytes: dict[int, int] = {}

    def __call__(self, slot: int, report: Any) -> None:
        from service.observability import metrics  # the serving process only (see __init__.py)

        if report is None:
            self._bytes.pop(slot, None)
        elif isinstance(report, ModelLoad):
            metrics.WORKER_MODEL_LOADS.labels(model=report.name, version=str(report.version)).inc()
            metrics.WORKER_MODEL_LOAD_DURATION.labels(model=report.name).observe(report.seconds)
            for name, version, _ in report.evicted:
                metrics.WORKER_MODEL_EVICTIONS.labels(model=name, version=str(version)).inc()
            self._bytes[slot] = report.loaded_bytes
        else:
            return
        metrics.WORKER_MODEL_BYTES.set(sum(self._bytes.values()))


def load_models_config(
    settings: Settings, version_dirs: Sequence[str | Path], *, verdict_dir: str | Path | None = None
) -> dict[str, Any]:
    """The `load_models` config for the model versions the server serves, from the settings.

    verdict_dir: a private directory the processes share parity verdicts through (the server makes
    one per pool); None: each process runs the self-test itself.
    """
    threads = settings.torch_threads or max(1, (os.cpu_count() or 1) // max(1, settings.workers))
    return {
        "models": [str(p) for p in version_dirs],
        "device": settings.device,
        "cuda_device_id": settings.cuda_device_id,
        "torch_threads": threads,
        "nice": settings.worker_nice,
        "memory_bytes": settings.worker_model_memory_bytes,
        "verdict_dir": None if verdict_dir is None else str(verdict_dir),
        "parity_process": settings.worker_parity_process,
        "limits": {
            "max_iterations": settings.max_task_iterations,
            "max_image_side": settings.max_task_image_side,
            "max_batch": settings.max_task_batch,
        },
    }


class ParityError(RuntimeError):
    """A version's rebuilt PyTorch network disagrees with its model.onnx (see `_check_version`)."""

    def __init__(self, key: Key, message: str) -> None:
        super().__init__(message)
        self.key = key


def read_version(directory: Path) -> ModelVersion:
    """The version in `directory`, its architecture known (or an imported ONNX model, which
    `load_models` leaves out); RuntimeError naming what is wrong."""
    from export import repository
    from export.errors import ExportError
    from export.models import get_spec

    try:
        version = repository.read_version(directory)
    except ExportError as exc:
        raise RuntimeError(str(exc)) from None
    if not version.imported:
        get_spec(version.architecture)  # UnknownArchitecture names the known ones
    return version


def _build_module(version: ModelVersion) -> nn.Module:
    """The version's network as the exporter built it, weights.pt loaded strictly, on the CPU,
    float32, eval mode, no parameter requiring grad (the algorithms take input gradients only)."""
    import torch

    from export.models import build

    label = f"{version.name}:{version.version}"
    try:
        module = build(version.architecture, num_classes=version.num_classes, **version.build_kwargs)
    except TypeError as exc:
        raise RuntimeError(
            f"{label}: metadata.json's build_kwargs {version.build_kwargs} do not build "
            f"{version.architecture}: {exc}"
        ) from None
    state = torch.load(version.weights_path, map_location="cpu", weights_only=True)
    module.load_state_dict(state, strict=True)
    del state
    module = module.float().eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


def _build_model(version: ModelVersion, device: Any) -> TorchModel:
    """A job's model: weights.pt checked against metadata.json again (the parity verdict was given
    for those bytes), then built and moved to `device`."""
    from export import repository
    from export.errors import ExportError

    try:
        repository.verify_file(version, "weights.pt")
    except ExportError as exc:
        raise RuntimeError(str(exc)) from None
    return TorchModel(
        name=version.name,
        version=version.version,
        architecture=version.architecture,
        module=_build_module(version).to(device),
        num_classes=version.num_classes,
        input_shape=version.input_shape,
        preprocessing=version.preprocessing,
        capabilities=version.capabilities,
        layers=tuple(version.metadata["layers"]) if version.metadata.get("layers") else None,
    )


def _check_version(version: ModelVersion) -> None:
    """The parity self-test, on a module built for it and dropped after.

    Every file metadata.json lists is checked (size, sha256), the module is built as
    `_build_module` does, then export.onnx_export.verify_version runs it and model.onnx on ONNX
    Runtime's CPU provider on the export's fixed input: raises ParityError when they differ beyond
    the export's bound, RuntimeError for anything else that stops the version from loading.
    """
    from export import repository
    from export.errors import ExportError, VerificationError
    from export.onnx_export import verify_version

    try:
        repository.verify_files(version)
    except ExportError as exc:
        raise RuntimeError(str(exc)) from None
    module = _build_module(version)
    try:
        parity = verify_version(version, module)
    except VerificationError as exc:
        raise ParityError(
            version.key,
            "the PyTorch network rebuilt from weights.pt disagrees with model.onnx "
            f"(ONNX Runtime) on the export's fixed input: {exc}",
        ) from None
    log.info(
        "%s:%d: parity with model.onnx on ONNX Runtime: relative diff %.2g (bound %g)",
        *version.key,
        parity.relative_diff,
        parity.max_relative_diff,
    )


def _verdict_now(version: ModelVersion) -> str | None:
    """None when the version passes the parity self-test, else why it is refused."""
    try:
        _check_version(version)
    except ParityError as exc:
        return str(exc)
    return None


@contextlib.contextmanager
def _locked(path: Path, *, blocking: bool) -> Iterator[bool]:
    """An exclusive flock on `path` while inside; yields False (not held) when `blocking` is False
    and another process holds it."""
    import fcntl

    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _verdict_path(version: ModelVersion, directory: Path) -> Path:
    # metadata.json names the sha256 of weights.pt and model.onnx and the build arguments: all the
    # verdict depends on besides this code. Its own bytes are the key.
    return directory / f"{hashlib.sha256(version.metadata_path.read_bytes()).hexdigest()}.json"


def _shared_verdict(version: ModelVersion, directory: Path, *, blocking: bool) -> tuple[bool, str | None]:
    """(found, verdict) for `version` through `directory`: read when another process computed it,
    else computed now and written for the others. (False, None) when not blocking and another
    process is computing it right now."""
    path = _verdict_path(version, directory)
    with _locked(path.with_suffix(".lock"), blocking=blocking) as held:
        if not held:
            return False, None
        if path.exists():
            refused: str | None = json.loads(path.read_text())["refused"]
            return True, refused
        refused = _verdict_now(version)
        tmp = directory / f".{path.stem}.{os.getpid()}.tmp"
        tmp.write_text(json.dumps({"refused": refused}))
        os.replace(tmp, path)
        return True, refused


def shared_verdicts(versions: Sequence[ModelVersion], directory: str | None) -> dict[Key, str | None]:
    """The parity verdict of every version (None: passed; else why refused), each computed once per
    `directory`. First the versions no other process is testing, then a wait for the rest: two
    processes starting together test different versions at the same time."""
    if directory is None:
        return {v.key: _verdict_now(v) for v in versions}
    verdicts: dict[Key, str | None] = {}
    pending = list(versions)
    for blocking in (False, True):
        waiting = []
        for v in pending:
            found, refused = _shared_verdict(v, Path(directory), blocking=blocking)
            if found:
                verdicts[v.key] = refused
            else:
                waiting.append(v)
        pending = waiting
    return {v.key: verdicts[v.key] for v in versions}


def _known_verdicts(versions: Sequence[ModelVersion], directory: str | None) -> dict[Key, str | None]:
    """The verdicts another process of the pool already wrote (files appear whole: os.replace)."""
    known: dict[Key, str | None] = {}
    if directory is None:
        return known
    for version in versions:
        with contextlib.suppress(FileNotFoundError):
            known[version.key] = json.loads(_verdict_path(version, Path(directory)).read_text())["refused"]
    return known


class _ParityProcess:
    """`python -m service.worker.parity` testing some versions (see parity.py), started at once so
    it runs while the gradient process imports torch. `verdicts()` waits for its answer; `stop()`
    kills it if it still runs (the gradient process's start failed meanwhile)."""

    def __init__(self, versions: Sequence[ModelVersion], config: Mapping[str, Any]) -> None:
        import subprocess
        import sys

        request = {
            "models": [str(v.path) for v in versions],
            "verdict_dir": config.get("verdict_dir"),
            "torch_threads": int(config.get("torch_threads", 0)),
            "parent": os.getpid(),
        }
        # The directory this package was imported from, so the test runs this very code, installed
        # or not (the tests run from a checkout).
        root = str(Path(__file__).resolve().parents[2])
        path = os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))
        self._process = subprocess.Popen(
            [sys.executable, "-m", "service.worker.parity", json.dumps(request)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            env=dict(os.environ, PYTHONPATH=path),
            text=True,
        )

    def verdicts(self) -> dict[Key, str | None]:
        """The verdicts (None: passed; else why refused); RuntimeError with the process's own error
        when something stopped a version from loading, or when the process died."""
        from service.worker.spawned import exit_status

        out, _ = self._process.communicate()
        try:
            answer = json.loads(out.splitlines()[-1])
        except (ValueError, IndexError):
            status = exit_status(self._process.returncode)
            raise RuntimeError(f"the parity self-test process {status} without an answer") from None
        if "error" in answer:
            raise RuntimeError(answer["error"])
        return {(name, version): refused for name, version, refused in answer["verdicts"]}

    def stop(self) -> None:
        if self._process.poll() is None:
            self._process.kill()
        self._process.wait()


@contextlib.contextmanager
def _verdicts(
    versions: Sequence[ModelVersion], config: Mapping[str, Any]
) -> Iterator[Callable[[], dict[Key, str | None]]]:
    """Yields a function that returns every version's parity verdict (`shared_verdicts`), in the
    order of `versions`. With config["parity_process"] the versions no other process of the pool has
    a verdict for yet are tested in a process of their own (parity.py), started on entry so the test
    runs while the caller goes on; else here, when the function is called."""
    directory = config.get("verdict_dir")
    known = _known_verdicts(versions, directory)
    untested = [v for v in versions if v.key not in known]
    if not untested or not config.get("parity_process", False):
        yield lambda: shared_verdicts(versions, directory)
        return
    process = _ParityProcess(untested, config)

    def wait() -> dict[Key, str | None]:
        found = known | process.verdicts()
        return {v.key: found[v.key] for v in versions}

    try:
        yield wait
    finally:
        process.stop()


def _torch_device(config: Mapping[str, Any]) -> str:
    """Import torch, set its threads, and choose the device (config["device"]) the jobs run on."""
    import torch

    threads = int(config.get("torch_threads", 0))
    if threads > 0:
        torch.set_num_threads(threads)
    wanted = config.get("device", "auto")
    if wanted not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda, got {wanted!r}")
    use_cuda = wanted == "cuda" or (wanted == "auto" and torch.cuda.is_available())
    if wanted == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device=cuda but torch.cuda.is_available() is false in the gradient worker")
    return f"cuda:{int(config.get('cuda_device_id', 0))}" if use_cuda else "cpu"


def load_models(config: Mapping[str, Any]) -> LoadedModels:
    """Prepare every model version listed in `config` (see `load_models_config`) for gradient jobs.

    config["models"]: repository version directories (each with metadata.json and weights.pt);
    config["device"]: "auto" (CUDA when torch.cuda.is_available()), "cpu" or "cuda";
    config["cuda_device_id"], config["torch_threads"] (0: leave torch's default), config["nice"]
    (lower this process's CPU priority by that much; 0: unchanged), config["memory_bytes"] (the
    bound of `LoadedModels`; 0 or missing: none), config["verdict_dir"] (see `load_models_config`),
    config["parity_process"] (run the self-test in a process of its own, parity.py; missing: here),
    config["limits"].
    Each version's parity is proven now (`_check_version`, or the verdict another process of the
    same server reached) and its module dropped again: `LoadedModels.get` builds it on first use. One
    that fails the parity self-test is listed in `refused` (its jobs answer FAILED_PRECONDITION),
    anything else that stops a version from loading fails the process's start.
    """
    nice = int(config.get("nice", 0))
    if nice > 0:
        # Below the serving process: where they share cores, classification threads win. First, so
        # that a parity process started next inherits it.
        os.nice(nice)
    # An imported ONNX model has no weights.pt and no module to build: the serving process answers
    # its gradient RPCs FAILED_PRECONDITION before any job exists (service/frontend/gradients.py).
    versions = [v for entry in config.get("models", []) if not (v := read_version(Path(entry))).imported]
    with _verdicts(versions, config) as verdicts:
        device = _torch_device(config)
        reached = verdicts()
    offered: dict[Key, ModelVersion] = {}
    refused: dict[Key, str] = {}
    for key, reason in reached.items():
        if reason is None:
            offered[key] = next(v for v in versions if v.key == key)
        else:
            # Explaining another network than the one that classified is worse than not explaining:
            # the version keeps classifying (ONNX Runtime) but is not offered for gradient RPCs.
            refused[key] = reason
            log.error("not offering %s:%d for gradient RPCs: %s", *key, reason)
    _release_memory()  # the self-test's modules and ONNX Runtime sessions
    return LoadedModels(
        models={},
        device=device,
        limits=Limits(**dict(config.get("limits", {}))),
        refused=refused,
        offered=offered,
        memory_bytes=int(config.get("memory_bytes", 0)),
    )


__all__ = [
    "LoadMetrics",
    "LoadedModels",
    "ModelLoad",
    "ParityError",
    "TorchModel",
    "load_models",
    "load_models_config",
    "module_bytes",
]
