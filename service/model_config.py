"""Per-model configuration: an optional `DIR/<model>/config.yaml` beside the model's versions.

The server's settings are the defaults; a model's file overrides them for every version of that
model, the way Triton's config.pbtxt does (LeNet-5 wants batches of 256, VGG-19 of 8):

    # model_repository/lenet5/config.yaml
    max_batch_size: 256
    max_queue_delay_s: 0.001
    max_queue_size: 512
    warmup_batch_sizes: [1, 256]      # or "all" / "none"
    instances: 2                      # ONNX Runtime sessions, each computing a batch at once
    device: cpu                       # auto | cpu | cuda
    precision: exported               # exported | fp32 | fp16 (fp32 exports converted at load)
    version_policy: {latest: 2}       # or {specific: [1, 3]} or {all: true}
    gradients: [explain]              # the gradient RPCs offered: explain, dream, stylize,
                                      #   feature_maps, filters

Why YAML: it is written by hand, next to Kubernetes manifests, by the people who write those, and
it takes comments; JSON is valid YAML, so a generated file may be JSON. It is read with
`yaml.safe_load` (no tags, no objects) and validated with pydantic: an unknown or malformed field is
an error naming the file and the field, never ignored.

Integrity (SECURITY.md): the file is not part of a version's sha256 manifest (it belongs to the
model, not to one version, and an operator edits it without re-exporting); it is checked on its own:
a regular file (no symlink), at most MAX_CONFIG_BYTES, in the model's folder of the repository.

Torch- and ONNX-Runtime-free: the catalog, the engine, the frontends and the gradient tier read it.
"""

from __future__ import annotations

import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from service.settings import Settings, warmup_sizes_of

CONFIG_FILE = "config.yaml"
MAX_CONFIG_BYTES = 64 * 1024
GRADIENT_RPCS = ("explain", "dream", "stylize", "feature_maps", "filters")


class ModelConfigError(ValueError):
    """config.yaml cannot be used; the message names the file and the field."""


class VersionPolicy(BaseModel):
    """Which versions are served when the `models` setting names the model without versions:
    exactly one of latest (the N highest, default 1), specific (these, each must exist) or all."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    latest: int | None = Field(default=None, ge=1)
    specific: tuple[int, ...] | None = None
    all: bool | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> VersionPolicy:
        given = [k for k in ("latest", "specific", "all") if getattr(self, k) not in (None, False)]
        if len(given) != 1:
            raise ValueError("give exactly one of latest: N, specific: [versions] or all: true")
        if self.specific is not None and (not self.specific or min(self.specific) < 1):
            raise ValueError("specific must list version numbers >= 1")
        return self

    def choose(self, versions: list[int]) -> list[int]:
        """The versions of `versions` (what the repository has) this policy serves, ascending.
        Raises ValueError naming a specific version the repository lacks."""
        if self.all:
            return sorted(versions)
        if self.specific is not None:
            missing = sorted(set(self.specific) - set(versions))
            if missing:
                have = ", ".join(map(str, sorted(versions)))
                raise ValueError(
                    f"version_policy names version {missing[0]}, which is not there (it has: {have})"
                )
            return sorted(set(self.specific))
        return sorted(versions)[-(self.latest or 1) :]

    def describe(self) -> str:
        if self.all:
            return "all"
        if self.specific is not None:
            return "specific: " + ",".join(map(str, self.specific))
        return f"latest: {self.latest or 1}"


class ModelConfig(BaseModel):
    """The overrides of one model's config.yaml; None: the server's setting."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_batch_size: int | None = Field(default=None, ge=1, le=256)
    max_queue_delay_s: float | None = Field(default=None, ge=0, le=1)
    max_queue_size: int | None = Field(default=None, ge=1, le=100_000)
    warmup_batch_sizes: Literal["auto", "all", "none"] | tuple[int, ...] | None = None
    instances: int | None = Field(default=None, ge=1, le=16)
    device: Literal["auto", "cpu", "cuda"] | None = None
    # exported: as the version was exported; fp32: refuse an fp16 export; fp16: an fp16 export as it
    # is, an fp32 export converted at load and checked (service/engine/precision.py).
    precision: Literal["exported", "fp32", "fp16"] | None = None
    version_policy: VersionPolicy | None = None
    gradients: tuple[Literal["explain", "dream", "stylize", "feature_maps", "filters"], ...] | None = None

    @field_validator("warmup_batch_sizes")
    @classmethod
    def _sizes(cls, value: Any) -> Any:
        if isinstance(value, tuple):
            if not value or any(not 1 <= s <= 256 for s in value):
                raise ValueError("batch sizes must be 1..256 (or all, or none)")
            return tuple(sorted(set(value)))
        return value


@dataclass(frozen=True)
class ServingConfig:
    """What one model version is really served with: its config.yaml over the server's settings,
    capped by what the model allows (a fixed batch dimension). GetModel and Triton's ModelConfig
    report these."""

    max_batch_size: int
    max_queue_delay_s: float
    max_queue_size: int
    warmup_batch_sizes: tuple[int, ...]
    device: str
    version_policy: str
    config_file: str  # "" when the model has none
    instances: int = 1
    intra_op_threads: int = 0  # per instance; 0: ONNX Runtime's default (one per core)
    precision: str = "fp32"  # what runs: fp32, fp16 (an fp16 export) or fp16 (converted at load)

    def as_dict(self) -> dict[str, Any]:
        return {
            "max_batch_size": self.max_batch_size,
            "max_queue_delay_s": self.max_queue_delay_s,
            "max_queue_size": self.max_queue_size,
            "warmup_batch_sizes": list(self.warmup_batch_sizes),
            "device": self.device,
            "version_policy": self.version_policy,
            "config_file": self.config_file,
            "instances": self.instances,
            "intra_op_threads": self.intra_op_threads,
            "precision": self.precision,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ServingConfig:
        return cls(**{**data, "warmup_batch_sizes": tuple(data["warmup_batch_sizes"])})


def read_model_config(model_dir: Path) -> ModelConfig:
    """The model's config.yaml (an empty ModelConfig when there is none). Raises ModelConfigError
    naming the file and the field."""
    path = model_dir / CONFIG_FILE
    try:
        info = path.lstat()
    except FileNotFoundError:
        return ModelConfig()
    except OSError as exc:
        raise ModelConfigError(f"{path}: cannot be read: {exc.strerror}") from None
    if not stat.S_ISREG(info.st_mode):
        raise ModelConfigError(f"{path}: must be a regular file (not a symlink or a directory)")
    if info.st_size > MAX_CONFIG_BYTES:
        raise ModelConfigError(f"{path}: {info.st_size} bytes, more than {MAX_CONFIG_BYTES}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise ModelConfigError(f"{path}: not valid YAML: {exc}") from None
    if data is None:
        return ModelConfig()
    if not isinstance(data, dict):
        raise ModelConfigError(f"{path}: must be a mapping of settings, got {type(data).__name__}")
    try:
        return ModelConfig.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(part) for part in first["loc"]) or "(top level)"
        more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
        raise ModelConfigError(f"{path}: {field}: {first['msg']}{more}") from None


def warmup_sizes(settings: Settings, config: ModelConfig, max_batch: int, *, fixed_shape: bool) -> list[int]:
    """The batch sizes a version runs once before it serves: the model's config, else the setting."""
    given = config.warmup_batch_sizes
    if given is None:
        spec = settings.warmup_batch_sizes
    elif isinstance(given, tuple):
        spec = ",".join(map(str, given))
    else:
        spec = given
    return warmup_sizes_of(spec, max_batch, fixed_shape=fixed_shape)


__all__ = [
    "CONFIG_FILE",
    "GRADIENT_RPCS",
    "ModelConfig",
    "ModelConfigError",
    "ServingConfig",
    "VersionPolicy",
    "read_model_config",
    "warmup_sizes",
]
