"""`cnnserve score` throughput against raw ClassifyStream on the same running server.

    python -m bench.score_throughput --address HOST:PORT [--model lenet5] [--count 2000] [--rounds 3]

Writes `count` rendered digits as PNGs to a temporary directory, then alternates, `rounds` times:
raw ClassifyStream (every request built in memory up front, one stream, the server's own window
the only limit) and `cnnserve score DIR` (files read, rows written to a JSONL file, fsync'ed).
Prints images/s of each (best round) and the ratio score / raw.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import grpc

from export import digits
from service._proto.cnnserve.v1 import inference_pb2 as pb
from service._proto.cnnserve.v1 import inference_pb2_grpc as pb_grpc
from service.cli import main as cnnserve
from service.client import default_channel_options

CPU: dict[str, float] = {}  # client CPU seconds per image of the last round


def raw(address: str, model: str, payloads: list[bytes]) -> float:
    requests = [
        pb.ClassifyStreamRequest(
            id=str(i), request=pb.ClassifyRequest(model=model, image=pb.ImageInput(encoded=p))
        )
        for i, p in enumerate(payloads)
    ]
    with grpc.insecure_channel(address, options=default_channel_options()) as channel:
        stub = pb_grpc.InferenceStub(channel)  # type: ignore[no-untyped-call]
        start, cpu = time.perf_counter(), time.process_time()
        answered = sum(1 for r in stub.ClassifyStream(iter(requests)) if r.WhichOneof("outcome") == "result")
        elapsed = time.perf_counter() - start
        CPU["raw"] = (time.process_time() - cpu) / len(payloads)
    assert answered == len(payloads), f"only {answered} of {len(payloads)} answered"
    return len(payloads) / elapsed


def scored(address: str, model: str, directory: Path, out: Path, window: int) -> float:
    out.unlink(missing_ok=True)
    start, cpu = time.perf_counter(), time.process_time()
    status = cnnserve(["score", str(directory), "--address", address, "--model", model, "--quiet",
                       "--output", str(out), "--window", str(window)])  # fmt: skip
    elapsed = time.perf_counter() - start
    assert status == 0
    CPU["score"] = (time.process_time() - cpu) / len(list(directory.iterdir()))
    return sum(1 for _ in out.open()) / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--address", required=True)
    parser.add_argument("--model", default="lenet5")
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--window", type=int, default=64)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp) / "images"
        directory.mkdir()
        n = digits.num_samples()
        for i in range(args.count):
            digits.render(i % n).save(directory / f"{i:06d}.png", "PNG")
        payloads = [p.read_bytes() for p in sorted(directory.iterdir())]
        raw(args.address, args.model, payloads[:200])  # warm-up
        raws, scores = [], []
        for _ in range(args.rounds):
            raws.append(raw(args.address, args.model, payloads))
            scores.append(scored(args.address, args.model, directory, Path(tmp) / "out.jsonl", args.window))
            print(
                f"raw {raws[-1]:.0f} img/s ({CPU['raw'] * 1e6:.0f} us client CPU per image), "
                f"score {scores[-1]:.0f} img/s ({CPU['score'] * 1e6:.0f} us)",
                flush=True,
            )
        print(f"best: raw ClassifyStream {max(raws):.0f} img/s, cnnserve score {max(scores):.0f} img/s, "
              f"ratio {max(scores) / max(raws):.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
