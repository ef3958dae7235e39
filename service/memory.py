"""Giving the heap's free pages back to the operating system after a burst of allocations.

glibc's malloc keeps memory it was given back by `free` for the next allocation instead of
returning it, except the part at the very top of a heap. A model load frees a lot in the middle of
its heaps: ONNX Runtime's parsed model.onnx and the initializers it copied out of it, a warm-up's
activations (the CPU arena is off, so they go back to malloc); a gradient worker's dropped modules.
Measured on 2 cores (issue 13): ResNet-50 alone left 166 MB of such free memory in the server, the
six demo models 490 MB. `malloc_trim(0)` hands every free page of every arena back (madvise), in
1-11 ms; what is still in use is untouched, and the next allocations fault fresh pages in as they
would after a start. Without glibc (musl, macOS) there is nothing to call,
and RSS goes down later or not at all.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
from typing import Any

log = logging.getLogger(__name__)


@functools.cache
def _malloc_trim() -> Any:
    """glibc's malloc_trim, or None where the C library has none."""
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def trim_heap() -> bool:
    """Return the heap's free pages to the operating system (glibc's malloc_trim(0)). Takes the
    allocator's locks for a few milliseconds; ctypes releases the GIL meanwhile. Returns False where
    there is no malloc_trim to call."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


__all__ = ["trim_heap"]
