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
from export.checkpoints import head_classes, load_weights, read_state_dict
from export.errors import CheckpointError, UsageError
from export.metadata import ONNX_FILE, WEIGHTS_FILE
from export.preprocessing import Preprocessing, describe_input
from export.repository import ModelVersion, VersionWriter, check_name
from export.user_files import check_label_count

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


def _refuse_bad_arguments(
    weights: str | Path | None, model: nn.Module | None, opset: int, num_classes: int | None
) -> None:
    if weights is not None and model is not None:
        raise UsageError("give either a checkpoint or an in-memory model, not both")
    if num_classes is not None and not (isinstance(num_classes, int) and num_classes >= 1):
        raise UsageError(f"--num-classes must be a positive integer, got {num_classes!r}")
    onnx_export.check_opset(opset)


@dataclass(frozen=True)
class Head:
    """What the exported network classifies into, and what it is fed: the architecture's own (the
    zoo's data set) or the user's (a fine-tuned checkpoint)."""

    num_classes: int
    labels: list[str]
    preprocessing: Preprocessing
    custom_labels: bool  # the user's labels, not the architecture's data set's

    @property
    def input_shape(self) -> tuple[int, int, int]:
        p = self.preprocessing
        return (p.channels, p.crop, p.crop)


def _classes(spec: ArchSpec, num_classes: int | None, state_dict: Any, weights: str | Path | None) -> int:
    """The number of classes: --num-classes, else the checkpoint's head, else the architecture's.
    A --num-classes the checkpoint's head contradicts is refused here, naming the key and shape."""
    if state_dict is None:
        return num_classes if num_classes is not None else spec.num_classes
    found = head_classes(state_dict, spec.head)
    if found is None:  # not this architecture's checkpoint: load_weights names what does not fit
        return num_classes if num_classes is not None else spec.num_classes
    if num_classes is not None and num_classes != found:
        key = f"{spec.head}.weight"
        raise CheckpointError(
            f"checkpoint {weights} does not fit {spec.name} with --num-classes {num_classes}: its "
            f"classifier head {key} is {list(state_dict[key].shape)}, i.e. {found} classes"
        )
    return found


def _head(
    spec: ArchSpec,
    num_classes: int,
    labels: list[str] | None,
    labels_source: str,
    preprocessing: Preprocessing | None,
) -> Head:
    if labels is not None:
        check_label_count(labels, num_classes, labels_source)
    elif num_classes != spec.num_classes:
        raise UsageError(
            f"{spec.name} with {num_classes} classes (not {spec.dataset}'s {spec.num_classes}) needs "
            "their names: --labels FILE, one per line"
        )
    return Head(
        num_classes=num_classes,
        labels=labels if labels is not None else labels_for(spec.dataset, num_classes),
        preprocessing=preprocessing or spec.preprocessing,
        custom_labels=labels is not None,
    )


def _check_input_shape(spec: ArchSpec, head: Head, build_kwargs: dict[str, Any]) -> None:
    """UsageError unless the architecture runs at the preprocessing's input shape (LeNet-5's fully
    connected C5 needs exactly 32x32, say). Shapes only, on the meta device: free."""
    from export.models import build

    if head.input_shape == spec.input_shape:
        return
    try:
        with torch.device("meta"):
            network = build(spec.name, num_classes=head.num_classes, **build_kwargs)
            with torch.no_grad():
                network(torch.empty(1, *head.input_shape))
    except Exception as e:  # noqa: BLE001 - any failure means "this shape does not fit"
        raise UsageError(
            f"{spec.name} cannot take the preprocessing's input {list(head.input_shape)} (its own is "
            f"{list(spec.input_shape)}): {' '.join(str(e).split())[:200]}"
        ) from None


def _build_kwargs(
    spec: ArchSpec, build_kwargs: dict[str, Any] | None, weights: str | Path | None, channels: int
) -> dict[str, Any]:
    """`build_kwargs`, plus transform_input=True for GoogLeNet loaded from a checkpoint, as
    torchvision builds it for its published weights, and in_channels where the preprocessing's
    colour mode is not the architecture's (a grayscale ResNet, say). num_classes is never here:
    metadata.json's num_classes says it, and whoever rebuilds the network passes it."""
    kwargs = dict(build_kwargs or {})
    if spec.name == "googlenet" and weights is not None:
        kwargs.setdefault("transform_input", True)
    if channels != spec.input_shape[0]:
        kwargs.setdefault("in_channels", channels)
    return kwargs


def _network(
    arch: str,
    build_kwargs: dict[str, Any],
    model: nn.Module | None,
    weights: str | Path | None,
    seed: int,
    calibrated: bool = False,
    state_dict: Any = None,
) -> tuple[nn.Module, str | None, dict[str, Any] | None]:
    """The eval-mode network to export, the sha256 of the checkpoint it was loaded from (None
    without one) and how random weights were initialized (None for given weights): `model` if
    given, else `arch` built with `build_kwargs` and initialized after `torch.manual_seed(seed)`,
    then loaded from the checkpoint `weights` if given, or with `calibrated` scaled to stay alive
    (export.calibration). `state_dict`: the checkpoint's, already read; `build_kwargs` hold
    num_classes when it is not the architecture's."""
    from export.models import build, get_spec

    source_sha256 = None
    initialization: dict[str, Any] | None = None
    if model is None:
        with torch.random.fork_rng(devices=[]):  # seeded init without touching the caller's RNG
            torch.manual_seed(seed)
            model = build(arch, **build_kwargs)
        if weights is not None:
            source_sha256 = load_weights(model, weights, arch, state_dict)
        else:
            calibration = None
            if calibrated:
                from export.calibration import calibrate

                spec = get_spec(arch)
                calibration = calibrate(model, spec.preprocessing, spec.head, seed=seed)
            initialization = {"seed": seed, "calibration": calibration}
    return model.eval(), source_sha256, initialization


def _write_model_files(
    directory: Path,
    model: nn.Module,
    spec: ArchSpec,
    input_shape: tuple[int, int, int],
    *,
    opset: int,
    fp16: bool,
) -> onnx_export.Verification:
    """weights.pt (the float32 state_dict) and model.onnx (logits and features) in `directory`, the
    latter checked and verified against eval-mode `model`; returns the verification."""
    state_dict = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    torch.save(state_dict, directory / WEIGHTS_FILE)

    onnx_path = directory / ONNX_FILE
    onnx_export.export_onnx(model, input_shape, onnx_path, opset=opset, fp16=fp16, head=spec.head)
    onnx_export.check(onnx_path, opset, features=True)
    return onnx_export.verify(onnx_path, model, input_shape, fp16=fp16, head=spec.head)


def _metadata(
    spec: ArchSpec,
    name: str,
    model: nn.Module,
    head: Head,
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
    in `version` and `files`. `trained_on` defaults to the architecture's data set when `trained`
    and the labels are that data set's (a fine-tuned model's data set is the user's to name)."""
    from export.describe import describe_model
    from export.layers import FEATURES_NAME, addressable_layers, features_dim
    from export.models import build

    arch = spec.name
    if trained_on is None and trained and not head.custom_labels:
        trained_on = spec.dataset
    with torch.device("meta"):  # shapes only: parameters and MACs of this head at this input
        described = describe_model(
            build(arch, num_classes=head.num_classes, **build_kwargs), head.input_shape, arch
        )
    dtype = "float16" if fp16 else "float32"
    return {
        "schema_version": 1,
        "name": name,
        "version": 0,  # set by commit
        "architecture": arch,
        "input": {
            "name": onnx_export.INPUT_NAME,
            "shape": list(head.input_shape),
            "dtype": dtype,
            "description": describe_input(head.preprocessing),
        },
        "output": {"name": onnx_export.OUTPUT_NAME, "shape": [head.num_classes], "dtype": dtype},
        # The embedding: model.onnx's second output, the final classifier layer's input.
        "features": {
            "name": FEATURES_NAME,
            "shape": [features_dim(model, spec.head)],
            "dtype": dtype,
            "layer": spec.head,
        },
        # What Explain's neuron target, Dream and FeatureMaps may name, with output shapes: the
        # serving process checks names and GetModel lists them without torch.
        "layers": addressable_layers(model, head.input_shape),
        "num_classes": head.num_classes,
        # The one description of how an image becomes this model's input: the service decodes
        # every request with it (service/images.py -> export.preprocessing.to_tensor).
        "preprocessing": head.preprocessing.to_dict(),
        "labels": head.labels,
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
    num_classes: int | None = None,
    labels: list[str] | None = None,
    labels_source: str = "--labels",
    preprocessing: Preprocessing | None = None,
) -> ExportResult:
    """Export architecture `arch` as a new version of model `name` (default: `arch`) in `repository`.

    Weights: `weights` (a checkpoint file, loaded strictly and safely), or an in-memory `model`, or
    neither: random initialization after `torch.manual_seed(seed)`, recorded as untrained (with
    `calibrated`, scaled so it stays numerically alive: export.calibration; what the demo does).
    `trained_on` defaults to the architecture's data set when weights are given. GoogLeNet loaded
    from a checkpoint is built with transform_input=True as torchvision does for its published
    weights (override with build_kwargs={"transform_input": False}). The version is built in a
    `.tmp-*` directory and renamed into place only after the checker and the ORT parity check pass.

    A fine-tuned checkpoint (the user's classes): `num_classes` (default: the rows of the
    checkpoint's classifier head `ArchSpec.head`; a contradiction is refused naming its shape),
    `labels` (required when the classes are not the architecture's data set's; `labels_source`
    names where they came from in messages) and `preprocessing` (default: the architecture's; its
    colour mode and crop give the input shape). All of them are recorded in metadata.json.
    """
    from export.models import get_spec

    started = time.perf_counter()
    spec = get_spec(arch)
    name = check_name(name or arch)
    _refuse_bad_arguments(weights, model, opset, num_classes)
    trained = weights is not None or model is not None

    # Cheap refusals first (a bad checkpoint, labels that do not fit, an input the network cannot
    # take, an existing version, an unwritable repository), before any export work.
    state_dict = read_state_dict(weights) if weights is not None else None
    classes = _classes(spec, num_classes, state_dict, weights)
    if model is not None:
        last = model.get_submodule(spec.head)
        classes = int(getattr(last, "out_features", classes))
    head = _head(spec, classes, labels, labels_source, preprocessing)
    kwargs = _build_kwargs(spec, build_kwargs, weights, head.preprocessing.channels)
    _check_input_shape(spec, head, kwargs)
    network_kwargs = dict(kwargs, num_classes=classes) if classes != spec.num_classes else kwargs
    writer = VersionWriter(repository, name, version)
    with writer:
        model, source_sha256, initialization = _network(
            arch, network_kwargs, model, weights, seed, calibrated, state_dict
        )
        del state_dict
        verification = _write_model_files(writer.path, model, spec, head.input_shape, opset=opset, fp16=fp16)
        own_data = (
            spec.dataset == "digits" and not head.custom_labels and head.preprocessing == spec.preprocessing
        )
        evaluation = _digits_accuracy(writer.path, fp16) if trained and own_data else None
        metadata = _metadata(
            spec,
            name,
            model,
            head,
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
