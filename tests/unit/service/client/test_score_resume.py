"""`cnnserve score` resuming an output: a row counts only for the model (and pinned version) it was
scored with, and a path is the same path however it was typed; error rows say what was asked for.
Against an in-process fake Inference server."""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest

from service._proto.cnnserve.v1 import inference_pb2 as pb
from service._proto.cnnserve.v1 import inference_pb2_grpc as pb_grpc
from service.cli import main
from service.client import score


class EchoInference(pb_grpc.InferenceServicer):
    """Answers each item with the model asked for, version 1 for "the latest"; "bad*" images are
    INVALID_ARGUMENT. Counts the items it answered."""

    def __init__(self) -> None:
        self.items = 0

    def ClassifyStream(self, request_iterator, context):  # type: ignore[no-untyped-def]
        for item in request_iterator:
            self.items += 1
            request = item.request
            if request.image.encoded.startswith(b"bad"):
                yield pb.ClassifyStreamResponse(id=item.id, error=pb.Status(code=3, message="not an image"))
                continue
            result = pb.ClassifyResponse(
                model=request.model, version=request.version or 1, classes=[pb.ClassScore(index=1)]
            )
            yield pb.ClassifyStreamResponse(id=item.id, result=result)


@pytest.fixture
def fake() -> Iterator[tuple[str, EchoInference]]:
    servicer = EchoInference()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    pb_grpc.add_InferenceServicer_to_server(servicer, server)  # type: ignore[no-untyped-call]
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}", servicer
    server.stop(None)


@pytest.fixture
def digits(tmp_path: Path) -> Path:
    """tmp/scoreset/digits with 3 images."""
    folder = tmp_path / "scoreset" / "digits"
    folder.mkdir(parents=True)
    for i in range(3):
        (folder / f"{i}.png").write_bytes(b"png %d" % i)
    return folder


def rows(path: Path) -> list[dict]:  # type: ignore[type-arg]
    return [json.loads(line) for line in path.read_text().splitlines()]


def run(address: str, *args: str) -> int:
    return main(["score", "--address", address, "--quiet", *args])


# --- the model -----------------------------------------------------------------------------------


def test_an_output_of_another_model_is_refused_and_left_alone(
    fake: tuple[str, EchoInference], digits: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    address, servicer = fake
    out = tmp_path / "scores.jsonl"
    assert run(address, str(digits), "--model", "lenet5", "--output", str(out)) == 0
    out.write_text(out.read_text() + '{"path": "half a ro')  # a killed run's partial row
    before = out.read_bytes()
    capsys.readouterr()
    assert run(address, str(digits), "--model", "resnet18", "--output", str(out)) == 2
    err = capsys.readouterr().err
    assert "holds rows of model lenet5, and this run asks for resnet18" in err and str(out) in err
    assert out.read_bytes() == before and servicer.items == 3  # nothing scored, nothing repaired


def test_a_pinned_version_must_match_the_rows(
    fake: tuple[str, EchoInference], digits: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    address, servicer = fake
    out = tmp_path / "scores.csv"
    assert run(address, str(digits), "--model", "lenet5", "--version", "2", "--output", str(out)) == 0
    capsys.readouterr()
    assert run(address, str(digits), "--model", "lenet5", "--version", "3", "--output", str(out)) == 2
    assert "rows of lenet5 version 2, and this run asks for version 3" in capsys.readouterr().err
    # The same version, or "the latest" (each row records the version that answered): resumed.
    for version in ("2", "0"):
        assert run(address, str(digits), "--model", "lenet5", "--version", version, "--output", str(out)) == 0
        assert "scored 0, failed 0, skipped 3" in capsys.readouterr().err
    assert servicer.items == 3


def test_error_rows_carry_the_model_and_version_asked_for(
    fake: tuple[str, EchoInference], tmp_path: Path
) -> None:
    address, _ = fake
    (tmp_path / "bad.png").write_bytes(b"bad image")
    listing = tmp_path / "list.txt"
    listing.write_text(f"{tmp_path / 'bad.png'}\n{tmp_path / 'missing.png'}\n")
    out = tmp_path / "scores.jsonl"
    assert run(address, f"@{listing}", "--model", "lenet5", "--version", "4", "--output", str(out)) == 1
    found = {Path(r["path"]).name: r for r in rows(out)}
    assert found["bad.png"]["error"] == "INVALID_ARGUMENT: not an image"
    assert found["missing.png"]["error"].startswith("NOT_FOUND: ")
    assert all((r["model"], r["version"]) == ("lenet5", 4) for r in found.values())


# --- the paths -----------------------------------------------------------------------------------


def test_the_same_images_typed_two_ways_are_scored_once(
    fake: tuple[str, EchoInference], digits: Path, tmp_path: Path,
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """The issue's case: the set scored as /abs/scoreset/digits, then from inside scoreset as
    `digits` (and as `./digits/../digits/`): one row per image, written as its absolute path."""
    address, servicer = fake
    out = tmp_path / "scores.csv"
    assert run(address, str(digits), "--model", "lenet5", "--output", str(out)) == 0
    monkeypatch.chdir(digits.parent)
    capsys.readouterr()
    for spelling in ("digits", "./digits/../digits/", "digits/*.png"):
        assert run(address, spelling, "--model", "lenet5", "--output", str(out)) == 0
        assert "scored 0, failed 0, skipped 3" in capsys.readouterr().err, spelling
    lines = out.read_text().splitlines()
    assert len(lines) == 1 + 3 and servicer.items == 3
    assert sorted(line.split(",")[0] for line in lines[1:]) == [str(digits / f"{i}.png") for i in range(3)]


def test_relative_rows_of_an_older_version_resume_from_the_same_directory(
    fake: tuple[str, EchoInference], digits: Path, tmp_path: Path,
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """An output written before paths were normalised holds them as typed (here `digits/0.png`
    run from scoreset, the same image typed absolute, and an error row without model or version):
    rerun from that directory, its rows count; the new rows are absolute; nothing is scored twice."""
    address, servicer = fake
    out = tmp_path / "old.jsonl"
    legacy = [
        score.make_row("digits/0.png", model="lenet5", version=1),
        score.make_row(str(digits / "0.png"), model="lenet5", version=1),
        score.make_row("./digits/1.png", error="INTERNAL: boom"),  # old error rows: model "", version 0
    ]
    out.write_text("".join(score.format_row(r, "jsonl") for r in legacy))
    monkeypatch.chdir(digits.parent)
    assert run(address, str(digits), "--model", "lenet5", "--output", str(out)) == 1  # the old error row
    assert servicer.items == 1
    assert [r["path"] for r in rows(out)][3:] == [str(digits / "2.png")]
    # The notes are for whoever wonders why rows were (or were not) matched.
    capsys.readouterr()
    assert main(["score", "--address", address, str(digits), "--model", "lenet5", "--output", str(out)]) == 1
    err = capsys.readouterr().err
    assert f"2 rows of {out} name relative paths" in err
    assert f"{out} holds several rows for 1 path(s); each counts once" in err
