"""The engine process (service/engine/process.py) and its client (service/engine/remote.py): the
classify path over the socket and shared-memory rows answers what the in-process engine answers,
admission is exact across frontends, a frontend that dies gives back what it held, and an engine
that dies fails every call at once instead of letting it wait for its deadline."""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from linear_repo import GRAY8, RGB8, expected_probs, png, random_image, run, settings_for

from service.engine.process import run_engine_process
from service.engine.remote import RemoteEngine
from service.engine.slots import SHM_DIR, remove_blocks
from service.errors import ResourceExhausted, Unavailable
from service.frontend.classify import ClassifyPath

ROOT = Path(__file__).resolve().parents[4]


class EngineProcess:
    """A spawned engine process on a socket in tmp_path, stopped (SIGTERM, then SIGKILL) at the end."""

    def __init__(self, root: Path, tmp_path: Path, **settings: Any) -> None:
        self.settings = settings_for(root, **settings)
        self.socket = tmp_path / "engine.sock"
        self.prefix = f"cnnserve-test-{os.getpid()}-{tmp_path.name[-6:]}"
        self.process = mp.get_context("spawn").Process(
            target=run_engine_process, args=(self.settings.model_dump_json(), str(self.socket), self.prefix)
        )
        self.process.start()

    def blocks(self) -> list[str]:
        return sorted(p.name for p in SHM_DIR.glob(f"{self.prefix}*"))

    def stop(self) -> None:
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(30)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(10)
        remove_blocks(self.prefix)


@pytest.fixture
def engine_process(repo: dict[str, Any], tmp_path: Path) -> Any:
    started: list[EngineProcess] = []

    def start(**settings: Any) -> EngineProcess:
        started.append(EngineProcess(repo["root"], tmp_path, **settings))
        return started[-1]

    yield start
    for process in started:
        process.stop()


def test_the_classify_path_over_the_engine_process_answers_like_in_process(
    repo: dict[str, Any], engine_process: Any
) -> None:
    process = engine_process(models="rgb,gray")
    w, b = repo["weights"][("rgb", 2)]
    gw, gb = repo["weights"][("gray", 1)]
    arrays = [random_image(i, (12 + i, 10)) for i in range(7)]  # 7 > max_batch_size 4

    async def main() -> None:
        remote = RemoteEngine(process.socket)
        await remote.connect()
        assert remote.ready
        assert [(m.name, m.version) for m in remote.models()] == [("gray", 1), ("rgb", 2)]
        path = ClassifyPath(remote, process.settings)
        probs, timings = await path.classify_images(remote.get("rgb"), [png(a) for a in arrays], None)
        np.testing.assert_allclose(probs, expected_probs(arrays, RGB8, w, b), rtol=1e-4, atol=1e-6)
        assert timings.decode_s > 0 and timings.inference_s > 0
        gray = remote.get("gray")
        x = np.random.default_rng(9).standard_normal((3, 1, 8, 8)).astype(np.float32)
        logits, _ = await path.infer(gray, x, None)
        np.testing.assert_allclose(
            logits, x.reshape(3, -1).astype(np.float64) @ gw + gb, rtol=1e-4, atol=1e-4
        )
        probs, _ = await path.classify_images(gray, [png(arrays[0])], None)
        np.testing.assert_allclose(probs, expected_probs([arrays[0]], GRAY8, gw, gb), rtol=1e-4, atol=1e-6)
        # Other outputs cross the wire too, side by side in the order asked (the linear models'
        # features are their flattened input).
        both, _ = await path.infer(gray, x, None, outputs=("features", "logits"))
        assert both.shape == (3, 64 + 3)
        np.testing.assert_array_equal(both[:, :64], x.reshape(3, -1))
        np.testing.assert_allclose(both[:, 64:], logits, rtol=1e-6)
        path.close()
        await remote.close()

    run(main)


def test_admission_is_exact_across_frontends(repo: dict[str, Any], engine_process: Any) -> None:
    process = engine_process(models="rgb", max_batch_size=1, max_queue_size=1)  # capacity 2

    async def main() -> None:
        first, second = RemoteEngine(process.socket), RemoteEngine(process.socket)
        await first.connect()
        await second.connect()
        model = first.get("rgb")
        held = await first.admit(model, 2)
        with pytest.raises(ResourceExhausted) as refused:
            await second.admit(model, 1)
        assert refused.value.reason == "queue_full"
        held.release()
        again = await second.admit(model, 2)
        again.inputs[0][...] = 0.5
        again.inputs[1][...] = 0.25
        logits, _ = await second.infer(model, again, None)
        assert logits.shape == (2, 4)
        for frontend in (first, second):
            await frontend.close()

    run(main)


def test_a_killed_frontend_gives_back_what_it_held(repo: dict[str, Any], engine_process: Any) -> None:
    process = engine_process(models="rgb", max_batch_size=1, max_queue_size=1)
    code = (
        "import asyncio, os, signal\n"
        "from pathlib import Path\n"
        "from service.engine.remote import RemoteEngine\n"
        "async def main():\n"
        f"    remote = RemoteEngine(Path({str(process.socket)!r}))\n"
        "    await remote.connect()\n"
        "    await remote.admit(remote.get('rgb'), 2)\n"
        "    print('held', flush=True)\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        "asyncio.run(main())\n"
    )

    async def main() -> None:
        remote = RemoteEngine(process.socket)
        await remote.connect()
        frontend = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-c", code],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert frontend.returncode == -signal.SIGKILL and "held" in frontend.stdout, frontend.stderr
        deadline = time.monotonic() + 10
        while True:  # the engine notices the closed connection on its next read
            try:
                admission = await remote.admit(remote.get("rgb"), 2)
                break
            except ResourceExhausted:
                assert time.monotonic() < deadline, "the killed frontend's places were never given back"
                await asyncio.sleep(0.05)
        admission.release()
        await remote.close()

    run(main)


def test_a_killed_engine_fails_every_call_at_once(repo: dict[str, Any], engine_process: Any) -> None:
    process = engine_process(models="rgb")

    async def main() -> None:
        remote = RemoteEngine(process.socket)
        await remote.connect()
        model = remote.get("rgb")
        admission = await remote.admit(model, 1)
        assert process.blocks()
        os.kill(process.process.pid, signal.SIGKILL)
        started = time.monotonic()
        while remote.ready:
            assert time.monotonic() - started < 5
            await asyncio.sleep(0.01)
        with pytest.raises(Unavailable, match="engine process"):
            await remote.infer(model, admission, time.monotonic() + 60)
        with pytest.raises(Unavailable, match="engine process"):
            await remote.admit(model, 1)
        assert time.monotonic() - started < 5  # not the 60 s deadline
        await remote.close()

    run(main)
    process.process.join(10)
    left = process.blocks()
    assert left and remove_blocks(process.prefix) == left  # the supervisor's clean-up
    assert process.blocks() == []


def test_a_stopped_engine_leaves_no_block(repo: dict[str, Any], engine_process: Any) -> None:
    process = engine_process(models="rgb,gray")

    async def main() -> None:
        remote = RemoteEngine(process.socket)
        await remote.connect()
        assert len(process.blocks()) == 2
        await remote.close()

    run(main)
    process.process.terminate()
    process.process.join(30)
    assert process.process.exitcode == 0
    assert process.blocks() == []
