"""The REST examples of docs/API.md ("Open Inference Protocol over REST"), run as written against
the shared server: the bash ones with curl, the Python ones with this project's interpreter, the
tritonclient one in a venv of its own holding only `tritonclient[http]`. The one change made to
them is the address: `localhost:8000` becomes the test server's REST port."""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from server_process import ROOT, ServerProcess, clean_env

from service._proto.inference import grpc_predict_v2_pb2 as pb
from service._proto.inference import grpc_predict_v2_pb2_grpc as pb_grpc

pytestmark = pytest.mark.integration

EXAMPLE = re.compile(r"<!-- rest-example(?P<tag> \w+)? -->\n```(?P<lang>\w+)\n(?P<code>.*?)```", re.S)


def examples() -> list[tuple[str, str, str]]:
    text = (ROOT / "docs" / "API.md").read_text()
    found = [(m["lang"], (m["tag"] or "").strip(), m["code"]) for m in EXAMPLE.finditer(text)]
    assert len(found) == 4, "docs/API.md's REST examples moved; update this test"
    return found


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    pixels = (np.random.default_rng(0).random((120, 160, 3)) * 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG")
    (tmp_path / "cat.jpg").write_bytes(buffer.getvalue())
    return tmp_path


def run(command: list[str], code: str, server: ServerProcess, cwd: Path) -> str:
    code = code.replace("localhost:8000", server.http_address)
    result = subprocess.run(
        [*command, code], cwd=cwd, env=clean_env(), capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, f"{command[0]} example failed:\n{code}\n{result.stdout}\n{result.stderr}"
    return result.stdout


@pytest.mark.parametrize("index", range(4))
def test_the_rest_examples_run_as_documented(
    index: int, server: ServerProcess, workdir: Path, request: pytest.FixtureRequest
) -> None:
    lang, tag, code = examples()[index]
    if lang == "bash":
        out = run(["bash", "-euo", "pipefail", "-c"], code, server, workdir)
    elif tag == "tritonclient":
        python = request.getfixturevalue("tritonclient_python")
        out = run([str(python), "-c"], code, server, workdir)
        assert out.split() == ["(2,", "10)", "(2,", "10)"]
        return
    else:
        out = run([sys.executable, "-c"], code, server, workdir)
    assert "error" not in out, out
    if "classify?top_k=3" in code:
        assert out.startswith("200\n") and '"classes":[' in out and '"untrained":true' in out
    if "classification" in code:
        assert re.search(r"\d\.\d+:\d+:", out), out


TRITON_SCRIPT = """
import json, sys
import numpy as np
import tritonclient.http as http
from tritonclient.utils import InferenceServerException

client = http.InferenceServerClient(sys.argv[1])
out = {"live": client.is_server_live(), "unknown_ready": client.is_model_ready("nope")}
out["extensions"] = client.get_server_metadata()["extensions"]
image = open("cat.jpg", "rb").read()
tensor = http.InferInput("input", [2], "BYTES")
tensor.set_data_from_numpy(np.array([image, image], dtype=object))
wanted = [http.InferRequestedOutput("probabilities", class_count=2), http.InferRequestedOutput("features")]
result = client.infer("resnet18", [tensor], outputs=wanted, request_id="r7")
out["top"] = [e.decode() for e in result.as_numpy("probabilities").ravel()]
out["features"] = list(result.as_numpy("features").shape)
out["id"] = result.get_response()["id"]
out["parameters"] = result.get_response()["parameters"]
x = np.random.default_rng(0).random((3, 1, 32, 32), dtype=np.float32)
tensor = http.InferInput("input", [3, 1, 32, 32], "FP32")
tensor.set_data_from_numpy(x)
result = client.infer(
    "lenet5", [tensor], request_compression_algorithm="gzip", response_compression_algorithm="deflate"
)
out["logits"] = result.as_numpy("logits").tolist()
try:
    bad = http.InferInput("input", [1, 1, 31, 32], "FP32").set_data_from_numpy(x[:1, :, :31])
    client.infer("lenet5", [bad])
except InferenceServerException as e:
    out["error"] = [e.status(), e.message()]
print(json.dumps(out))
"""


def test_tritonclient_http_images_compression_and_errors(
    server: ServerProcess, workdir: Path, tritonclient_python: Path
) -> None:
    """What a Triton user's client does beyond the doc's example: BYTES images with the
    classification extension, the features output, gzip/deflate, and an error's status."""
    result = subprocess.run(
        [str(tritonclient_python), "-c", TRITON_SCRIPT, server.http_address],
        cwd=workdir, env=clean_env(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["live"] is True and out["unknown_ready"] is False
    assert "binary_tensor_data" in out["extensions"]
    assert len(out["top"]) == 4 and out["features"] == [2, 512] and out["id"] == "r7"
    assert out["top"][:2] == out["top"][2:]  # the same image twice
    assert out["parameters"]["untrained"] is True
    assert out["error"][0] == "400" and "expected shape" in out["error"][1]
    x = np.random.default_rng(0).random((3, 1, 32, 32), dtype=np.float32)
    request = pb.ModelInferRequest(model_name="lenet5")
    request.inputs.add(name="input", datatype="FP32", shape=[3, 1, 32, 32])
    request.outputs.add(name="logits")
    request.raw_input_contents.append(x.tobytes())
    response = pb_grpc.GRPCInferenceServiceStub(server.channel).ModelInfer(request, timeout=60)
    expected = np.frombuffer(response.raw_output_contents[0], "<f4").reshape(3, 10)
    np.testing.assert_allclose(np.asarray(out["logits"]), expected, rtol=1e-6, atol=1e-6)
