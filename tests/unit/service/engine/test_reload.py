"""Hot reload (issue 13): a new version loads in the background and serves once warm, the version
that left the version policy drains and unloads, a bad version is refused while the old one serves;
by SIGHUP (Server.request_reload) or by polling (repository_poll_s)."""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from linear_repo import GRAY8, add_version, settings_for
from pydantic import ValidationError
from servicer_fakes import Harness

from service._proto.cnnserve.v1 import inference_pb2 as pb
from service._proto.cnnserve.v1 import inference_pb2_grpc as pb_grpc
from service.engine.engine import ClassificationEngine
from service.observability import metrics
from service.settings import Settings

TENSOR = pb.ImageInput(
    tensor=pb.Tensor(shape=[1, 8, 8], dtype="float32", data=np.zeros((1, 8, 8), np.float32).tobytes())
)


class ClassifyLoad:
    """Classify(gray, version 0) on two threads until stopped: every answer's version, every error."""

    def __init__(self, channel: grpc.Channel) -> None:
        self._stub = pb_grpc.InferenceStub(channel)
        self._stop = threading.Event()
        self.versions: list[int] = []
        self.errors: list[str] = []
        self._threads = [threading.Thread(target=self._loop, daemon=True) for _ in range(2)]

    def _loop(self) -> None:
        request = pb.ClassifyRequest(model="gray", image=TENSOR)
        while not self._stop.is_set():
            try:
                self.versions.append(self._stub.Classify(request, timeout=10).version)
            except grpc.RpcError as exc:
                self.errors.append(f"{exc.code().name}: {exc.details()}")

    def __enter__(self) -> ClassifyLoad:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(10)


def wait_for(condition: Any, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"not within {timeout} s: {what}"
        time.sleep(0.02)


def publish(root: Path, version: int, seed: int) -> None:
    """Write gray:<version> aside and rename it into place, as the exporter does."""
    staging = root.parent / f"staging-{version}"
    add_version(staging, "gray", version, p=GRAY8, classes=3, seed=seed)
    shutil.move(str(staging / "gray" / str(version)), str(root / "gray" / str(version)))


def failures(version: int) -> float:
    return (
        metrics.registry.get_sample_value(
            "cnnserve_model_load_failures_total", {"model": "gray", "version": str(version)}
        )
        or 0.0
    )


@pytest.fixture
def gray_repo(tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    add_version(root, "gray", 1, p=GRAY8, classes=3, seed=1)
    return root


def test_a_new_version_takes_over_under_load_with_no_error(gray_repo: Path) -> None:
    engine = ClassificationEngine(settings_for(gray_repo, models="gray"))
    h = Harness(engine, repository=gray_repo, models="gray")  # type: ignore[arg-type]
    try:
        with ClassifyLoad(h.channel) as load:
            wait_for(lambda: len(load.versions) > 20, "answers from version 1")
            publish(gray_repo, 2, seed=2)
            h.loop.call_soon_threadsafe(h.server.request_reload)  # as SIGHUP does
            wait_for(lambda: [m.version for m in engine.models()] == [2], "version 1 unloaded")
            answered = len(load.versions)
            wait_for(lambda: len(load.versions) > answered + 20, "answers after the switch")
        assert load.errors == []
        switch = load.versions.index(2)
        assert set(load.versions[:switch]) == {1} and set(load.versions[answered:]) == {2}
        assert (
            metrics.registry.get_sample_value(
                "cnnserve_model_info",
                {"model": "gray", "version": "1", "provider": "CPUExecutionProvider", "trained": "false"},
            )
            is None
        )  # gone from the loaded-versions gauge
        info = pb_grpc.InferenceStub(h.channel).GetModel(pb.GetModelRequest(name="gray"), timeout=5)
        assert info.version == 2 and list(info.versions) == [2] and info.ready

        # A bad version 3 (model.onnx no longer matches its sha256): refused and counted; 2 serves on.
        before = failures(3)
        publish(gray_repo, 3, seed=3)
        (gray_repo / "gray" / "3" / "model.onnx").write_bytes(b"not the exported model")
        result = h.run(engine.reload())
        assert [m.version for m in result.added] == [] and result.removed == []
        assert "gray:3" in result.failed[0] and "model.onnx" in result.failed[0]
        assert failures(3) == before + 1
        assert [m.version for m in engine.models()] == [2]
        reply = pb_grpc.InferenceStub(h.channel).Classify(
            pb.ClassifyRequest(model="gray", image=TENSOR), timeout=5
        )
        assert reply.version == 2
    finally:
        h.close()


def test_the_repository_is_polled(gray_repo: Path) -> None:
    settings = settings_for(gray_repo, models="gray", repository_poll_s=0.1)
    engine = ClassificationEngine(settings)
    h = Harness(engine, repository=gray_repo, models="gray", repository_poll_s=0.1)  # type: ignore[arg-type]
    try:
        publish(gray_repo, 2, seed=2)
        wait_for(lambda: [m.version for m in engine.models()] == [2], "version 2 found by the poll")
        # A version added by a reload serves classification; its gradient RPCs wait for gradient
        # processes that know it (Server._renew_gradient_pool; tests/integration/test_lifecycle.py).
        # These linear models offer none, so nothing waits.
        assert engine.get("gray").capabilities == {
            "classify": True,
            "embed": True,  # the engine's own: served at once, like classify
            "explain": False,
            "dream": False,
            "stylize": False,
            "feature_maps": False,
            "filters": False,
        }
        assert not engine.awaiting_gradients and engine.offer_gradients() == []
    finally:
        h.close()


def test_a_policy_of_all_keeps_the_old_version_and_a_deleted_model_unloads(
    gray_repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import weakref

    from service import memory

    (gray_repo / "gray" / "config.yaml").write_text("version_policy: {all: true}\n")
    add_version(gray_repo, "rgb", 1, seed=5)
    engine = ClassificationEngine(settings_for(gray_repo))
    h = Harness(engine, repository=gray_repo)  # type: ignore[arg-type]
    try:
        rgb_session = weakref.ref(engine._served[("rgb", 1)].sessions[0])
        publish(gray_repo, 2, seed=2)
        shutil.rmtree(gray_repo / "rgb")
        trims: list[int] = []
        monkeypatch.setattr(memory, "trim_heap", lambda: trims.append(1) or True)
        result = h.run(engine.reload())
        assert [(m.name, m.version) for m in result.added] == [("gray", 2)]
        assert [(m.name, m.version) for m in result.removed] == [("rgb", 1)]
        # The unloaded version's session is gone, and the heap was trimmed after (and after the load).
        assert rgb_session() is None and len(trims) == 2
        assert sorted((m.name, m.version) for m in engine.models()) == [("gray", 1), ("gray", 2)]
    finally:
        h.close()


def test_polling_needs_one_process() -> None:
    with pytest.raises(ValidationError, match="frontends=1"):
        Settings(repository_poll_s=5, frontends=2)
