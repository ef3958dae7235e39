"""The CPU proxy of a GPU server (issue 12): LeNet-5 fed 224x224 JPEGs, so inference is almost free
and the serving path (gRPC, parsing, decode, preprocessing, batching hops, metrics) is all the work,
as it is on a GPU where the card computes faster than Python feeds it.

The physical limit, measured in the same run: the raw pipeline (service.images decode +
preprocessing + one ONNX Runtime call per image, on a session built like the service's), in one
process and in one spawned process per core at once. The served numbers (Classify at c=16, one
ClassifyStream with 64 in flight, `--models lenet5 --workers 0`) are reported against both.

    python -m bench --parts proxy       # in the benchmark table (bench/__main__.py part_proxy)
    python -m bench.proxy MODEL_DIR     # the raw pipeline alone, 1 and nproc processes
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import time
from pathlib import Path

from bench.raw_ort import open_session
from export.preprocessing import Preprocessing
from service import images
from service.settings import Settings


def _pipeline_count(model_dir: Path, jpeg: bytes, start_at: float, seconds: float) -> int:
    """Images through decode + preprocess + ORT (batch 1) from `start_at` (time.time()) for `seconds`."""
    session = open_session(model_dir / "model.onnx")
    metadata = json.loads((model_dir / "metadata.json").read_text())
    preprocessing = Preprocessing.from_dict(metadata["preprocessing"])
    max_pixels = int(Settings.model_fields["max_image_pixels"].default)  # the server's default cap

    def once() -> None:
        image = images.decode_image(jpeg, max_pixels=max_pixels)
        session.run(images.image_to_tensor(image, preprocessing)[None])

    for _ in range(20):  # warm-up: the first calls allocate
        once()
    while time.time() < start_at:
        time.sleep(0.005)
    end = start_at + seconds
    done = 0
    while time.time() < end:
        once()
        done += 1
    return done


def raw_pipeline(model_dir: Path, jpeg: bytes, *, seconds: float, processes: int) -> float:
    """Images/s of the raw pipeline in this process (processes=1), or summed over `processes`
    spawned processes running at once, each with its own session (the service's SessionOptions)."""
    if processes == 1:
        return _pipeline_count(model_dir, jpeg, time.time(), seconds) / seconds
    ctx = mp.get_context("spawn")
    start_at = time.time() + 3.0 + 1.5 * processes  # imports and session loads first
    with ctx.Pool(processes) as pool:
        futures = [
            pool.apply_async(_pipeline_count, (model_dir, jpeg, start_at, seconds)) for _ in range(processes)
        ]
        total = sum(f.get(timeout=seconds + 300) for f in futures)
    return total / seconds


def main() -> None:
    from bench.__main__ import jpeg_224

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model_dir", type=Path, help="a version directory holding model.onnx and metadata.json")
    p.add_argument("--seconds", type=float, default=5.0)
    args = p.parse_args()
    jpeg = jpeg_224()
    cores = os.cpu_count() or 1
    one = raw_pipeline(args.model_dir, jpeg, seconds=args.seconds, processes=1)
    every = raw_pipeline(args.model_dir, jpeg, seconds=args.seconds, processes=cores)
    print(f"raw pipeline: {one:.0f} img/s in 1 process, {every:.0f} img/s in {cores} processes")


if __name__ == "__main__":
    main()
