"""service/memory.py: the heap's free pages really go back to the operating system."""

from __future__ import annotations

import platform
from pathlib import Path

import pytest

from service import memory


def _rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


@pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's malloc_trim"
)
def test_trim_heap_returns_freed_memory_that_glibc_kept() -> None:
    # 200 MB in 4 kB blocks (malloc's heap, not its own mappings), one in ten kept: what is freed
    # lies in holes between live blocks, where glibc keeps it, as after a model load.
    blocks = [bytearray(4000) for _ in range(50_000)]
    kept = blocks[::10]
    del blocks
    held = _rss_bytes()
    assert memory.trim_heap()
    assert held - _rss_bytes() > 100_000_000
    del kept
