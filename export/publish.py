"""Publishing a model version: `export_to_repository`.

The network (random, loaded from a checkpoint, or given) goes through the ONNX stage
(export.onnx_export: export, check, verify); weights.pt, model.onnx and metadata.json are written
into a `VersionWriter` (export.repository) and committed as a new version only once all of it
passed. A model that fails a step is refused with VerificationError and its version directory removed.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

# The ONNX stage is called through its module (onnx_export.export_onnx, .check, .verify), so a test
# can substitute one step for a sabotaged one and see the next step refuse it.
from export import onnx_export
from export.checkpoints import load_weights
from export.errors import UsageError
from export.metadata import ONNX_FILE, WEIGHTS_FILE
from export.preprocessing import describe_input
from export.repository import ModelVersion, VersionWriter, check_name

if TYPE_CHECKING:
    from export.models import ArchSpec

RANDOM_WEIGHTS_SEED = 0


@dataclass(frozen=True)
class ExportResult:
    version: ModelVersion
    seconds: float  # export + check + verification + writing
    onnx_bytes: int
    verification: onnx_export.Verification


def labels_for(dataset: str, num_classes: int) -> list[str]:
    """Class names for a data set: the digits, or ImageNet's 1000 classes (export/data)."""
    if dataset == "digits":
        labels = [str(d) for d in range(10)]
    elif dataset == "imagenet":
        from importlib import resources

        text = resources.files("export").joinpath("data/imagenet_classes.txt").read_text(encoding="utf-8")
        labels = text.splitlines()
    else:
        raise UsageError(f"no labels for data set {dataset!r}")
    if len(labels) != num_classes:
        raise UsageError(f"{dataset} has {len(labels)} labels but the model has {num_classes} classes")
    return labels


def _digits_accuracy(directory: Path, fp16: bool) -> dict[str, Any]:
    """Held-out accuracy of the exported model itself (model.onnx in `directory`), run by ONNX
    Runtime (what the service serves)."""
    from export.digits import SPLIT_DESCRIPTION, load_split

    split = load_split()
    session = onnx_export.ort_session(directory / ONNX_FILE)
    x = split.x_test.astype(np.float16 if fp16 else np.float32)
    (logits,) = session.run([onnx_export.OUTPUT_NAME], {onnx_export.INPUT_NAME: x})
    correct = int((logits.argmax(1) == split.y_test).sum())
    return {
        "dataset": "digits",
        "split": f"held-out ({SPLIT_DESCRIPTION})",
        "samples": len(split.y_test),
        "accuracy": round(correct / len(split.y_test), 6),
        "runtime": "onnxruntime CPUExecutionProvider",
    }


def _refuse_bad_arguments(weights: str | Path | None, model: nn.Module | None, opset: int) -> None:
    if weights is not None and model is not None:
        raise UsageError("give either a checkpoint or an in-memory model, not both")
    onnx_export.check_opset(opset)


def _build_kwargs(
    arch: str, build_kwargs: dict[str, Any] | None, weights: str | Path | None
) -> dict[str, Any]:
    """`build_kwargs`, plus transform_input=True for GoogLeNet loaded from a checkpoint, as
    torchvision builds it for its published weights."""
    kwargs = dict(build_kwargs or {})
    if arch == "googlenet" and weights is not None:
        kwargs.setdefault("transform_input", True)
    return kwargs


def _network(
    arch: str,
    build_kwargs: dict[str, Any],
    model: nn.Module | None,
    weights: str | Path | None,
    seed: int,
    calibrated: bool = False,
) -> tuple[nn.Module, str | None, dict[str, Any] | None]:
    """The eval-mode network to export, the sha256 of the checkpoint it was loaded from (None
    without one) and how random weights were initialized (None for given weights): `model` if
    given, else `arch` built with `build_kwargs` and initialized after `torch.manual_seed(seed)`,
    then loaded from the checkpoint `weights` if given, or with `calibrated` scaled to stay alive
    (export.calibration)."""
    from export.models import build, get_spec

    source_sha256 = None
    initialization: dict[str, Any] | None = None
    if model is None:
        with torch.random.fork_rng(devices=[]):  # seeded init without touching the caller's RNG
            torch.manual_seed(seed)
            model = build(arch, **build_kwargs)
        if weights is not None:
            source_sha256 = load_weights(model, weights, arch)
        else:
            calibration = None
            if calibrated:
                from export.calibration import calibrate

                spec = get_spec(arch)
                calibration = calibrate(model, spec.preprocessing, spec.head, seed=seed)
            initialization = {"seed": seed, "calibration": calibration}
    return model.eval(), source_sha256, initialization


def _write_model_files(
    directory: Path, model: nn.Module, spec: ArchSpec, *, opset: int, fp16: bool
) -> onnx_export.Verification:
    """weights.pt (the float32 state_dict) and model.onnx (logits and features) in `directory`, the
    latter checked and verified against eval-mode `model`; returns the verification."""
    state_dict = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    torch.save(state_dict, directory / WEIGHTS_FILE)

    onnx_path = directory / ONNX_FILE
    onnx_export.export_onnx(model, spec.input_shape, onnx_path, opset=opset, fp16=fp16, head=spec.head)
    onnx_export.check(onnx_path, opset, features=True)
    return onnx_export.verify(onnx_path, model, spec.input_shape, fp16=fp16, head=spec.head)


def _metadata(
    spec: ArchSpec,
    name: str,
    model: nn.Module,
    *,
    fp16: bool,
    opset: int,
    trained: bool,
    trained_on: str | None,
    source_sha256: str | None,
    verification: onnx_export.Verification,
    training: dict[str, Any] | None,
    evaluation: dict[str, Any] | None,
    build_kwargs: dict[str, Any],
    initialization: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """metadata.json for the export of `spec`'s architecture as `name`; VersionWriter.commit fills
    in `version` and `files`. `trained_on` defaults to the architecture's data set when `trained`."""
    from export.describe import describe
    from export.layers import FEATURES_NAME, addressable_layers, features_dim

    arch = spec.name
    if trained_on is None and trained:
        trained_on = spec.dataset
    described = describe(arch)
    dtype = "float16" if fp16 else "float32"
    return {
        "schema_version": 1,
        "name": name,
        "version": 0,  # set by commit
        "architecture": arch,
        "input": {
            "name": onnx_export.INPUT_NAME,
            "shape": list(spec.input_shape),
            "dtype": dtype,
            "description": describe_input(spec.preprocessing),
        },
        "output": {"name": onnx_export.OUTPUT_NAME, "shape": [spec.num_classes], "dtype": dtype},
        # The embedding: model.onnx's second output, the final classifier layer's input.
        "features": {
            "name": FEATURES_NAME,
            "shape": [features_dim(model, spec.head)],
            "dtype": dtype,
            "layer": spec.head,
        },
        # What Explain's neuron target, Dream and FeatureMaps may name, with output shapes: the
        # serving process checks names and GetModel lists them without torch.
        "layers": addressable_layers(model, spec.input_shape),
        "num_classes": spec.num_classes,
        "preprocessing": spec.preprocessing.to_dict(),
        "labels": labels_for(spec.dataset, spec.num_classes),
        "trained": trained,
        "trained_on": trained_on if trained else None,
        # What the exported (eval-mode) network computes with: GoogLeNet's aux heads excluded.
        "parameters": int(described["parameters_without_aux"]),
        "flops": int(described["flops"]),
        "fp16": fp16,
        "source_checkpoint_sha256": source_sha256,
        "files": {},  # filled in by commit
        "opset": opset,
        "exporters": onnx_export.exporter_versions(),
        "exported_at": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "verification": asdict(verification),
        "capabilities": onnx_export.capabilities(arch, model),
        "training": training,
        "evaluation": evaluation,
        # Random weights: the seed, and the calibration that keeps them alive (export.calibration).
        "initialization": initialization,
        "build_kwargs": build_kwargs,
    }


def export_to_repository(
    arch: str,
    repository: str | Path,
    *,
    weights: str | Path | None = None,
    model: nn.Module | None = None,
    name: str | None = None,
    version: int | None = None,
    fp16: bool = False,
    opset: int = onnx_export.DEFAULT_OPSET,
    trained_on: str | None = None,
    training: dict[str, Any] | None = None,
    build_kwargs: dict[str, Any] | None = None,
    seed: int = RANDOM_WEIGHTS_SEED,
    calibrated: bool = False,
) -> ExportResult:
    """Export architecture `arch` as a new version of model `name` (default: `arch`) in `repository`.

    Weights: `weights` (a checkpoint file, loaded strictly and safely), or an in-memory `model`, or
    neither: random initialization after `torch.manual_seed(seed)`, recorded as untrained (with
    `calibrated`, scaled so it stays numerically alive: export.calibration; what the demo does).
    `trained_on` defaults to the architecture's data set when weights are given. GoogLeNet loaded
    from a checkpoint is built with transform_input=True as torchvision does for its published
    weights (override with build_kwargs={"transform_input": False}). The version is built in a
    `.tmp-*` directory and renamed into place only after the checker and the ORT parity check pass.
    """
    from export.models import get_spec

    started = time.perf_counter()
    spec = get_spec(arch)
    name = check_name(name or arch)
    _refuse_bad_arguments(weights, model, opset)
    kwargs = _build_kwargs(arch, build_kwargs, weights)
    trained = weights is not None or model is not None

    # Cheap refusals first (an existing version, an unwritable repository, a bad checkpoint).
    writer = VersionWriter(repository, name, version)
    with writer:
        model, source_sha256, initialization = _network(arch, kwargs, model, weights, seed, calibrated)
        verification = _write_model_files(writer.path, model, spec, opset=opset, fp16=fp16)
        evaluation = _digits_accuracy(writer.path, fp16) if trained and spec.dataset == "digits" else None
        metadata = _metadata(
            spec,
            name,
            model,
            fp16=fp16,
            opset=opset,
            trained=trained,
            trained_on=trained_on,
            source_sha256=source_sha256,
            verification=verification,
            training=training,
            evaluation=evaluation,
            build_kwargs=kwargs,
            initialization=initialization,
        )
        committed = writer.commit(metadata)
    return ExportResult(
        version=committed,
        seconds=time.perf_counter() - started,
        onnx_bytes=committed.onnx_path.stat().st_size,
        verification=verification,
    )
