"""Test-only: the real server with hooks that let test_crash_recovery crash, hang, hold and locate its
gradient workers, and make an ONNX Runtime run fail. Never imported by `service`.

Why a wrapper started by the test, and not a flag or an environment variable in the service: any
crash trigger a request can reach would be a denial-of-service backdoor in production. Here the
triggers exist only in a server the test starts as

    python -c "from tests.integration.crash_worker import main; main()" JOBS_DIR serve ...

`main` swaps `service.worker.handlers.handle` and `loading.load_models` for the wrappers below before
the server builds its pool, and wraps `ModelSession.run`. Under `serve --frontends N` the pool and the
ONNX Runtime sessions live in the supervisor's gradient and engine processes: `main` also swaps
`service.multiprocess.engine_main` and `gradients_main`, so those processes start in this module and
install the same wrappers first. The pool pickles its handler and initializer by
reference, so the spawned workers import this module by name and run the same wrappers around the
production functions; everything else (servicers, batcher, pool, health, metrics) is the production
code path.

Gradient jobs, by the dream seed of the request (DreamParams.seed):
- every job first writes its worker's pid to JOBS_DIR/job-<seed>, so the test knows whom to kill;
- POISON_SEED: the worker segfaults (reads address 0) before doing anything: an input that crashes
  its worker every time;
- HANG_SEED: the handler never returns and never looks at ctx.should_stop() (a stuck worker);
- HOLD_SEEDS: the real dream runs (progress streams), then the result is held back until
  JOBS_DIR/release-<seed> exists, so a job is deterministically still in flight when the test
  kills the other worker.
Worker start: while JOBS_DIR/hold-start exists, a starting worker waits before loading its models.
Classification: a batch holding the value ORT_POISON_VALUE makes its ONNX Runtime run fail with a
genuine onnxruntime error (a second session whose Reshape cannot succeed), on the model's runner
thread, where a real ORT failure would surface.
"""

from __future__ import annotations

import ctypes
import functools
import os
import resource
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from service import multiprocess
from service.worker import handlers, loading
from service.worker.jobs import JobContext
from service.worker.loading import LoadedModels

JOBS_DIR_ENV = "CRASH_TEST_JOBS_DIR"  # not CNNSERVE_*: the settings own that prefix
POISON_SEED = 666
HANG_SEED = 777
HOLD_SEEDS = range(1000, 2000)
ORT_POISON_VALUE = 6.66e6

_real_handle = handlers.handle
_real_load_models = loading.load_models
_real_run: Any = None  # ModelSession.run, set by _install(); onnxruntime stays out of the workers
_real_engine_main = multiprocess.engine_main
_real_gradients_main = multiprocess.gradients_main


def _jobs_dir() -> Path:
    return Path(os.environ[JOBS_DIR_ENV])


def job_file(jobs_dir: Path, seed: int) -> Path:
    return jobs_dir / f"job-{seed}"


def release_file(jobs_dir: Path, seed: int) -> Path:
    return jobs_dir / f"release-{seed}"


def gradients_pid_file(jobs_dir: Path) -> Path:
    return jobs_dir / "gradients-pid"


def hold_start_file(jobs_dir: Path) -> Path:
    return jobs_dir / "hold-start"


def handle(state: Any, task: Any, ctx: JobContext) -> Any:
    seed = getattr(getattr(task, "params", None), "seed", None)
    jobs_dir = _jobs_dir()
    if isinstance(seed, int):
        tmp = jobs_dir / f".job-{seed}.tmp"
        tmp.write_text(str(os.getpid()))
        os.replace(tmp, job_file(jobs_dir, seed))  # atomic: the test never reads half a pid
    if seed == POISON_SEED:
        ctypes.string_at(0)  # SIGSEGV
    if seed == HANG_SEED:
        while True:
            time.sleep(0.05)
    result = _real_handle(state, task, ctx)
    if seed in HOLD_SEEDS:
        while not release_file(jobs_dir, seed).exists() and not ctx.should_stop():
            time.sleep(0.02)
    return result


def load_models(config: Mapping[str, Any]) -> LoadedModels:
    while hold_start_file(_jobs_dir()).exists():
        time.sleep(0.05)
    return _real_load_models(config)


@functools.cache
def _broken_session() -> Any:
    """An ONNX Runtime session whose every run fails inside ORT (Reshape of 4 values to 3 x 5)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Reshape", ["x", "shape"], ["y"])],
        "broken",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [helper.make_tensor("shape", TensorProto.INT64, [2], [3, 5])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def _run(self: Any, batch: np.ndarray) -> np.ndarray:
    if np.any(np.asarray(batch) == np.float32(ORT_POISON_VALUE)):
        _broken_session().run(None, {"x": np.zeros(4, dtype=np.float32)})
    return _real_run(self, batch)


def _install() -> None:
    """Swap the production functions for the wrappers above, in this process (see the docstring)."""
    # The segfaults must not leave core files behind (core_pattern may write them to the cwd).
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    handlers.handle = handle  # type: ignore[assignment]  # both read by Server._make_pool
    loading.load_models = load_models
    from service.engine.session import ModelSession

    global _real_run
    if _real_run is None:
        _real_run = ModelSession.run
        ModelSession.run = _run  # type: ignore[method-assign]  # the batchers bind it at load time


def engine_main(*args: Any) -> None:
    """`serve --frontends N`: the engine process, with the ORT wrapper installed in it."""
    _install()
    _real_engine_main(*args)


def gradients_main(*args: Any) -> None:
    """`serve --frontends N`: the gradient process, whose pool spawns the wrapped workers. It
    writes its pid, so the test can find the workers among its children."""
    _install()
    tmp = _jobs_dir() / ".gradients-pid.tmp"
    tmp.write_text(str(os.getpid()))
    os.replace(tmp, gradients_pid_file(_jobs_dir()))
    _real_gradients_main(*args)


def main() -> None:
    jobs_dir, *argv = sys.argv[1:]
    os.environ[JOBS_DIR_ENV] = jobs_dir  # inherited by the spawned workers and processes
    _install()
    # The supervisor spawns its children by reference to these names: they start here, install
    # the wrappers in their own interpreter, then run the production entry points.
    multiprocess.engine_main = engine_main  # type: ignore[assignment]
    multiprocess.gradients_main = gradients_main  # type: ignore[assignment]
    from service.__main__ import _argv
    from service.cli import main as cli_main

    sys.exit(cli_main(_argv(argv)))
