"""The client room's boundaries: `service.client` keeps every public name it had as one module, and
the client and `cnnserve score` import neither PyTorch nor ONNX Runtime nor the server side (a
client machine needs neither, and torch alone costs ~1 s of start-up). The client runs on the base
install alone (`pip install cnnserve`, no extras): checked here in this environment with the extras'
modules made unimportable, and for real in a venv of its own by tests/integration/test_light_client.py."""

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


# The top-level modules that only the extras bring (pyproject: serve, worker, export): a base install
# has none of them.
EXTRAS_ONLY = [
    "torch", "onnxruntime", "onnx", "onnxscript", "sklearn", "pydantic", "pydantic_settings",
    "prometheus_client", "yaml", "grpc_health", "grpc_reflection", "starlette", "uvicorn", "httptools",
]  # fmt: skip

# Run first in the child: every import of an EXTRAS_ONLY module fails as if it were not installed.
_BLOCKER = f"""
import importlib.abc, sys
class _NotInstalled(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition('.')[0] in {EXTRAS_ONLY!r}:
            raise ModuleNotFoundError(f'No module named {{name!r}}', name=name)
        return None
sys.meta_path.insert(0, _NotInstalled())
"""


def _without_extras(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", _BLOCKER + code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )


def test_the_blocker_blocks() -> None:
    """Else every test below would pass vacuously."""
    result = _without_extras("import pydantic")
    assert result.returncode != 0 and "No module named 'pydantic'" in result.stderr


@pytest.mark.parametrize(
    "argv",
    [["--help"], ["classify", "--help"], ["score", "--help"], ["models", "--help"], ["explain", "--help"]],
    ids=" ".join,
)
def test_the_client_commands_run_on_the_base_install(argv: list[str]) -> None:
    code = f"import service.client\nfrom service.cli import main\nmain({argv!r})"
    result = _without_extras(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: cnnserve")
    if argv == ["--help"]:  # the server commands are listed, with what they need
        flat = " ".join(result.stdout.split())
        assert "serve run the gRPC server (needs pip install 'cnnserve[serve]')" in flat
        assert "worker run the gradient-worker tier (needs pip install 'cnnserve[worker]')" in flat


@pytest.mark.parametrize(
    ("argv", "extra"),
    [
        (["serve"], "serve"),
        (["serve", "--repository", "/models", "--grpc-port", "8500"], "serve"),
        (["worker", "--workers", "2"], "worker"),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, list) else v,
)
def test_a_server_command_says_which_extra_it_needs(argv: list[str], extra: str) -> None:
    code = f"import sys\nfrom service.cli import main\nsys.exit(main({argv!r}))"
    result = _without_extras(code)
    assert result.returncode == 2, result.stderr
    assert result.stdout == ""
    assert result.stderr.strip() == (
        f"cnnserve {argv[0]} needs the {extra} extra, which this installation lacks (no module named "
        f"'pydantic'): pip install 'cnnserve[{extra}]'"
    )


def test_an_unknown_argument_to_a_client_command_is_still_a_usage_error() -> None:
    """main lets unknown arguments through to the stand-ins only."""
    from service.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["models", "--no-such-flag"])
    assert exit_info.value.code == 2


def test_serve_with_gradient_workers_and_no_torch_says_so() -> None:
    """The serve extra without the worker extra: the local gradient workers would die at start."""
    code = (
        "import sys, importlib.util\n"
        "find_spec = importlib.util.find_spec\n"
        "importlib.util.find_spec = lambda name, *a: None if name == 'torch' else find_spec(name, *a)\n"
        "from service.cli import main\n"
        "sys.exit(main(['serve', '--repository', '/nonexistent']))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 2
    assert "need PyTorch" in result.stderr and "pip install 'cnnserve[worker]'" in result.stderr
    assert "--workers 0" in result.stderr
