"""Which ONNX Runtime execution provider to use, decided by what really works on this machine.

`onnxruntime.get_available_providers()` only lists the providers *compiled into* the wheel: the
onnxruntime-gpu wheel lists CUDAExecutionProvider on a machine with no GPU, no driver and no CUDA
libraries, and a session asked for CUDA then silently falls back to CPU after printing errors. So
CUDA is chosen only when a real probe succeeds: a tiny convolution (which needs cuBLAS and cuDNN,
the libraries that are usually missing) runs in a session whose first provider is CUDA.

The probe runs in a child process: a broken driver can crash or hang the process that touches it,
and ONNX Runtime prints its provider-loading errors straight to stderr; in a child, both stay
contained, and its stderr becomes the reason we log.
"""

from __future__ import annotations

import functools
import glob
import json
import logging
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import onnxruntime as ort

from service.settings import Settings

log = logging.getLogger(__name__)

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"

PROBE_TIMEOUT_S = 120.0  # first CUDA initialisation (driver JIT, cuDNN load) can take tens of seconds


class ProviderUnavailable(RuntimeError):
    """`device=cuda` was requested but CUDA cannot be used on this machine (a startup error)."""


@dataclass(frozen=True)
class ProviderChoice:
    """The execution provider the sessions will use, and why."""

    name: str  # CUDAExecutionProvider or CPUExecutionProvider
    options: dict[str, str] = field(default_factory=dict)  # provider options (CUDA: device_id, ...)
    device_id: int | None = None  # CUDA device, None on CPU
    reason: str = ""  # one line for the startup log: why this provider

    @property
    def is_cuda(self) -> bool:
        return self.name == CUDA

    def session_providers(self) -> list[str | tuple[str, dict[str, str]]]:
        """The `providers=` argument for onnxruntime.InferenceSession."""
        if self.is_cuda:
            # CPU stays second: ONNX Runtime places the few nodes CUDA has no kernel for (shape
            # arithmetic) there. The session's get_providers()[0] tells whether CUDA really came up.
            return [(CUDA, dict(self.options)), CPU]
        return [CPU]


@dataclass(frozen=True)
class CudaStatus:
    usable: bool
    reason: str  # why not (or the probe's summary when usable)


def cuda_options(settings: Settings) -> dict[str, str]:
    return {
        "device_id": str(settings.cuda_device_id),
        "cudnn_conv_algo_search": settings.cudnn_conv_algo_search,
    }


def select_provider(settings: Settings) -> ProviderChoice:
    """Pick the provider for `settings.device`.

    - `cpu`: CPU.
    - `auto`: CUDA if it really works (see module doc), else CPU; the reason is logged.
    - `cuda`: CUDA, or ProviderUnavailable saying why it cannot be used.
    """
    if settings.device == "cpu":
        return ProviderChoice(CPU, reason="device=cpu requested")
    status = cuda_status(settings.cuda_device_id, settings.cudnn_conv_algo_search)
    if status.usable:
        return ProviderChoice(
            CUDA,
            options=cuda_options(settings),
            device_id=settings.cuda_device_id,
            reason=f"CUDA device {settings.cuda_device_id} is usable ({status.reason})",
        )
    if settings.device == "cuda":
        raise ProviderUnavailable(
            f"device=cuda was requested but CUDA device {settings.cuda_device_id} is not usable: "
            f"{status.reason}. Fix the GPU setup or start with --device auto or cpu."
        )
    return ProviderChoice(CPU, reason=f"device=auto and CUDA is not usable: {status.reason}")


def _has_gpu_device_nodes() -> bool:
    # NVIDIA's driver creates /dev/nvidiactl and /dev/nvidia<N>; WSL2 exposes GPUs as /dev/dxg.
    # Without any of them no CUDA call can succeed, and we skip the (slower) probe process.
    return bool(glob.glob("/dev/nvidia[0-9]*")) or os.path.exists("/dev/dxg")


@functools.lru_cache(maxsize=8)
def cuda_status(device_id: int = 0, cudnn_conv_algo_search: str = "HEURISTIC") -> CudaStatus:
    """Whether ONNX Runtime can really run a convolution on CUDA device `device_id` (cached)."""
    if CUDA not in ort.get_available_providers():
        return CudaStatus(False, f"this onnxruntime build ({ort.__version__}) has no CUDA provider")
    if sys.platform.startswith("linux") and not _has_gpu_device_nodes():
        return CudaStatus(False, "no NVIDIA GPU device nodes (/dev/nvidia*) on this machine")
    return probe_cuda(device_id, cudnn_conv_algo_search)


def probe_cuda(device_id: int, cudnn_conv_algo_search: str = "HEURISTIC") -> CudaStatus:
    """Run the CUDA probe in a child process and report what happened."""
    started = time.monotonic()
    try:
        proc = subprocess.run(
            [sys.executable, "-c", _PROBE_SCRIPT, str(device_id), cudnn_conv_algo_search],
            capture_output=True,
            text=True,
            timeout=PROBE_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return CudaStatus(False, f"the CUDA probe did not finish within {PROBE_TIMEOUT_S:.0f} s")
    except OSError as exc:
        return CudaStatus(False, f"could not start the CUDA probe: {exc}")
    elapsed = time.monotonic() - started
    result: dict[str, Any] = {}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("{"):
            try:
                result = json.loads(line)
            except ValueError:
                continue
            break
    if result.get("ok"):
        return CudaStatus(True, f"probe ran a convolution on {result.get('providers')} in {elapsed:.1f} s")
    detail = result.get("error") or _last_error_line(proc.stderr) or f"probe exited with {proc.returncode}"
    ort_error = _last_error_line(proc.stderr)
    if ort_error and ort_error not in detail:
        detail = f"{detail}; onnxruntime said: {ort_error}"
    log.debug("CUDA probe stderr:\n%s", proc.stderr)
    return CudaStatus(False, detail)


def _last_error_line(stderr: str) -> str:
    """The most informative line of ONNX Runtime's stderr (its last error, colour codes removed)."""
    lines = [_strip_ansi(line).strip() for line in stderr.splitlines()]
    lines = [line for line in lines if line]
    for line in reversed(lines):
        if "[E:" in line or "Error" in line or "error" in line:
            # ORT lines look like "2026-... [E:onnxruntime:Default, file.cc:123 fn] message".
            message = line.split("] ", 1)[-1]
            # ... and the message often repeats the C++ location before ": FAIL : <what happened>".
            return message.split(" : FAIL : ", 1)[-1][:500]
    return lines[-1][:500] if lines else ""


def _strip_ansi(text: str) -> str:
    return re.sub(r"\x1b\[[0-9;]*m", "", text)


# Executed with `python -c` in the probe process; prints one JSON line. A 3x3 convolution on a
# 1x1x8x8 input exercises cuDNN and the CUDA allocator, and its output is checked against numpy.
_PROBE_SCRIPT = r"""
import json, sys
device_id, algo = int(sys.argv[1]), sys.argv[2]
out = {"ok": False}
try:
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper
    w = np.arange(9, dtype=np.float32).reshape(1, 1, 3, 3) / 10
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])], "probe",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, 8, 8])],
        [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=[
        ("CUDAExecutionProvider", {"device_id": str(device_id), "cudnn_conv_algo_search": algo})])
    providers = sess.get_providers()
    out["providers"] = providers
    if providers[0] != "CUDAExecutionProvider":
        out["error"] = "onnxruntime fell back to " + providers[0] + " (CUDA provider failed to load)"
    else:
        x = np.random.default_rng(0).standard_normal((1, 1, 8, 8)).astype(np.float32)
        y = sess.run(["y"], {"x": x})[0]
        xp = np.pad(x[0, 0], 1)
        ref = np.array([[(xp[i:i + 3, j:j + 3] * w[0, 0]).sum() for j in range(8)] for i in range(8)])
        if np.allclose(y[0, 0], ref, atol=1e-3):
            out["ok"] = True
        else:
            out["error"] = "the probe convolution on CUDA returned wrong values"
except Exception as exc:
    text = str(exc).strip()
    out["error"] = type(exc).__name__ + (": " + text.splitlines()[0][:400] if text else "")
print(json.dumps(out), flush=True)
"""
