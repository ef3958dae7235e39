"""Gradient-job overhead: our algorithms against the bare PyTorch work they cannot avoid.

Each benchmark times one of our algorithms and a hand-written minimal loop doing the same forward and
backward passes at the same sizes, in the same process (so the same torch thread count and device),
and reports ours / raw (target <= 1.2, the issue's):

- style: one iteration of `style_transfer.stylize` (an L-BFGS update plus one objective evaluation:
  forward, Gram matrices, losses, backward) vs a VGG-19 forward through relu5_1 (features[:30], i.e.
  cut right after conv5_1) plus the input-gradient backward, nothing else;
- dream: a whole `deepdream.dream` run (the notebook's 4 octaves x 10 steps, jitter 32, no tiling,
  plus the objective before and after) vs one forward (to inception4c) + input-gradient backward per
  step at that step's octave size, summed. The raw loop does no roll: a circular roll keeps the size,
  so the jitter is part of the overhead being measured, as are the pyramid and the step normalisation;
- guided: `guided_backprop.explain` as a gradient process calls it (guided backprop, with the per-layer stop
  checks) on a batch vs one batched plain input gradient of the class scores (forward + backward).

Methodology, for a shared, noisy machine:
- paired samples: style and dream time each raw pass *inside* our progress callback, right after our
  step at the same size, and subtract it from our time; so every raw sample sits next to the step it
  is compared with, and a neighbour's burst hits both alike. Guided alternates whole calls;
- a warm-up round of both sides first (allocator, oneDNN primitive caches), then `rounds` rounds; the
  ratio is the median of the paired ratios (ours / raw), and the spread (min..max of the per-round
  medians) is reported with it: a wide spread means the machine was busy;
- random weights (the speed does not depend on them); parameters never require grad on either side,
  so both compute the input gradient only.

`style_interference` measures what a real server does: classification c=1 latency of a server with
one gradient worker, alone and while a real Stylize RPC runs on it (`python -m bench --parts
resnet,style`).

    python -m bench.gradients                 # 256 and 512 px, every benchmark (~15 min on 2 cores)
    python -m bench.gradients --quick         # 64 px, few steps: a smoke test of the code (~1 min)
    python -m bench.gradients --sizes 256 --only style --threads 2 --json
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from bench.fixtures import frozen_on, synthetic_image
from export.models import build
from export.preprocessing import IMAGENET
from service.worker.deepdream import DreamProgress, dream
from service.worker.guided_backprop import explain
from service.worker.params import DreamParams, StyleParams, octave_sizes
from service.worker.style_transfer import StyleProgress, stylize

TARGET_RATIO = 1.2
# GoogLeNet's modules in forward order up to inception4c (transform_input is off in our builds; the
# auxiliary heads do not run in eval mode).
GOOGLENET_TO_4C = (
    "conv1", "maxpool1", "conv2", "conv3", "maxpool2",
    "inception3a", "inception3b", "maxpool3", "inception4a", "inception4b", "inception4c",
)  # fmt: skip
VGG19_TO_RELU5_1 = 30  # features[:30]: conv1_1 ... conv5_1, relu5_1


@dataclass(frozen=True)
class Comparison:
    name: str  # "style", "dream", "guided"
    size: int  # image side in pixels
    ours_s: float  # seconds per unit (style: iteration; dream: whole run; guided: batch)
    raw_s: float  # the same for the minimal loop
    ratio: float  # median over the paired samples of ours / raw
    ratio_min: float  # spread of the per-round median ratios
    ratio_max: float
    steps_per_s: float  # our optimisation steps (guided: images) per second
    unit: str  # what ours_s is per
    rounds: int  # measured rounds (after one warm-up round)
    samples: int  # paired samples behind the medians
    threads: int  # torch intra-op threads, both sides
    device: str

    @property
    def ok(self) -> bool:
        return self.ratio <= TARGET_RATIO


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _normalize(x: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET.mean, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET.std, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def _pixels(image: np.ndarray, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))[None].to(device)


def _summarize(
    name: str,
    size: int,
    rounds: list[tuple[list[float], list[float]]],
    steps_per_unit: float,
    unit: str,
    device: torch.device,
) -> Comparison:
    """rounds: (ours samples, raw samples) per measured round, seconds per unit, paired by position."""
    pairs = [(o, r) for ours_r, raw_r in rounds for o, r in zip(ours_r, raw_r, strict=True)]
    per_round = [statistics.median(o / r for o, r in zip(*round_, strict=True)) for round_ in rounds]
    ours_s = statistics.median(o for o, _ in pairs)
    return Comparison(
        name=name,
        size=size,
        ours_s=ours_s,
        raw_s=statistics.median(r for _, r in pairs),
        ratio=statistics.median(o / r for o, r in pairs),
        ratio_min=min(per_round),
        ratio_max=max(per_round),
        steps_per_s=steps_per_unit / ours_s,
        unit=unit,
        rounds=len(rounds),
        samples=len(pairs),
        threads=torch.get_num_threads(),
        device=str(device),
    )


# --- style ------------------------------------------------------------------------------------------


def bench_style(
    size: int,
    *,
    iterations: int = 8,
    rounds: int = 3,
    device: torch.device | None = None,
    quick: bool = False,
) -> Comparison:
    """Seconds per style iteration (ours) vs per raw VGG-19 forward+backward through relu5_1.

    Each round is one `stylize` run of iterations + 1 evaluations; after every evaluation the progress
    callback times one raw pass on the same content image. Our iteration k (k >= 2) is the time from
    the end of that raw pass to the end of evaluation k: the L-BFGS update, the clamp, the forward,
    the Gram matrices and losses, the backward and the bookkeeping.
    """
    if quick:
        iterations, rounds = 3, 2
    device = device or torch.device("cpu")
    torch.manual_seed(0)
    vgg = frozen_on(build("vgg19"), device)
    content, style = synthetic_image(size, 0), synthetic_image(size, 1)
    features: nn.Sequential = vgg.features  # type: ignore[assignment]
    trunk = features[:VGG19_TO_RELU5_1]
    x0 = _pixels(content, device)

    def raw() -> None:
        x = x0.clone().requires_grad_(True)
        out = trunk(_normalize(x))
        torch.autograd.grad(out.pow(2).mean(), [x])

    def one_round() -> tuple[list[float], list[float]]:
        ours: list[float] = []
        raws: list[float] = []
        resumed: float | None = None

        def on_progress(p: StyleProgress) -> None:
            nonlocal resumed
            _sync(device)
            end = time.perf_counter()
            if resumed is not None:
                ours.append(end - resumed)
            raw()
            _sync(device)
            resumed = time.perf_counter()
            raws.append(resumed - end)

        params = StyleParams(iterations=iterations + 1, max_side=size)
        stylize(vgg, content, [style], params, mean=IMAGENET.mean, std=IMAGENET.std, progress=on_progress)
        return ours, raws[1:]  # the first raw pass follows the first evaluation: a warm-up

    one_round()  # warm-up
    measured = [one_round() for _ in range(rounds)]
    return _summarize("style", size, measured, 1.0, "iteration", device)


# --- dream ------------------------------------------------------------------------------------------


def bench_dream(
    size: int,
    *,
    octaves: int = 4,
    steps: int = 10,
    rounds: int = 3,
    device: torch.device | None = None,
    quick: bool = False,
) -> Comparison:
    """Seconds per whole DeepDream run (ours) vs the raw forward+backward passes at its octave sizes.

    In each round the progress callback runs one raw pass at the octave size of the step just taken;
    ours is the run's wall time minus those raw passes, raw their sum.
    """
    if quick:
        octaves, steps, rounds = 2, 2, 2
    device = device or torch.device("cpu")
    torch.manual_seed(0)
    net = frozen_on(build("googlenet"), device)
    image = synthetic_image(size)
    params = DreamParams(octaves=octaves, steps=steps, tile_size=0)
    layers = {"inception4c": 1.0}
    trunk = nn.Sequential(*(getattr(net, name) for name in GOOGLENET_TO_4C))
    sizes = octave_sizes(size, size, octaves, params.octave_scale)  # exactly what dream() runs
    coarse_first = list(reversed(sizes))
    base = _pixels(image, device)
    inputs = {
        hw: F.interpolate(base, size=hw, mode="bilinear", align_corners=False, antialias=True) for hw in sizes
    }

    def raw(hw: tuple[int, int]) -> None:
        x = inputs[hw].clone().requires_grad_(True)
        torch.autograd.grad(trunk(_normalize(x)).pow(2).mean(), [x])

    def one_round() -> tuple[list[float], list[float]]:
        raws: list[float] = []

        def on_progress(p: DreamProgress) -> None:
            _sync(device)
            start = time.perf_counter()
            raw(coarse_first[p.octave - 1])
            _sync(device)
            raws.append(time.perf_counter() - start)

        start = time.perf_counter()
        out = dream(
            net, image, params, layers=layers, mean=IMAGENET.mean, std=IMAGENET.std, progress=on_progress
        )
        _sync(device)
        total = time.perf_counter() - start
        assert out.octave_sizes == tuple(sizes) and len(raws) == out.steps == len(sizes) * steps
        return [total - sum(raws)], [sum(raws)]

    one_round()  # warm-up
    measured = [one_round() for _ in range(rounds)]
    return _summarize("dream", size, measured, float(len(sizes) * steps), "run", device)


# --- guided backprop --------------------------------------------------------------------------------


def bench_guided(
    size: int,
    *,
    batch: int = 4,
    rounds: int = 5,
    device: torch.device | None = None,
    quick: bool = False,
) -> Comparison:
    """Seconds per batch: guided backprop as a gradient process runs it vs a batched plain input gradient."""
    if quick:
        batch, rounds = 2, 2
    device = device or torch.device("cpu")
    torch.manual_seed(0)
    vgg = frozen_on(build("vgg19"), device)
    pixels = np.stack([synthetic_image(size, i) for i in range(batch)]).transpose(0, 3, 1, 2)
    x0 = _normalize(torch.from_numpy(np.ascontiguousarray(pixels)).to(device))
    targets = list(range(batch))
    target_t = torch.tensor(targets, device=device)

    def ours() -> None:
        explain(vgg, x0, targets, method="guided_backprop", should_stop=lambda: False)

    def raw() -> None:
        x = x0.clone().requires_grad_(True)
        logits = vgg(x)
        torch.autograd.grad(logits.gather(1, target_t[:, None]).sum(), [x])

    def timed(fn: Callable[[], None]) -> float:
        start = time.perf_counter()
        fn()
        _sync(device)
        return time.perf_counter() - start

    timed(ours), timed(raw)  # warm-up
    measured = []
    for i in range(rounds):  # alternate which side goes first, so neither always follows the other
        if i % 2 == 0:
            ours_s = timed(ours)
            raw_s = timed(raw)
        else:
            raw_s = timed(raw)
            ours_s = timed(ours)
        measured.append(([ours_s], [raw_s]))
    return _summarize("guided", size, measured, float(batch), "batch", device)


def run_all(
    sizes: Sequence[int] = (256, 512), device: torch.device | None = None, quick: bool = False
) -> list[Comparison]:
    results = []
    for size in sizes:
        for fn in (bench_guided, bench_dream, bench_style):
            results.append(fn(size, device=device, quick=quick))
    return results


# --- classification latency next to a real Stylize RPC ---------------------------------------------


@dataclass(frozen=True)
class Interference:
    alone_p50_s: float
    alone_p99_s: float
    loaded_p50_s: float
    loaded_p99_s: float
    alone_n: int
    loaded_n: int
    errors: int
    style_size: int
    style_steps: int  # Stylize iterations the server reported during the loaded windows
    style_steps_per_s: float  # as the client saw them (progress messages per second)


class _StylizeCall:
    """A Stylize RPC in a thread: `started` is set at its first progress message; `stop()` cancels it
    and returns (iterations reported, seconds from the first to the last progress message)."""

    def __init__(self, stub: Any, request: Any, timeout_s: float) -> None:
        self.started = threading.Event()
        self.stamps: list[float] = []
        self.error: str | None = None
        self._call = stub.Stylize(request, timeout=timeout_s)
        self._thread = threading.Thread(target=self._read, name="bench-stylize", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        import grpc

        try:
            for message in self._call:
                if message.HasField("progress"):
                    self.stamps.append(time.perf_counter())
                    self.started.set()
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.CANCELLED:
                self.error = f"{exc.code().name}: {exc.details()}"
        finally:
            self.started.set()

    def stop(self) -> tuple[int, float]:
        self._call.cancel()
        self._thread.join(30)
        span = self.stamps[-1] - self.stamps[0] if len(self.stamps) > 1 else 0.0
        return len(self.stamps), span


def _encoded_png(image: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray((np.clip(image, 0, 1) * 255).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def wait_gradients_serving(address: str, timeout_s: float = 600.0) -> None:
    """Block until the server's gradient workers are up (health service cnnserve.v1.Gradients)."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from service.frontend.server import GRADIENTS_SERVICE

    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            try:
                request = health_pb2.HealthCheckRequest(service=GRADIENTS_SERVICE)
                if stub.Check(request, timeout=2).status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.5)
    raise RuntimeError(f"gradient workers of {address} not SERVING after {timeout_s:.0f} s")


def style_interference(
    address: str,
    classify_request: Any,
    *,
    style_model: str = "vgg19",
    style_size: int = 256,
    seconds: float = 12.0,
    rounds: int = 2,
) -> Interference:
    """Classification latency (c=1, `classify_request`) of the server at `address` alone and while a
    real Stylize RPC (L-BFGS, `style_size` px) runs on its gradient worker, in alternating windows
    (alone, loaded, alone, loaded, ...; `seconds` of each in all). The Stylize call is started before
    each loaded window, measured once its first iteration is reported, and cancelled after it."""
    import grpc

    from bench.load import run_load
    from service._proto.cnnserve.v1 import inference_pb2 as pb
    from service._proto.cnnserve.v1 import inference_pb2_grpc as pb_grpc

    wait_gradients_serving(address)
    window = seconds / rounds
    request = pb.StylizeRequest(
        model=style_model,
        content=pb.ImageInput(encoded=_encoded_png(synthetic_image(style_size, 0))),
        styles=[pb.StyleImage(image=pb.ImageInput(encoded=_encoded_png(synthetic_image(style_size, 1))))],
        iterations=1000,  # more than a window needs: it is cancelled at the end of each
        max_side=style_size,
    )
    alone: list[float] = []
    loaded: list[float] = []
    errors = steps = 0
    span = 0.0
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.InferenceStub(channel)  # type: ignore[no-untyped-call]
        for _ in range(rounds):
            r = run_load(address, classify_request, concurrency=1, processes=1, duration_s=window)
            alone.extend(r.latencies_s)
            errors += r.errors
            call = _StylizeCall(stub, request, timeout_s=window + 240)  # under max_deadline_s (600)
            try:
                if not call.started.wait(600) or call.error:
                    raise RuntimeError(f"the Stylize call did not start: {call.error}")
                r = run_load(address, classify_request, concurrency=1, processes=1, duration_s=window)
                loaded.extend(r.latencies_s)
                errors += r.errors
            finally:
                n, s = call.stop()
            if call.error:
                raise RuntimeError(f"the Stylize call failed: {call.error}")
            steps += n
            span += s

    def pct(samples: list[float], q: float) -> float:
        return float(np.percentile(samples, q)) if samples else float("nan")

    return Interference(
        alone_p50_s=pct(alone, 50),
        alone_p99_s=pct(alone, 99),
        loaded_p50_s=pct(loaded, 50),
        loaded_p99_s=pct(loaded, 99),
        alone_n=len(alone),
        loaded_n=len(loaded),
        errors=errors,
        style_size=style_size,
        style_steps=steps,
        style_steps_per_s=(steps - rounds) / span if span > 0 else float("nan"),
    )


# --- CLI --------------------------------------------------------------------------------------------


def format_table(results: Sequence[Comparison]) -> str:
    lines = [
        f"{'bench':7} {'size':>5} {'ours s':>9} {'raw s':>9} {'ratio':>6} {'spread':>11} {'steps/s':>8}"
        f"  per        threads device"
    ]
    for r in results:
        flag = "" if r.ok else f"  > {TARGET_RATIO}"
        lines.append(
            f"{r.name:7} {r.size:5d} {r.ours_s:9.4f} {r.raw_s:9.4f} {r.ratio:6.2f}"
            f" {r.ratio_min:5.2f}-{r.ratio_max:<5.2f} {r.steps_per_s:8.2f}  {r.unit:10} {r.threads:7d}"
            f" {r.device}{flag}"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gradients", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--sizes", default=None, help="comma-separated image sides (default 256,512; quick 64)"
    )
    parser.add_argument("--only", choices=("style", "dream", "guided"), help="run one benchmark")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--quick", action="store_true", help="small sizes, few steps and rounds: a smoke run")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--check", action="store_true", help=f"exit 1 if a ratio exceeds {TARGET_RATIO}")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sizes = [int(s) for s in (args.sizes or ("64" if args.quick else "256,512")).split(",") if s]
    benches: dict[str, Callable[..., Comparison]] = {
        "style": bench_style,
        "dream": bench_dream,
        "guided": bench_guided,
    }
    names = [args.only] if args.only else ["guided", "dream", "style"]
    results = []
    for size in sizes:
        for name in names:
            results.append(benches[name](size, device=device, quick=args.quick))
            if not args.json:
                print(format_table(results[-1:]).splitlines()[-1], file=sys.stderr, flush=True)
    if args.json:
        print(json.dumps([{**asdict(r), "ok": r.ok} for r in results], indent=2))
    else:
        print(format_table(results))
    return 1 if args.check and not all(r.ok for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
