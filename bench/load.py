"""Load generation for `python -m bench`: asyncio gRPC clients in worker processes, and a bare
grpc.aio echo server (the transport floor a served Classify is compared with).

Every client process opens its own channels (`connections` of them: distinct TCP connections, so
`serve --frontends N`, whose kernel hands each connection to one frontend, sees them spread) and
runs `concurrency` asyncio tasks that issue the same request back to back; completions are counted
only inside a common time window (all processes start measuring at the same wall-clock instant,
after their own warm-up), so process start-up does not dilute the rate; latencies are those of the
requests completed in the window.

    python -m bench.load echo        # prints "listening 127.0.0.1:PORT", serves until SIGTERM
    python -m bench.load style 256   # a style-transfer job looping until killed
"""

from __future__ import annotations

import asyncio
import http.client
import multiprocessing as mp
import os
import signal
import sys
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc

from service._proto.cnnserve.v1 import inference_pb2 as pb
from service._proto.cnnserve.v1 import inference_pb2_grpc as pb_grpc

CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    # Channels to the same address would otherwise share one subchannel: one TCP connection.
    ("grpc.use_local_subchannel_pool", 1),
]


@dataclass
class LoadResult:
    completed: int = 0  # requests (stream: items) completed inside the window
    errors: int = 0
    seconds: float = 0.0
    latencies_s: list[float] = field(default_factory=list)  # of the requests finished in the window
    error_samples: list[str] = field(default_factory=list)

    def record(self, ok: bool, t0: float, t1: float, start_at: float, end_at: float) -> None:
        """One request sent at t0 and answered at t1. Throughput: completions inside the window.
        Latency: those, whatever their start (a request queued behind the warm-up is still a
        request the server answered)."""
        if start_at <= t1 <= end_at:
            if ok:
                self.completed += 1
                self.latencies_s.append(t1 - t0)
            else:
                self.errors += 1

    def merge(self, other: LoadResult) -> None:
        self.completed += other.completed
        self.errors += other.errors
        self.seconds = max(self.seconds, other.seconds)
        self.latencies_s.extend(other.latencies_s)
        self.error_samples.extend(other.error_samples[: max(0, 5 - len(self.error_samples))])


async def _unary_load(
    address: str,
    request: pb.ClassifyRequest | pb.EmbedRequest,
    concurrency: int,
    start_at: float,
    duration_s: float,
    connections: int = 1,
) -> LoadResult:
    result = LoadResult()
    end_at = start_at + duration_s
    channels = [grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS) for _ in range(connections)]
    try:
        stubs = [pb_grpc.InferenceStub(channel) for channel in channels]  # type: ignore[no-untyped-call]
        method = "Embed" if isinstance(request, pb.EmbedRequest) else "Classify"
        # connect + warm
        await asyncio.gather(*(getattr(stub, method)(request, timeout=60) for stub in stubs))

        async def one_task(stub: pb_grpc.InferenceStub) -> None:
            call = getattr(stub, method)
            while True:
                t0 = time.time()
                if t0 >= end_at:
                    return
                try:
                    await call(request, timeout=60)
                    ok = True
                except grpc.aio.AioRpcError as exc:
                    ok = False
                    if len(result.error_samples) < 5:
                        result.error_samples.append(f"{exc.code().name}: {exc.details()}")
                result.record(ok, t0, time.time(), start_at, end_at)

        await asyncio.gather(*(one_task(stubs[n % connections]) for n in range(concurrency)))
    finally:
        await asyncio.gather(*(channel.close() for channel in channels))
    result.seconds = duration_s
    return result


async def _stream_load(
    address: str,
    request: pb.ClassifyRequest,
    window: int,
    start_at: float,
    duration_s: float,
    connections: int = 1,
) -> LoadResult:
    """`connections` ClassifyStreams, one per connection, keeping `window` items in flight between
    them; counts responses inside the time window."""
    result = LoadResult()
    shares = [window // connections + (1 if i < window % connections else 0) for i in range(connections)]
    await asyncio.gather(
        *(_one_stream(address, request, n, start_at, duration_s, result) for n in shares if n)
    )
    result.seconds = duration_s
    return result


async def _one_stream(
    address: str, request: pb.ClassifyRequest, window: int, start_at: float, duration_s: float,
    result: LoadResult,
) -> None:  # fmt: skip
    end_at = start_at + duration_s
    async with grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS) as channel:
        stub = pb_grpc.InferenceStub(channel)  # type: ignore[no-untyped-call]
        await stub.Classify(request, timeout=60)
        credits = asyncio.Semaphore(window)
        stop = asyncio.Event()

        async def requests() -> AsyncIterator[pb.ClassifyStreamRequest]:
            i = 0
            while not stop.is_set():
                await credits.acquire()
                if stop.is_set():
                    return
                yield pb.ClassifyStreamRequest(id=str(i), request=request)
                i += 1

        call = stub.ClassifyStream(requests(), timeout=duration_s + 120)
        async for response in call:
            credits.release()
            now = time.time()
            if now > end_at:
                stop.set()
                break
            if now >= start_at:
                if response.WhichOneof("outcome") == "result":
                    result.completed += 1
                else:
                    result.errors += 1
                    if len(result.error_samples) < 5:
                        result.error_samples.append(response.error.message)
        call.cancel()


def _rest_load(
    address: str, request: pb.ClassifyRequest, concurrency: int, start_at: float, duration_s: float
) -> LoadResult:
    """`concurrency` threads, each on its own keep-alive HTTP/1.1 connection, POSTing the request's
    image to the REST image route (POST /v2/models/{model}/classify?top_k=K) back to back."""
    result = LoadResult()
    lock = threading.Lock()
    end_at = start_at + duration_s
    host, port = address.rsplit(":", 1)
    path = f"/v2/models/{request.model}/classify" + (f"?top_k={request.top_k}" if request.top_k else "")
    body = request.image.encoded

    def one_client() -> None:
        connection = http.client.HTTPConnection(host, int(port), timeout=60)
        try:
            while True:
                t0 = time.time()
                if t0 >= end_at:
                    return
                try:
                    connection.request("POST", path, body)
                    response = connection.getresponse()
                    answer = response.read()
                    ok = response.status == 200
                    error = "" if ok else f"{response.status}: {answer[:200]!r}"
                except OSError as exc:
                    ok, error = False, repr(exc)
                    connection.close()
                t1 = time.time()
                with lock:
                    if not ok and len(result.error_samples) < 5:
                        result.error_samples.append(error)
                    result.record(ok, t0, t1, start_at, end_at)
        finally:
            connection.close()

    threads = [threading.Thread(target=one_client, daemon=True) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    result.seconds = duration_s
    return result


def _worker(
    kind: str,
    address: str,
    request_bytes: bytes,
    concurrency: int,
    start_at: float,
    duration_s: float,
    connections: int = 1,
) -> LoadResult:
    request = (pb.EmbedRequest if kind == "embed" else pb.ClassifyRequest).FromString(request_bytes)
    connections = max(1, min(connections, concurrency))
    if kind == "stream":
        return asyncio.run(_stream_load(address, request, concurrency, start_at, duration_s, connections))
    if kind == "rest":  # `address` is the REST port's
        assert isinstance(request, pb.ClassifyRequest)
        return _rest_load(address, request, concurrency, start_at, duration_s)
    return asyncio.run(_unary_load(address, request, concurrency, start_at, duration_s, connections))


def run_load(
    address: str,
    request: pb.ClassifyRequest | pb.EmbedRequest,
    *,
    concurrency: int,
    processes: int,
    duration_s: float,
    kind: str = "unary",
    warmup_s: float = 2.0,
    connections: int = 1,
) -> LoadResult:
    """`concurrency` requests in flight in total, spread over `processes` client processes
    (spawned, so no grpc state is forked), each with `connections` connections (streams). `kind`:
    "unary" (Classify), "stream" (ClassifyStream), "embed" (Embed, an EmbedRequest) or "rest" (the
    ClassifyRequest's image to the REST image route; `address` is the REST port's)."""
    processes = max(1, min(processes, concurrency))
    per = [concurrency // processes + (1 if i < concurrency % processes else 0) for i in range(processes)]
    # Spawned interpreters need ~1-2 s to import grpc on a busy 2-core box before they can start.
    start_at = time.time() + warmup_s + 1.5 * processes
    payload = request.SerializeToString()
    total = LoadResult()
    if processes == 1:
        total.merge(_worker(kind, address, payload, per[0], start_at, duration_s, connections))
        return total
    ctx = mp.get_context("spawn")
    with ctx.Pool(processes) as pool:
        futures = [
            pool.apply_async(_worker, (kind, address, payload, n, start_at, duration_s, connections))
            for n in per
        ]
        for f in futures:
            total.merge(f.get(timeout=duration_s + 300))
    return total


# --- the bare echo server -------------------------------------------------------------------------


class EchoServicer(pb_grpc.InferenceServicer):
    """Classify answers a fixed response: no decoding, no model, no batching, no metrics."""

    def __init__(self, response: pb.ClassifyResponse) -> None:
        self.response = response

    async def Classify(
        self, request: pb.ClassifyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ClassifyResponse:
        return self.response


def echo_response() -> pb.ClassifyResponse:
    """Shaped like a LeNet-5 top-5 answer (labels, probabilities, timings)."""
    return pb.ClassifyResponse(
        model="lenet5",
        version=1,
        classes=[pb.ClassScore(index=i, label=str(i), probability=0.1) for i in range(5)],
        timings=pb.Timings(
            decode_seconds=1e-4, preprocess_seconds=1e-4, queue_seconds=1e-4,
            inference_seconds=1e-4, total_seconds=1e-3,
        ),  # fmt: skip
    )


async def serve_baseline(servicer: pb_grpc.InferenceServicer, port: int = 0) -> None:
    """Serve `servicer` (a baseline: the echo server, bench.floor) on 127.0.0.1, print
    "listening 127.0.0.1:PORT" and run until SIGTERM or SIGINT."""
    server = grpc.aio.server(options=CHANNEL_OPTIONS)
    pb_grpc.add_InferenceServicer_to_server(servicer, server)  # type: ignore[no-untyped-call]
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print(f"listening 127.0.0.1:{bound}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    await stop.wait()
    await server.stop(1)


def _style_job(size: int) -> None:
    """A style-transfer job (VGG-19, L-BFGS) at `size` px, repeated until killed: the CPU load a
    gradient process puts next to the classifier. Prints "running" after the first evaluation."""
    import torch

    from bench.fixtures import frozen_on, synthetic_image
    from export.models import build
    from export.preprocessing import IMAGENET
    from service.worker.params import StyleParams
    from service.worker.style_transfer import stylize

    torch.manual_seed(0)
    vgg = frozen_on(build("vgg19"), torch.device("cpu"))
    content, style = synthetic_image(size, 0), synthetic_image(size, 1)
    announced = False

    def progress(_: object) -> None:
        nonlocal announced
        if not announced:
            print("running", flush=True)
            announced = True

    while True:
        stylize(vgg, content, [style], StyleParams(iterations=1000, max_side=size),
                mean=IMAGENET.mean, std=IMAGENET.std, progress=progress)  # fmt: skip


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    if sys.argv[1:] == ["echo"]:
        asyncio.run(serve_baseline(EchoServicer(echo_response())))
    elif len(sys.argv) == 3 and sys.argv[1] == "style":
        _style_job(int(sys.argv[2]))
    else:
        print(__doc__, file=sys.stderr)
        raise SystemExit(2)
