"""`python -m service.worker.parity`: a gradient process's parity self-test, in a process of its own.

The self-test (loading.py, `_check_version`) needs ONNX Runtime and builds each version's module
once; a gradient process that ran it itself kept ONNX Runtime imported and some of what the test
allocated for the rest of its life, though it never uses them again (idle RSS, issue 13). So
`load_models` starts this short-lived process (settings.worker_parity_process) and reads the
verdicts back. It runs the same `shared_verdicts` as in-process, through the same verdict directory
and locks, so the processes of one pool still test each version once between them.

Protocol: the request is the one argument, in JSON ({"models": [version dirs], "verdict_dir": str
or null, "torch_threads": int, "parent": pid}), so the test starts before anyone writes to a pipe.
The answer is the last line on stdout, in JSON: {"verdicts": [[name, version, refused reason or
null], ...]} with exit status 0, or {"error": message} with exit status 1 for anything that stops a
version from loading (the caller raises it as RuntimeError). Logs go to stderr, as the gradient
process's own do.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

from service.worker import loading

_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _die_with_parent(parent: int) -> None:
    """Exit when the gradient process that started this one dies (its start timed out and it was
    killed, or the server stopped): nobody would read the verdicts, and the versions' locks would
    hold up the process that replaces it. Linux only; elsewhere this process finishes its test."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # it died before prctl took effect
        os._exit(1)


def run(request: dict[str, Any]) -> dict[str, Any]:
    """The answer to one request (see the module docstring)."""
    threads = int(request.get("torch_threads", 0))
    if threads > 0:
        import torch

        torch.set_num_threads(threads)
    try:
        versions = [loading.read_version(Path(entry)) for entry in request["models"]]
        verdicts = loading.shared_verdicts(versions, request.get("verdict_dir"))
    except Exception as exc:  # noqa: BLE001 - answered, as the gradient process would have raised it
        return {"error": str(exc)}
    return {"verdicts": [[name, version, refused] for (name, version), refused in verdicts.items()]}


def main() -> int:
    request = json.loads(sys.argv[1])
    _die_with_parent(int(request["parent"]))
    answer = run(request)
    print(json.dumps(answer), flush=True)
    return 1 if "error" in answer else 0


if __name__ == "__main__":
    sys.exit(main())
