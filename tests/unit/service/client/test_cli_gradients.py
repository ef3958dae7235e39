"""`cnnserve explain`, `dream` and `stylize` against a recording fake servicer: the PNG they write,
what they print (text and --json), their progress, their exit statuses, the output file they
refuse to replace, and SIGINT. (Stylize needs a VGG-19, absent from the integration tests' demo
repository: this fake is its only command-line coverage.)"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from gradient_fake import STEPS, RecordingInference, png, serve
from PIL import Image

from service import cli
from service._proto.cnnserve.v1 import inference_pb2 as pb
from service.client import gradient_commands

ROOT = Path(__file__).resolve().parents[4]
HINT = "is cnnserve serving gRPC at {}? (the metrics port is not the gRPC port)"


@pytest.fixture(scope="module")
def fake() -> Iterator[tuple[RecordingInference, str]]:
    servicer = RecordingInference()
    server, address = serve(servicer)
    yield servicer, address
    server.stop(None)


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "in.png"
    path.write_bytes(png(32))
    return path


def _opened(path: Path) -> Image.Image:
    with Image.open(path) as opened:
        opened.load()
        assert opened.format == "PNG"
        return opened


def test_explain_writes_the_png_and_prints_the_classes(
    fake: tuple[RecordingInference, str], image: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    servicer, address = fake
    out = tmp_path / "saliency.png"
    argv = [
        "explain",
        str(image),
        "--model",
        "resnet18",
        "--target",
        "7",
        "--method",
        "gradcam",
        "-o",
        str(out),
    ]
    assert cli.main([*argv, "--address", address]) == 0
    request = servicer.requests["Explain"][-1]
    assert isinstance(request, pb.ExplainRequest)
    assert list(request.target_classes) == [7] and request.method == pb.EXPLAIN_METHOD_GRADCAM
    assert request.images[0].encoded == image.read_bytes()
    assert _opened(out).size == (8, 8)
    assert oct(out.stat().st_mode & 0o777) == oct(0o666 & ~_umask())  # not mkstemp's 0600
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"{out}: gradcam saliency of {image} (resnet18 v4)"
    assert lines[1] == "  explained: class 7 (index 7, p 0.2500)"
    assert lines[2] == "  predicted: three (index 3, p 0.5000)"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp file left


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_explain_a_neuron_as_json(
    fake: tuple[RecordingInference, str], image: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    servicer, address = fake
    out = tmp_path / "n.png"
    argv = ["explain", str(image), "--model", "m", "--neuron", "layer4:12:3,5", "-o", str(out), "--json"]
    assert cli.main([*argv, "--address", address]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["explained"] is None and record["predicted"]["label"] == "three"
    assert record["neuron"] == {
        "layer": "layer4", "channel": 12, "y": 3, "x": 5, "activation": 2.5, "field": [0, 1, 10, 11],
    }  # fmt: skip
    assert record["saliency_shape"] == [3, 4, 5] and record["output"] == str(out) and out.exists()
    # Usage errors: a malformed neuron, or a neuron and a target together.
    for bad in (["--neuron", "layer4"], ["--neuron", "layer4:1", "--target", "3"]):
        with pytest.raises(SystemExit) as info:
            cli.main(["explain", str(image), "--model", "m", "-o", str(tmp_path / "x.png"), *bad])
        assert info.value.code == 2
    assert "LAYER:CHANNEL" in capsys.readouterr().err


def test_dream_shows_progress_lines_off_a_terminal_and_a_summary(
    fake: tuple[RecordingInference, str], image: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    servicer, address = fake
    out = tmp_path / "dream.png"
    argv = ["dream", str(image), "--model", "resnet18", "--layer", "layer3", "--layer", "layer4",
            "--octaves", "2", "--steps", "3", "--seed", "9", "--max-side", "64", "-o", str(out),
            "--progress-interval", "0"]  # fmt: skip
    assert cli.main([*argv, "--address", address]) == 0
    request = servicer.requests["Dream"][-1]
    assert isinstance(request, pb.DreamRequest)
    assert [la.layer for la in request.layers] == ["layer3", "layer4"]
    assert (request.octaves, request.steps, request.seed, request.max_side) == (2, 3, 9, 64)
    assert not request.HasField("jitter")  # unset options: the server's defaults
    assert _opened(out).size == (16, 16)
    captured = capsys.readouterr()
    progress = [line for line in captured.err.splitlines() if line.startswith("dream: step")]
    assert progress == [f"dream: step {s}/{STEPS} octave 1 objective {s}" for s in range(1, STEPS + 1)]
    assert captured.out.strip() == (
        f"{out}: 16x16 dream of {image} (resnet18 v2, layer3, layer4): {STEPS} steps, objective 1 -> 9, 1.5 s"
    )


def test_dream_progress_is_a_bar_on_a_terminal_and_json_is_quiet(
    fake: tuple[RecordingInference, str], image: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, address = fake
    terminal = _Terminal()
    bar = gradient_commands.StepProgress("dream", quiet=False, interval_s=5.0, stream=terminal)
    for step in range(1, STEPS + 1):
        bar(gradient_commands.GradientProgress(step, STEPS, 1, {"objective": float(step)}))
    bar.close()
    assert f"{STEPS}/{STEPS}" in terminal.getvalue() and "\r" in terminal.getvalue()

    out = tmp_path / "d.png"
    assert (
        cli.main(["dream", str(image), "--model", "m", "-o", str(out), "--json", "--address", address]) == 0
    )
    captured = capsys.readouterr()
    record = json.loads(captured.out)
    assert (record["width"], record["steps"], record["layers"]) == (16, STEPS, [
        {"layer": "layer3", "weight": 1.0, "channels": []}])  # fmt: skip
    assert "step" not in captured.err


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_stylize_sends_content_and_styles(
    fake: tuple[RecordingInference, str], image: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    servicer, address = fake
    style = tmp_path / "style.png"
    style.write_bytes(png(20, 3))
    out = tmp_path / "styled.png"
    argv = ["stylize", str(image), str(style), str(style), "--iterations", "40", "--max-side", "256",
            "--optimizer", "adam", "-o", str(out), "--quiet", "--address", address]  # fmt: skip
    assert cli.main(argv) == 0
    request = servicer.requests["Stylize"][-1]
    assert isinstance(request, pb.StylizeRequest)
    assert (request.model, request.iterations, request.max_side) == ("vgg19", 40, 256)
    assert request.optimizer == pb.STYLE_OPTIMIZER_ADAM and request.content.encoded == image.read_bytes()
    assert [s.image.encoded for s in request.styles] == [style.read_bytes()] * 2
    assert _opened(out).size == (12, 12)
    captured = capsys.readouterr()
    assert captured.err == ""  # --quiet
    assert captured.out.startswith(f"{out}: 12x12 {image} in the style of {style}, {style} (vgg19 v1)")
    assert "4 iterations (best 3), loss 8 -> 1" in captured.out

    out2 = tmp_path / "styled2.png"
    assert cli.main(["stylize", str(image), str(style), "-o", str(out2), "--json", "--address", address]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["losses"] == {"total": 1.0, "style": 0.5} and record["best_iteration"] == 3


def test_an_existing_output_is_refused_before_the_call_unless_forced(
    fake: tuple[RecordingInference, str], image: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    servicer, address = fake
    out = tmp_path / "keep.png"
    out.write_bytes(b"an earlier result")
    calls = len(servicer.requests.get("Dream", []))
    assert cli.main(["dream", str(image), "--model", "m", "-o", str(out), "--address", address]) == 2
    assert f"cnnserve dream: {out} exists; pass --force to replace it" in capsys.readouterr().err
    assert out.read_bytes() == b"an earlier result" and len(servicer.requests["Dream"]) == calls
    argv = ["dream", str(image), "--model", "m", "-o", str(out), "--force", "--quiet", "--address", address]
    assert cli.main(argv) == 0
    assert _opened(out).size == (16, 16)
    assert cli.main(["explain", str(image), "--model", "m", "-o", str(tmp_path), "--address", address]) == 2
    assert "is a directory" in capsys.readouterr().err


def test_a_missing_image_and_a_server_error_exit_1(
    fake: tuple[RecordingInference, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, address = fake
    out = tmp_path / "o.png"
    missing = tmp_path / "missing.png"
    for command in ("explain", "dream"):
        assert cli.main([command, str(missing), "--model", "m", "-o", str(out), "--address", address]) == 1
        assert f"cnnserve {command}: {missing}: error: No such file or directory" in capsys.readouterr().err
    assert cli.main(["stylize", str(missing), str(missing), "-o", str(out), "--address", address]) == 1
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"bad")
    assert cli.main(["dream", str(bad), "--model", "m", "-o", str(out), "--address", address]) == 1
    assert "cnnserve dream: INVALID_ARGUMENT: cannot decode the image" in capsys.readouterr().err
    good = tmp_path / "good.png"
    good.write_bytes(png())
    assert cli.main(["explain", str(good), "--model", "missing", "-o", str(out), "--address", address]) == 1
    err = capsys.readouterr().err
    assert "cnnserve explain: NOT_FOUND: unknown model 'missing'" in err and "is cnnserve serving" not in err
    assert not out.exists()


@pytest.mark.parametrize("command", ["explain", "dream", "stylize"])
def test_an_unreachable_server_exits_2_with_the_hint(
    command: str, image: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    address = "127.0.0.1:1"
    images = [str(image), str(image)] if command == "stylize" else [str(image), "--model", "m"]
    out = tmp_path / "o.png"
    assert cli.main([command, *images, "-o", str(out), "--address", address, "--timeout", "5"]) == 2
    err = capsys.readouterr().err
    assert f"cnnserve {command}: UNAVAILABLE" in err and HINT.format(address) in err
    assert not out.exists()


def test_sigint_cancels_the_job_and_exits_130_without_a_traceback(
    fake: tuple[RecordingInference, str], image: Path, tmp_path: Path
) -> None:
    servicer, address = fake
    servicer.hang, servicer.cancelled = True, threading.Event()
    out = tmp_path / "o.png"
    argv = [
        "dream",
        str(image),
        "--model",
        "m",
        "-o",
        str(out),
        "--address",
        address,
        "--progress-interval",
        "0",
    ]
    try:
        with subprocess.Popen(
            [sys.executable, "-c", "import sys; from service.cli import main; sys.exit(main(sys.argv[1:]))",
             *argv],
            cwd=ROOT, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)},
        ) as proc:  # fmt: skip
            assert proc.stderr is not None
            first = proc.stderr.readline()
            assert first.startswith("dream: step 1/"), first
            proc.send_signal(signal.SIGINT)
            rest = proc.stderr.read()
            assert proc.wait(timeout=30) == 130
    finally:
        servicer.hang = False
    assert "Traceback" not in rest and "interrupted; the job was cancelled, nothing written" in rest
    assert servicer.cancelled.wait(5), "the server never saw the call cancelled"
    assert not out.exists()


def test_help_names_the_new_commands_and_their_exit_statuses() -> None:
    text = cli.build_parser().format_help()
    for command in ("explain", "dream", "stylize"):
        assert command in text
    assert "exit status (explain, dream, stylize)" in text


def test_untrained_weights_are_said_in_text_and_json(
    fake: tuple[RecordingInference, str], image: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, address = fake
    warning = "untrained demo weights: answers are meaningless"
    argv = ["dream", str(image), "--model", "untrained-resnet", "-o", str(tmp_path / "d.png"), "--quiet"]
    assert cli.main([*argv, "--address", address]) == 0
    assert f"({warning})" in capsys.readouterr().out
    argv = ["explain", str(image), "--model", "untrained-resnet", "-o", str(tmp_path / "e.png"), "--json"]
    assert cli.main([*argv, "--address", address]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["untrained"] is True and record["warning"] == warning
    argv = ["stylize", str(image), str(image), "--model", "vgg19", "-o", str(tmp_path / "s.png"), "--quiet"]
    assert cli.main([*argv, "--address", address]) == 0
    assert warning not in capsys.readouterr().out  # trained weights: nothing said
