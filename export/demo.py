"""`python -m export demo`: a ready-to-serve model repository with no downloads.

LeNet-5 is trained on the digits here (seconds) and exported as trained, with its held-out accuracy
in metadata.json; alexnet (the paper's), googlenet, resnet18, resnet50 and vgg19 are exported with
seeded random weights (`torch.manual_seed(0)` before each build), calibrated so their activations
stay alive on a photo (export.calibration: no uniform softmax, no vanishing DeepDream objective),
marked untrained: they exercise every code path of the service, but their classes are meaningless
until real weights are exported over them with `python -m export onnx ARCH --weights FILE`.

Idempotent: a model whose latest version exists and passes `verify_files` is left alone, so a rerun
(a restarted Kubernetes Job, say) rebuilds nothing. A latest version that fails verification is kept
for inspection and a new version is exported above it; so is one exported before this release's
outputs (no `features`: the embedding, issue 14), so `make demo` brings an old demo repository up
to date without touching what it served.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from export.errors import RepositoryError, UsageError
from export.publish import export_to_repository
from export.repository import ModelVersion, latest, scan, verify_files

DEMO_MODELS: tuple[str, ...] = ("lenet5", "alexnet", "googlenet", "resnet18", "resnet50", "vgg19")


@dataclass(frozen=True)
class DemoOutcome:
    name: str
    version: int
    exported: bool  # False: an existing verified version was kept
    seconds: float  # export time (training included for lenet5); 0 when kept
    onnx_bytes: int
    relative_diff: float  # from the version's metadata.json
    max_abs_diff: float
    held_out_accuracy: float | None  # lenet5: model.onnx on the held-out digits


def _outcome(version: ModelVersion, exported: bool, seconds: float) -> DemoOutcome:
    meta = version.metadata
    evaluation = meta.get("evaluation") or {}
    return DemoOutcome(
        name=version.name,
        version=version.version,
        exported=exported,
        seconds=seconds,
        onnx_bytes=int(meta["files"]["model.onnx"]["bytes"]),
        relative_diff=float(meta["verification"]["relative_diff"]),
        max_abs_diff=float(meta["verification"]["max_abs_diff"]),
        held_out_accuracy=evaluation.get("accuracy"),
    )


def format_outcome(o: DemoOutcome) -> str:
    what = "exported" if o.exported else "up to date"
    line = (
        f"{o.name:<10} v{o.version:<3} {what:<10} {o.seconds:6.1f}s  {o.onnx_bytes / 1e6:8.1f} MB  "
        f"parity rel {o.relative_diff:.2e} (max abs {o.max_abs_diff:.2e})"
    )
    if o.held_out_accuracy is not None:
        line += f"  held-out accuracy {o.held_out_accuracy:.2%}"
    return line


def _verified_latest(versions: list[ModelVersion], name: str, log: TextIO | None) -> ModelVersion | None:
    current = latest(versions, name)
    if current is None:
        return None
    try:
        verify_files(current)
    except RepositoryError as e:
        if log is not None:
            print(
                f"warning: {name} v{current.version} fails verification ({e}); exporting a new version",
                file=log,
            )
        return None
    if "features" not in current.metadata:
        if log is not None:
            print(
                f"{name} v{current.version} was exported before embeddings (no features output); "
                "exporting a new version",
                file=log,
            )
        return None
    return current


def demo(
    repository: str | Path,
    models: Sequence[str] | None = None,
    *,
    out: TextIO | None = sys.stdout,
    progress: TextIO | None = sys.stderr,
    epochs: int | None = None,
) -> list[DemoOutcome]:
    """Fill `repository` with `models` (default DEMO_MODELS); returns one outcome per model.

    `out` gets one line per model (time, ONNX size, parity error); `progress` the LeNet-5 training
    log and warnings. `epochs` overrides LeNet-5's training epochs (tests).
    """
    from export.models import get_spec
    from export.train import DEFAULT_EPOCHS, train_lenet5

    names = list(DEMO_MODELS if models is None else models)
    for name in names:
        get_spec(name)  # unknown names fail before any work
    if len(set(names)) != len(names):
        raise UsageError(
            f"models listed twice: {', '.join(sorted({n for n in names if names.count(n) > 1}))}"
        )
    root = Path(repository)
    if root.exists() and not root.is_dir():
        raise RepositoryError(f"repository {root} is not a directory")
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RepositoryError(f"repository {root} is not writable: {e.strerror or e}") from None
    existing = scan(root)

    outcomes = []
    for name in names:
        current = _verified_latest(existing, name, progress)
        if current is not None:
            outcome = _outcome(current, exported=False, seconds=0.0)
        elif name == "lenet5":
            started = time.perf_counter()
            trained = train_lenet5(epochs=epochs or DEFAULT_EPOCHS, progress=progress)
            result = export_to_repository(
                "lenet5", root, model=trained.model, trained_on="digits", training=trained.training_record()
            )
            outcome = _outcome(result.version, exported=True, seconds=time.perf_counter() - started)
        else:
            result = export_to_repository(name, root, calibrated=True)
            outcome = _outcome(result.version, exported=True, seconds=result.seconds)
        outcomes.append(outcome)
        if out is not None:
            print(format_outcome(outcome), file=out, flush=True)
    return outcomes
