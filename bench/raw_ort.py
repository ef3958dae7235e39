"""The in-process baseline: raw ONNX Runtime on a model file, no gRPC, no decoding, no batcher.

`make bench` compares the served numbers against these. The session is built exactly as the
service builds it (service.engine.session: same SessionOptions from the same Settings, same
provider choice, IO binding on CUDA, fp16 cast), so the ratio measures the service's own overhead.

    python -m bench.raw_ort model_repository/resnet50/1/model.onnx --batch-sizes 1,8,16 --json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from service.engine.providers import select_provider
from service.engine.session import ModelSession
from service.settings import Settings


@dataclass(frozen=True)
class ThroughputPoint:
    batch_size: int
    images_per_s: float
    batches: int  # runs timed
    seconds: float  # wall time of the timed runs
    batch_latency_p50_s: float


@dataclass(frozen=True)
class LatencyStats:
    batch_size: int
    iterations: int
    mean_s: float
    p50_s: float
    p90_s: float
    p99_s: float
    min_s: float
    max_s: float


def percentile(samples: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation, as numpy computes it."""
    if not samples:
        raise ValueError("no samples")
    return float(np.percentile(np.asarray(samples, dtype=np.float64), q))


def open_session(model_path: Path | str, settings: Settings | None = None) -> ModelSession:
    """A ModelSession for `model_path`, configured like the service's. Input name, dtype and shape
    come from the metadata.json beside the model when there is one, else from the ONNX file."""
    no_overrides: dict[str, Any] = {}  # defaults and CNNSERVE_* variables, like the server
    settings = settings or Settings(**no_overrides)
    path = Path(model_path)
    kwargs: dict[str, Any] = {}
    meta_path = path.parent / "metadata.json"
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        kwargs = {
            "input_name": meta["input"].get("name", "input"),
            "output_name": meta["output"].get("name", "logits"),
            "input_dtype": np.dtype(meta["input"].get("dtype", "float32")),
            "input_shape": tuple(int(d) for d in meta["input"]["shape"]),
        }
    else:
        import onnxruntime as ort

        probe = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        first_in, first_out = probe.get_inputs()[0], probe.get_outputs()[0]
        kwargs = {
            "input_name": first_in.name,
            "output_name": first_out.name,
            "input_dtype": np.float16 if first_in.type == "tensor(float16)" else np.float32,
        }
    return ModelSession(path, settings=settings, provider=select_provider(settings), **kwargs)


def _inputs(session: ModelSession, batch_size: int, seed: int = 0) -> np.ndarray:
    # Normalised-image-like values; the service hands ORT float32 too (cast inside run for fp16).
    rng = np.random.default_rng(seed)
    return rng.standard_normal((batch_size, *session.input_shape), dtype=np.float32)


def measure_throughput(
    session: ModelSession,
    batch_sizes: Iterable[int],
    *,
    min_duration_s: float = 2.0,
    min_batches: int = 5,
    warmup: int = 2,
) -> list[ThroughputPoint]:
    """Images per second of back-to-back runs at each batch size (one caller, like the batcher's
    single runner thread)."""
    points = []
    for batch_size in batch_sizes:
        x = _inputs(session, batch_size)
        for _ in range(warmup):
            session.run(x)
        durations: list[float] = []
        started = time.perf_counter()
        while len(durations) < min_batches or time.perf_counter() - started < min_duration_s:
            t0 = time.perf_counter()
            session.run(x)
            durations.append(time.perf_counter() - t0)
        total = time.perf_counter() - started
        points.append(
            ThroughputPoint(
                batch_size=batch_size,
                images_per_s=batch_size * len(durations) / total,
                batches=len(durations),
                seconds=total,
                batch_latency_p50_s=percentile(durations, 50),
            )
        )
    return points


def measure_latency(
    session: ModelSession, *, batch_size: int = 1, iterations: int = 200, warmup: int = 10
) -> LatencyStats:
    """Latency percentiles of single runs at `batch_size` (1: the concurrency-1 floor a served
    request cannot beat)."""
    x = _inputs(session, batch_size)
    for _ in range(warmup):
        session.run(x)
    samples = []
    for _ in range(iterations):
        t0 = time.perf_counter()
        session.run(x)
        samples.append(time.perf_counter() - t0)
    return LatencyStats(
        batch_size=batch_size,
        iterations=iterations,
        mean_s=statistics.fmean(samples),
        p50_s=percentile(samples, 50),
        p90_s=percentile(samples, 90),
        p99_s=percentile(samples, 99),
        min_s=min(samples),
        max_s=max(samples),
    )


def run_baseline(
    model_path: Path | str,
    batch_sizes: Sequence[int] = (1, 4, 8, 16),
    *,
    settings: Settings | None = None,
    latency_iterations: int = 200,
    min_duration_s: float = 2.0,
) -> dict[str, Any]:
    """Throughput at each batch size plus batch-1 latency, as a JSON-friendly dict."""
    session = open_session(model_path, settings)
    session.warmup(sorted(set(batch_sizes)))
    throughput = measure_throughput(session, batch_sizes, min_duration_s=min_duration_s)
    latency = measure_latency(session, iterations=latency_iterations)
    return {
        "model": str(model_path),
        "provider": session.provider,
        "input_shape": list(session.input_shape),
        "input_dtype": session.input_dtype.name,
        "throughput": [asdict(p) for p in throughput],
        "latency_batch1": asdict(latency),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.raw_ort", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "model", type=Path, help="path to model.onnx (metadata.json beside it is used if present)"
    )
    parser.add_argument("--batch-sizes", default="1,4,8,16", help="comma-separated batch sizes")
    parser.add_argument("--iterations", type=int, default=200, help="batch-1 latency samples")
    parser.add_argument("--min-duration-s", type=float, default=2.0, help="time per throughput point")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default=None)
    parser.add_argument("--intra-op-threads", type=int, default=None)
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    overrides: dict[str, Any] = {}
    if args.device is not None:
        overrides["device"] = args.device
    if args.intra_op_threads is not None:
        overrides["intra_op_threads"] = args.intra_op_threads
    batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
    result = run_baseline(
        args.model,
        batch_sizes,
        settings=Settings(**overrides),
        latency_iterations=args.iterations,
        min_duration_s=args.min_duration_s,
    )
    if args.json:
        json.dump(result, sys.stdout, indent=2)
        print()
        return 0
    print(f"{result['model']} on {result['provider']} ({result['input_dtype']} {result['input_shape']})")
    print(f"{'batch':>6} {'images/s':>10} {'p50 batch ms':>13}")
    for point in result["throughput"]:
        p50_ms = point["batch_latency_p50_s"] * 1e3
        print(f"{point['batch_size']:>6} {point['images_per_s']:>10.1f} {p50_ms:>13.3f}")
    lat = result["latency_batch1"]
    print(
        f"batch-1 latency ms: p50 {lat['p50_s'] * 1e3:.3f}  p90 {lat['p90_s'] * 1e3:.3f}  "
        f"p99 {lat['p99_s'] * 1e3:.3f}  mean {lat['mean_s'] * 1e3:.3f}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
