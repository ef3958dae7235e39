"""The client room's boundaries: `service.client` keeps every public name it had as one module, and
the client and `cnnserve score` import neither PyTorch nor ONNX Runtime nor the server side (a
client machine needs neither, and torch alone costs ~1 s of start-up)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[4]

# Every public name of service/client.py before it became a package (commit 36ce45a).
PUBLIC_NAMES = [
    "CHEAP_UNARY_METHODS", "DEFAULT_KEEPALIVE_S", "DEFAULT_KEEPALIVE_TIMEOUT_S", "DEFAULT_MAX_MESSAGE_BYTES",
    "DEFAULT_SERVICE_CONFIG", "GRADIENT_UNARY_METHODS", "INFERENCE_SERVICE", "OIP_SERVICE",
    "RETRYABLE_STATUS_CODES", "ClassScore", "ClassifyResult", "CnnserveClient", "CnnserveError", "ImageLike",
    "StreamResult", "Timings", "connection_hint", "default_channel_options", "image_input", "not_connected",
]  # fmt: skip
# Added since: the gradient and embedding results (issue 15).
ADDED_NAMES = [
    "DreamLayer", "DreamResult", "EmbedResult", "ExplainResult", "Explanation", "FeatureMap",
    "FeatureMapsResult", "FiltersResult", "GradientProgress", "Neuron", "NeuronExplained", "StylizeResult",
]  # fmt: skip

# What a client process must never load: the heavy runtimes and the server side of service/ (with the
# rooms the reshape of issue 11 gives it: service.frontend, service.engine).
FORBIDDEN = [
    "torch", "onnxruntime", "service.server", "service.servicers", "service.gradients", "service.oip",
    "service.forwarding", "service.worker_server", "service.classify", "service.worker", "service.frontend",
    "service.engine",
]  # fmt: skip


def _loaded(code: str) -> list[str]:
    """The FORBIDDEN modules (or their submodules) loaded in a fresh interpreter that runs `code`."""
    script = f"import sys\n{code}\nprint(' '.join(sorted(sys.modules)))"
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120, check=True
    )
    modules = result.stdout.split()
    return sorted({f for f in FORBIDDEN for m in modules if m == f or m.startswith(f + ".")})


def test_service_client_keeps_every_public_name() -> None:
    import service.client

    missing = [name for name in PUBLIC_NAMES if not hasattr(service.client, name)]
    assert not missing, f"service.client lost {missing}"
    assert sorted(service.client.__all__) == sorted(PUBLIC_NAMES + ADDED_NAMES)


@pytest.mark.parametrize(
    "code",
    [
        "import service.client",
        "import service.client.commands, service.client.gradient_commands, service.client.score",
        # Building the parser imports every client command; running one (score here) imports the rest.
        "from service.cli import main\ntry:\n    main(['score', '--help'])\nexcept SystemExit:\n    pass",
    ],
)
def test_the_client_imports_neither_torch_nor_onnxruntime_nor_the_server(code: str) -> None:
    assert _loaded(code) == []


def test_importing_the_cli_leaves_the_client_commands_for_later() -> None:
    """Every spawned gradient child imports service.cli (through the main module): the client
    commands, and grpc with them, are imported only when the parser is built."""
    script = "import sys, service.cli; print('grpc' in sys.modules, 'service.client' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120, check=True
    )
    assert result.stdout.split() == ["False", "False"]
