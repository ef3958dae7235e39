"""What one frontend -> engine hop costs on this machine (issue 12's process split): the control
message round trip, and moving a preprocessed tensor by shared memory against pickling it.

    python -m bench.ipc_hop [--seconds 3]

Control messages: an asyncio frontend sends (slot, rows, deadline) over a Unix socket pair to an
engine process whose asyncio loop answers (slot, status) at once: one round trip at a time (the
latency a c=1 request pays twice over: request and result), and many in flight (the rate one
engine loop sustains). Tensors: a 3x224x224 float32 image (602 KB) written into a preallocated
multiprocessing.shared_memory slot (what a frontend's preprocessing would write anyway: the copy
shown is the extra one when it cannot preprocess in place), against pickle.dumps + loads of it.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import pickle
import socket
import statistics
import struct
import time
from multiprocessing import shared_memory

import numpy as np

MESSAGE = struct.Struct("<IId")  # slot, rows, deadline
REPLY = struct.Struct("<II")  # slot, status


def _engine(sock: socket.socket) -> None:
    async def serve() -> None:
        reader, writer = await asyncio.open_unix_connection(sock=sock)
        while True:
            try:
                data = await reader.readexactly(MESSAGE.size)
            except asyncio.IncompleteReadError:
                return
            slot, rows, _deadline = MESSAGE.unpack(data)
            writer.write(REPLY.pack(slot, 0))
            if rows:  # rows=0: the frontend asks for a flush of replies
                continue
            await writer.drain()

    asyncio.run(serve())


async def _round_trips(sock: socket.socket, seconds: float, in_flight: int) -> tuple[list[float], int]:
    reader, writer = await asyncio.open_unix_connection(sock=sock)
    latencies: list[float] = []
    done = 0
    end = time.perf_counter() + seconds
    if in_flight == 1:
        while time.perf_counter() < end:
            t0 = time.perf_counter()
            writer.write(MESSAGE.pack(1, 0, 0.0))
            await reader.readexactly(REPLY.size)
            latencies.append(time.perf_counter() - t0)
            done += 1
    else:
        while time.perf_counter() < end:
            writer.write(
                b"".join(MESSAGE.pack(i, 1, 0.0) for i in range(in_flight - 1)) + MESSAGE.pack(0, 0, 0.0)
            )
            await reader.readexactly(REPLY.size * in_flight)
            done += in_flight
    writer.close()
    return latencies, done


def _measure(seconds: float, in_flight: int) -> tuple[list[float], int]:
    """Round trips with a fresh engine process (each asyncio.run needs its own connection)."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    engine = mp.get_context("spawn").Process(target=_engine, args=(theirs,), daemon=True)
    engine.start()
    theirs.close()
    time.sleep(1.0)  # the spawned interpreter's start-up
    try:
        return asyncio.run(_round_trips(ours, seconds, in_flight))
    finally:
        engine.terminate()
        engine.join(5)


def control_hop(seconds: float) -> dict[str, float]:
    latencies, _ = _measure(seconds, 1)
    _, done = _measure(seconds, 64)
    return {
        "rtt_p50_us": statistics.median(latencies) * 1e6,
        "rtt_p99_us": float(np.percentile(latencies, 99)) * 1e6,
        "messages_per_s_64_in_flight": done / seconds,
    }


def tensor_move(repeats: int = 300) -> dict[str, float]:
    image = np.random.default_rng(0).standard_normal((3, 224, 224)).astype(np.float32)
    block = shared_memory.SharedMemory(create=True, size=image.nbytes * 4)
    try:
        slots = np.ndarray((4, 3, 224, 224), dtype=np.float32, buffer=block.buf)
        t0 = time.perf_counter()
        for i in range(repeats):
            slots[i % 4] = image
        shm_s = (time.perf_counter() - t0) / repeats
        t0 = time.perf_counter()
        for _ in range(repeats):
            pickle.loads(pickle.dumps(image, protocol=pickle.HIGHEST_PROTOCOL))
        pickle_s = (time.perf_counter() - t0) / repeats
        del slots
    finally:
        block.close()
        block.unlink()
    return {"shm_write_us": shm_s * 1e6, "pickle_roundtrip_us": pickle_s * 1e6, "bytes": float(image.nbytes)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=3.0)
    args = p.parse_args()
    hop = control_hop(args.seconds)
    move = tensor_move()
    print(
        "control round trip (asyncio, Unix socket): "
        f"p50 {hop['rtt_p50_us']:.0f} us, p99 {hop['rtt_p99_us']:.0f} us;"
        f" {hop['messages_per_s_64_in_flight']:.0f} messages/s with 64 in flight"
    )
    print(
        f"3x224x224 float32 ({move['bytes'] / 1e3:.0f} KB): "
        f"shared-memory slot write {move['shm_write_us']:.0f} us,"
        f" pickle dumps+loads {move['pickle_roundtrip_us']:.0f} us"
    )


if __name__ == "__main__":
    main()
