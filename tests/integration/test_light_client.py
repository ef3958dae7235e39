"""The light client, installed for real: virtual environments holding cnnserve's base install alone
(the wheel of this checkout, no extras, as `pip install cnnserve` gives) run `cnnserve classify`,
`cnnserve score`, `cnnserve models` and service.client against the session's real server (started
from the project's environment, which has every extra).

- lowest: every base dependency at pyproject's floor (protobuf 5.26.1, grpcio 1.65.5: the stubs'
  stamps, tools/gen_protos.py), highest: whatever pip picks today (protobuf 7.x). Both in the default
  run: they are the protobuf range the committed stubs promise.
- beside tritonclient[grpc] 2.73, which pins protobuf < 7: tritonclient's own gRPC client calls
  ModelInfer on our server, and `cnnserve classify` runs, in the same environment.

Every client process runs with PYTHONWARNINGS=error (protobuf warns about gencode it merely
tolerates) and outside the checkout, so `import service` is the installed package. pip takes the
wheels from its cache after the first run; each environment costs ~15 s to build.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from packaging.version import Version
from server_process import ROOT, ServerProcess

from export import digits
from export.preprocessing import DIGITS, to_tensor

pytestmark = pytest.mark.integration

# Only the extras bring these (pyproject: serve, worker, export): a base install has none.
EXTRAS_ONLY = [
    "torch", "onnxruntime", "onnxruntime-gpu", "onnx", "onnxscript", "scikit-learn", "pydantic",
    "pydantic-settings", "prometheus-client", "pyyaml", "grpcio-health-checking", "grpcio-reflection",
    "grpcio-tools", "starlette", "uvicorn", "httptools",
]  # fmt: skip
IMAGES = 6
TRITONCLIENT = "tritonclient[grpc]==2.73.0"


def base_floors() -> dict[str, str]:
    """name -> the lowest version pyproject's base dependencies allow (`name>=X`)."""
    floors = {}
    for requirement in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]:
        match = re.fullmatch(r"([A-Za-z0-9_.-]+)>=([0-9.]+)(?:,.*)?", requirement)
        assert match, f"base dependency without a floor: {requirement}"
        floors[match.group(1)] = match.group(2)
    return floors


@dataclass
class Venv:
    root: Path
    workdir: Path  # outside the checkout: `import service` must find the installed package

    @property
    def python(self) -> Path:
        return self.root / "bin" / "python"

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("CNNSERVE_", "PYTHON"))}
        return env | {
            "PYTHONWARNINGS": "error",
            "PATH": f"{self.root / 'bin'}{os.pathsep}{env.get('PATH', '')}",
        }

    def run(self, *argv: str | Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(a) for a in argv], cwd=self.workdir, env=self.env(), capture_output=True, text=True,
            timeout=timeout, check=False,
        )  # fmt: skip

    def cnnserve(self, *argv: str | Path) -> subprocess.CompletedProcess[str]:
        return self.run(self.root / "bin" / "cnnserve", *argv)

    def python_code(self, code: str) -> subprocess.CompletedProcess[str]:
        return self.run(self.python, "-c", code)

    def distributions(self) -> dict[str, str]:
        code = (
            "import importlib.metadata as m, json, re\n"
            "print(json.dumps({re.sub(r'[-_.]+', '-', d.metadata['Name']).lower(): d.version "
            "for d in m.distributions()}))"
        )
        result = self.python_code(code)
        assert result.returncode == 0, result.stderr
        return dict(json.loads(result.stdout))


@pytest.fixture(scope="module")
def cnnserve_wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel of this checkout, built from a copy (an in-tree build would write build/ here)."""
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for package in ("service", "export"):
        shutil.copytree(ROOT / package, src / package, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    out = tmp_path_factory.mktemp("wheel")
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "--quiet",
         "--disable-pip-version-check", "-w", str(out), str(src)],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    (wheel,) = out.glob("cnnserve-*.whl")
    return wheel


def make_venv(root: Path, *requirements: str | Path) -> Venv:
    """A fresh venv with `requirements` installed by pip from PyPI (its cache after the first run)."""
    subprocess.run([sys.executable, "-m", "venv", str(root)], check=True, timeout=120)
    workdir = root / "work"
    workdir.mkdir()
    venv = Venv(root, workdir)
    pip = [
        venv.python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--prefer-binary",
        *requirements,
    ]  # fmt: skip
    result = subprocess.run(
        [str(a) for a in pip], cwd=workdir, capture_output=True, text=True, timeout=600, check=False,
        env={k: v for k, v in venv.env().items() if k != "PYTHONWARNINGS"},
    )  # fmt: skip
    assert result.returncode == 0, f"pip install {requirements} failed:\n{result.stdout}\n{result.stderr}"
    return venv


@pytest.fixture(scope="module")
def digit_images(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, int]]:
    """IMAGES held-out digits as PNGs, and path -> true label."""
    root = tmp_path_factory.mktemp("digits")
    labels = {}
    for index in (int(i) for i in digits.split_indices()[1][:IMAGES]):
        path = root / f"digit-{index:04d}.png"
        digits.render(index).save(path, "PNG")
        labels[str(path)] = digits.label(index)
    return root, labels


def assert_classifies_and_scores(
    venv: Venv, server: ServerProcess, digit_images: tuple[Path, dict[str, int]]
) -> None:
    """`cnnserve classify`, `score` and `models`, and service.client, from `venv` against `server`."""
    root, labels = digit_images
    paths = sorted(labels)
    result = venv.cnnserve("classify", *paths, "--model", "lenet5", "--address", server.address, "--json")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""  # no warning of any kind
    records = json.loads(result.stdout)
    assert [r["image"] for r in records] == paths
    assert sum(r["classes"][0]["index"] == labels[r["image"]] for r in records) >= IMAGES - 1

    out = venv.workdir / "scores.jsonl"
    out.unlink(missing_ok=True)
    args = ("--model", "lenet5", "--address", server.address, "--output", out, "--quiet")
    result = venv.cnnserve("score", root, *args)
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["path"] for r in rows) == paths and all(r["error"] == "" for r in rows)
    assert sum(r["classes"][0]["index"] == labels[r["path"]] for r in rows) >= IMAGES - 1

    result = venv.cnnserve("models", "--address", server.address, "--json")
    assert result.returncode == 0, result.stderr
    assert {m["name"] for m in json.loads(result.stdout)} == {"lenet5", "resnet18"}

    code = (
        "import service, numpy as np\n"
        "from PIL import Image\n"
        "from service.client import CnnserveClient\n"
        f"image = Image.open({paths[0]!r})\n"
        f"with CnnserveClient({server.address!r}, timeout_s=30) as client:\n"
        "    a = client.classify(image, model='lenet5', top_k=3).classes\n"
        "    b = client.classify(np.asarray(image), model='lenet5', top_k=3).classes\n"
        "assert a == b, (a, b)\n"
        "print(service.__file__, a[0].index)"
    )
    result = venv.python_code(code)
    assert result.returncode == 0, result.stderr
    module_file, top = result.stdout.split()
    assert Path(module_file).is_relative_to(venv.root), (
        "the checkout's service/ was imported, not the wheel's"
    )
    assert int(top) == labels[paths[0]]


def assert_base_only(venv: Venv) -> dict[str, str]:
    installed = venv.distributions()
    assert installed.get("cnnserve") == "0.1.0"
    present = sorted(set(EXTRAS_ONLY) & installed.keys())
    assert present == [], f"a base install brought {present}"
    # And none importable by another route (a stray path entry, a namespace package).
    code = (
        "import importlib.util as u; print([m for m in ('torch', 'onnxruntime', 'onnx') if u.find_spec(m)])"
    )
    result = venv.python_code(code)
    assert (result.returncode, result.stdout.strip()) == (0, "[]"), result.stderr
    return installed


@pytest.fixture(scope="module", params=["lowest", "highest"])
def base_venv(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, cnnserve_wheel: Path
) -> Iterator[tuple[str, Venv]]:
    root = tmp_path_factory.mktemp(f"venv-{request.param}")
    pins = (
        [f"{name}=={version}" for name, version in base_floors().items()] if request.param == "lowest" else []
    )
    yield request.param, make_venv(root, cnnserve_wheel, *pins)
    shutil.rmtree(root, ignore_errors=True)


def test_the_base_install_runs_the_client_against_the_server(
    base_venv: tuple[str, Venv], server: ServerProcess, digit_images: tuple[Path, dict[str, int]]
) -> None:
    bound, venv = base_venv
    installed = assert_base_only(venv)
    if bound == "lowest":
        floors = {name.lower(): Version(version) for name, version in base_floors().items()}
        assert {name: Version(installed[name]) for name in floors} == floors
        assert (str(floors["protobuf"]), str(floors["grpcio"])) == ("5.26.1", "1.65.5")
    else:
        assert installed["protobuf"].startswith("7."), installed["protobuf"]
    assert_classifies_and_scores(venv, server, digit_images)


def test_a_server_command_on_the_base_install_names_its_extra(base_venv: tuple[str, Venv]) -> None:
    _, venv = base_venv
    result = venv.cnnserve("serve", "--repository", "/models")
    assert result.returncode == 2
    assert "pip install 'cnnserve[serve]'" in result.stderr and "Traceback" not in result.stderr
    result = venv.cnnserve("--help")
    assert result.returncode == 0 and "cnnserve[worker]" in result.stdout


# What tritonclient.grpc does with our server: metadata, then ModelInfer with FP32 tensors and with
# encoded images (BYTES) asking for the top class (class_count). Argument: the server address, a
# .npy of preprocessed digits, the PNG paths; prints the two answers' argmaxes as JSON.
TRITON_SCRIPT = """
import json, sys
import numpy as np
import tritonclient.grpc as grpcclient

address, tensors, *pngs = sys.argv[1:]
client = grpcclient.InferenceServerClient(url=address)
assert client.is_server_live() and client.is_model_ready("lenet5")
metadata = client.get_model_metadata("lenet5")
assert [i.name for i in metadata.inputs] == ["input"], metadata

batch = np.load(tensors)
inp = grpcclient.InferInput("input", list(batch.shape), "FP32")
inp.set_data_from_numpy(batch)
result = client.infer("lenet5", [inp], outputs=[grpcclient.InferRequestedOutput("logits")])
logits = result.as_numpy("logits")

images = np.array([open(p, "rb").read() for p in pngs], dtype=object)
inp = grpcclient.InferInput("input", [len(pngs)], "BYTES")
inp.set_data_from_numpy(images)
top = client.infer(
    "lenet5", [inp], outputs=[grpcclient.InferRequestedOutput("probabilities", class_count=1)]
).as_numpy("probabilities")
client.close()
print(json.dumps({
    "fp32": logits.argmax(axis=1).tolist(),
    "bytes": [int(row[0].decode().split(":")[1]) for row in top],
}))
"""


@pytest.fixture(scope="module")
def triton_venv(tmp_path_factory: pytest.TempPathFactory, cnnserve_wheel: Path) -> Iterator[Venv]:
    root = tmp_path_factory.mktemp("venv-tritonclient")
    yield make_venv(root, cnnserve_wheel, TRITONCLIENT)
    shutil.rmtree(root, ignore_errors=True)


def test_tritonclient_and_the_client_share_one_environment(
    triton_venv: Venv, server: ServerProcess, digit_images: tuple[Path, dict[str, int]]
) -> None:
    """tritonclient 2.73 pins protobuf < 7: with stubs stamped by a protobuf 7 generator, cnnserve
    would not even import next to it (VersionError, gencode 7.35.1 runtime 6.33.x)."""
    installed = assert_base_only(triton_venv)
    assert installed["tritonclient"] == "2.73.0"
    assert installed["protobuf"].startswith("6."), installed["protobuf"]

    root, labels = digit_images
    paths = sorted(labels)
    tensors = triton_venv.workdir / "digits.npy"
    import numpy as np

    indices = [int(Path(p).stem.removeprefix("digit-")) for p in paths]
    np.save(tensors, np.stack([to_tensor(digits.render(i), DIGITS) for i in indices]))
    script = triton_venv.workdir / "triton_infer.py"
    script.write_text(TRITON_SCRIPT)
    result = triton_venv.run(triton_venv.python, script, server.address, tensors, *paths)
    assert result.returncode == 0, result.stderr
    answers = json.loads(result.stdout)
    expected = [labels[p] for p in paths]
    assert sum(a == e for a, e in zip(answers["fp32"], expected, strict=True)) >= IMAGES - 1
    assert answers["bytes"] == answers["fp32"]  # the server's preprocessing = the test's

    assert_classifies_and_scores(triton_venv, server, digit_images)
