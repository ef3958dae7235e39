"""The engine as the frontend sees it: a small protocol the in-process ClassificationEngine
implements today and the engine process of the coming split implements remotely.

    models() / get(name, version)   the model versions served (service.catalog.LoadedModel)
    admit(model, n)                 a place for n images, taken before any work on their input
    infer(model, x, deadline, adm)  float32 logits [n, K] for a preprocessed, validated batch

Tensors in, logits out: decoding, preprocessing, validation of client values and the softmax are
the frontend's (service/frontend/classify.py). Errors are service.errors with their status:
ResourceExhausted (queue_full) from admit, DeadlineExceeded, Unavailable (loading, draining),
NotFound, Internal.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import numpy as np

if TYPE_CHECKING:
    from service.catalog import LoadedModel


class Admission(Protocol):
    """A place in a model version's batcher, held from admit() until infer() takes it over."""

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

    def admit(self, model: LoadedModel, n: int) -> Admission: ...

    async def infer(
        self, model: LoadedModel, x: np.ndarray, deadline: float | None, admission: Admission | None = None
    ) -> tuple[np.ndarray, InferTimings]: ...


__all__ = ["Admission", "Engine", "InferTimings", "ModelSource"]
