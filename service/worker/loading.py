"""The child side of a gradient process, part one: loading the PyTorch models it computes with.

`load_models(config)` runs once in every gradient process (the pool's initializer, as
`functools.partial(load_models, config)` with `config = load_models_config(settings, dirs)`). It
rebuilds each model version the server serves from its weights.pt, proves it against its model.onnx
(the parity self-test) and returns the `LoadedModels` every job of that process then uses
(handlers.handle). torch is imported inside the functions, so the serving process can import this
module to build the config without loading PyTorch.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from export.preprocessing import Preprocessing
from service.errors import FailedPrecondition, NotFound
from service.worker.params import Limits

if TYPE_CHECKING:
    from torch import nn

    from service.settings import Settings

log = logging.getLogger(__name__)


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


@dataclass
class LoadedModels:
    """What `load_models` returns and `handle` gets: the loaded models, the device and the caps."""

    models: dict[tuple[str, int], TorchModel]
    device: str
    limits: Limits
    # Versions that failed the parity self-test, with the reason: never used for a job.
    refused: dict[tuple[str, int], str] = field(default_factory=dict)

    def ready_summary(self) -> dict[str, Any]:
        """What the pool reports to the serving process with Ready (pool.ready_summary): the
        versions refused for gradient RPCs, as {"name:version": reason}."""
        return {"refused": {f"{n}:{v}": reason for (n, v), reason in self.refused.items()}}

    def get(self, name: str, version: int) -> TorchModel:
        """version 0 (or less) is the latest version of `name` the gradient processes were given."""
        if version <= 0:
            versions = [v for (n, v) in (*self.models, *self.refused) if n == name]
            if not versions:
                raise NotFound(f"model {name!r} is not loaded in the gradient workers")
            version = max(versions)
        if (name, version) in self.refused:
            raise FailedPrecondition(
                f"model {name!r} version {version} is not offered for gradient RPCs: "
                f"{self.refused[(name, version)]}",
                reason="parity_failed",
            )
        try:
            return self.models[(name, version)]
        except KeyError:
            raise NotFound(
                f"model {name!r} version {version} is not loaded in the gradient workers"
            ) from None


def load_models_config(settings: Settings, version_dirs: Sequence[str | Path]) -> dict[str, Any]:
    """The `load_models` config for the model versions the server serves, from the settings."""
    import os

    threads = settings.torch_threads or max(1, (os.cpu_count() or 1) // max(1, settings.workers))
    return {
        "models": [str(p) for p in version_dirs],
        "device": settings.device,
        "cuda_device_id": settings.cuda_device_id,
        "torch_threads": threads,
        "nice": settings.worker_nice,
        "limits": {
            "max_iterations": settings.max_task_iterations,
            "max_image_side": settings.max_task_image_side,
            "max_batch": settings.max_task_batch,
        },
    }


class ParityError(RuntimeError):
    """A version's rebuilt PyTorch network disagrees with its model.onnx (see `_load_version`)."""

    def __init__(self, key: tuple[str, int], message: str) -> None:
        super().__init__(message)
        self.key = key


def _load_version(directory: Path, device: Any) -> TorchModel:
    """Rebuild one repository version as the exporter built it, and prove it.

    metadata.json is read and validated by export.repository (one reader, one schema), every file it
    lists is checked (size, sha256), the module is built with the exporter's `build_kwargs` and loads
    weights.pt strictly. Then the parity self-test (export.onnx_export.verify_version) runs the
    module and model.onnx on ONNX Runtime's CPU provider on the export's fixed input, on the CPU
    before the module moves to `device`: raises ParityError when they differ beyond the export's
    bound, RuntimeError for anything else that stops the version from loading.
    """
    import torch

    from export import repository
    from export.errors import ExportError, VerificationError
    from export.models import build, get_spec
    from export.onnx_export import verify_version

    try:
        version = repository.read_version(directory)
        repository.verify_files(version)
    except ExportError as exc:
        raise RuntimeError(str(exc)) from None
    label = f"{version.name}:{version.version}"
    get_spec(version.architecture)  # UnknownArchitecture names the known ones
    try:
        module = build(version.architecture, num_classes=version.num_classes, **version.build_kwargs)
    except TypeError as exc:
        raise RuntimeError(
            f"{label}: metadata.json's build_kwargs {version.build_kwargs} do not build "
            f"{version.architecture}: {exc}"
        ) from None
    state = torch.load(version.weights_path, map_location="cpu", weights_only=True)
    module.load_state_dict(state, strict=True)
    module = module.float().eval()
    for p in module.parameters():
        p.requires_grad_(False)  # gradient processes never train; the algorithms take input gradients only
    try:
        parity = verify_version(version, module)
    except VerificationError as exc:
        raise ParityError(
            version.key,
            "the PyTorch network rebuilt from weights.pt disagrees with model.onnx "
            f"(ONNX Runtime) on the export's fixed input: {exc}",
        ) from None
    log.info(
        "%s: parity with model.onnx on ONNX Runtime: relative diff %.2g (bound %g)",
        label,
        parity.relative_diff,
        parity.max_relative_diff,
    )
    return TorchModel(
        name=version.name,
        version=version.version,
        architecture=version.architecture,
        module=module.to(device),
        num_classes=version.num_classes,
        input_shape=version.input_shape,
        preprocessing=version.preprocessing,
        capabilities=version.capabilities,
    )


def load_models(config: Mapping[str, Any]) -> LoadedModels:
    """Load every model version listed in `config` (see `load_models_config`) for gradient jobs.

    config["models"]: repository version directories (each with metadata.json and weights.pt);
    config["device"]: "auto" (CUDA when torch.cuda.is_available()), "cpu" or "cuda";
    config["cuda_device_id"], config["torch_threads"] (0: leave torch's default), config["nice"]
    (lower this process's CPU priority by that much; 0: unchanged), config["limits"].
    Each version is rebuilt and checked as `_load_version` says; one that fails the parity self-test
    is left out of `models` and listed in `refused` (its jobs answer FAILED_PRECONDITION), anything
    else that stops a version from loading fails the process's start.
    """
    import os

    import torch

    threads = int(config.get("torch_threads", 0))
    if threads > 0:
        torch.set_num_threads(threads)
    nice = int(config.get("nice", 0))
    if nice > 0:
        # Below the serving process: where they share cores, classification threads win.
        os.nice(nice)
    wanted = config.get("device", "auto")
    if wanted not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda, got {wanted!r}")
    use_cuda = wanted == "cuda" or (wanted == "auto" and torch.cuda.is_available())
    if wanted == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device=cuda but torch.cuda.is_available() is false in the gradient worker")
    device = torch.device(f"cuda:{int(config.get('cuda_device_id', 0))}") if use_cuda else torch.device("cpu")
    models: dict[tuple[str, int], TorchModel] = {}
    refused: dict[tuple[str, int], str] = {}
    for entry in config.get("models", []):
        try:
            loaded = _load_version(Path(entry), device)
        except ParityError as exc:
            # Explaining another network than the one that classified is worse than not explaining:
            # the version keeps classifying (ONNX Runtime) but is not offered for gradient RPCs.
            refused[exc.key] = str(exc)
            log.error("not offering %s:%d for gradient RPCs: %s", *exc.key, exc)
            continue
        models[(loaded.name, loaded.version)] = loaded
    return LoadedModels(
        models=models,
        device=str(device),
        limits=Limits(**dict(config.get("limits", {}))),
        refused=refused,
    )


__all__ = ["LoadedModels", "ParityError", "TorchModel", "load_models", "load_models_config"]
