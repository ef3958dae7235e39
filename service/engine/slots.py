"""Shared-memory slots: where a frontend process puts a request's preprocessed images and finds its
logits, and the engine process reads and writes them, so tensors cross the process boundary
without being pickled (the frontend/engine process split, issue 12).

One `SlotBlock` per model version, created by the engine and attached by every frontend:

    inputs  float32 [rows, C, H, W]   written by the frontend that holds the row (decode into it)
    logits  float32 [rows, K]         written by the engine, read by that frontend

rows = the version's admission capacity (max_queue_size + max_batch_size): a request admitted by
the engine always finds its rows, so the block never needs to grow. float32 whatever the model's
input dtype: preprocessing produces float32 and the session casts (fp16 models).

`RowAllocator` is the engine's bookkeeping: which rows are free, and which frontend connection
holds the others, so a frontend that dies (its connection closes) gives every row back at once.
It prefers one contiguous run of rows, so a batch of one request can run on a view of the block
with no copy.

Why multiprocessing.shared_memory: it is the standard library's (no dependency), gives one named
POSIX segment that numpy views directly, and is what CPython's own process pools build on. Its trap
on Python < 3.13: every process that creates *or attaches* registers the segment with the resource
tracker, which unlinks it when that process exits, and the tracker (one, shared by every process
the supervisor spawns) keeps one entry per name, not per process: a frontend's exit would destroy
the engine's block under every other frontend, and an unregister by one would cancel the other's.
So our blocks are kept out of the tracker altogether, and their life is explicit: the engine
unlinks its blocks when it stops, and the supervisor removes whatever a killed engine left with
`remove_blocks(prefix)` (the prefix names the supervisor: `cnnserve-<pid>`). Linux (/dev/shm).
"""

from __future__ import annotations

import math
import os
import secrets
from dataclasses import dataclass
from multiprocessing import resource_tracker, shared_memory
from pathlib import Path

import numpy as np

FLOAT32 = np.dtype(np.float32)
SHM_DIR = Path("/dev/shm")


@dataclass(frozen=True)
class SlotLayout:
    """The shape of one model version's block."""

    rows: int
    input_shape: tuple[int, ...]
    classes: int

    def __post_init__(self) -> None:
        if self.rows < 1 or self.classes < 1 or not self.input_shape or min(self.input_shape) < 1:
            raise ValueError(f"invalid slot layout {self}")

    @property
    def input_bytes(self) -> int:
        return self.rows * math.prod(self.input_shape) * FLOAT32.itemsize

    @property
    def nbytes(self) -> int:
        return self.input_bytes + self.rows * self.classes * FLOAT32.itemsize


class SlotBlock:
    """One model version's shared-memory block (see the module docstring). `create` in the engine,
    `attach` by name in a frontend; `close()` in every process, `unlink()` once, by the creator."""

    def __init__(self, memory: shared_memory.SharedMemory, layout: SlotLayout, *, owner: bool) -> None:
        if memory.size < layout.nbytes:
            raise ValueError(
                f"shared memory {memory.name} holds {memory.size} bytes; the layout needs {layout.nbytes}"
            )
        self.layout = layout
        self.owner = owner
        self._memory = memory
        buffer = memory.buf
        self.inputs = np.ndarray((layout.rows, *layout.input_shape), dtype=FLOAT32, buffer=buffer)
        self.logits = np.ndarray(
            (layout.rows, layout.classes), dtype=FLOAT32, buffer=buffer, offset=layout.input_bytes
        )

    @property
    def name(self) -> str:
        return self._memory.name

    @classmethod
    def create(cls, layout: SlotLayout, *, prefix: str = "cnnserve") -> SlotBlock:
        """A new block, zero-filled, under a fresh random name."""
        memory = shared_memory.SharedMemory(
            name=f"{prefix}-{secrets.token_hex(6)}", create=True, size=layout.nbytes
        )
        _untrack(memory)
        return cls(memory, layout, owner=True)

    @classmethod
    def attach(cls, name: str, layout: SlotLayout) -> SlotBlock:
        """The engine's block `name`, without taking part in its life (the module docstring: why)."""
        memory = shared_memory.SharedMemory(name=name)
        _untrack(memory)
        return cls(memory, layout, owner=False)

    def close(self) -> None:
        """Drop this process's mapping (numpy views of it must not be used afterwards)."""
        del self.inputs, self.logits
        self._memory.close()

    def unlink(self) -> None:
        """Remove the segment (the creator, once every frontend is gone or will reattach)."""
        if not self.owner:
            raise RuntimeError("only the process that created a slot block unlinks it")
        # unlink() unregisters from the tracker: register first, so that stays a matched pair.
        resource_tracker.register(self._memory._name, "shared_memory")  # type: ignore[attr-defined]
        self._memory.unlink()


def _untrack(memory: shared_memory.SharedMemory) -> None:
    """Keep the resource tracker out of this segment's life (the module docstring says why)."""
    resource_tracker.unregister(memory._name, "shared_memory")  # type: ignore[attr-defined]


def remove_blocks(prefix: str) -> list[str]:
    """Unlink every block whose name starts with `prefix` (what a killed engine left behind);
    returns their names."""
    removed = []
    for path in SHM_DIR.glob(f"{prefix}*"):
        try:
            os.unlink(path)
        except FileNotFoundError:  # removed meanwhile
            continue
        removed.append(path.name)
    return sorted(removed)


class RowAllocator:
    """Which rows of a block are free, and who holds the others (see the module docstring).

    Exact: `allocate(n, owner)` succeeds whenever n <= free rows (admission guarantees that), with
    one contiguous run when there is one and the lowest free rows otherwise.
    """

    def __init__(self, rows: int) -> None:
        self._free = np.ones(rows, dtype=bool)
        self._owner: dict[int, object] = {}

    @property
    def free(self) -> int:
        return int(self._free.sum())

    def allocate(self, n: int, owner: object) -> tuple[int, ...]:
        if not 1 <= n <= self.free:
            raise ValueError(f"cannot allocate {n} rows: {self.free} free of {len(self._free)}")
        run = self._contiguous(n)
        rows = (
            tuple(range(run, run + n))
            if run is not None
            else tuple(int(i) for i in np.flatnonzero(self._free)[:n])
        )
        self._free[list(rows)] = False
        for row in rows:
            self._owner[row] = owner
        return rows

    def release(self, rows: tuple[int, ...]) -> None:
        if len(set(rows)) != len(rows):
            raise ValueError(f"rows {rows} name a row twice")
        for row in rows:
            if self._free[row]:
                raise ValueError(f"row {row} is not allocated")
        for row in rows:
            self._free[row] = True
            del self._owner[row]

    def release_owner(self, owner: object) -> int:
        """Free every row `owner` holds (its frontend went away); returns how many."""
        rows = tuple(row for row, held_by in self._owner.items() if held_by is owner)
        self.release(rows)
        return len(rows)

    def _contiguous(self, n: int) -> int | None:
        """The first row of the first run of n free rows, or None."""
        run = 0
        for row, free in enumerate(self._free):
            run = run + 1 if free else 0
            if run == n:
                return row - n + 1
        return None


def is_contiguous(rows: tuple[int, ...]) -> bool:
    """True when `rows` are one ascending run (the block can be used as a view, no copy)."""
    return all(b == a + 1 for a, b in zip(rows, rows[1:], strict=False))


__all__ = ["RowAllocator", "SlotBlock", "SlotLayout", "is_contiguous", "remove_blocks"]
