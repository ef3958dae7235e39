"""`cnnserve score` against real servers: a directory of rendered held-out digits scored by LeNet-5
into JSONL and CSV, resuming after an interruption, a corrupt image, shards, and retries when the
server's queue is full. The command runs in-process (service.cli.main), as the CLI would."""

from __future__ import annotations

import csv
import json
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from server_process import ServerProcess, module_server

from export import digits
from service._proto.cnnserve.v1 import inference_pb2 as pb
from service._proto.cnnserve.v1 import inference_pb2_grpc as pb_grpc
from service.cli import main
from service.client.score import scorer

pytestmark = pytest.mark.integration

COUNT = 50


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, int]]:
    """COUNT held-out digits as PNGs in nested directories, and path -> true label."""
    root = tmp_path_factory.mktemp("digits")
    labels = {}
    for n, index in enumerate(int(i) for i in digits.split_indices()[1][:COUNT]):
        path = root / f"batch{n % 3}" / f"digit-{index:04d}.png"
        path.parent.mkdir(exist_ok=True)
        digits.render(index).save(path, "PNG")
        labels[str(path)] = digits.label(index)
    (root / "notes.txt").write_text("not an image")
    return root, labels


def score(server: ServerProcess, *args: str) -> int:
    return main(["score", "--address", server.address, "--model", "lenet5", "--quiet", *args])


def jsonl(path: Path) -> list[dict]:  # type: ignore[type-arg]
    return [json.loads(line) for line in path.read_text().splitlines()]


def assert_correct(rows: list[dict], labels: dict[str, int]) -> None:  # type: ignore[type-arg]
    assert sorted(r["path"] for r in rows) == sorted(labels)  # every image once, nothing else
    assert all(r["error"] == "" and r["model"] == "lenet5" and r["version"] == 1 for r in rows)
    correct = sum(r["classes"][0]["index"] == labels[r["path"]] for r in rows)
    assert correct >= 0.9 * len(rows)


def test_scores_a_directory_to_jsonl_and_csv(
    server: ServerProcess,
    images: tuple[Path, dict[str, int]],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    root, labels = images
    out = tmp_path / "scores.jsonl"
    assert score(server, str(root), "--output", str(out), "--top-k", "3") == 0
    rows = jsonl(out)
    assert_correct(rows, labels)
    assert all(len(r["classes"]) == 3 and r["classes"][0]["label"] for r in rows)
    assert f"scored {COUNT}, failed 0, skipped 0" in capsys.readouterr().err

    out_csv = tmp_path / "scores.csv"
    assert score(server, str(root / "**" / "*.png"), "--output", str(out_csv)) == 0
    with out_csv.open(newline="") as f:
        records = list(csv.DictReader(f))
    assert len(records) == COUNT
    assert sum(int(r["index"]) == labels[r["path"]] for r in records) >= 0.9 * COUNT
    assert all(r["error"] == "" and len(json.loads(r["classes"])) == 5 for r in records)


def test_resume_after_an_interruption_neither_loses_nor_duplicates(
    server: ServerProcess,
    images: tuple[Path, dict[str, int]],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    root, labels = images
    for name in ("scores.jsonl", "scores.csv"):
        out = tmp_path / name
        assert score(server, str(root), "--output", str(out)) == 0
        lines = out.read_text().splitlines(keepends=True)
        # Killed mid-run: the last 12 rows never written, the one before half written.
        out.write_text("".join(lines[:-12]) + lines[-12][: len(lines[-12]) // 2])
        capsys.readouterr()
        assert score(server, str(root), "--output", str(out)) == 0
        err = capsys.readouterr().err
        assert f"scored 12, failed 0, skipped {COUNT - 12}" in err
        if name.endswith(".jsonl"):
            assert_correct(jsonl(out), labels)
        else:
            with out.open(newline="") as f:
                assert sorted(r["path"] for r in csv.DictReader(f)) == sorted(labels)
        # A third run has nothing to do.
        assert score(server, str(root), "--output", str(out)) == 0
        assert f"scored 0, failed 0, skipped {COUNT}" in capsys.readouterr().err


def test_a_corrupt_image_gets_an_error_row_and_exit_status_1(
    server: ServerProcess,
    images: tuple[Path, dict[str, int]],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    root, labels = images
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    good = sorted(labels)[:5]
    listing = tmp_path / "list.txt"
    listing.write_text("\n".join([*good, str(corrupt)]) + "\n")
    out = tmp_path / "scores.jsonl"
    assert score(server, f"@{listing}", "--output", str(out)) == 1
    rows = {r["path"]: r for r in jsonl(out)}
    assert sorted(rows) == sorted([*good, str(corrupt)])
    assert rows[str(corrupt)]["error"].startswith("INVALID_ARGUMENT: ")
    assert rows[str(corrupt)]["classes"] == []
    assert "scored 5, failed 1" in capsys.readouterr().err
    # Rerunning skips it and still reports the failure; --retry-failed replaces its row.
    assert score(server, "--list", str(listing), "--output", str(out)) == 1
    assert len(jsonl(out)) == 6
    corrupt.write_bytes((root / Path(good[0]).relative_to(root)).read_bytes())
    assert score(server, "--list", str(listing), "--output", str(out), "--retry-failed") == 0
    rows = {r["path"]: r for r in jsonl(out)}
    assert len(rows) == len(jsonl(out)) == 6 and all(r["error"] == "" for r in rows.values())


def test_shards_partition_the_set(
    server: ServerProcess, images: tuple[Path, dict[str, int]], tmp_path: Path
) -> None:
    root, labels = images
    outs = [tmp_path / f"scores-{i}-of-2.jsonl" for i in range(2)]
    for i, out in enumerate(outs):
        assert score(server, str(root), f"--shard={i}/2", f"--output={out}") == 0
    first, second = ({r["path"] for r in jsonl(out)} for out in outs)
    assert not first & second
    assert first | second == set(labels)
    assert abs(len(first) - len(second)) <= 1


# --- retries on a full queue -------------------------------------------------------------------


@pytest.fixture(scope="module")
def busy_server(demo_repository: Path) -> Iterator[ServerProcess]:
    """resnet18 one image at a time, one image may wait: concurrent load fills the queue."""
    yield from module_server(
        demo_repository,
        "--models", "resnet18",
        "--max-batch-size", "1",
        "--max-queue-size", "1",
        "--max-queue-delay-s", "0",
        "--intra-op-threads", "1",
    )  # fmt: skip


def test_retries_resource_exhausted_until_everything_is_scored(
    busy_server: ServerProcess,
    images: tuple[Path, dict[str, int]],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _, labels = images
    monkeypatch.setattr(scorer, "BACKOFF_MAX_S", 0.5)  # the test's patience, not production's
    stop = threading.Event()
    rng = np.random.default_rng(0)
    tensor = rng.standard_normal((3, 224, 224)).astype(np.float32)
    request = pb.ClassifyRequest(
        model="resnet18",
        image=pb.ImageInput(tensor=pb.Tensor(shape=[3, 224, 224], dtype="float32", data=tensor.tobytes())),
    )

    def load() -> None:
        stub = pb_grpc.InferenceStub(busy_server.channel)
        while not stop.is_set():
            try:
                stub.Classify(request, timeout=30)
            except grpc.RpcError:
                pass
            # A short pause after each answer: the two threads still keep the room of two images
            # full most of the time (the queue fills: asserted below), but an answer's slot is not
            # always retaken at once, so the scorer's retries can get in (without it, whether they
            # ever do within 50 attempts was a matter of scheduling luck on a loaded machine).
            stop.wait(0.02)

    listing = tmp_path / "list.txt"  # resnet18 is slow on a CPU: a few images are enough
    listing.write_text("\n".join(sorted(labels)[:4]) + "\n")
    threads = [threading.Thread(target=load, daemon=True) for _ in range(2)]
    for thread in threads:
        thread.start()
    try:
        out = tmp_path / "scores.jsonl"
        status = main(
            [
                "score", f"@{listing}", "--address", busy_server.address, "--model", "resnet18",
                "--quiet", "--output", str(out), "--window", "8", "--max-attempts", "50",
            ]
        )  # fmt: skip
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
    err = capsys.readouterr().err
    assert status == 0, err
    rows = jsonl(out)
    assert sorted(r["path"] for r in rows) == sorted(labels)[:4]
    assert all(r["error"] == "" for r in rows)
    rejected = busy_server.sample(
        "cnnserve_rejections_total", method="ClassifyStream", model="resnet18", reason="queue_full"
    )
    assert rejected > 0, "the queue never filled: nothing was retried"
    assert " retries" in err


def test_resume_is_per_model_and_per_image_however_its_path_is_typed(
    server: ServerProcess,
    images: tuple[Path, dict[str, int]],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Issue 17: the folder typed absolute, then relative from its parent, used to add a second row
    per image; another model on the same output used to skip everything and exit 0."""
    root, labels = images
    out = tmp_path / "scores.csv"
    assert score(server, str(root), "--output", str(out)) == 0
    monkeypatch.chdir(root.parent)
    capsys.readouterr()
    assert score(server, root.name, "--output", str(out)) == 0
    assert f"scored 0, failed 0, skipped {COUNT}" in capsys.readouterr().err
    with out.open(newline="") as f:
        assert sorted(r["path"] for r in csv.DictReader(f)) == sorted(labels)
    before = out.read_bytes()
    argv = ["score", "--address", server.address, "--quiet", root.name, "--output", str(out)]
    assert main([*argv, "--model", "resnet18"]) == 2
    assert "holds rows of model lenet5, and this run asks for resnet18" in capsys.readouterr().err
    assert out.read_bytes() == before
