"""The parity bounds a model's ONNX file must meet against its float32 reference: at export
(export/onnx_export.py, against PyTorch) and when the server converts an fp32 export to float16 at
load (service/engine/precision.py, against the fp32 ONNX model). Torch-free: the engine reads it.

relative_diff = max |got - reference| / max |reference| over a seeded batch of VERIFY_BATCH
N(0, 1) inputs; top-1 agreement = the share of its rows whose argmax is equal.
"""

from __future__ import annotations

import numpy as np

VERIFY_BATCH = 4
VERIFY_SEED = 0
FP32_MAX_RELATIVE_DIFF = 1e-4
FP16_MAX_RELATIVE_DIFF = 1e-2
# Random-weight ImageNet models have nearly tied logits: fp16 rounding can legitimately swap a top-1.
FP16_MIN_TOP1_AGREEMENT = 0.75
FP16_SMALLEST_NORMAL = float(np.finfo(np.float16).tiny)  # 6.1e-05
FP16_MAX = float(np.finfo(np.float16).max)  # 65504
