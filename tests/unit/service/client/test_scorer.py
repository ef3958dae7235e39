"""service.client.score without a real model: path collection, sharding, resume parsing, and the
retry/reconnect logic against an in-process fake Inference server."""

from __future__ import annotations

import http.server
import json
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest

from service._proto.cnnserve.v1 import inference_pb2 as pb
from service._proto.cnnserve.v1 import inference_pb2_grpc as pb_grpc
from service.cli import build_parser, main
from service.client import score
from service.client.score import scorer


def touch(path: Path, data: bytes = b"x") -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return str(path)


def test_collect_paths_directories_globs_lists_sorted_and_unique(tmp_path: Path) -> None:
    a = touch(tmp_path / "d" / "b" / "a.PNG")
    b = touch(tmp_path / "d" / "a.jpg")
    touch(tmp_path / "d" / "readme.txt")
    c = touch(tmp_path / "e" / "c.webp")
    explicit = touch(tmp_path / "odd.bin")
    listing = tmp_path / "list.txt"
    listing.write_text(f"# comment\n{c}\n\n{b}\n")
    paths = score.collect_paths(
        [str(tmp_path / "d"), str(tmp_path / "e" / "*.webp"), explicit, f"@{listing}"], [str(listing)]
    )
    assert paths == sorted({a, b, c, explicit})
    with pytest.raises(FileNotFoundError):
        score.collect_paths([str(tmp_path / "missing")])


@pytest.mark.parametrize("count", [1, 2, 3, 8])
def test_shards_partition_exactly(count: int) -> None:
    paths = [f"img{i:03d}.png" for i in range(41)]
    random.Random(0).shuffle(paths)
    shards = [score.shard_paths(paths, i, count) for i in range(count)]
    assert sorted(p for s in shards for p in s) == sorted(paths)
    assert max(map(len, shards)) - min(map(len, shards)) <= 1
    assert score.shard_paths(paths, 0, count) == score.shard_paths(list(reversed(paths)), 0, count)


@pytest.mark.parametrize("text", ["3", "8/8", "-1/8", "a/b", "1/0", "1/2/3"])
def test_bad_shards_are_refused(text: str) -> None:
    with pytest.raises(ValueError):
        score.parse_shard(text)
    assert score.parse_shard("3/8") == (3, 8)


def test_the_batch_job_command_line_parses() -> None:
    args = build_parser().parse_args(
        ["score", "/data/input", "--address=cnnserve:8500", "--model=resnet50", "--shard=3/8",
         "--output=/data/output/scores-3-of-8.jsonl"]
    )  # fmt: skip
    assert (args.inputs, args.shard, args.window) == (["/data/input"], "3/8", 64)


def test_read_existing_cuts_a_partial_last_line_and_reads_rows(tmp_path: Path) -> None:
    out = tmp_path / "s.jsonl"
    rows = [
        score.make_row("/d/a.png", model="m", version=1),
        score.make_row("/d/b.png", error="INTERNAL: x\ny"),
    ]
    out.write_text("".join(score.format_row(r, "jsonl") for r in rows) + '{"path": "c.p')
    existing = score.read_existing(str(out), "jsonl")
    assert (existing.ok, existing.failed, existing.truncated_bytes) == ({"/d/a.png"}, {"/d/b.png"}, 13)
    assert out.read_text().count("\n") == 2 and out.read_text().endswith("\n")
    assert json.loads(out.read_text().splitlines()[1])["error"] == "INTERNAL: x y"  # one line
    # --retry-failed drops the error rows.
    existing = score.read_existing(str(out), "jsonl", drop_failed=True)
    assert existing.failed == set() and [json.loads(x)["path"] for x in out.read_text().splitlines()] == [
        "/d/a.png"
    ]


def test_read_existing_csv_and_refuses_a_foreign_file(tmp_path: Path) -> None:
    out = tmp_path / "s.csv"
    row = score.make_row('/d/we,ird "name".png', model="m", version=2)
    out.write_text(score.csv_header() + score.format_row(row, "csv") + "half,a,ro")
    existing = score.read_existing(str(out), "csv")
    assert existing.ok == {'/d/we,ird "name".png'} and existing.truncated_bytes == 9
    out.write_text("something,else\n")
    with pytest.raises(ValueError, match="not a `cnnserve score` CSV"):
        score.read_existing(str(out), "csv")
    bad = tmp_path / "bad.jsonl"
    bad.write_text("not json\n")
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        score.read_existing(str(bad), "jsonl")


def test_output_format_and_backoff() -> None:
    assert score.output_format("x.CSV", None) == "csv"
    assert score.output_format("x.csv", "jsonl") == "jsonl"
    assert score.output_format("-", None) == "jsonl"
    rng = random.Random(1)
    delays = [score.backoff_s(a, rng) for a in range(1, 12)]
    assert 0.05 <= delays[0] <= 0.1 and max(delays) <= scorer.BACKOFF_MAX_S
    assert delays[4] > delays[0]


# --- against a fake server ---------------------------------------------------------------------


class FlakyInference(pb_grpc.InferenceServicer):
    """Answers RESOURCE_EXHAUSTED to the first try of every image and UNAVAILABLE to the second of
    'b*' images; the first stream breaks (UNAVAILABLE) after 3 answers; 'bad*' is INVALID_ARGUMENT."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.seen: dict[bytes, int] = {}
        self.streams = 0

    def ClassifyStream(self, request_iterator, context):  # type: ignore[no-untyped-def]
        with self.lock:
            self.streams += 1
            stream = self.streams
        answered = 0
        for item in request_iterator:
            data = item.request.image.encoded
            with self.lock:
                self.seen[data] = tries = self.seen.get(data, 0) + 1
            if stream == 1 and answered == 3:
                context.abort(grpc.StatusCode.UNAVAILABLE, "connection reset")
            answered += 1
            if data.startswith(b"bad"):
                yield pb.ClassifyStreamResponse(id=item.id, error=pb.Status(code=3, message="not an image"))
            elif tries == 1:
                yield pb.ClassifyStreamResponse(id=item.id, error=pb.Status(code=8, message="queue full"))
            elif tries == 2 and data.startswith(b"b"):
                yield pb.ClassifyStreamResponse(id=item.id, error=pb.Status(code=14, message="draining"))
            else:
                classes = [pb.ClassScore(index=len(data), label=data.decode(), probability=0.9)]
                result = pb.ClassifyResponse(model=item.request.model, version=7, classes=classes)
                yield pb.ClassifyStreamResponse(id=item.id, result=result)


@pytest.fixture
def fake() -> Iterator[tuple[str, FlakyInference]]:
    servicer = FlakyInference()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    pb_grpc.add_InferenceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}", servicer
    server.stop(None)


def test_retries_reconnects_and_resumes_against_a_flaky_server(
    fake: tuple[str, FlakyInference], tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    monkeypatch.setattr(scorer, "BACKOFF_INITIAL_S", 0.01)
    address, servicer = fake
    names = ["a1", "a2", "b1", "b2", "c1", "c2", "c3", "bad1"]
    for name in names:
        touch(tmp_path / "in" / f"{name}.png", name.encode())
    out = tmp_path / "out.jsonl"
    argv = ["score", str(tmp_path / "in"), "--address", address, "--model", "m", "--output", str(out),
            "--window", "3", "--progress-interval", "0"]  # fmt: skip
    assert main(argv) == 1  # bad1 failed
    err = capsys.readouterr().err
    rows = {r["path"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert len(rows) == len(out.read_text().splitlines()) == len(names)
    for name in names:
        row = rows[str(tmp_path / "in" / f"{name}.png")]
        if name == "bad1":
            assert row["error"] == "INVALID_ARGUMENT: not an image"
        else:
            assert row["error"] == "" and row["version"] == 7 and row["classes"][0]["label"] == name
    assert servicer.streams >= 2
    assert "reconnects" in err and "scored 7, failed 1" in err and "img/s" in err

    # Too few attempts: the RESOURCE_EXHAUSTED answer becomes the row.
    out2 = tmp_path / "out2.jsonl"
    touch(tmp_path / "in2" / "z.png", b"zz")
    argv2 = ["score", str(tmp_path / "in2"), "--address", address, "--model", "m", "--output", str(out2)]
    assert main([*argv2, "--max-attempts", "1", "--quiet"]) == 1
    (row,) = map(json.loads, out2.read_text().splitlines())
    assert row["error"] == "RESOURCE_EXHAUSTED: queue full"


@pytest.fixture
def http1_address() -> Iterator[str]:
    """A plain HTTP/1.1 server, as the metrics port is."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("where", ["closed port", "metrics port"])
@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_an_unreachable_server_gives_up_with_status_2_a_hint_and_no_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
    http1_address: str, where: str, fmt: str,
) -> None:  # fmt: skip
    monkeypatch.setattr(scorer, "BACKOFF_INITIAL_S", 0.01)
    address = "127.0.0.1:1" if where == "closed port" else http1_address
    touch(tmp_path / "a.png")
    out = tmp_path / "sub" / f"o.{fmt}"
    status = main(["score", str(tmp_path / "a.png"), "--address", address, "--model", "m",
                   "--output", str(out), "--max-attempts", "2", "--quiet"])  # fmt: skip
    assert status == 2
    err = capsys.readouterr().err
    assert "UNAVAILABLE" in err
    assert f"is cnnserve serving gRPC at {address}? (the metrics port is not the gRPC port)" in err
    assert not out.exists() and not out.parent.exists()


def test_a_finished_run_over_nothing_new_still_leaves_its_output(tmp_path: Path) -> None:
    """No answer needed (every path already done, or none given): the output still exists."""
    (tmp_path / "empty").mkdir()
    out = tmp_path / "o.csv"
    argv = ["score", str(tmp_path / "empty"), "--address", "127.0.0.1:1", "--model", "m", "--quiet"]
    assert main([*argv, "--output", str(out)]) == 0
    assert out.read_text() == score.csv_header()


class SlowInference(pb_grpc.InferenceServicer):
    def ClassifyStream(self, request_iterator, context):  # type: ignore[no-untyped-def]
        for item in request_iterator:
            time.sleep(0.02)
            result = pb.ClassifyResponse(
                model="m", version=1, classes=[pb.ClassScore(index=1, probability=1)]
            )
            yield pb.ClassifyStreamResponse(id=item.id, result=result)


def test_sigterm_keeps_every_written_row_and_a_rerun_finishes(tmp_path: Path) -> None:
    """A real `cnnserve score` process stopped with SIGTERM mid-run: exit 143, only whole rows;
    the rerun scores the rest."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    pb_grpc.add_InferenceServicer_to_server(SlowInference(), server)
    address = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
    server.start()
    try:
        for i in range(200):
            touch(tmp_path / "in" / f"{i:03d}.png")
        out = tmp_path / "out.csv"
        argv = ["score", str(tmp_path / "in"), "--address", address, "--model", "m", "--output", str(out)]
        root = Path(__file__).resolve().parents[4]
        process = subprocess.Popen(
            [sys.executable, "-m", "service", *argv, "--quiet"], cwd=root, stderr=subprocess.PIPE, text=True
        )
        deadline = time.monotonic() + 60
        while (not out.exists() or out.read_text().count("\n") < 10) and time.monotonic() < deadline:
            time.sleep(0.05)
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=30)
        assert process.returncode == 128 + signal.SIGTERM, err
        text = out.read_text()
        assert text.endswith("\n") and 10 <= text.count("\n") < 201
        # The summary, and what to do next; no traceback.
        assert (
            "cnnserve score: scored " in err and "stopped by SIGTERM; rerun the same command to resume" in err
        )
        assert "Traceback" not in err
        assert main([*argv, "--quiet"]) == 0
        rows = out.read_text().splitlines()
        assert rows[0] == score.csv_header().strip()
        assert sorted(r.split(",")[0] for r in rows[1:]) == sorted(
            str(p) for p in (tmp_path / "in").iterdir()
        )
    finally:
        server.stop(None)


def test_a_reader_closing_standard_output_ends_the_run_quietly(tmp_path: Path) -> None:
    """`cnnserve score DIR | head -3`: exit 141 (as a tool killed by SIGPIPE), no traceback, and no
    "Exception ignored ... BrokenPipeError" from Python's flush of stdout at exit."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    pb_grpc.add_InferenceServicer_to_server(SlowInference(), server)
    address = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
    server.start()
    try:
        for i in range(200):
            touch(tmp_path / "in" / f"{i:03d}.png")
        root = Path(__file__).resolve().parents[4]
        argv = ["score", str(tmp_path / "in"), "--address", address, "--model", "m", "--quiet"]
        process = subprocess.Popen(
            [sys.executable, "-m", "service", *argv],
            cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip
        assert process.stdout is not None and process.stderr is not None
        lines = [process.stdout.readline() for _ in range(3)]
        process.stdout.close()  # what `head -3` does
        with process.stderr:
            err = process.stderr.read().decode()
        process.wait(timeout=30)
        assert all(json.loads(line)["error"] == "" for line in lines)
        assert process.returncode == 128 + signal.SIGPIPE, err
        assert "Traceback" not in err and "BrokenPipeError" not in err and "Exception ignored" not in err
    finally:
        server.stop(None)
