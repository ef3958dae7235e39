"""Fuzzing a real `python -m service serve` (lenet5 trained, resnet18 random, an imported ONNX model
"imported", one gradient worker) with hypothesis: over 1,000 mutated requests on every RPC of
cnnserve.v1.Inference, the Open Inference Protocol and health, plus raw bytes as request bodies.

Requests are derived from the proto descriptors (every field of every request message, nested
messages, oneofs, maps and repeated fields), with domain strategies where random values would
never reach the interesting code: corrupt and hostile images (truncated, bit-flipped, wrong magic,
spliced, decompression bombs, huge declared dimensions), tensors of odd shapes, dtypes and sizes
with NaN/Inf, ModelInfer with mismatched raw_input_contents / contents / shape / datatype,
out-of-range enums and versions, unknown models, oversized top_k, negative numbers.

Pass criteria: no call is answered UNKNOWN or INTERNAL (nor per item in ClassifyStream or
EmbedStream), none
hangs, the server and its worker never crash, the server is SERVING afterwards, and its RSS grows
by less than RSS_GROWTH_BOUND_BYTES. The gradient caps are small, so a gradient request that passes
validation is a fraction of a second of work (one resnet18 explain, or 4 dream steps on <= 64 px).
Raw bodies that do not parse must be answered INVALID_ARGUMENT, which takes
service.frontend.interceptors.MalformedRequestInterceptor on the server (grpc.aio alone answers UNKNOWN).

REST (the OIP's HTTP binding) gets the same ModelInfer requests as JSON or with the binary tensor data
extension, mutated (junk keys and values, lying header lengths, random bodies and encodings), the
image route with the hostile images, and metadata routes with odd names: no answer may be a 500 (or
any 5xx but 503/504), every error must be a JSON `{"error": ...}`.

Hypothesis runs with derandomize=True (a fixed seed) and no shrinking: a failure is reported as the
request that was sent. The test prints how many requests each RPC got and the codes seen.
"""

from __future__ import annotations

import base64
import gzip
import io
import json
import math
import shutil
import struct
import time
import urllib.parse
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import onnx
import pytest
import requests
from google.protobuf import descriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st
from PIL import Image
from server_process import ServerProcess, module_server

from service._proto.cnnserve.v1 import inference_pb2 as pb
from service._proto.inference import grpc_predict_v2_pb2 as oip

pytestmark = pytest.mark.integration

FD = descriptor.FieldDescriptor
BAD_CODES = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL}
BAD_ITEM_CODES = {grpc.StatusCode.UNKNOWN.value[0], grpc.StatusCode.INTERNAL.value[0]}
CALL_TIMEOUT_S = 30.0
STRUCTURED_EXAMPLES = 900
RAW_EXAMPLES = 300
REST_EXAMPLES = 300
MIN_REQUESTS = 1000
# Growth of the server's VmRSS from after the warm-up to the end of the fuzzing. Measured: 10-30 MB
# over ~1,200 requests (allocator arenas of the gRPC and preprocessing threads); a leak of a
# request's buffers (up to 3.4 MB each) would exceed it within a few dozen requests.
RSS_GROWTH_BOUND_BYTES = 100 * 1024 * 1024
MAX_IMAGES = 4

SERVICES = (
    pb.DESCRIPTOR.services_by_name["Inference"],
    oip.DESCRIPTOR.services_by_name["GRPCInferenceService"],
    health_pb2.DESCRIPTOR.services_by_name["Health"],
)
METHODS: tuple[descriptor.MethodDescriptor, ...] = tuple(m for s in SERVICES for m in s.methods)


SERVER_ARGS = (
    "--max-batch-size", "4",  # the start-up warms up batch sizes 1..4 only
    "--workers", "1",
    "--torch-threads", "1",
    "--max-images-per-request", str(MAX_IMAGES),
    "--max-message-bytes", str(1024 * 1024),
    "--max-image-pixels", "1000000",
    # Gradient caps: anything admitted is small (<= 4 steps, one-image explains; images are <= 64 px).
    "--max-task-iterations", "4",
    "--max-task-image-side", "224",  # resnet18 explains take 224 px inputs
    "--max-task-batch", "2",
    "--max-task-cost", "160000",  # one resnet18 explain (224 px), not two
    "--max-task-duration-s", "20",
)  # fmt: skip


IMPORTED = "imported"


@pytest.fixture(scope="module")
def fuzz_repository(
    demo_repository: Path, tmp_path_factory: pytest.TempPathFactory, build_onnx_classifier: Callable[..., Any]
) -> Path:
    """The demo repository plus "imported": a small NHWC classifier saved with a fixed batch of 1
    (tests/conftest.py onnx_classifier), through `python -m export import` (so transposed to NCHW,
    its batch made dynamic), whose gradient RPCs answer FAILED_PRECONDITION."""
    from export.importing import import_onnx
    from export.preprocessing import Preprocessing

    base = tmp_path_factory.mktemp("fuzz")
    root = Path(shutil.copytree(demo_repository, base / "repository"))
    onnx.save_model(build_onnx_classifier(layout="NHWC", batch=1, classes=4), str(base / "user.onnx"))
    import_onnx(
        base / "user.onnx", root, name=IMPORTED, labels=["a", "b", "c", "d"],
        preprocessing=Preprocessing("RGB", 40, 32, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)),
    )  # fmt: skip
    return root


@pytest.fixture(scope="module")
def server(fuzz_repository: Path) -> Iterator[ServerProcess]:
    yield from module_server(fuzz_repository, *SERVER_ARGS)


# --- hostile images ---------------------------------------------------------------------------------


def _encode(image: Image.Image, fmt: str, **options: Any) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **options)
    return buf.getvalue()


def _png_declaring(width: int, height: int) -> bytes:
    """A 1x1 PNG whose IHDR declares width x height (CRC fixed, so only the size is a lie)."""
    data = bytearray(_encode(Image.new("L", (1, 1)), "PNG"))
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def _jpeg_declaring(jpeg: bytes, width: int, height: int) -> bytes:
    data = bytearray(jpeg)
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def _webp_declaring(webp: bytes, side: int) -> bytes:
    data = bytearray(webp)
    assert data[12:16] == b"VP8 ", "lossy WebP expected"
    data[26:30] = struct.pack("<HH", side, side)  # 14-bit width and height after the start code
    return bytes(data)


def _bases() -> dict[str, bytes]:
    rng = np.random.default_rng(0)
    rgb64 = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    gray32 = Image.fromarray(rng.integers(0, 256, (32, 32), dtype=np.uint8), "L")
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate
    jpeg = _encode(rgb64, "JPEG", quality=80)
    webp = _encode(rgb64, "WEBP", quality=80)
    return {
        "png_rgb64": _encode(rgb64, "PNG"),
        "png_gray32": _encode(gray32, "PNG"),
        "png_rgba": _encode(Image.new("RGBA", (40, 48), (1, 2, 3, 4)), "PNG"),
        "png_16bit": _encode(Image.new("I;16", (32, 32), 300), "PNG"),
        "png_palette": _encode(rgb64.convert("P"), "PNG"),
        "png_interlaced": _encode(rgb64, "PNG", interlace=1),
        "png_1x1": _encode(Image.new("RGB", (1, 1)), "PNG"),
        "jpeg_rgb64": jpeg,
        "jpeg_progressive": _encode(rgb64, "JPEG", progressive=True),
        "jpeg_cmyk": _encode(rgb64.convert("CMYK"), "JPEG"),
        "jpeg_exif_rotated": _encode(rgb64, "JPEG", exif=exif.tobytes()),
        "webp_rgb64": webp,
        "webp_lossless": _encode(rgb64, "WEBP", lossless=True),
        # Decompression bombs: a lying header, and a real 16-megapixel image of zeros (~16 KB).
        "png_declares_100k_square": _png_declaring(100_000, 100_000),
        "png_declares_2e31_wide": _png_declaring(2**31 - 1, 1),
        "png_bomb_16mp": _encode(Image.new("L", (4000, 4000)), "PNG", optimize=True),
        "jpeg_declares_65k_square": _jpeg_declaring(jpeg, 65_000, 65_000),
        "jpeg_declares_0x0": _jpeg_declaring(jpeg, 0, 0),
        "webp_declares_16k_square": _webp_declaring(webp, 0x3FFF),
        # Formats we refuse by their magic.
        "gif": _encode(rgb64.convert("P"), "GIF"),
        "bmp": _encode(rgb64, "BMP"),
        "tiff": _encode(rgb64, "TIFF"),
        "svg": b'<svg xmlns="http://www.w3.org/2000/svg" width="99999" height="99999"/>',
    }


BASES = _bases()
MAGICS = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff\xe0\x00\x10JF", b"RIFF\x00\x00\x00\x00", b"GIF89a\x00\x00")


@st.composite
def image_bytes(draw: st.DrawFn) -> bytes:
    name = draw(st.sampled_from(sorted(BASES)))
    data = bytearray(BASES[name])
    op = draw(
        st.sampled_from(["none"] * 4 + ["truncate", "bitflip", "magic", "splice", "insert", "zero_tail"])
    )
    if op == "truncate":
        del data[draw(st.integers(0, len(data) - 1)) :]
    elif op == "bitflip":
        for _ in range(draw(st.integers(1, 8))):
            data[draw(st.integers(0, len(data) - 1))] ^= 1 << draw(st.integers(0, 7))
    elif op == "magic":
        data[:8] = draw(st.sampled_from(MAGICS))
    elif op == "splice":
        other = BASES[draw(st.sampled_from(sorted(BASES)))]
        data = data[: draw(st.integers(0, len(data)))] + other[draw(st.integers(0, len(other))) :]
    elif op == "insert":
        at = draw(st.integers(0, len(data)))
        data[at:at] = draw(st.binary(min_size=1, max_size=64))
    elif op == "zero_tail":
        at = draw(st.integers(0, len(data) - 1))
        data[at:] = bytes(len(data) - at)
    return bytes(data)


any_bytes = st.one_of(image_bytes(), st.binary(max_size=256))

# --- scalar strategies --------------------------------------------------------------------------------

INT_RANGES = {
    FD.TYPE_INT32: (-(2**31), 2**31 - 1),
    FD.TYPE_SINT32: (-(2**31), 2**31 - 1),
    FD.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    FD.TYPE_INT64: (-(2**63), 2**63 - 1),
    FD.TYPE_SINT64: (-(2**63), 2**63 - 1),
    FD.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    FD.TYPE_UINT32: (0, 2**32 - 1),
    FD.TYPE_FIXED32: (0, 2**32 - 1),
    FD.TYPE_UINT64: (0, 2**64 - 1),
    FD.TYPE_FIXED64: (0, 2**64 - 1),
}
EDGE_INTS = (0, 1, -1, 2, 3, 4, 5, 9, 10, 11, 31, 32, 33, 64, 65, 224, 999, 1000, 1001, 2**31 - 1, -(2**31))
EDGE_INTS += (2**32 - 1, 2**63 - 1, -(2**63), 2**64 - 1)


def ints(lo: int, hi: int) -> st.SearchStrategy[int]:
    return st.one_of(st.sampled_from([v for v in EDGE_INTS if lo <= v <= hi]), st.integers(lo, hi))


@st.composite
def mostly(draw: st.DrawFn, good: st.SearchStrategy[Any], bad: st.SearchStrategy[Any]) -> Any:
    """`good` about 3 times in 4 (st.one_of(good, good, good, bad) would dedupe to 1 in 2), so
    enough requests get past validation into the engine and the workers."""
    return draw(good if draw(st.integers(0, 3)) != 3 else bad)


MODEL_NAMES = mostly(
    st.sampled_from(["lenet5", "resnet18", IMPORTED]),
    st.one_of(
        st.sampled_from(
            ["vgg19", "", "LENET5", "lenet5\x00", "../../etc/passwd", "model:lenet5", "x" * 300, "lenet5 "]
        ),
        st.text(max_size=12),
    ),
)
OIP_VERSIONS = mostly(
    st.sampled_from(["", "1"]),
    st.one_of(
        st.sampled_from(
            ["0", "-1", "2", "01", "1.0", " 1", "\u0663", "99999999999999999999999", "1e3", "+1"]
        ),
        st.text(max_size=6),
    ),
)
VERSIONS = mostly(st.sampled_from([0, 1]), ints(-(2**63), 2**63 - 1))
SMALL_COUNTS = mostly(st.sampled_from([0, 1, 2, 4, 5]), ints(-(2**31), 2**31 - 1))
TENSOR_DTYPES = mostly(
    st.sampled_from(["float32", "float16", "FP32", "fp16"]),
    st.one_of(
        st.sampled_from(["float64", "int8", "uint8", "bfloat16", "", "BYTES", "float32 ", "f4"]),
        st.text(max_size=8),
    ),
)
OIP_DATATYPES = mostly(
    st.sampled_from(["FP32", "FP16", "BYTES", "fp32"]),
    st.one_of(st.sampled_from(["FP64", "INT8", "UINT8", "BF16", "BOOL", "", "STRING"]), st.text(max_size=6)),
)
DREAM_LAYERS = st.one_of(
    st.sampled_from(
        ["layer3", "layer4", "features.4", "features.0", "fc", "", "layer1.0.conv1", "classifier", ".."]
    ),
    st.text(max_size=10),
)
HEALTH_SERVICES = st.one_of(
    st.sampled_from(
        ["", "cnnserve.v1.Inference", "cnnserve.v1.Inference/gradients", "model:lenet5", "model:nope"]
    ),
    st.text(max_size=10),
)

# --- tensors ------------------------------------------------------------------------------------------

TENSOR_SHAPES = mostly(
    st.sampled_from([[1, 32, 32], [1, 1, 32, 32], [3, 224, 224], [1, 3, 224, 224], [2, 3, 32, 32]]),
    st.one_of(
        st.sampled_from(
            [
                [2, 1, 32, 32], [32, 32], [], [0, 32, 32], [1, 0, 32, 32], [1, 32, 31], [3, 32, 32], [1],
                [-1, 32, 32], [1, -32, -32], [2**40, 2**40], [1, 2**31, 2**31], [2**62, 4], [1, 1, 1, 32, 32],
            ]
        ),
        st.lists(ints(-(2**63), 2**63 - 1), max_size=5),
    ),
)  # fmt: skip
FILLS = ("normal", "zeros", "huge", "nan", "inf", "-inf", "subnormal", "one_nan")
MAX_TENSOR_BYTES = 3 * 224 * 224 * 4


def _values(rng: np.random.Generator, count: int, fill: str) -> np.ndarray:
    if fill == "zeros":
        return np.zeros(count)
    if fill == "huge":
        return np.full(count, 1e30)  # finite in float32, inf in float16
    if fill in ("nan", "inf", "-inf"):
        return np.full(count, float(fill))
    if fill == "subnormal":
        return np.full(count, 1e-42)
    values = rng.standard_normal(count)
    if fill == "one_nan" and count:
        values[rng.integers(count)] = np.nan
    return values


@st.composite
def tensor_payload(draw: st.DrawFn, shape: list[int], itemsize: int, dtype: str) -> bytes:
    """Bytes for a tensor of `shape`: exactly the right size (with some fill), or not."""
    count = math.prod(shape) if shape and all(d >= 0 for d in shape) else -1
    mode = draw(st.sampled_from(["exact", "exact", "short", "long", "empty", "random"]))
    if mode in ("exact", "short", "long") and 0 <= count * itemsize <= MAX_TENSOR_BYTES:
        rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
        wire = "<f2" if itemsize == 2 else "<f4"
        with np.errstate(over="ignore"):
            data = _values(rng, count, draw(st.sampled_from(FILLS))).astype(wire).tobytes()
        if mode == "short":
            return data[: max(0, len(data) - draw(st.integers(1, 8)))]
        if mode == "long":
            return data + b"\x00" * draw(st.integers(1, 8))
        return data
    if mode == "empty":
        return b""
    return draw(st.binary(max_size=128))


@st.composite
def tensors(draw: st.DrawFn) -> pb.Tensor:
    shape = draw(TENSOR_SHAPES)
    dtype = draw(TENSOR_DTYPES)
    itemsize = 2 if "16" in dtype else 4
    return pb.Tensor(shape=shape, dtype=dtype, data=draw(tensor_payload(shape, itemsize, dtype)))


# --- ModelInfer: coherent requests with one thing wrong (or none) --------------------------------------

OIP_SHAPES = mostly(
    st.sampled_from([[1, 1, 32, 32], [2, 1, 32, 32], [1, 3, 224, 224], [1], [2], [2, 1]]),
    st.one_of(
        st.sampled_from(
            [
                [1, 2], [MAX_IMAGES + 1], [0, 1, 32, 32], [-1, 1, 32, 32], [1, 1, 32], [2**40, 1, 32, 32],
                [2**31, 2**31, 2**31, 2**31], [], [MAX_IMAGES + 1, 1, 32, 32],
            ]
        ),
        st.lists(ints(-(2**63), 2**63 - 1), max_size=5),
    ),
)  # fmt: skip


def _length_prefixed(elements: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(e)) + e for e in elements)


@st.composite
def infer_parameters(draw: st.DrawFn) -> dict[str, oip.InferParameter]:
    keys = st.one_of(
        st.sampled_from(["classification", "shared_memory_region", "binary_data", "priority"]),
        st.text(max_size=8),
    )
    values = st.one_of(
        st.builds(oip.InferParameter, int64_param=ints(-(2**63), 2**63 - 1)),
        st.builds(oip.InferParameter, bool_param=st.booleans()),
        st.builds(oip.InferParameter, string_param=st.text(max_size=8)),
        st.builds(oip.InferParameter, double_param=st.floats(allow_nan=True, allow_infinity=True)),
        st.builds(oip.InferParameter),
    )
    return draw(st.dictionaries(keys, values, max_size=2))


@st.composite
def infer_requests(draw: st.DrawFn) -> oip.ModelInferRequest:
    request = oip.ModelInferRequest(model_name=draw(MODEL_NAMES), model_version=draw(OIP_VERSIONS))
    request.id = draw(st.text(max_size=8))
    for _ in range(draw(mostly(st.just(1), st.sampled_from([0, 2])))):
        tensor = request.inputs.add(
            name=draw(mostly(st.just("input"), st.sampled_from(["", "x", "logits", "input\x00"]))),
            datatype=draw(OIP_DATATYPES),
            shape=draw(OIP_SHAPES),
        )
        for key, value in draw(mostly(st.just({}), infer_parameters())).items():
            tensor.parameters[key].CopyFrom(value)
        contents = draw(mostly(st.just("none"), st.sampled_from(["fp32", "bytes", "int", "fp32_wrong"])))
        count = math.prod(tensor.shape) if all(d >= 0 for d in tensor.shape) else -1
        if contents == "fp32" and 0 <= count <= 4096:
            rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
            tensor.contents.fp32_contents.extend(_values(rng, count, draw(st.sampled_from(FILLS))).tolist())
        elif contents == "fp32_wrong":
            tensor.contents.fp32_contents.extend(draw(st.lists(st.floats(width=32), max_size=8)))
        elif contents == "bytes":
            tensor.contents.bytes_contents.extend(draw(st.lists(any_bytes, max_size=MAX_IMAGES + 1)))
        elif contents == "int":
            tensor.contents.int_contents.extend(draw(st.lists(ints(-(2**31), 2**31 - 1), max_size=4)))
    raw = draw(
        mostly(st.sampled_from(["matching", "none"]), st.sampled_from(["images", "extra_entry", "random"]))
    )
    for tensor in request.inputs if raw in ("matching", "images") else []:
        if raw == "images" or tensor.datatype.upper() == "BYTES":
            images = draw(st.lists(any_bytes, min_size=0, max_size=MAX_IMAGES + 1))
            blob = _length_prefixed(images)
            if draw(st.booleans()):  # a lying length prefix or a cut-off blob
                blob = blob[: draw(st.integers(0, len(blob)))] if blob else struct.pack("<I", 2**31)
            request.raw_input_contents.append(blob)
        else:
            itemsize = 2 if "16" in tensor.datatype else 4
            request.raw_input_contents.append(
                draw(tensor_payload(list(tensor.shape), itemsize, tensor.datatype))
            )
    if raw == "extra_entry":
        request.raw_input_contents.extend([b"", b"\x00" * 4])
    elif raw == "random":
        request.raw_input_contents.extend(draw(st.lists(st.binary(max_size=64), max_size=2)))
    classification = st.builds(oip.InferParameter, int64_param=st.integers(1, 10)).map(
        lambda p: {"classification": p}
    )
    for _ in range(draw(mostly(st.just(0), st.integers(1, 3)))):
        output = request.outputs.add(
            name=draw(mostly(st.sampled_from(["logits", "probabilities"]), st.sampled_from(["", "softmax"])))
        )
        for key, value in draw(mostly(st.one_of(st.just({}), classification), infer_parameters())).items():
            output.parameters[key].CopyFrom(value)
    for key, value in draw(mostly(st.just({}), infer_parameters())).items():
        request.parameters[key].CopyFrom(value)
    return request


# --- REST: the same requests over HTTP ------------------------------------------------------------------

JSON_VALUES = st.recursive(
    st.one_of(st.none(), st.booleans(), ints(-(2**70), 2**70), st.floats(), st.text(max_size=6)),
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=6,
)


def _parameter_json(parameter: oip.InferParameter) -> Any:
    choice = parameter.WhichOneof("parameter_choice")
    return getattr(parameter, choice) if choice else None


@st.composite
def rest_infer_bodies(draw: st.DrawFn) -> tuple[str, bytes, dict[str, str]]:
    """A fuzzed ModelInfer as a REST call: (path, body, headers)."""
    request = draw(infer_requests())
    binary = draw(st.booleans())
    inputs, sections = [], []
    for position, tensor in enumerate(request.inputs):
        item: dict[str, Any] = {"name": tensor.name, "datatype": tensor.datatype, "shape": list(tensor.shape)}
        parameters = {k: _parameter_json(v) for k, v in tensor.parameters.items()}
        raw = request.raw_input_contents[position] if position < len(request.raw_input_contents) else None
        if binary and raw is not None:
            parameters["binary_data_size"] = len(raw)
            sections.append(raw)
        elif tensor.contents.fp32_contents:
            item["data"] = list(tensor.contents.fp32_contents)
        elif tensor.contents.bytes_contents:
            item["data"] = [{"b64": base64.b64encode(e).decode()} for e in tensor.contents.bytes_contents]
        elif raw is not None and tensor.datatype == "FP32" and len(raw) % 4 == 0:
            item["data"] = np.frombuffer(raw, "<f4").tolist()
        elif tensor.datatype in ("FP32", "FP16") and 0 <= math.prod(tensor.shape) <= 4096:
            rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
            values = _values(rng, math.prod(tensor.shape), draw(st.sampled_from(FILLS)))
            nested = draw(st.booleans())
            item["data"] = values.reshape(list(tensor.shape)).tolist() if nested else values.tolist()
        elif tensor.datatype == "BYTES":
            images = draw(st.lists(any_bytes, min_size=1, max_size=MAX_IMAGES + 1))
            item["data"] = [{"b64": base64.b64encode(e).decode()} for e in images]
        if parameters:
            item["parameters"] = parameters
        inputs.append(item)
    document: dict[str, Any] = {"inputs": inputs}
    if request.id:
        document["id"] = request.id
    outputs = [
        {"name": o.name, "parameters": {k: _parameter_json(v) for k, v in o.parameters.items()}}
        for o in request.outputs
    ]
    if outputs:
        document["outputs"] = outputs
    parameters = {k: _parameter_json(v) for k, v in request.parameters.items()}
    parameters.update(draw(mostly(st.just({}), st.dictionaries(
        st.sampled_from(["timeout", "binary_data_output", "priority"]), JSON_VALUES, max_size=2
    ))))  # fmt: skip
    if parameters:
        document["parameters"] = parameters
    mutation = draw(
        mostly(st.just("none"), st.sampled_from(["junk_key", "junk_value", "drop", "not_object"]))
    )
    if mutation == "junk_key":
        document[draw(st.text(max_size=5))] = draw(JSON_VALUES)
    elif mutation == "junk_value":
        document[draw(st.sampled_from(["inputs", "outputs", "parameters", "id"]))] = draw(JSON_VALUES)
    elif mutation == "drop":
        document.pop("inputs")
    text = (
        json.dumps(document).encode() if mutation != "not_object" else json.dumps(draw(JSON_VALUES)).encode()
    )
    headers = {"Content-Type": "application/json"}
    body = text
    if sections or draw(st.integers(0, 9)) == 0:
        body = text + b"".join(sections)
        header = len(text) + draw(mostly(st.just(0), st.integers(-len(text) - 2, 64)))
        latin1 = st.text(st.characters(max_codepoint=255, exclude_categories=("Cc",)), max_size=4)
        headers["Inference-Header-Content-Length"] = draw(mostly(st.just(str(header)), latin1))
    if draw(st.integers(0, 9)) == 0:
        encoding = draw(st.sampled_from(["gzip", "deflate", "br", "gzip, gzip", ""]))
        headers["Content-Encoding"] = encoding
        if encoding == "gzip" and draw(st.booleans()):
            body = gzip.compress(body)
    version = request.model_version
    model = urllib.parse.quote(request.model_name, safe="") or "x"
    path = f"/v2/models/{model}" + (f"/versions/{urllib.parse.quote(version, safe='')}" if version else "")
    return path + "/infer", body, headers


@st.composite
def rest_calls(draw: st.DrawFn) -> tuple[str, str, bytes, dict[str, str]]:
    """(method, path, body, headers) of one REST call."""
    kind = draw(st.sampled_from(["infer", "infer", "infer", "classify", "classify", "raw", "get"]))
    if kind == "infer":
        return ("POST", *draw(rest_infer_bodies()))
    model = urllib.parse.quote(draw(MODEL_NAMES), safe="") or "x"
    if kind == "classify":
        query = draw(st.dictionaries(
            mostly(st.sampled_from(["top_k", "timeout_ms"]), st.text(max_size=4)),
            mostly(st.sampled_from(["0", "1", "5", "1000"]), st.text(max_size=6)),
            max_size=2,
        ))  # fmt: skip
        path = f"/v2/models/{model}/classify?{urllib.parse.urlencode(query)}"
        return "POST", path, draw(any_bytes), {}
    if kind == "raw":
        route = draw(st.sampled_from(["infer", "classify", "ready", ""]))
        return "POST", f"/v2/models/{model}/{route}", draw(st.binary(max_size=256)), {}
    version = urllib.parse.quote(draw(OIP_VERSIONS), safe="")
    path = draw(st.sampled_from([
        "/v2", "/v2/health/live", "/v2/health/ready", f"/v2/models/{model}", f"/v2/models/{model}/ready",
        f"/v2/models/{model}/versions/{version or 'x'}",
        f"/v2/models/{model}/versions/{version or 'x'}/ready",
        "/v2/models", "/", "/v2/repository/index", f"/v2/models/{model}/config",
    ]))  # fmt: skip
    return draw(st.sampled_from(["GET", "GET", "HEAD", "PUT", "DELETE"])), path, b"", {}


def send_rest(
    session: requests.Session, base: str, call: tuple[str, str, bytes, dict[str, str]], tally: Tally
) -> None:
    method, path, body, headers = call
    route = _rest_route(path)
    try:
        response = session.request(method, base + path, data=body, headers=headers, timeout=CALL_TIMEOUT_S)
    except requests.RequestException as exc:
        tally.failures.append(f"{route}: {exc!r} for {method} {path} {_short(body)}")
        return
    tally.requests += 1
    tally.codes.setdefault(route, Counter())[str(response.status_code)] += 1
    status = response.status_code
    if status >= 500 and status not in (503, 504):
        tally.failures.append(f"{route}: {status} {response.text[:200]!r} for {method} {path} {_short(body)}")
    elif status >= 400 and method != "HEAD" and response.content:
        try:
            error = response.json()["error"]
        except (ValueError, KeyError, TypeError):
            tally.failures.append(f"{route}: {status} not a JSON error {response.text[:200]!r} for {path}")
        else:
            if not isinstance(error, str):
                tally.failures.append(f"{route}: {status} error {error!r} for {path}")


def valid_rest_calls() -> list[tuple[str, str, bytes, dict[str, str]]]:
    """One valid call of each REST inference form, so each reaches the engine at least once."""
    x = np.zeros((2, 1, 32, 32), np.float32)
    tensor = {"name": "input", "shape": [2, 1, 32, 32], "datatype": "FP32"}
    as_json = json.dumps({"inputs": [{**tensor, "data": x.ravel().tolist()}]}).encode()
    header = json.dumps({"inputs": [{**tensor, "parameters": {"binary_data_size": x.nbytes}}]}).encode()
    binary = {"Inference-Header-Content-Length": str(len(header))}
    return [
        ("POST", "/v2/models/lenet5/infer", as_json, {"Content-Type": "application/json"}),
        ("POST", "/v2/models/lenet5/versions/1/infer", header + x.tobytes(), binary),
        ("POST", "/v2/models/resnet18/classify?top_k=3", BASES["jpeg_rgb64"], {}),
    ]


REST_ROUTES = {"REST infer", "REST classify", "REST ready", "REST metadata", "REST other"}


def _rest_route(path: str) -> str:
    """The tally's name for a REST path: its route, or "other" (server routes, unknown paths)."""
    path = path.split("?")[0]
    if not path.startswith("/v2/models/"):
        return "REST other"
    last = path.rstrip("/").rsplit("/", 1)[-1]
    return f"REST {last}" if last in ("infer", "classify", "ready") else "REST metadata"


# --- any request message, from its descriptor -----------------------------------------------------------

# Field-level domain strategies, by field name (the same name means the same thing across messages).
BY_FIELD_NAME: dict[tuple[int, str], st.SearchStrategy[Any]] = {
    (FD.TYPE_STRING, "model"): MODEL_NAMES,
    (FD.TYPE_STRING, "name"): st.one_of(MODEL_NAMES, HEALTH_SERVICES),
    (FD.TYPE_STRING, "model_name"): MODEL_NAMES,
    (FD.TYPE_STRING, "version"): OIP_VERSIONS,
    (FD.TYPE_STRING, "model_version"): OIP_VERSIONS,
    (FD.TYPE_STRING, "service"): HEALTH_SERVICES,
    (FD.TYPE_STRING, "dtype"): TENSOR_DTYPES,
    (FD.TYPE_STRING, "datatype"): OIP_DATATYPES,
    (FD.TYPE_STRING, "layer"): DREAM_LAYERS,
    (FD.TYPE_STRING, "layers"): DREAM_LAYERS,  # FeatureMapsRequest's names
    (FD.TYPE_INT32, "channel"): mostly(st.integers(0, 600), ints(-(2**31), 2**31 - 1)),  # a neuron's
    (FD.TYPE_INT32, "y"): mostly(st.integers(0, 60), ints(-(2**31), 2**31 - 1)),
    (FD.TYPE_INT32, "x"): mostly(st.integers(0, 60), ints(-(2**31), 2**31 - 1)),
    (FD.TYPE_INT32, "max_channels"): mostly(st.sampled_from([0, 1, 16, 256, 257]), ints(-(2**31), 2**31 - 1)),
    (FD.TYPE_INT64, "version"): VERSIONS,
    (FD.TYPE_INT32, "top_k"): mostly(st.sampled_from([0, 1, 3, 5, 10]), ints(-(2**31), 2**31 - 1)),
    (FD.TYPE_INT32, "octaves"): SMALL_COUNTS,
    (FD.TYPE_INT32, "steps"): SMALL_COUNTS,
    (FD.TYPE_INT32, "iterations"): SMALL_COUNTS,
    (FD.TYPE_INT32, "max_side"): mostly(st.sampled_from([0, 32, 48, 64]), ints(-(2**31), 2**31 - 1)),
    (FD.TYPE_INT32, "target_classes"): mostly(st.integers(0, 9), ints(-(2**31), 2**31 - 1)),
}
# Only resnet18 offers the gradient RPCs here (the demo lenet5 has no explain/dream capability).
GRADIENT_MODEL = mostly(st.just("resnet18"), MODEL_NAMES)
BY_FIELD: dict[str, st.SearchStrategy[Any]] = {
    "cnnserve.v1.ExplainRequest.model": GRADIENT_MODEL,
    "cnnserve.v1.DreamRequest.model": GRADIENT_MODEL,
    "cnnserve.v1.FeatureMapsRequest.model": GRADIENT_MODEL,
    "cnnserve.v1.FiltersRequest.model": GRADIENT_MODEL,
}
# Always present (their empty values are among their strategies' values): an absent model name
# stops a request at the first check.
ALWAYS_SET = frozenset({"model", "model_name"})
BY_MESSAGE: dict[str, st.SearchStrategy[Any]] = {
    "cnnserve.v1.Tensor": tensors(),
    "inference.InferParameter": infer_parameters().map(
        lambda d: next(iter(d.values()), oip.InferParameter())
    ),
}


def scalar(field: descriptor.FieldDescriptor) -> st.SearchStrategy[Any]:
    special = BY_FIELD.get(field.full_name, BY_FIELD_NAME.get((field.type, field.name)))
    if special is not None:
        return special
    if field.type in INT_RANGES:
        return ints(*INT_RANGES[field.type])
    if field.type == FD.TYPE_DOUBLE:
        return st.one_of(st.sampled_from([0.0, -1.0, 1.0, 1e308, -1e-308]), st.floats())
    if field.type == FD.TYPE_FLOAT:
        return st.floats(width=32)
    if field.type == FD.TYPE_BOOL:
        return st.booleans()
    if field.type == FD.TYPE_ENUM:  # proto3 enums are open: unknown numbers reach the server
        return st.one_of(
            st.sampled_from([v.number for v in field.enum_type.values]), ints(-(2**31), 2**31 - 1)
        )
    if field.type == FD.TYPE_STRING:
        return st.text(max_size=12)
    if field.type == FD.TYPE_BYTES:
        return any_bytes
    raise AssertionError(f"no strategy for {field.full_name}")


def value_of(field: descriptor.FieldDescriptor, depth: int) -> st.SearchStrategy[Any]:
    if field.type == FD.TYPE_MESSAGE:
        return messages(field.message_type, depth + 1)
    return scalar(field)


@st.composite
def messages(draw: st.DrawFn, desc: descriptor.Descriptor, depth: int = 0) -> Message:
    if desc.full_name in BY_MESSAGE:
        return draw(BY_MESSAGE[desc.full_name])
    if desc.full_name == "inference.ModelInferRequest" and draw(st.integers(0, 3)) != 3:
        return draw(infer_requests())
    message = GetMessageClass(desc)()
    if depth > 4:
        return message
    chosen_oneof_member = {
        oneof.name: draw(st.sampled_from([*oneof.fields, None]))
        for oneof in desc.oneofs
        if len(oneof.fields) > 1
    }
    for field in desc.fields:
        oneof = field.containing_oneof
        if oneof is not None and len(oneof.fields) > 1 and chosen_oneof_member[oneof.name] is not field:
            continue
        if field.name not in ALWAYS_SET and draw(st.integers(0, 3)) == 3:  # unset: empty fields too
            continue
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            key_field, value_field = (
                field.message_type.fields_by_name["key"],
                field.message_type.fields_by_name["value"],
            )
            entries = draw(st.dictionaries(scalar(key_field), value_of(value_field, depth), max_size=2))
            target = getattr(message, field.name)
            for key, value in entries.items():
                if value_field.type == FD.TYPE_MESSAGE:
                    target[key].CopyFrom(value)
                else:
                    target[key] = value
        elif field.is_repeated:
            limit = MAX_IMAGES + 1 if field.type == FD.TYPE_MESSAGE else 5
            values = draw(st.lists(value_of(field, depth), max_size=limit))
            getattr(message, field.name).extend(values)
        elif field.type == FD.TYPE_MESSAGE:
            getattr(message, field.name).CopyFrom(draw(value_of(field, depth)))
        else:
            setattr(message, field.name, draw(value_of(field, depth)))
    return message


@st.composite
def calls(draw: st.DrawFn) -> tuple[descriptor.MethodDescriptor, Any]:
    """(method, request): a list of request messages for client-streaming methods."""
    method = draw(st.sampled_from(METHODS))
    if method.client_streaming:
        return method, draw(st.lists(messages(method.input_type), max_size=4))
    return method, draw(messages(method.input_type))


@st.composite
def raw_calls(draw: st.DrawFn) -> tuple[descriptor.MethodDescriptor, bytes]:
    """(method, body): random bytes, or a generated request's wire bytes mutated."""
    method = draw(st.sampled_from(METHODS))
    if draw(st.booleans()):
        return method, draw(st.binary(min_size=1, max_size=512))
    data = bytearray(draw(messages(method.input_type)).SerializeToString())
    if not data:
        return method, b"\xff"
    for _ in range(draw(st.integers(1, 4))):
        data[draw(st.integers(0, len(data) - 1))] ^= 1 << draw(st.integers(0, 7))
    if draw(st.booleans()):
        del data[draw(st.integers(0, len(data) - 1)) :]
    return method, bytes(data) or b"\xff"


def _method(path: str) -> descriptor.MethodDescriptor:
    service, name = path.split("/")
    return next(m for m in METHODS if m.containing_service.full_name == service and m.name == name)


def valid_calls() -> list[tuple[descriptor.MethodDescriptor, Any]]:
    """Explicit examples: one well-formed request per deep path, so every run computes something on
    every RPC (the generated requests mostly stop at a check)."""
    gray = pb.ImageInput(encoded=BASES["png_gray32"])
    rgb = pb.ImageInput(encoded=BASES["png_rgb64"])
    zeros = np.zeros((1, 32, 32), np.float32).tobytes()
    lenet_tensor = pb.ImageInput(tensor=pb.Tensor(shape=[1, 1, 32, 32], dtype="float32", data=zeros))
    raw = np.random.default_rng(0).standard_normal((2, 1, 32, 32)).astype("<f4").tobytes()
    infer_raw = oip.ModelInferRequest(
        model_name="lenet5",
        inputs=[oip.ModelInferRequest.InferInputTensor(name="input", datatype="FP32", shape=[2, 1, 32, 32])],
        raw_input_contents=[raw],
    )
    infer_images = oip.ModelInferRequest(
        model_name="resnet18",
        model_version="1",
        inputs=[oip.ModelInferRequest.InferInputTensor(name="input", datatype="BYTES", shape=[2, 1])],
        raw_input_contents=[_length_prefixed([BASES["jpeg_rgb64"], BASES["webp_rgb64"]])],
        outputs=[
            oip.ModelInferRequest.InferRequestedOutputTensor(
                name="probabilities", parameters={"classification": oip.InferParameter(int64_param=3)}
            )
        ],
    )
    infer_imported = oip.ModelInferRequest(
        model_name=IMPORTED,
        inputs=[oip.ModelInferRequest.InferInputTensor(name="input", datatype="FP32", shape=[3, 3, 32, 32])],
        raw_input_contents=[np.random.default_rng(1).standard_normal((3, 3, 32, 32)).astype("<f4").tobytes()],
    )
    infer_features = oip.ModelInferRequest()
    infer_features.CopyFrom(infer_raw)
    infer_features.outputs.add(name="features")
    infer_features.outputs.add(name="logits")
    dream = pb.DreamRequest(
        model="resnet18",
        image=rgb,
        layers=[pb.DreamLayer(layer="layer2", weight=2.0, channels=[0, 5])],
        octaves=2,  # 64 px and 46 px
        steps=2,
        preview_every=1,
    )
    stylize = pb.StylizeRequest(
        model="resnet18", content=rgb, styles=[pb.StyleImage(image=rgb)], iterations=2
    )
    return [
        (_method("cnnserve.v1.Inference/Classify"), pb.ClassifyRequest(model="lenet5", image=gray, top_k=3)),
        (
            _method("cnnserve.v1.Inference/ClassifyBatch"),
            pb.ClassifyBatchRequest(model="lenet5", images=[gray, lenet_tensor, gray], top_k=10),
        ),
        (
            _method("cnnserve.v1.Inference/ClassifyStream"),
            [
                pb.ClassifyStreamRequest(id="a", request=pb.ClassifyRequest(model="resnet18", image=rgb)),
                pb.ClassifyStreamRequest(
                    id="b", request=pb.ClassifyRequest(model="lenet5", image=lenet_tensor)
                ),
                pb.ClassifyStreamRequest(id="c"),
            ],
        ),
        (
            _method("cnnserve.v1.Inference/Embed"),
            pb.EmbedRequest(model="resnet18", image=rgb, normalize=True, top_k=3),
        ),
        (
            _method("cnnserve.v1.Inference/EmbedStream"),
            [
                pb.EmbedStreamRequest(id="a", request=pb.EmbedRequest(model="resnet18", image=rgb)),
                pb.EmbedStreamRequest(
                    id="b", request=pb.EmbedRequest(model="lenet5", image=lenet_tensor, top_k=2)
                ),
                pb.EmbedStreamRequest(id="c"),
            ],
        ),
        (_method("cnnserve.v1.Inference/GetModel"), pb.GetModelRequest(name="resnet18", include_labels=True)),
        (
            _method("cnnserve.v1.Inference/Explain"),
            pb.ExplainRequest(
                model="resnet18", images=[rgb], target_classes=[3], method=pb.EXPLAIN_METHOD_GUIDED_GRADCAM
            ),
        ),
        (
            _method("cnnserve.v1.Inference/Explain"),
            pb.ExplainRequest(model="resnet18", images=[rgb], include_plain_gradient=True),
        ),
        (
            _method("cnnserve.v1.Inference/Explain"),
            pb.ExplainRequest(
                model="resnet18", images=[rgb], neuron=pb.NeuronTarget(layer="layer2", channel=3, y=1, x=2)
            ),
        ),
        (
            _method("cnnserve.v1.Inference/FeatureMaps"),
            pb.FeatureMapsRequest(model="resnet18", image=rgb, layers=["layer3", "fc"], max_channels=4),
        ),
        (
            _method("cnnserve.v1.Inference/Filters"),
            pb.FiltersRequest(model="resnet18", layer="layer1.0.conv1"),
        ),
        (_method("cnnserve.v1.Inference/Dream"), dream),
        (_method("cnnserve.v1.Inference/DreamUnary"), dream),
        (_method("cnnserve.v1.Inference/Stylize"), stylize),
        (_method("cnnserve.v1.Inference/StylizeUnary"), stylize),
        (_method("inference.GRPCInferenceService/ModelInfer"), infer_raw),
        (_method("inference.GRPCInferenceService/ModelInfer"), infer_images),
        (_method("inference.GRPCInferenceService/ModelInfer"), infer_features),
        (_method("inference.GRPCInferenceService/ModelInfer"), infer_imported),
        (_method("cnnserve.v1.Inference/Classify"), pb.ClassifyRequest(model=IMPORTED, image=rgb, top_k=4)),
        # The imported model's refusals: FAILED_PRECONDITION, never INTERNAL.
        (_method("cnnserve.v1.Inference/Explain"), pb.ExplainRequest(model=IMPORTED, images=[rgb])),
        (_method("cnnserve.v1.Inference/Embed"), pb.EmbedRequest(model=IMPORTED, image=rgb)),
        (_method("cnnserve.v1.Inference/Dream"), pb.DreamRequest(model=IMPORTED, image=rgb)),
        (_method("inference.GRPCInferenceService/ModelMetadata"), oip.ModelMetadataRequest(name="resnet18")),
        (
            _method("inference.GRPCInferenceService/ModelReady"),
            oip.ModelReadyRequest(name="lenet5", version="1"),
        ),
        (_method("grpc.health.v1.Health/Check"), health_pb2.HealthCheckRequest(service="model:lenet5")),
        (_method("grpc.health.v1.Health/Watch"), health_pb2.HealthCheckRequest(service="")),
    ]


# --- sending ------------------------------------------------------------------------------------------


class Tally:
    """Codes seen per RPC, and every call that broke the rules."""

    def __init__(self) -> None:
        self.codes: dict[str, Counter[str]] = {}
        self.failures: list[str] = []
        self.requests = 0

    def record(self, rpc: str, code: grpc.StatusCode, details: str, request: Any) -> None:
        self.requests += 1
        self.codes.setdefault(rpc, Counter())[code.name] += 1
        if code in BAD_CODES or code == grpc.StatusCode.DEADLINE_EXCEEDED:
            self.failures.append(f"{rpc}: {code.name} {details!r} for {_short(request)}")

    def item_failure(self, rpc: str, status: pb.Status, request: Any) -> None:
        self.failures.append(f"{rpc} item: code {status.code} {status.message!r} for {_short(request)}")

    def summary(self) -> str:
        lines = [f"fuzz: {self.requests} requests, {len(self.failures)} failures"]
        for rpc in sorted(self.codes):
            counts = ", ".join(f"{name} {n}" for name, n in self.codes[rpc].most_common())
            lines.append(f"  {rpc:<52} {sum(self.codes[rpc].values()):>4}  {counts}")
        return "\n".join(lines)


def _short(request: Any, limit: int = 200) -> str:
    text = repr(request if isinstance(request, bytes) else str(request))
    return text if len(text) <= limit else text[:limit] + "..."


def _path(method: descriptor.MethodDescriptor) -> str:
    return f"/{method.containing_service.full_name}/{method.name}"


def send(
    channel: grpc.Channel, method: descriptor.MethodDescriptor, request: Any, tally: Tally, raw: bool
) -> None:
    """One call with the method's own arity; `raw`: request is the body's bytes (identity serializers)."""
    rpc = _path(method)[1:] + (" (raw bytes)" if raw else "")
    out_cls = GetMessageClass(method.output_type)
    serialize = None if raw else (lambda m: m.SerializeToString())
    deserialize = out_cls.FromString
    code, details = grpc.StatusCode.OK, ""
    try:
        if method.client_streaming:
            call = channel.stream_stream(
                _path(method), request_serializer=serialize, response_deserializer=deserialize
            )
            items = [request] if raw else request
            for response in call(iter(items), timeout=CALL_TIMEOUT_S):
                if response.WhichOneof("outcome") == "error" and response.error.code in BAD_ITEM_CODES:
                    tally.item_failure(rpc, response.error, request)
        elif method.server_streaming:
            call = channel.unary_stream(
                _path(method), request_serializer=serialize, response_deserializer=deserialize
            )
            stream = call(request, timeout=CALL_TIMEOUT_S)
            for _ in stream:
                if method.name == "Watch":  # never ends by itself: one answer is the answer
                    stream.cancel()
                    break
        else:
            call = channel.unary_unary(
                _path(method), request_serializer=serialize, response_deserializer=deserialize
            )
            call(request, timeout=CALL_TIMEOUT_S)
    except grpc.RpcError as exc:
        code, details = exc.code(), exc.details() or ""
        if method.name == "Watch" and code == grpc.StatusCode.CANCELLED and "Locally cancelled" in details:
            code, details = grpc.StatusCode.OK, ""
    tally.record(rpc, code, details, request)


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def _health(server: ServerProcess, service: str) -> int:
    stub = health_pb2_grpc.HealthStub(server.channel)
    return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status


def _warm_up(server: ServerProcess, tally: Tally) -> None:
    """Every code path once with valid requests, so the RSS baseline includes lazily built state."""
    channel = server.channel
    lenet = pb.ImageInput(tensor=pb.Tensor(shape=[1, 32, 32], dtype="float32", data=bytes(4 * 32 * 32)))
    warm = [
        ("Classify", pb.ClassifyRequest(model="lenet5", image=lenet)),
        ("Classify", pb.ClassifyRequest(model="resnet18", image=pb.ImageInput(encoded=BASES["jpeg_rgb64"]))),
        ("ClassifyBatch", pb.ClassifyBatchRequest(model="lenet5", images=[lenet, lenet])),
        ("Classify", pb.ClassifyRequest(model=IMPORTED, image=pb.ImageInput(encoded=BASES["webp_rgb64"]))),
        ("Embed", pb.EmbedRequest(model="resnet18", image=pb.ImageInput(encoded=BASES["jpeg_rgb64"]))),
        ("Explain", pb.ExplainRequest(model="resnet18", images=[pb.ImageInput(encoded=BASES["png_rgb64"])])),
        (
            "DreamUnary",
            pb.DreamRequest(
                model="resnet18", image=pb.ImageInput(encoded=BASES["png_rgb64"]), octaves=1, steps=2
            ),
        ),
    ]
    methods = {m.name: m for m in SERVICES[0].methods}
    for _ in range(3):
        for name, request in warm:
            send(channel, methods[name], request, tally, raw=False)
    assert not tally.failures, tally.failures
    assert all(set(codes) == {"OK"} for codes in tally.codes.values()), tally.summary()


def test_fuzzed_requests_on_every_rpc(server: ServerProcess) -> None:
    _fuzz_every_rpc(server, rss_bytes)


@pytest.fixture(scope="module")
def frontends_server(demo_repository: Path) -> Iterator[ServerProcess]:
    yield from module_server(demo_repository, *SERVER_ARGS, "--frontends", "2")


def tree_rss_bytes(pid: int) -> int:
    """VmRSS of `pid` and every descendant (the supervisor of `serve --frontends N` and its children)."""
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return rss_bytes(pid) + sum(tree_rss_bytes(int(child)) for child in children)


@pytest.mark.slow
def test_fuzzed_requests_on_every_rpc_with_two_frontends(frontends_server: ServerProcess) -> None:
    """The same hostile requests under `serve --frontends 2`: frontends in front of the engine
    process and the gradient process (RSS: the whole process tree)."""
    _fuzz_every_rpc(frontends_server, tree_rss_bytes)


def _fuzz_every_rpc(server: ServerProcess, rss: Callable[[int], int]) -> None:
    deadline = time.monotonic() + 120
    while _health(server, "cnnserve.v1.Inference/gradients") != health_pb2.HealthCheckResponse.SERVING:
        assert time.monotonic() < deadline, f"gradient worker not SERVING:\n{server.log}"
        time.sleep(0.2)
    _warm_up(server, Tally())
    pid = server.process.pid
    rss_before = rss(pid)
    restarts_before = server.sample("cnnserve_worker_restarts_total")
    tally = Tally()
    channel = server.new_channel()
    fuzz = settings(
        max_examples=STRUCTURED_EXAMPLES,
        derandomize=True,
        database=None,
        deadline=None,
        phases=(Phase.explicit, Phase.generate),  # report the failing calls as sent; no shrinking
        # The "slowness" is the server's work, and the examples are large by design.
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.large_base_example,
            HealthCheck.filter_too_much,
        ],
    )

    def send_structured(call: tuple[descriptor.MethodDescriptor, Any]) -> None:
        send(channel, *call, tally, raw=False)

    structured = fuzz(given(calls())(send_structured))
    for call in valid_calls():
        structured = example(call)(structured)

    @settings(fuzz, max_examples=RAW_EXAMPLES)
    @given(raw_calls())
    def raw_bodies(call: tuple[descriptor.MethodDescriptor, bytes]) -> None:
        send(channel, *call, tally, raw=True)

    rest = Tally()
    session = requests.Session()
    base = f"http://{server.http_address}"

    @settings(fuzz, max_examples=REST_EXAMPLES)
    @given(rest_calls())
    def rest_calls_(call: tuple[str, str, bytes, dict[str, str]]) -> None:
        send_rest(session, base, call, rest)

    for call in valid_rest_calls():
        rest_calls_ = example(call)(rest_calls_)

    started = time.monotonic()
    try:
        structured()
        raw_bodies()
        rest_calls_()
    finally:
        channel.close()
        session.close()
        print(f"\n{tally.summary()}\n{rest.summary()}\nin {time.monotonic() - started:.1f} s")
    rss_after = rss(pid)
    print(f"server VmRSS {rss_before / 2**20:.0f} MiB -> {rss_after / 2**20:.0f} MiB")

    assert not tally.failures, "\n".join(tally.failures[:20])
    assert not rest.failures, "\n".join(rest.failures[:20])
    assert tally.requests >= MIN_REQUESTS
    assert rest.requests >= REST_EXAMPLES and set(rest.codes) == REST_ROUTES
    assert rest.codes["REST infer"]["200"] >= 2 and rest.codes["REST classify"]["200"] >= 1
    assert {rpc.split(" ")[0] for rpc in tally.codes} == {_path(m)[1:] for m in METHODS}  # every RPC
    assert server.process.poll() is None, f"the server died:\n{server.log[-4000:]}"
    assert server.sample("cnnserve_worker_restarts_total") == restarts_before, "a gradient worker crashed"
    for service in (
        "",
        "cnnserve.v1.Inference",
        "inference.GRPCInferenceService",
        "cnnserve.v1.Inference/gradients",
    ):
        assert _health(server, service) == health_pb2.HealthCheckResponse.SERVING, service
    assert rss_after - rss_before < RSS_GROWTH_BOUND_BYTES
