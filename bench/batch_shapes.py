"""What a change of batch size costs one ONNX Runtime session, with and without busy preprocessing
threads: the device check behind `Settings.cuda_fixed_batch` (BENCHMARKS.md, "GPU, second look").

The session is the server's (bench.raw_ort.open_session: same options, provider, IO binding on
CUDA). Each line is the median time of one `run()`:

    python -m bench.batch_shapes artifacts/bench_repository/resnet50/1/model.onnx
    python -m bench.batch_shapes MODEL --threads 0,2,16 --fixed-batch   # padded, as served on CUDA
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from bench.raw_ort import open_session
from service.engine.session import ModelSession

CYCLE = (3, 7, 12, 5, 16, 9, 1, 14, 6, 11, 2, 8, 15, 4, 10, 13)


def median_run_s(session: ModelSession, sizes: Sequence[int], inputs: dict[int, np.ndarray]) -> float:
    times = []
    for n in sizes:
        started = time.perf_counter()
        session.run(inputs[n])
        times.append(time.perf_counter() - started)
    return statistics.median(times[2:] if len(times) > 4 else times)


def _busy_preprocessing(stop: threading.Event) -> None:
    from bench.__main__ import jpeg_224
    from export.preprocessing import IMAGENET, to_tensor
    from service.images import decode_image

    data = jpeg_224()
    while not stop.is_set():
        to_tensor(decode_image(data, max_pixels=10**8), IMAGENET)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("model", type=Path, help="a model.onnx (metadata.json beside it is used)")
    parser.add_argument("--threads", default="0,16", help="preprocessing threads kept busy meanwhile")
    parser.add_argument("--rounds", type=int, default=2, help="passes over the 16 batch sizes")
    parser.add_argument("--fixed-batch", action="store_true", help="pad every batch to 16 rows")
    args = parser.parse_args(argv)

    session = open_session(args.model)
    session.warmup(range(1, 17))
    if args.fixed_batch:
        session.fix_batch_size(16)
    rng = np.random.default_rng(0)
    inputs = {n: rng.standard_normal((n, *session.input_shape)).astype(np.float32) for n in range(1, 17)}
    print(f"{args.model} on {session.provider}" + (" (fixed batch 16)" if args.fixed_batch else ""))
    for count in (int(t) for t in args.threads.split(",")):
        stop = threading.Event()
        workers = [
            threading.Thread(target=_busy_preprocessing, args=(stop,), daemon=True) for _ in range(count)
        ]
        for w in workers:
            w.start()
        try:
            time.sleep(0.5 if workers else 0)
            steady = {n: median_run_s(session, [n] * 20, inputs) for n in (8, 16)}
            cycling = median_run_s(session, list(CYCLE) * args.rounds, inputs)
            alternating = median_run_s(session, [8, 9] * 10, inputs)
        finally:
            stop.set()
            for w in workers:
                w.join()
        print(
            f"{count:2d} preprocessing threads: always 8 {steady[8] * 1e3:.2f} ms, always 16 "
            f"{steady[16] * 1e3:.2f} ms, sizes 1..16 in turn {cycling * 1e3:.2f} ms, "
            f"8/9 alternating {alternating * 1e3:.2f} ms",
            flush=True,
        )


if __name__ == "__main__":
    main()
