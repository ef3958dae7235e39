"""The engine as the frontend sees it: a small protocol the in-process ClassificationEngine
implements today and the engine process of the coming split implements remotely.

    models() / get(name, version)   the model versions served (service.catalog.LoadedModel)
    await admit(model, n)           a place for n images, taken before any work on their input;
                                    the Admission holds their input rows: the frontend
                                    preprocesses straight into them
    await infer(model, admission, deadline, outputs)
                                    float32 [n, ...] for the admitted, filled rows: the outputs
                                    named (LOGITS [n, K], FEATURES [n, D]) side by side, all from
                                    one ONNX Runtime call in one batch

Tensors in, logits out: decoding, preprocessing, validation of client values and the softmax are
the frontend's (service/frontend/classify.py). Errors are service.errors with their status:
ResourceExhausted (queue_full) from admit, DeadlineExceeded, Unavailable (loading, draining),
NotFound, Internal.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

import numpy as np

from service.errors import FailedPrecondition

if TYPE_CHECKING:
    from service.catalog import LoadedModel

# What infer() may return, by name: the model's logits and its embedding (ModelInfo.features).
LOGITS = "logits"
FEATURES = "features"
OUTPUTS = (LOGITS, FEATURES)


def select_outputs(model: LoadedModel, outputs: Sequence[str], rows: np.ndarray) -> np.ndarray:
    """The columns of `outputs` from a session's rows ([n, K] logits, or [n, K + D] logits then
    features: the rows' width says which), side by side in the order asked. FailedPrecondition
    when FEATURES is asked of a model exported without them; ValueError for a name that is not an
    output."""
    k = model.num_classes
    parts = []
    for name in outputs:
        if name == LOGITS:
            parts.append(rows[:, :k])
        elif name == FEATURES:
            if rows.shape[1] == k:
                raise features_missing(model)
            parts.append(rows[:, k:])
        else:
            raise ValueError(f"unknown output {name!r}; outputs are {OUTPUTS}")
    return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=1)


def features_missing(model: LoadedModel) -> FailedPrecondition:
    from service.catalog import imported, no_features_hint

    if imported(model):
        return FailedPrecondition(
            f"model {model.name}:{model.version} has no features output: {no_features_hint(model)}",
            reason="no_features",
        )
    return FailedPrecondition(
        f"model {model.name}:{model.version} was exported without the features output (embeddings "
        f"arrived later); {no_features_hint(model)}",
        reason="no_features",
    )


class Rows(Protocol):
    """n input rows: `rows[i]` is a writable float32 (C, H, W) array (a numpy batch is one)."""

    def __len__(self) -> int: ...

    def __getitem__(self, i: int, /) -> np.ndarray: ...


class Admission(Protocol):
    """A place for n images in a model version's batcher, held from admit() until infer() takes it
    over, with their input rows, written by the frontend row by row (in the engine process of the
    coming split, rows of a shared-memory slot block, service/engine/slots.py, not necessarily
    adjacent: hence rows, not one array)."""

    @property
    def inputs(self) -> Rows:
        """The n input rows to fill before infer()."""
        ...

    def release(self) -> None:
        """Give the place back (a no-op once infer() took it over)."""


class InferTimings(Protocol):
    """Where a request's time in the engine went."""

    @property
    def queue_s(self) -> float: ...

    @property
    def inference_s(self) -> float: ...


class ModelSource(Protocol):
    """The model versions a process serves: enough for name resolution and ModelInfo."""

    @property
    def ready(self) -> bool: ...

    def models(self) -> list[LoadedModel]: ...

    def get(self, name: str, version: int | None = None) -> LoadedModel:
        """The model `name` at `version` (None: the latest). Raises NotFound."""
        ...


class Engine(ModelSource, Protocol):
    """Batching and inference (service.engine.engine.ClassificationEngine)."""

    async def admit(self, model: LoadedModel, n: int) -> Admission: ...

    async def infer(
        self,
        model: LoadedModel,
        admission: Admission,
        deadline: float | None,
        outputs: tuple[str, ...] = (LOGITS,),
    ) -> tuple[np.ndarray, InferTimings]: ...


__all__ = [
    "Admission",
    "Engine",
    "FEATURES",
    "InferTimings",
    "LOGITS",
    "ModelSource",
    "OUTPUTS",
    "Rows",
    "features_missing",
    "select_outputs",
]
