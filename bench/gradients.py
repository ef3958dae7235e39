"""Gradient-job overhead: our algorithms against the bare PyTorch work they cannot avoid.

Each benchmark times one of our algorithms per optimisation step and a hand-written minimal loop doing
the same forward and backward passes at the same size, then reports ours / raw (target <= 1.2):

- style: one L-BFGS evaluation of `style_transfer.stylize` vs a VGG-19 forward through relu5_1
  (features[:30]) plus the input-gradient backward, nothing else;
- dream: a whole `deepdream.dream` run vs the same number of forward(to inception4c)+backward passes
  at each octave's size, summed (the raw loop gets no jitter, no normalisation, no hooks);
- guided: `guided_backprop.explain` (guided backprop) on a batch vs one batched plain input gradient
  of the class scores (forward + backward), i.e. the extra cost of the guided ReLU hooks.

Random weights (the speed does not depend on them); parameters never require grad in either side, so
both compute the input gradient only.

    python -m bench.gradients --sizes 256,512 --json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

from export.models import build
from export.preprocessing import IMAGENET
from service.worker.deepdream import dream
from service.worker.guided_backprop import explain
from service.worker.style_transfer import StyleProgress, stylize
from service.worker.tasks import DreamParams, StyleParams, octave_sizes

TARGET_RATIO = 1.2
# GoogLeNet's modules in forward order up to inception4c (transform_input is off in our builds).
GOOGLENET_TO_4C = (
    "conv1", "maxpool1", "conv2", "conv3", "maxpool2",
    "inception3a", "inception3b", "maxpool3", "inception4a", "inception4b", "inception4c",
)  # fmt: skip


@dataclass(frozen=True)
class Comparison:
    name: str  # "style", "dream", "guided"
    size: int  # image side in pixels
    ours_s: float  # seconds per step (dream: per whole run)
    raw_s: float  # the same for the minimal loop
    ratio: float  # ours_s / raw_s
    steps_per_s: float  # our optimisation steps (guided: images) per second
    device: str

    @property
    def ok(self) -> bool:
        return self.ratio <= TARGET_RATIO


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Median seconds of `repeats` calls after one warm-up call."""
    fn()
    _sync(device)
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def _compare(
    ours: Callable[[], object], raw: Callable[[], object], device: torch.device, repeats: int
) -> tuple[float, float]:
    """Median seconds of each, the calls interleaved (ours, raw, ours, ...) after a warm-up of both,
    so a noisy neighbour on a shared machine slows both sides alike."""
    ours()
    raw()
    _sync(device)
    samples: tuple[list[float], list[float]] = ([], [])
    for _ in range(repeats):
        for fn, out in ((ours, samples[0]), (raw, samples[1])):
            start = time.perf_counter()
            fn()
            _sync(device)
            out.append(time.perf_counter() - start)
    return statistics.median(samples[0]), statistics.median(samples[1])


def _image(size: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    base = np.stack([x, y, 0.5 + 0.5 * np.sin(8 * x * y)], axis=2)
    return np.clip(base + 0.05 * rng.standard_normal(base.shape), 0, 1).astype(np.float32)


def _frozen(model: nn.Module, device: torch.device) -> nn.Module:
    model = model.to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _normalize(x: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET.mean, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET.std, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def bench_style(size: int, *, iterations: int = 6, device: torch.device | None = None) -> Comparison:
    device = device or torch.device("cpu")
    torch.manual_seed(0)
    vgg = _frozen(build("vgg19"), device)
    content, style = _image(size, 0), _image(size, 1)

    stamps: list[float] = []

    def on_progress(p: StyleProgress) -> None:
        _sync(device)
        stamps.append(time.perf_counter())

    params = StyleParams(iterations=iterations + 1, max_side=size)
    stylize(vgg, content, [style], params, mean=IMAGENET.mean, std=IMAGENET.std, progress=on_progress)
    # per-evaluation time from consecutive evaluations (excludes computing the style targets)
    ours = statistics.median(np.diff(stamps).tolist())

    features: nn.Sequential = vgg.features  # type: ignore[assignment]
    trunk = features[:30]  # through relu5_1
    x0 = torch.from_numpy(content.transpose(2, 0, 1).copy())[None].to(device)

    def raw() -> None:
        x = x0.clone().requires_grad_(True)
        out = trunk(_normalize(x))
        torch.autograd.grad(out.pow(2).mean(), [x])

    raw_s = _timed(raw, device, iterations)
    return Comparison("style", size, ours, raw_s, ours / raw_s, 1.0 / ours, str(device))


def bench_dream(
    size: int, *, octaves: int = 4, steps: int = 10, repeats: int = 3, device: torch.device | None = None
) -> Comparison:
    device = device or torch.device("cpu")
    torch.manual_seed(0)
    net = _frozen(build("googlenet"), device)
    image = _image(size)
    params = DreamParams(octaves=octaves, steps=steps, tile_size=0)
    layers = {"inception4c": 1.0}

    def ours() -> None:
        dream(net, image, params, layers=layers, mean=IMAGENET.mean, std=IMAGENET.std)

    trunk = nn.Sequential(*(getattr(net, name) for name in GOOGLENET_TO_4C))
    sizes = octave_sizes(size, size, octaves, params.octave_scale)
    inputs = [torch.rand(1, 3, h, w, device=device) for h, w in sizes]

    def raw() -> None:
        for x0 in inputs:
            for _ in range(steps):
                x = x0.clone().requires_grad_(True)
                torch.autograd.grad(trunk(_normalize(x)).pow(2).mean(), [x])

    ours_s, raw_s = _compare(ours, raw, device, repeats)
    total_steps = len(sizes) * steps
    return Comparison("dream", size, ours_s, raw_s, ours_s / raw_s, total_steps / ours_s, str(device))


def bench_guided(
    size: int, *, batch: int = 4, repeats: int = 3, device: torch.device | None = None
) -> Comparison:
    device = device or torch.device("cpu")
    torch.manual_seed(0)
    vgg = _frozen(build("vgg19"), device)
    x0 = _normalize(
        torch.from_numpy(np.stack([_image(size, i) for i in range(batch)]).transpose(0, 3, 1, 2).copy())
    )
    x0 = x0.to(device)
    targets = list(range(batch))

    def ours() -> None:
        explain(vgg, x0, targets, method="guided_backprop")

    def raw() -> None:
        x = x0.clone().requires_grad_(True)
        logits = vgg(x)
        torch.autograd.grad(logits[torch.arange(batch), torch.tensor(targets)].sum(), [x])

    ours_s, raw_s = _compare(ours, raw, device, repeats)
    return Comparison("guided", size, ours_s, raw_s, ours_s / raw_s, batch / ours_s, str(device))


def run_all(sizes: Sequence[int] = (256, 512), device: torch.device | None = None) -> list[Comparison]:
    results = []
    for size in sizes:
        results.append(bench_guided(size, device=device))
        results.append(bench_dream(size, device=device))
        results.append(bench_style(size, device=device))
    return results


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gradients", description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="256,512", help="comma-separated image sides")
    parser.add_argument("--only", choices=("style", "dream", "guided"), help="run one benchmark")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--check", action="store_true", help=f"exit 1 if a ratio exceeds {TARGET_RATIO}")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sizes = [int(s) for s in args.sizes.split(",") if s]
    benches: dict[str, Callable[..., Comparison]] = {
        "style": bench_style,
        "dream": bench_dream,
        "guided": bench_guided,
    }
    names = [args.only] if args.only else ["guided", "dream", "style"]
    results = [benches[name](size, device=device) for size in sizes for name in names]
    if args.json:
        print(json.dumps([{**asdict(r), "ok": r.ok} for r in results], indent=2))
    else:
        print(f"{'bench':7} {'size':>5} {'ours s':>9} {'raw s':>9} {'ratio':>6} {'steps/s':>8}  device")
        for r in results:
            flag = "" if r.ok else f"  > {TARGET_RATIO}"
            print(
                f"{r.name:7} {r.size:5d} {r.ours_s:9.4f} {r.raw_s:9.4f} {r.ratio:6.2f} {r.steps_per_s:8.2f}"
                f"  {r.device}{flag}"
            )
    return 1 if args.check and not all(r.ok for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
