"""The engine as the frontend sees it: a small protocol the in-process ClassificationEngine
implements today and the engine process of the coming split implements remotely.

    models() / get(name, version)   the model versions served (service.catalog.LoadedModel)
    await admit(model, n)           a place for n images, taken before any work on their input;
                                    the Admission holds their input rows: the frontend
                                    preprocesses straight into them
    await infer(model, admission, deadline)
                                    float32 logits [n, K] for the admitted, filled rows

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
        self, model: LoadedModel, admission: Admission, deadline: float | None
    ) -> tuple[np.ndarray, InferTimings]: ...


__all__ = ["Admission", "Engine", "InferTimings", "ModelSource", "Rows"]
