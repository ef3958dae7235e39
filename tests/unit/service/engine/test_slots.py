"""Shared-memory slots (service/engine/slots.py): what a frontend writes the engine reads, a
frontend's exit or death never removes the engine's block, nothing leaks, and the row allocator
is exact and gives a dead frontend's rows back."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from service.engine.slots import SHM_DIR, RowAllocator, SlotBlock, SlotLayout, is_contiguous, remove_blocks

LAYOUT = SlotLayout(rows=6, input_shape=(3, 4, 5), classes=7)
ROOT = Path(__file__).resolve().parents[4]


def _frontend(name: str, layout: SlotLayout, row: int, done: mp.Queue) -> None:  # type: ignore[type-arg]
    """What a frontend does: attach, preprocess into its row, read the engine's logits."""
    block = SlotBlock.attach(name, layout)
    block.inputs[row] = float(row) + 0.5
    done.put(block.logits[row].tolist())
    block.close()


@pytest.fixture
def block() -> SlotBlock:
    created = SlotBlock.create(LAYOUT, prefix=f"cnnserve-test-{os.getpid()}")
    yield created
    if (SHM_DIR / created.name).exists():
        created.close()
        created.unlink()


def test_the_layout_says_what_the_block_holds() -> None:
    assert LAYOUT.input_bytes == 6 * 3 * 4 * 5 * 4
    assert LAYOUT.nbytes == LAYOUT.input_bytes + 6 * 7 * 4
    with pytest.raises(ValueError, match="invalid slot layout"):
        SlotLayout(rows=0, input_shape=(3, 4, 5), classes=7)


def test_a_frontend_process_writes_what_the_engine_reads(block: SlotBlock) -> None:
    assert block.inputs.shape == (6, 3, 4, 5) and block.logits.shape == (6, 7)
    assert not block.inputs.any() and not block.logits.any()  # zero-filled
    block.logits[2] = np.arange(7, dtype=np.float32)
    ctx = mp.get_context("spawn")
    done = ctx.Queue()
    frontend = ctx.Process(target=_frontend, args=(block.name, LAYOUT, 2, done))
    frontend.start()
    assert done.get(timeout=60) == list(range(7))
    frontend.join(60)
    assert frontend.exitcode == 0
    np.testing.assert_array_equal(block.inputs[2], np.full((3, 4, 5), 2.5, np.float32))
    assert not block.inputs[[0, 1, 3, 4, 5]].any()
    # The frontend exited normally: its resource tracker did not remove the engine's block.
    assert (SHM_DIR / block.name).exists()
    again = SlotBlock.attach(block.name, LAYOUT)
    np.testing.assert_array_equal(again.inputs[2], block.inputs[2])
    again.close()


def test_a_killed_frontend_leaves_the_block_and_the_owner_removes_it(block: SlotBlock) -> None:
    code = (
        "import os, signal, sys\n"
        "from service.engine.slots import SlotBlock, SlotLayout\n"
        f"b = SlotBlock.attach({block.name!r}, SlotLayout(rows=6, input_shape=(3, 4, 5), classes=7))\n"
        "b.inputs[0] = 9.0\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, timeout=120)
    assert result.returncode == -signal.SIGKILL, result.stderr
    time.sleep(0.5)  # the killed process's resource tracker, had it tracked the block, unlinks it now
    assert (SHM_DIR / block.name).exists()
    assert (block.inputs[0] == 9.0).all()
    block.close()
    block.unlink()
    assert not (SHM_DIR / block.name).exists()
    with pytest.raises(RuntimeError, match="only the process that created"):
        attached = SlotBlock.create(LAYOUT, prefix=f"cnnserve-test-{os.getpid()}")
        try:
            SlotBlock.attach(attached.name, LAYOUT).unlink()
        finally:
            attached.close()
            attached.unlink()


def test_what_a_killed_engine_left_is_removed_by_prefix() -> None:
    prefix = f"cnnserve-test-{os.getpid()}-engine"
    left = [SlotBlock.create(LAYOUT, prefix=prefix) for _ in range(2)]
    names = sorted(b.name for b in left)
    for b in left:
        b.close()  # the engine is gone: nobody maps them, nobody unlinked them
    assert remove_blocks(prefix) == names
    assert not any((SHM_DIR / n).exists() for n in names)
    assert remove_blocks(prefix) == []


def test_the_allocator_is_exact_and_prefers_one_run() -> None:
    rows = RowAllocator(6)
    a, b = object(), object()
    first = rows.allocate(2, a)
    second = rows.allocate(3, b)
    assert first == (0, 1) and second == (2, 3, 4) and rows.free == 1
    with pytest.raises(ValueError, match="cannot allocate 2 rows: 1 free of 6"):
        rows.allocate(2, a)
    rows.release(first)
    assert rows.allocate(3, a) == (0, 1, 5)  # no run of 3 left: the lowest free rows
    assert not is_contiguous((0, 1, 5)) and is_contiguous((2, 3, 4)) and is_contiguous((4,))
    with pytest.raises(ValueError, match="name a row twice"):
        rows.release((0, 0))
    assert rows.release_owner(b) == 3 and rows.free == 3  # b's frontend died: all its rows back
    with pytest.raises(ValueError, match="row 2 is not allocated"):
        rows.release((2,))
    assert rows.allocate(3, b) == (2, 3, 4)
    assert rows.release_owner(object()) == 0
