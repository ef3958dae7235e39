"""The models a process serves: which versions the settings select from the repository, what each
served version is (`LoadedModel`), and the one rule for "the latest version" (`Catalog.get`).

Every room uses it: the engine (ONNX Runtime sessions for these versions), the gradient tier (no
session, the same selection), the frontend (name resolution, ModelInfo). So it imports neither ONNX
Runtime nor torch: only the repository reader (export.repository, torch-free) and numpy.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from export import repository
from export.errors import RepositoryError
from export.metadata import is_imported
from export.preprocessing import Preprocessing
from service.errors import NotFound
from service.model_config import (
    GRADIENT_RPCS,
    ModelConfig,
    ModelConfigError,
    ServingConfig,
    VersionPolicy,
    read_model_config,
)

log = logging.getLogger(__name__)

SUPPORTED_DTYPES = (np.dtype(np.float32), np.dtype(np.float16))


class ModelLoadError(RuntimeError):
    """A model version cannot be served (unsafe file, wrong inputs/outputs, provider fell back...),
    or the model selection names what the repository does not have."""


@dataclass(frozen=True)
class LoadedModel:
    """A model version being served. `metadata` is its full metadata.json."""

    name: str
    version: int
    architecture: str
    input_shape: tuple[int, int, int]
    input_dtype: np.dtype
    num_classes: int
    labels: tuple[str, ...]
    preprocessing: Preprocessing
    trained: bool
    trained_on: str | None
    parameters: int
    flops: int
    provider: str
    capabilities: dict[str, bool] = field(compare=False)
    metadata: dict[str, Any] = field(compare=False, repr=False)
    # The version directory (model.onnx, weights.pt, metadata.json): the gradient processes load
    # weights.pt of exactly the versions served here.
    path: Path | None = field(default=None, compare=False)
    # The model's config.yaml (service/model_config.py), and what the engine really serves it
    # with (set once its batcher exists; None in a process that runs no engine).
    config: ModelConfig = field(default_factory=ModelConfig, compare=False, repr=False)
    serving: ServingConfig | None = field(default=None, compare=False, repr=False)


def input_name(model: LoadedModel) -> str:
    """The name of the model's input tensor, as ONNX Runtime, ModelInfo and the OIP know it."""
    return str((model.metadata or {}).get("input", {}).get("name", "input"))


def output_name(model: LoadedModel) -> str:
    """The name of the model's logits output, as ONNX Runtime, ModelInfo and the OIP know it."""
    return str((model.metadata or {}).get("output", {}).get("name", "logits"))


# What the service says wherever a version with untrained weights answers (server log, OIP): the
# demo's seeded random weights give confident-looking answers that mean nothing.
UNTRAINED_WARNING = "untrained demo weights: answers are meaningless"


def features_name(model: LoadedModel) -> str | None:
    """The name of the model's embedding output (metadata.json `features`), or None for a version
    exported before embeddings existed."""
    features = (model.metadata or {}).get("features")
    return str(features.get("name", "features")) if isinstance(features, dict) else None


def features_dim(model: LoadedModel) -> int:
    """D, the embedding's length; 0 when the model has no features output."""
    features = (model.metadata or {}).get("features")
    return int(features["shape"][0]) if isinstance(features, dict) else 0


# What the gradient RPCs answer (FAILED_PRECONDITION) for a model imported as ONNX: they run on the
# PyTorch module rebuilt from weights.pt, and an import has neither.
IMPORTED_NO_GRADIENTS = "imported ONNX model: no PyTorch module"


def imported(model: LoadedModel) -> bool:
    """Whether `model` was imported as ONNX (`python -m export import`, metadata.json `imported`)."""
    return is_imported(model.metadata or {})


def no_features_hint(model: LoadedModel) -> str:
    """What to do about a version without a features output: re-export a zoo version (the command),
    import an ONNX model again naming its embedding output."""
    if imported(model):
        return (
            "it is an imported ONNX model whose embedding output was not named; if its graph has one, "
            "import it again with --features-output NAME"
        )
    return f"re-export it: {reexport_command(model)}"


def reexport_command(model: LoadedModel) -> str:
    """The command that exports `model` again as a new version with this release's outputs: from
    its own weights.pt when trained, from the same seeded random weights when not."""
    root = model.path.parent.parent if model.path is not None else Path("DIR")
    weights = f" --weights {model.path / 'weights.pt'}" if model.trained and model.path is not None else ""
    return f"python -m export onnx {model.architecture}{weights} --name {model.name} --repository {root}"


def loaded_model(
    meta: dict[str, Any],
    *,
    provider: str,
    path: Path | None = None,
    config: ModelConfig | None = None,
    serving: ServingConfig | None = None,
) -> LoadedModel:
    """metadata.json (+ the model's config.yaml) -> LoadedModel, checking what the service relies
    on. The config's `gradients` list narrows the gradient capabilities the model offers."""
    try:
        inp, out = meta["input"], meta["output"]
        shape = tuple(int(d) for d in inp["shape"])
        dtype = np.dtype(str(inp.get("dtype", "float32")))
        num_classes = int(meta["num_classes"])
        preprocessing = Preprocessing.from_dict(meta["preprocessing"])
        labels = tuple(str(label) for label in (meta.get("labels") or ()))
        name, version = str(meta["name"]), int(meta["version"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelLoadError(f"metadata.json is missing or has an invalid field: {exc!r}") from None
    if len(shape) != 3 or min(shape) < 1:
        raise ModelLoadError(f"metadata.json input shape {list(shape)} is not [C, H, W]")
    if dtype not in SUPPORTED_DTYPES:
        raise ModelLoadError(f"metadata.json input dtype {dtype.name} is not float32 or float16")
    if list(out.get("shape", [num_classes])) != [num_classes]:
        raise ModelLoadError(
            f"metadata.json output shape {out.get('shape')} is not [num_classes={num_classes}]"
        )
    if labels and len(labels) != num_classes:
        raise ModelLoadError(f"metadata.json has {len(labels)} labels for {num_classes} classes")
    if (preprocessing.channels, preprocessing.crop, preprocessing.crop) != shape:
        raise ModelLoadError(
            f"preprocessing ({preprocessing.color_mode}, crop {preprocessing.crop}) does not produce "
            f"the input shape {list(shape)}"
        )
    capabilities = {str(k): bool(v) for k, v in (meta.get("capabilities") or {"classify": True}).items()}
    # FeatureMaps and Filters need nothing but the PyTorch weights (no ReLU, no particular
    # architecture), so every version with weights.pt offers them, also one exported before they
    # existed (its metadata.json's capabilities do not name them).
    has_weights = repository.WEIGHTS_FILE in (meta.get("files") or {})
    capabilities.setdefault("feature_maps", has_weights)
    capabilities.setdefault("filters", has_weights)
    config = config or ModelConfig()
    if config.gradients is not None:
        offered = set(config.gradients)
        capabilities = {k: v and (k not in GRADIENT_RPCS or k in offered) for k, v in capabilities.items()}
    return LoadedModel(
        name=name,
        version=version,
        architecture=str(meta.get("architecture", name)),
        input_shape=(shape[0], shape[1], shape[2]),
        input_dtype=dtype,
        num_classes=num_classes,
        labels=labels,
        preprocessing=preprocessing,
        trained=bool(meta.get("trained", False)),
        trained_on=meta.get("trained_on"),
        parameters=int(meta.get("parameters") or 0),
        flops=int(meta.get("flops") or 0),
        provider=provider,
        capabilities=capabilities,
        metadata=meta,
        path=path,
        config=config,
        serving=serving,
    )


# --- model selection ---------------------------------------------------------------------------

_ITEM = re.compile(
    r"^(?P<name>[A-Za-z0-9][A-Za-z0-9_.\-]*)(?::(?P<versions>all|[1-9][0-9]*(?:\+[1-9][0-9]*)*))?$"
)


@dataclass(frozen=True)
class Selection:
    """Which versions of one model to serve."""

    latest: bool = False
    all: bool = False
    versions: frozenset[int] = frozenset()

    def __or__(self, other: Selection) -> Selection:
        return Selection(self.latest or other.latest, self.all or other.all, self.versions | other.versions)


def parse_model_selection(spec: str) -> dict[str, Selection] | None:
    """`settings.models` -> {name: Selection}; None means every model at its latest version.

    "" -> None; "a,b:2,c:1+3,d:all" (a name may repeat: the selections add up). Raises ValueError
    naming a malformed item.
    """
    if not spec.strip():
        return None
    selection: dict[str, Selection] = {}
    for raw in spec.split(","):
        item = raw.strip()
        match = _ITEM.match(item)
        if match is None:
            raise ValueError(
                f"invalid model selection {item!r} in models={spec!r}: use NAME, NAME:VERSION, "
                "NAME:V1+V2 or NAME:all"
            )
        versions = match["versions"]
        if versions is None:
            wanted = Selection(latest=True)
        elif versions == "all":
            wanted = Selection(all=True)
        else:
            wanted = Selection(versions=frozenset(int(v) for v in versions.split("+")))
        selection[match["name"]] = selection.get(match["name"], Selection()) | wanted
    return selection


def _by_policy(
    name: str, versions: dict[int, repository.ModelVersion], policy: VersionPolicy | None
) -> set[int]:
    """The versions a model named without versions serves: its version_policy, default the latest."""
    if policy is None:
        return {max(versions)}
    try:
        return set(policy.choose(list(versions)))
    except ValueError as exc:
        raise ModelLoadError(f"model {name!r}: {exc}") from None


def choose_versions(
    available: dict[str, dict[int, repository.ModelVersion]],
    selection: dict[str, Selection] | None,
    policies: dict[str, VersionPolicy] | None = None,
) -> list[repository.ModelVersion]:
    """The versions to load. A name or version that is not in the repository is a configuration
    error (raised, so a typo fails the start instead of silently serving less). A model named
    without versions (or every model, with no selection) serves what its version_policy says."""
    policies = policies or {}
    if selection is None:
        return [
            versions[v]
            for name, versions in sorted(available.items())
            for v in sorted(_by_policy(name, versions, policies.get(name)))
        ]
    chosen: list[repository.ModelVersion] = []
    for name, wanted in sorted(selection.items()):
        versions = available.get(name)
        if not versions:
            known = ", ".join(sorted(available)) or "none"
            raise ModelLoadError(f"model {name!r} is not in the repository (it has: {known})")
        missing = sorted(wanted.versions - versions.keys())
        if missing:
            have = ", ".join(map(str, sorted(versions)))
            raise ModelLoadError(f"model {name!r} has no version {missing[0]} (it has: {have})")
        numbers = set(versions) if wanted.all else set(wanted.versions)
        if wanted.latest:
            numbers |= _by_policy(name, versions, policies.get(name))
        chosen.extend(versions[v] for v in sorted(numbers))
    return chosen


@dataclass
class Chosen:
    """What select_versions chose: the versions with their model's config, and the models left
    out because their config.yaml is invalid (name -> the reason, naming file and field)."""

    versions: list[repository.ModelVersion]
    configs: dict[str, ModelConfig]
    refused: dict[str, str]

    def config(self, name: str) -> ModelConfig:
        return self.configs.get(name) or ModelConfig()


def select_versions(root: Path, models: str) -> Chosen:
    """The repository versions `models` (settings.models) selects under `root`, with each model's
    config.yaml. Versions whose metadata.json is invalid are skipped and logged by the scan; a model
    whose config.yaml is invalid is left out and logged (one bad file never takes the others down).
    Raises ModelLoadError for a malformed selection, a missing repository, an empty one, or a name
    or version it lacks."""
    try:
        selection = parse_model_selection(models)
    except ValueError as exc:
        raise ModelLoadError(str(exc)) from None
    try:
        versions = repository.scan(root)
    except RepositoryError as exc:
        raise ModelLoadError(str(exc)) from None
    available: dict[str, dict[int, repository.ModelVersion]] = {}
    for version in versions:
        available.setdefault(version.name, {})[version.version] = version
    if not available:
        raise ModelLoadError(f"no models found in the repository {root}")
    configs: dict[str, ModelConfig] = {}
    refused: dict[str, str] = {}
    for name in sorted(available):
        if selection is not None and name not in selection:
            continue
        try:
            configs[name] = read_model_config(root / name)
        except ModelConfigError as exc:
            refused[name] = str(exc)
            log.error("not serving %s: %s", name, exc)
    usable = {name: versions for name, versions in available.items() if name not in refused}
    if selection is not None:
        selection = {name: wanted for name, wanted in selection.items() if name not in refused}
    policies = {name: c.version_policy for name, c in configs.items() if c.version_policy is not None}
    return Chosen(choose_versions(usable, selection, policies), configs, refused)


# --- the served set ----------------------------------------------------------------------------


class Catalog:
    """The model versions one process serves, and the one "latest" rule: a request that names no
    version gets the highest version loaded (not the highest in the repository)."""

    def __init__(self, models: Iterable[LoadedModel] = ()) -> None:
        self._models = {(m.name, m.version): m for m in models}
        self._latest: dict[str, int] = {}
        for name, version in self._models:
            self._latest[name] = max(version, self._latest.get(name, 0))

    def __len__(self) -> int:
        return len(self._models)

    def models(self) -> list[LoadedModel]:
        return [self._models[key] for key in sorted(self._models)]

    def get(self, name: str, version: int | None = None) -> LoadedModel:
        """The model `name` at `version` (None: the latest loaded). Raises NotFound."""
        if name not in self._latest:
            known = ", ".join(sorted(self._latest)) or "none"
            raise NotFound(f"model {name!r} is not loaded; loaded models: {known}", reason="not_found")
        model = self._models.get((name, self._latest[name] if version is None else version))
        if model is None:
            have = ", ".join(str(v) for n, v in sorted(self._models) if n == name)
            raise NotFound(
                f"model {name!r} has no loaded version {version}; loaded: {have}", reason="not_found"
            )
        return model


__all__ = [
    "UNTRAINED_WARNING",
    "Catalog",
    "Chosen",
    "LoadedModel",
    "ModelLoadError",
    "SUPPORTED_DTYPES",
    "Selection",
    "choose_versions",
    "features_dim",
    "features_name",
    "imported",
    "loaded_model",
    "no_features_hint",
    "reexport_command",
    "parse_model_selection",
    "select_versions",
]
