"""bench.batch_shapes runs a real session at steady and changing batch sizes (padded or not)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from bench import batch_shapes


def _linear_model(path: Path) -> Path:
    w = np.random.default_rng(0).standard_normal((3 * 4 * 4, 5)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Flatten", ["input"], ["flat"], axis=1),
            helper.make_node("MatMul", ["flat", "W"], ["logits"]),
        ],
        "linear",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 4, 4])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 5])],
        [numpy_helper.from_array(w, "W")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9)
    path.write_bytes(model.SerializeToString())
    return path


@pytest.mark.parametrize("fixed", [False, True])
def test_prints_steady_and_changing_batch_times(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], fixed: bool
) -> None:
    model = _linear_model(tmp_path / "model.onnx")
    batch_shapes.main([str(model), "--threads", "0", "--rounds", "1", *(["--fixed-batch"] if fixed else [])])
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"{model} on CPUExecutionProvider")
    assert ("(fixed batch 16)" in out[0]) is fixed
    assert len(out) == 2 and out[1].startswith(" 0 preprocessing threads: always 8 ")
    assert "sizes 1..16 in turn" in out[1] and "8/9 alternating" in out[1]


def test_median_skips_the_first_runs() -> None:
    class Clocked:
        def __init__(self) -> None:
            self.sizes: list[int] = []

        def run(self, x: np.ndarray) -> np.ndarray:
            self.sizes.append(len(x))
            return x

    session = Clocked()
    inputs = {n: np.zeros((n, 1)) for n in (1, 2)}
    assert batch_shapes.median_run_s(session, [1, 2, 1, 2, 1, 2], inputs) >= 0  # type: ignore[arg-type]
    assert session.sizes == [1, 2, 1, 2, 1, 2]
