"""Models on demand in a gradient process (service/worker/loading.py): a version's module is built on
its first job and kept, the least recently used ones are dropped past the memory bound, the parity
verdict is reached at start (once per pool through the shared verdict directory), and each build is
reported to the serving process, which counts it in the metrics."""

from __future__ import annotations

import pickle
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from job_helpers import Ctx
from pool_harness import sample
from torch import nn

from service.errors import FailedPrecondition
from service.settings import Settings
from service.worker import loading
from service.worker.handlers import handle
from service.worker.jobs import ExplainJob
from service.worker.loading import LoadedModels, LoadMetrics, ModelLoad, ParityError, TorchModel, load_models
from service.worker.params import Limits


def lenet_state(repository: dict[str, Path], **config: Any) -> LoadedModels:
    config = {"models": [str(repository["lenet_v1"]), str(repository["lenet_v2"])], "device": "cpu", **config}
    return load_models(pickle.loads(pickle.dumps(config)))


def explain(version: int) -> ExplainJob:
    x = np.random.default_rng(version).standard_normal((1, 1, 32, 32)).astype(np.float32)
    return ExplainJob(model="digits", version=version, inputs=x, method="gradient", render=None)


def test_a_version_is_built_on_its_first_job_and_reused_by_the_next(repository: dict[str, Path]) -> None:
    state = lenet_state(repository)
    assert state.models == {} and sorted(state.offered) == [("digits", 1), ("digits", 2)]
    first, second = Ctx(), Ctx()
    handle(state, explain(1), first)
    handle(state, explain(1), second)
    (load,) = first.reports
    assert second.reports == []  # the second job used the module the first one built
    assert isinstance(load, ModelLoad) and (load.name, load.version, load.evicted) == ("digits", 1, ())
    lenet_bytes = sum(
        t.numel() * t.element_size() for t in state.models[("digits", 1)].module.state_dict().values()
    )
    assert load.bytes == load.loaded_bytes == lenet_bytes > 0 and load.seconds > 0
    assert list(state.models) == [("digits", 1)]


def test_a_small_bound_drops_the_other_version_for_the_next(repository: dict[str, Path]) -> None:
    state = lenet_state(repository)
    handle(state, explain(1), Ctx())
    state.memory_bytes = state.loaded_bytes + 1  # room for one LeNet-5, not two
    ctx = Ctx()
    handle(state, explain(2), ctx)
    (load,) = ctx.reports
    assert load.evicted == (("digits", 1, load.bytes),) and list(state.models) == [("digits", 2)]
    assert state.loaded_bytes == load.loaded_bytes == load.bytes


# --- the LRU on stand-in modules (no file, no parity: the order and the bound alone) ----------------


def fake_version(name: str, version: int, nbytes: int) -> Any:
    return SimpleNamespace(name=name, version=version, metadata={"files": {"weights.pt": {"bytes": nbytes}}})


@pytest.fixture
def built(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int]]:
    """`_build_model` replaced: a module of `bytes` float32 zeros per version; records each build."""
    calls: list[tuple[str, int]] = []

    def build(version: Any, device: Any) -> TorchModel:
        calls.append((version.name, version.version))
        module = nn.Linear(version.metadata["files"]["weights.pt"]["bytes"] // 4, 1, bias=False)
        return TorchModel(version.name, version.version, "toy", module, 1, (1, 1, 1), None, {})  # type: ignore[arg-type]

    monkeypatch.setattr(loading, "_build_model", build)
    return calls


def lru(bound: int, **sizes: int) -> LoadedModels:
    offered = {(name, 1): fake_version(name, 1, n) for name, n in sizes.items()}
    return LoadedModels(models={}, device="cpu", limits=Limits(), offered=offered, memory_bytes=bound)


def test_least_recently_used_modules_go_first(built: list[tuple[str, int]]) -> None:
    state = lru(400, a=100, b=100, c=100, d=100, e=200)
    reports: list[ModelLoad] = []
    for name in ("a", "b", "c", "d"):
        state.get(name, 1, reports.append)
    state.get("a", 1)  # a is now the most recently used: b is the least
    assert list(state.models) == [("b", 1), ("c", 1), ("d", 1), ("a", 1)] and state.loaded_bytes == 400
    state.get("e", 1, reports.append)  # 200 more bytes: b and c go, in that order
    assert reports[-1].evicted == (("b", 1, 100), ("c", 1, 100))
    assert list(state.models) == [("d", 1), ("a", 1), ("e", 1)] and state.loaded_bytes == 400
    state.get("b", 1, reports.append)  # built again; d is the least recently used now
    assert reports[-1].evicted == (("d", 1, 100),)
    assert built == [("a", 1), ("b", 1), ("c", 1), ("d", 1), ("e", 1), ("b", 1)]


def test_a_model_bigger_than_the_bound_is_built_alone(built: list[tuple[str, int]]) -> None:
    state = lru(150, small=100, big=400)
    state.get("small", 1)
    reports: list[ModelLoad] = []
    model = state.get("big", 1, reports.append)
    assert model.name == "big" and list(state.models) == [("big", 1)]
    assert reports[0].evicted == (("small", 1, 100),) and reports[0].loaded_bytes == 400
    state.get("small", 1)  # and the big one makes room in turn
    assert list(state.models) == [("small", 1)]
    unbounded = lru(0, small=100, big=400)
    unbounded.get("small", 1)
    unbounded.get("big", 1)
    assert list(unbounded.models) == [("small", 1), ("big", 1)]


def test_a_module_nothing_could_rebuild_is_never_dropped(built: list[tuple[str, int]]) -> None:
    state = lru(100, a=100)
    given = TorchModel("given", 1, "toy", nn.Linear(100, 1), 1, (1, 1, 1), None, {})  # type: ignore[arg-type]
    state.models[("given", 1)] = given
    state.get("a", 1)
    assert state.get("given", 1) is given and list(state.models) == [("a", 1), ("given", 1)]


# --- the parity verdict: at start, once per pool ---------------------------------------------------


def test_refused_versions_are_known_at_start_and_answer_failed_precondition(
    repository: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    real_check = loading._check_version

    def check(version: Any) -> None:
        if version.key == ("digits", 2):
            raise ParityError(version.key, "disagrees with model.onnx (test)")
        real_check(version)

    monkeypatch.setattr(loading, "_check_version", check)
    state = lenet_state(repository)
    assert state.ready_summary() == {"refused": {"digits:2": "disagrees with model.onnx (test)"}}
    assert state.models == {}  # verdicts only: nothing built at start
    with pytest.raises(FailedPrecondition, match="'digits' version 2 is not offered") as info:
        handle(state, explain(2), Ctx())
    assert info.value.reason == "parity_failed"
    handle(state, explain(1), Ctx())


def test_processes_of_one_pool_share_the_verdicts(
    repository: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tested: list[tuple[str, int]] = []
    real_check = loading._check_version

    def check(version: Any) -> None:
        tested.append(version.key)
        if version.key == ("digits", 2):
            raise ParityError(version.key, "refused (test)")
        real_check(version)

    monkeypatch.setattr(loading, "_check_version", check)
    first = lenet_state(repository, verdict_dir=str(tmp_path))
    second = lenet_state(repository, verdict_dir=str(tmp_path))  # another worker, or a replacement
    assert tested == [("digits", 1), ("digits", 2)]  # once each, by the first process only
    assert second.ready_summary() == first.ready_summary() == {"refused": {"digits:2": "refused (test)"}}
    assert list(second.offered) == [("digits", 1)]
    lenet_state(repository)  # no shared directory: the process tests every version itself
    assert tested == [("digits", 1), ("digits", 2)] * 2


def test_a_version_another_process_is_testing_waits_until_the_rest_are_done(
    repository: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two workers starting together test different versions at once: one held by another process
    is put off until the others are done, then its verdict is read or computed."""
    import fcntl
    import hashlib

    tested: list[tuple[str, int]] = []
    monkeypatch.setattr(loading, "_check_version", lambda version: tested.append(version.key))
    key = hashlib.sha256((repository["lenet_v1"] / "metadata.json").read_bytes()).hexdigest()
    with open(tmp_path / f"{key}.lock", "a") as held:  # another open file: flock treats it as another process
        fcntl.flock(held, fcntl.LOCK_EX)
        original = loading._shared_verdict

        def shared(version: Any, directory: Path, *, blocking: bool) -> tuple[bool, str | None]:
            if blocking:
                fcntl.flock(held, fcntl.LOCK_UN)  # the other process finishes (without a verdict)
            return original(version, directory, blocking=blocking)

        monkeypatch.setattr(loading, "_shared_verdict", shared)
        state = lenet_state(repository, verdict_dir=str(tmp_path))
    assert tested == [("digits", 2), ("digits", 1)]
    assert sorted(state.offered) == [("digits", 1), ("digits", 2)]


# --- metrics in the serving process --------------------------------------------------------------


def test_load_reports_move_the_metrics() -> None:
    record = LoadMetrics()
    loads = sample("cnnserve_worker_model_loads_total", model="m1", version="3")
    evictions = sample("cnnserve_worker_model_evictions_total", model="m0", version="1")
    seconds = sample("cnnserve_worker_model_load_seconds_count", model="m1")
    record(0, ModelLoad("m1", 3, 0.2, 1000, (("m0", 1, 500),), 1500))
    record(1, ModelLoad("m1", 3, 0.3, 1000, (), 1000))
    assert sample("cnnserve_worker_model_loads_total", model="m1", version="3") == loads + 2
    assert sample("cnnserve_worker_model_evictions_total", model="m0", version="1") == evictions + 1
    assert sample("cnnserve_worker_model_load_seconds_count", model="m1") == seconds + 2
    assert sample("cnnserve_worker_model_bytes") == 2500  # the two workers' totals
    record(0, None)  # worker 0 died: its models are gone with it
    assert sample("cnnserve_worker_model_bytes") == 1000
    record(1, "something else")  # other reports are not this recorder's
    assert sample("cnnserve_worker_model_bytes") == 1000


def test_the_memory_bound_setting() -> None:
    assert Settings().worker_model_memory_bytes == 1 << 30
    assert Settings(worker_model_memory_bytes=0).worker_model_memory_bytes == 0
    with pytest.raises(ValueError):
        Settings(worker_model_memory_bytes=-1)
