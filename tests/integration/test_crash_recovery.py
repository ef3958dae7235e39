"""Crash and recovery on a real server (issue 6 item 5; issue 4's pool fault points).

One `serve` process with two PyTorch workers (and again as `serve --frontends 2`, issue 12: the
workers are then the children of the supervisor's gradient process), started through
tests/integration/crash_worker.py: the production server with test-only wrappers around the
gradient handler, the worker initializer and the ONNX Runtime run (see that module for why a
wrapper and not a switch in the service). The tests kill workers from outside (SIGKILL, SIGSEGV) in
the middle of a job, send an input that segfaults its worker, hang a worker, take every worker away,
and make an ONNX Runtime run fail, and check what a client and an operator would notice:

- the affected call fails fast with UNAVAILABLE (INTERNAL for an input that crashed two workers),
  and every other call in flight (a gradient job on the other worker, classification calls and a
  classification stream) completes OK;
- capacity returns: the replacement loads its models, `cnnserve.v1.Inference/gradients` is SERVING,
  both workers take jobs;
- cnnserve_worker_restarts_total and cnnserve_worker_deaths_total move by exactly the deaths caused;
- no zombie children, and no shared memory left behind by name in /dev/shm. The pool's only shared
  memory is the per-worker cancel flag (multiprocessing RawValue): an mmap of a /dev/shm file that
  multiprocessing unlinks as soon as it is created, so it cannot leak by name; the kernel frees it
  with the last mapping. The tests check that, and that /dev/shm gains no entry nobody holds.

The classification engine has no thread or process of its own that can die apart from the server:
each model version runs ONNX Runtime on a single-thread executor in the server process, and an
exception in a run is delivered to the batcher as that batch's result (concurrent.futures), so the
thread survives. What can fail is a run; the last test makes one fail inside ONNX Runtime. A native
crash in ONNX Runtime ends the whole server process: that is recovered by the orchestrator's restart
and the other replicas, not inside the process.
"""

from __future__ import annotations

import io
import json
import os
import queue
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import pytest
from crash_worker import (
    HANG_SEED,
    ORT_POISON_VALUE,
    POISON_SEED,
    gradients_pid_file,
    hold_start_file,
    job_file,
    release_file,
)
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image
from server_process import ServerProcess, module_server

from service._proto.cnnserve.v1 import inference_pb2 as pb
from service._proto.cnnserve.v1 import inference_pb2_grpc as pb_grpc
from service.errors import GENERIC_INTERNAL_MESSAGE
from service.frontend.server import GRADIENTS_SERVICE
from service.worker.admission import CRASHED_TWICE_MESSAGE

pytestmark = pytest.mark.integration

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
LAUNCHER = ("-c", "from tests.integration.crash_worker import main; main()")
# A crashed job's caller must hear within this (pipe EOF: milliseconds; generous for a loaded CI box).
FAIL_FAST_S = 5.0
# How long a replacement worker may take to import torch and load the models on a loaded machine.
RECOVERY_S = 120.0
# --grace-period-s 2: the pool kills a job that ignores its stop flag 2 s after the deadline.
STOP_GRACE_S = 2.0
MODEL_CAPACITY = 8  # --max-batch-size 4 + --max-queue-size 4


@dataclass
class Harness:
    server: ServerProcess
    jobs: Path
    stub: pb_grpc.InferenceStub
    frontends: int
    seen_workers: set[int] = field(default_factory=set)

    @property
    def pool_pid(self) -> int:
        """The process whose children are the gradient workers: the server itself, or under
        `--frontends N` the supervisor's gradient process (which writes its pid for the test)."""
        if self.frontends == 1:
            return self.server.process.pid
        return int(gradients_pid_file(self.jobs).read_text())


# --- /proc and /dev/shm ---------------------------------------------------------------------------


def _stat(pid: int) -> tuple[str, int] | None:
    """(state, ppid) of a process, None when it is gone."""
    try:
        data = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = data[data.rindex(")") + 2 :].split()
    return fields[0], int(fields[1])


def _children(pid: int) -> dict[int, str]:
    """Child pid -> process state (R, S, Z, ...) of every child of `pid`."""
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (stat := _stat(int(entry))) is not None and stat[1] == pid:
            children[int(entry)] = stat[0]
    return children


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _worker_pids(crash: Harness) -> set[int]:
    children = _children(crash.pool_pid)
    return {pid for pid, state in children.items() if state != "Z" and "spawn_main" in _cmdline(pid)}


def _zombies(crash: Harness) -> dict[int, str]:
    parents = {crash.server.process.pid, crash.pool_pid}
    return {
        pid: _cmdline(pid) for parent in parents for pid, state in _children(parent).items() if state == "Z"
    }


def _shm() -> set[str]:
    return set(os.listdir("/dev/shm"))


def _shm_mappings(pid: int) -> set[str]:
    """The /dev/shm files a process maps, as /proc/PID/maps writes them ("... (deleted)" if unlinked)."""
    try:
        maps = Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return set()
    return {line[line.index("/dev/shm/") :] for line in maps.splitlines() if "/dev/shm/" in line}


def _shm_in_use() -> set[str]:
    """Names under /dev/shm that some live process maps or holds open."""
    names: set[str] = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        for path in _shm_mappings(int(entry)):
            names.add(path.removeprefix("/dev/shm/").removesuffix(" (deleted)"))
        try:
            fds = os.listdir(f"/proc/{entry}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{entry}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("/dev/shm/"):
                names.add(target.removeprefix("/dev/shm/").removesuffix(" (deleted)"))
    return names


def _leaked_shm(before: set[str]) -> set[str]:
    """Entries added to /dev/shm since `before` that still exist and that no live process holds.
    (Other test processes on the machine may hold entries of their own; those are not leaks.)"""
    new = _shm() - before
    if not new:
        return set()
    in_use = _shm_in_use()
    return {name for name in new if name not in in_use and os.path.exists(f"/dev/shm/{name}")}


# --- waiting, health, metrics ---------------------------------------------------------------------


def _wait(condition: Callable[[], bool], timeout: float, what: str, server: ServerProcess) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert server.process.poll() is None, f"the server exited while waiting for {what}:\n{server.log}"
        assert time.monotonic() < deadline, f"not within {timeout} s: {what}\n{server.log[-6000:]}"
        time.sleep(0.05)


def _health(server: ServerProcess, service: str) -> int:
    stub = health_pb2_grpc.HealthStub(server.channel)
    return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status


def _full_capacity(crash: Harness) -> set[int]:
    """Wait until two workers are alive and ready and gradients are SERVING; returns their pids."""
    server = crash.server

    def ready() -> bool:
        return (
            len(_worker_pids(crash)) == 2
            and server.sample("cnnserve_workers_alive") == 2
            and _health(server, GRADIENTS_SERVICE) == SERVING
        )

    _wait(ready, RECOVERY_S, "two gradient workers ready and gradients SERVING", server)
    pids = _worker_pids(crash)
    crash.seen_workers |= pids
    return pids


class Metrics:
    """Samples of GET /metrics now; `delta(later, name, **labels)` the rise since."""

    def __init__(self, server: ServerProcess) -> None:
        self.server = server
        self.samples = server.metrics()

    def value(self, name: str, **labels: str) -> float:
        return self.samples.get((name, frozenset(labels.items())), 0.0)

    def delta(self, name: str, **labels: str) -> float:
        now = self.server.metrics().get((name, frozenset(labels.items())), 0.0)
        return now - self.value(name, **labels)


# --- requests -------------------------------------------------------------------------------------


def _png(side: int, seed: int = 0) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _dream(seed: int, steps: int) -> pb.DreamRequest:
    return pb.DreamRequest(
        model="resnet18",
        image=pb.ImageInput(encoded=_png(48, seed=seed % 7)),
        octaves=1,
        steps=steps,
        jitter=4,
        seed=seed,
        preview_every=0,
    )


def _job_pid(crash: Harness, seed: int, timeout: float = 60.0) -> int:
    path = job_file(crash.jobs, seed)
    _wait(path.exists, timeout, f"job {seed} started in a worker", crash.server)
    return int(path.read_text())


def _both_workers_take_jobs(crash: Harness, first_seed: int) -> None:
    """Two jobs held open at once run on two different workers: the whole pool takes work."""
    seeds = (first_seed, first_seed + 1)
    calls = [crash.stub.DreamUnary.future(_dream(seed, steps=1), timeout=120) for seed in seeds]
    pids = {_job_pid(crash, seed) for seed in seeds}
    assert pids == _worker_pids(crash)
    for seed in seeds:
        release_file(crash.jobs, seed).touch()
    for call in calls:
        assert call.result().steps == 1


class ClassifyLoad:
    """Classify calls in a loop on two threads (lenet5, resnet18) until the block ends; every call's
    (start, end, status) is recorded."""

    def __init__(self, server: ServerProcess) -> None:
        self._channel = server.new_channel()
        self._stub = pb_grpc.InferenceStub(self._channel)
        self._stop = threading.Event()
        self.calls: list[tuple[float, float, grpc.StatusCode, str]] = []
        self._threads = [
            threading.Thread(target=self._loop, args=(model, side), daemon=True)
            for model, side in (("lenet5", 28), ("resnet18", 64))
        ]

    def _loop(self, model: str, side: int) -> None:
        request = pb.ClassifyRequest(model=model, image=pb.ImageInput(encoded=_png(side)))
        while not self._stop.is_set():
            start = time.monotonic()
            try:
                self._stub.Classify(request, timeout=60)
                code, details = grpc.StatusCode.OK, ""
            except grpc.RpcError as exc:
                code, details = exc.code(), str(exc.details())
            self.calls.append((start, time.monotonic(), code, details))
            time.sleep(0.01)  # leave the two cores to the gradient jobs too

    def __enter__(self) -> ClassifyLoad:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(60)
        self._channel.close()


# --- the server -----------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=[1, 2], ids=lambda n: f"frontends-{n}")
def crash(
    request: pytest.FixtureRequest, demo_repository: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Harness]:
    """The server; `frontends-2` runs every test again under `serve --frontends 2`, where the
    pool lives in the supervisor's gradient process and ONNX Runtime in its engine process."""
    frontends: int = request.param
    jobs = tmp_path_factory.mktemp("crash-jobs")
    shm_before = _shm()
    servers = module_server(
        demo_repository,
        "--frontends", str(frontends),
        "--workers", "2",
        "--torch-threads", "1",
        "--grace-period-s", str(STOP_GRACE_S),
        # Room for MODEL_CAPACITY images per model (admitted until answered): a failed batch that did
        # not give its room back would show within a few calls. Small batches also warm up faster.
        "--max-batch-size", "4",
        "--max-queue-size", "4",
        launcher=(*LAUNCHER, str(jobs)),
    )  # fmt: skip
    server = next(servers)
    harness = Harness(server, jobs, pb_grpc.InferenceStub(server.channel), frontends)
    _full_capacity(harness)
    yield harness
    server_pid = server.process.pid
    for _ in servers:  # SIGTERM; module_server asserts the exit status is 0
        pass
    assert all(_stat(pid) is None for pid in harness.seen_workers), "a worker outlived the server"
    assert not any(
        stat[1] == server_pid for pid in os.listdir("/proc") if pid.isdigit() and (stat := _stat(int(pid)))
    )
    assert "leaked" not in server.log and "resource_tracker" not in server.log, server.log[-4000:]
    assert _leaked_shm(shm_before) == set()


def test_the_pools_shared_memory_is_unlinked_so_it_cannot_leak(crash: Harness) -> None:
    pids = [crash.pool_pid, *_full_capacity(crash)]
    for pid in pids:
        mapped = _shm_mappings(pid)
        # Every process maps the cancel flags' arena (multiprocessing.heap: /dev/shm/pym-<pid>-...).
        assert any("/dev/shm/pym-" in path for path in mapped), (pid, mapped)
        assert all(path.endswith(" (deleted)") for path in mapped), (pid, mapped)


# --- a worker killed in the middle of a job ------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGSEGV], ids=lambda s: s.name)
def test_worker_killed_mid_job_fails_only_its_call_and_capacity_returns(
    crash: Harness, sig: signal.Signals
) -> None:
    server, stub = crash.server, crash.stub
    _full_capacity(crash)
    before = Metrics(server)
    shm_before = _shm()
    held_seed, victim_seed = 1000 + 10 * sig, 3000 + sig

    items: queue.Queue[pb.ClassifyStreamRequest | None] = queue.Queue()
    stream_request = pb.ClassifyRequest(model="lenet5", image=pb.ImageInput(encoded=_png(28, seed=1)))
    with ClassifyLoad(server) as load:
        stream = stub.ClassifyStream(iter(items.get, None), timeout=120)
        items.put(pb.ClassifyStreamRequest(id="before", request=stream_request))
        assert next(stream).HasField("result")

        # One job on each worker: `other` streams its steps and is then held open; `victim` runs.
        other = stub.Dream(_dream(held_seed, steps=3), timeout=120)
        assert next(other).HasField("progress")
        victim = stub.Dream(_dream(victim_seed, steps=400), timeout=120)
        assert next(victim).HasField("progress")  # it is computing, mid-job
        victim_pid, other_pid = _job_pid(crash, victim_seed), _job_pid(crash, held_seed)
        assert victim_pid != other_pid and {victim_pid, other_pid} == _worker_pids(crash)

        killed_at = time.monotonic()
        os.kill(victim_pid, sig)
        with pytest.raises(grpc.RpcError) as failed:
            for _ in victim:
                pass
        failed_after_s = time.monotonic() - killed_at

        items.put(pb.ClassifyStreamRequest(id="after", request=stream_request))
        after = next(stream)
        items.put(None)
        assert list(stream) == []
        release_file(crash.jobs, held_seed).touch()
        other_rest = list(other)
        time.sleep(0.2)  # a few classification calls after the job finished too

    assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "crashed" in failed.value.details() and sig.name in failed.value.details()
    assert failed_after_s < FAIL_FAST_S

    # Every other call in flight completed: the job on the other worker, the stream, the Classifies.
    assert other_rest[-1].HasField("result")
    assert [m.progress.step for m in other_rest if m.HasField("progress")] == [2, 3]
    assert other_rest[-1].result.steps == 3 and other_rest[-1].result.width == 48
    assert after.id == "after" and after.HasField("result")
    assert load.calls and [c for c in load.calls if c[2] != grpc.StatusCode.OK] == []
    assert any(start <= killed_at for start, *_ in load.calls)
    assert any(end >= killed_at + failed_after_s for _, end, *_ in load.calls)

    # Capacity returns: a replacement loads its models, health is SERVING, both workers take jobs.
    workers = _full_capacity(crash)
    assert victim_pid not in workers and other_pid in workers
    _both_workers_take_jobs(crash, held_seed + 1)
    assert before.delta("cnnserve_worker_restarts_total") == 1
    assert before.delta("cnnserve_worker_deaths_total", reason="job_crash") == 1
    assert before.delta("cnnserve_requests_total", method="Dream", model="resnet18", code="UNAVAILABLE") == 1
    assert (
        before.delta("cnnserve_rejections_total", method="Dream", model="resnet18", reason="worker_crash")
        == 1
    )

    # Reaped (no zombie), and nothing left in /dev/shm.
    assert _stat(victim_pid) is None
    assert _zombies(crash) == {}
    assert _leaked_shm(shm_before) == set()


# --- an input that crashes its worker -----------------------------------------------------------


def test_input_that_crashes_workers_twice_is_internal_and_never_retried(crash: Harness) -> None:
    """A client that retries UNAVAILABLE (as gRPC retry policies do) sends the poison input again
    at once: the second crash is answered INTERNAL, which nobody retries, and the input is then
    refused without reaching a worker. Each crash is logged with the input's fingerprint.

    The replacements are held before they load their models, so the two crashes leave no worker
    alive for a while: gradients health is then NOT_SERVING and gradient calls fail fast, while
    classification is untouched."""
    server = crash.server
    _full_capacity(crash)
    before = Metrics(server)
    retry_config = {
        "methodConfig": [
            {
                "name": [{"service": "cnnserve.v1.Inference", "method": "DreamUnary"}],
                "retryPolicy": {
                    "maxAttempts": 5,
                    "initialBackoff": "0.1s",
                    "maxBackoff": "1s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        ]
    }
    options = [("grpc.service_config", json.dumps(retry_config)), ("grpc.enable_retries", 1)]
    poison = _dream(POISON_SEED, steps=1)
    hold = hold_start_file(crash.jobs)
    hold.touch()
    try:
        with grpc.insecure_channel(server.address, options=options) as channel:
            retrying = pb_grpc.InferenceStub(channel)
            with pytest.raises(grpc.RpcError) as crashed:
                retrying.DreamUnary(poison, timeout=60)
        assert crashed.value.code() == grpc.StatusCode.INTERNAL
        assert crashed.value.details() == CRASHED_TWICE_MESSAGE

        # No worker alive: NOT_SERVING for gradients, their calls fail fast; classification serves.
        _wait(
            lambda: _health(server, GRADIENTS_SERVICE) == NOT_SERVING,
            FAIL_FAST_S,
            "gradients NOT_SERVING with no worker alive",
            server,
        )
        assert server.sample("cnnserve_workers_alive") == 0
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as refused:
            crash.stub.DreamUnary(_dream(7, steps=1), timeout=60)
        assert time.monotonic() - started < FAIL_FAST_S
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "no gradient worker is ready" in refused.value.details()
        assert _health(server, "") == SERVING
        png = pb.ImageInput(encoded=_png(28))
        assert crash.stub.Classify(pb.ClassifyRequest(model="lenet5", image=png), timeout=30).classes
    finally:
        hold.unlink(missing_ok=True)

    # Exactly two attempts reached a worker, and each took one down; the pool replaced both.
    workers = _full_capacity(crash)
    assert (
        before.delta("cnnserve_requests_total", method="DreamUnary", model="resnet18", code="UNAVAILABLE")
        == 2
    )
    assert (
        before.delta(
            "cnnserve_rejections_total", method="DreamUnary", model="resnet18", reason="worker_crash"
        )
        == 1
    )
    assert (
        before.delta("cnnserve_requests_total", method="DreamUnary", model="resnet18", code="INTERNAL") == 1
    )
    assert before.delta("cnnserve_worker_deaths_total", reason="job_crash") == 2
    assert before.delta("cnnserve_worker_restarts_total") == 2
    log = server.log
    assert "killed by SIGSEGV" in log
    assert "crash 1 of this input" in log and "crash 2 of this input" in log

    # From now on it is refused at once, and never reaches a worker again.
    job_file(crash.jobs, POISON_SEED).unlink()
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as refused:
        crash.stub.DreamUnary(poison, timeout=60)
    assert time.monotonic() - started < FAIL_FAST_S
    assert refused.value.code() == grpc.StatusCode.INTERNAL
    assert refused.value.details() == CRASHED_TWICE_MESSAGE
    assert not job_file(crash.jobs, POISON_SEED).exists()
    assert _worker_pids(crash) == workers
    assert before.delta("cnnserve_worker_restarts_total") == 2

    # Other inputs are served as before.
    assert crash.stub.DreamUnary(_dream(5, steps=1), timeout=120).steps == 1
    assert _zombies(crash) == {}


# --- a stuck worker ---------------------------------------------------------------------------------


def test_stuck_worker_is_killed_after_the_stop_grace_and_replaced(crash: Harness) -> None:
    server = crash.server
    _full_capacity(crash)
    before = Metrics(server)
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as late:
        crash.stub.DreamUnary(_dream(HANG_SEED, steps=1), timeout=2.0)
    assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    stuck = _job_pid(crash, HANG_SEED)
    _wait(lambda: _stat(stuck) is None, RECOVERY_S, "the stuck worker killed and reaped", server)
    # Not before the deadline plus the stop grace: a job gets its chance to stop by itself.
    assert time.monotonic() - started >= 2.0 + STOP_GRACE_S - 0.5
    assert "ignored should_stop()" in server.log
    workers = _full_capacity(crash)
    assert stuck not in workers
    assert before.delta("cnnserve_worker_deaths_total", reason="stop_overdue") == 1
    assert before.delta("cnnserve_worker_deaths_total", reason="job_crash") == 0
    assert before.delta("cnnserve_worker_restarts_total") == 1
    assert crash.stub.DreamUnary(_dream(6, steps=1), timeout=120).steps == 1
    assert _zombies(crash) == {}


# --- the classification engine ----------------------------------------------------------------------


def test_onnx_runtime_failure_fails_its_batch_and_the_model_keeps_serving(crash: Harness) -> None:
    server, stub = crash.server, crash.stub
    before = Metrics(server)
    shape = list(stub.GetModel(pb.GetModelRequest(name="lenet5"), timeout=10).input.shape)
    poison = np.full(shape, ORT_POISON_VALUE, dtype=np.float32)
    poison_input = pb.ImageInput(tensor=pb.Tensor(shape=shape, dtype="float32", data=poison.tobytes()))
    good = pb.ClassifyRequest(model="lenet5", image=pb.ImageInput(encoded=_png(28)))
    # More failures than the model has room for: each gives its room back, nothing is left broken.
    failures = MODEL_CAPACITY + 2
    for _ in range(failures):
        with pytest.raises(grpc.RpcError) as failed:
            stub.Classify(pb.ClassifyRequest(model="lenet5", image=poison_input), timeout=30)
        assert failed.value.code() == grpc.StatusCode.INTERNAL
        assert failed.value.details() == GENERIC_INTERNAL_MESSAGE
        assert stub.Classify(good, timeout=30).classes
    assert "inference failed" in server.log and "ONNXRuntimeError" in server.log  # logged, not sent
    assert (
        before.delta("cnnserve_requests_total", method="Classify", model="lenet5", code="INTERNAL")
        == failures
    )
    assert before.delta("cnnserve_requests_total", method="Classify", model="lenet5", code="OK") == failures
    # The batcher's loop never died (it would have been restarted and counted).
    assert before.delta("cnnserve_engine_restarts_total", model="lenet5") == 0
    assert _health(server, "") == SERVING and _health(server, "model:lenet5") == SERVING
