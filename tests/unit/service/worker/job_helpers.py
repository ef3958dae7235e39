"""Helpers of the gradient-job tests (test_loading, test_handlers, test_jobs, test_cuda,
test_loading_weights): a JobContext double, repository versions written as the exporter writes them,
and deterministic inputs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from service.worker.jobs import (
    ProgressUpdate,
)

REPO_ROOT = Path(__file__).resolve().parents[4]


class Ctx:
    """A JobContext as the pool provides it: records progress, stops after `stop_after` checks."""

    def __init__(self, stop_after: int | None = None) -> None:
        self.updates: list[ProgressUpdate] = []
        self.reports: list[Any] = []
        self.checks = 0
        self.stop_after = stop_after

    def should_stop(self) -> bool:
        self.checks += 1
        return self.stop_after is not None and self.checks > self.stop_after

    def progress(self, update: Any) -> None:
        self.updates.append(update)

    def report(self, payload: Any) -> None:
        self.reports.append(payload)


def write_version(root: Path, name: str, version: int, arch: str, model: torch.nn.Module) -> Path:
    """A repository version as `python -m export` writes it for an in-memory model (model.onnx,
    weights.pt and a schema-1 metadata.json), so the processes' parity self-test has the ONNX model to
    check against. One change: every version offers explain and dream (metadata.json is not hashed),
    so the jobs' plain-gradient path is tested on LeNet-5 too, which has no ReLU to guide."""
    from export.publish import export_to_repository

    path = export_to_repository(arch, root, model=model, name=name, version=version).version.path
    meta = json.loads((path / "metadata.json").read_text())
    meta["capabilities"].update(explain=True, dream=True)
    (path / "metadata.json").write_text(json.dumps(meta))
    return path


def digits(n: int) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((n, 1, 32, 32)).astype(np.float32)


def picture(h: int, w: int) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x / w, y / h, ((x // 8 + y // 8) % 2) * 0.8], axis=2).astype(np.float32)
