"""The gradient processes load weights.pt with weights_only=True: a pickle that carries code is refused
and its code never runs, even when metadata.json's sha256 matches it (an attacker who can write the
repository can write metadata.json too; the hash proves integrity, not that the file is safe).

The export side (checkpoints given to `python -m export onnx --weights`) has the same test in
tests/unit/export/test_checkpoints.py and test_cli.py."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
from pathlib import Path
from typing import Any

import pytest
import torch
from job_helpers import write_version

from export.models import build
from service.worker.loading import load_models


def plant(directory: Path, marker: Path) -> None:
    """Replace weights.pt with a state dict whose one entry runs `touch marker` when unpickled,
    and record its true sha256 in metadata.json."""

    class Payload:
        def __reduce__(self) -> tuple[Any, ...]:
            return (os.system, (f"touch {marker}",))

    state: dict[str, Any] = dict(build("lenet5").state_dict())
    state["features.0.weight"] = Payload()
    weights = directory / "weights.pt"
    torch.save(state, weights)
    meta = json.loads((directory / "metadata.json").read_text())
    meta["files"]["weights.pt"] = {
        "sha256": hashlib.sha256(weights.read_bytes()).hexdigest(),
        "bytes": weights.stat().st_size,
    }
    (directory / "metadata.json").write_text(json.dumps(meta))


def test_a_weights_file_carrying_code_is_refused_and_the_code_never_runs(tmp_path: Path) -> None:
    torch.manual_seed(0)
    directory = write_version(tmp_path / "repo", "digits", 1, "lenet5", build("lenet5"))
    marker = tmp_path / "PWNED"
    plant(directory, marker)
    config = {"models": [str(directory)], "device": "cpu"}
    with pytest.raises(
        pickle.UnpicklingError, match=r"(?s)Weights only load failed.*GLOBAL (posix|os|nt)\.system"
    ):
        # What each gradient process runs at start (the pool's initializer), config as it crosses spawn.
        load_models(pickle.loads(pickle.dumps(config)))
    assert not marker.exists()


def test_the_planted_payload_is_live(tmp_path: Path) -> None:
    """Control for the test above: an unrestricted load of the same file runs the payload."""
    directory = write_version(tmp_path / "repo", "digits", 1, "lenet5", build("lenet5"))
    marker = tmp_path / "RAN"
    plant(directory, marker)
    torch.load(directory / "weights.pt", weights_only=False)  # deliberately unsafe, on our own file
    assert marker.exists()
