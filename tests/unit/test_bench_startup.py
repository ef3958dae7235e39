"""`python -m bench --parts startup` reads the server's start-up log lines (issue 13)."""

from __future__ import annotations

import pytest

from bench.startup import parse_startup_log

# As `python -m service serve --log-format text --workers 1` prints them (two models, one of which
# fails to load), with the lines around them that must not be mistaken for them.
LOG = """\
2025-01-01T10:00:00.100Z INFO service.frontend.server: listening grpc=127.0.0.1:40001 metrics=127.0.0.1:40002
2025-01-01T10:00:00.200Z INFO service.engine.engine: execution provider: CPUExecutionProvider (no CUDA)
2025-01-01T10:00:00.700Z INFO service.engine.engine: loaded lenet5:1 on CPUExecutionProvider in 0.41 s \
(warm-up of batch sizes 1,2,4,8,16: 0.12 s)
2025-01-01T10:00:01.000Z ERROR service.engine.engine: not serving googlenet:3: model.onnx sha256 differs
2025-01-01T10:00:09.000Z INFO service.engine.engine: loaded vgg19:2 on CPUExecutionProvider in 7.95 s \
(warm-up of batch sizes 1,2,4,8,16: 5.50 s)
2025-01-01T10:00:09.100Z INFO service.frontend.server: ready in 8.90s: serving lenet5:1 \
(CPUExecutionProvider), vgg19:2 (CPUExecutionProvider)
2025-01-01T10:00:09.200Z INFO service.worker.supervisor: gradient worker 0 (pid 123) ready in 6.1 s
2025-01-01T10:00:15.250Z INFO service.worker.supervisor: 1 gradient workers ready in 6.1 s
2025-01-01T10:00:15.300Z INFO service.frontend.server: gradient workers ready in 6.20s: 1 worker(s)
"""


def test_load_and_ready_lines() -> None:
    parsed = parse_startup_log(LOG.splitlines())
    assert [(m.name, m.version, m.provider) for m in parsed.loads] == [
        ("lenet5", 1, "CPUExecutionProvider"),
        ("vgg19", 2, "CPUExecutionProvider"),
    ]
    assert [m.line for m in parsed.loads] == [2, 4]  # where to look up when each was printed
    assert parsed.load_s == pytest.approx(0.41 + 7.95)
    assert parsed.warm_up_s == pytest.approx(0.12 + 5.50)
    assert parsed.ready_s == pytest.approx(8.90)
    # The server's line, not the supervisor's or one worker's `ready in 6.1 s`.
    assert parsed.workers_ready_s == pytest.approx(6.20)
    assert not parsed.workers_failed
    assert parsed.not_serving == ["googlenet:3: model.onnx sha256 differs"]


def test_a_model_without_warm_up_and_failed_workers() -> None:
    lines = [
        "x INFO service.engine.engine: loaded resnet50:1 on CUDAExecutionProvider in 2.50 s "
        "(warm-up of batch sizes none: 0.00 s)",
        "x INFO service.engine.engine: loaded resnet18:1 on CPUExecutionProvider in 1.50 s "
        "(verify 0.10 s, session 0.30 s, ONNX Runtime graph cache off; warm-up of batch sizes 1,16: 1.00 s)",
        "x ERROR service.frontend.server: the gradient workers failed to start; gradient RPCs are"
        " UNAVAILABLE",
    ]
    parsed = parse_startup_log(lines)
    assert [(m.name, m.provider, m.load_s, m.warm_up_s) for m in parsed.loads] == [
        ("resnet50", "CUDAExecutionProvider", 2.5, 0.0),
        ("resnet18", "CPUExecutionProvider", 1.5, 1.0),
    ]
    assert parsed.workers_failed
    assert parsed.ready_s is None and parsed.workers_ready_s is None


def test_no_start_up_lines() -> None:
    parsed = parse_startup_log(["Traceback (most recent call last):", "OSError: address in use"])
    assert parsed.loads == [] and parsed.load_s == 0.0 and parsed.ready_s is None
