"""float16 at load: a model's config.yaml `precision: fp16` serves a float32 export as float16.

The graph is converted once per version with ONNX Runtime's own converter
(onnxruntime.transformers.float16, the one its model optimizer uses): weights and activations become
float16, the input and the logits stay float32 (keep_io_types), so clients and the batcher see the
same model. The converted model must then meet the export's float16 bounds (export/tolerances.py)
against the float32 ONNX model on the export's seeded batch, exactly as an `--fp16` export must
against PyTorch; a version that misses them is not served (logged and counted like any failed
load), and its float32 export is never silently served instead of what config.yaml asked.

Why: on a GPU with tensor cores float16 roughly halves the time and memory of a batch; on the CPU
provider ONNX Runtime has float16 kernels for few ops and wraps the others in casts, so it is no
faster there (issue 13, 2 cores, batch 4, 3 runs: ResNet-18 204 vs 193 ms float32, AlexNet 77
vs 66 ms): the choice
is offered per model and nothing turns it on by default. Its speed on CUDA has not been measured on
a device yet (BENCHMARKS.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from export.tolerances import (
    FP16_MAX,
    FP16_MAX_RELATIVE_DIFF,
    FP16_MIN_TOP1_AGREEMENT,
    FP16_SMALLEST_NORMAL,
    VERIFY_BATCH,
    VERIFY_SEED,
)


@dataclass(frozen=True)
class Fp16Check:
    """The converted model against the float32 one on the seeded batch."""

    relative_diff: float
    top1_agreement: float

    def describe(self) -> str:
        return (
            f"relative diff {self.relative_diff:.2g} (bound {FP16_MAX_RELATIVE_DIFF:g}), top-1 equal on "
            f"{self.top1_agreement:.0%} of {VERIFY_BATCH} rows (need {FP16_MIN_TOP1_AGREEMENT:.0%})"
        )


def convert_to_fp16(model_path: Path) -> bytes:
    """The float16 model of a self-contained float32 model.onnx, serialized, input and output still
    float32."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(str(model_path))
    return bytes(convert_float_to_float16(model, keep_io_types=True).SerializeToString())


def verify_batch(input_shape: tuple[int, ...]) -> np.ndarray:
    """The seeded N(0, 1) batch both models run (the export's size and seed)."""
    rng = np.random.default_rng(VERIFY_SEED)
    return rng.standard_normal((VERIFY_BATCH, *input_shape)).astype(np.float32)


def check_fp16(
    reference: np.ndarray, got: np.ndarray, classes: int | None = None
) -> tuple[Fp16Check, str | None]:
    """Compare the converted model's outputs with the float32 model's on verify_batch. Returns the
    figures and, when the bounds are missed, why (else None). With `classes`, the outputs are a
    session's (N, K + D) logits then features: the top-1 rule applies to the first K columns, the
    relative bound to the logits and the features each."""
    if classes is not None and reference.shape[1] > classes:
        check, refused = check_fp16(reference[:, :classes], got[:, :classes])
        features = _relative_diff(reference[:, classes:], got[:, classes:])
        if refused is None and not features <= FP16_MAX_RELATIVE_DIFF:
            refused = (
                f"the float16 model's features miss the bound against float32: relative diff "
                f"{features:.2g} (bound {FP16_MAX_RELATIVE_DIFF:g})"
            )
        return check, refused
    reference = np.asarray(reference, dtype=np.float64)
    got = np.asarray(got, dtype=np.float64)
    scale = float(np.abs(reference).max())
    finite = bool(np.isfinite(got).all())
    relative = _relative_diff(reference, got)
    agreement = float((got.argmax(1) == reference.argmax(1)).mean())
    check = Fp16Check(relative_diff=relative, top1_agreement=agreement)
    if scale < FP16_SMALLEST_NORMAL:
        return check, (
            f"float16 is meaningless for these weights: the logits' magnitude {scale:.3g} is below "
            f"float16's smallest normal number {FP16_SMALLEST_NORMAL:.3g}"
        )
    if not finite:
        why = f"the logits reach {scale:.3g}, beyond float16's {FP16_MAX:.0f}" if scale > FP16_MAX else ""
        return check, f"the float16 model's logits are not finite{': ' + why if why else ''}"
    if relative > FP16_MAX_RELATIVE_DIFF or agreement < FP16_MIN_TOP1_AGREEMENT:
        return check, f"the float16 model misses the bounds against float32: {check.describe()}"
    return check, None


def _relative_diff(reference: np.ndarray, got: np.ndarray) -> float:
    """max |got - reference| / max |reference| (inf when `got` is not finite)."""
    reference = np.asarray(reference, dtype=np.float64)
    got = np.asarray(got, dtype=np.float64)
    if not np.isfinite(got).all():
        return float("inf")
    max_abs = float(np.abs(got - reference).max())
    scale = float(np.abs(reference).max())
    return max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else float("inf"))


__all__ = ["Fp16Check", "check_fp16", "convert_to_fp16", "verify_batch"]
