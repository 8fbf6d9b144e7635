"""Giving freed memory back to the operating system.

glibc's malloc keeps memory that Python, Pillow and gRPC free in its heaps for reuse, and
returns it to the OS only when the top of a heap is free. After a burst of large decodes
(or large requests) the server's RSS therefore stays near its peak while idle, though
nothing is in use — and a container's memory limit counts RSS. ``malloc_trim(0)`` hands
every free page back; it costs about a millisecond per few hundred MB of heap.

``FreedMemory`` counts the bytes of large, short-lived buffers as they are freed (decoded
pixels, request messages) and trims when enough has accumulated and no decode is running,
and on the server's periodic tick, so RSS returns to its resting level after a burst.
``configure_allocator()`` (called once at server start) also makes glibc serve every
allocation of 8 MiB or more — the blocks Pillow holds large decoded images in — with its
own mmap, returned to the OS the moment it is freed. By default glibc raises that
threshold after the first such free, and each decode thread's arena then keeps the
largest image it ever decoded: with four decode threads, RSS grew by four large images
even when the decode budget let only one be decoded at a time.

Elsewhere than glibc (musl, macOS) both are no-ops.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import threading
from collections.abc import Callable

# Trim at most once per this many freed bytes while busy (and on every idle tick).
RELEASE_EVERY_BYTES = 256 * 1024 * 1024
# Allocations at least this large get their own mmap (glibc's M_MMAP_THRESHOLD). Smaller
# than Pillow's 16 MiB image blocks; larger than a batch of model inputs (a batch of 32
# at 224 px is 4.8 MB), which is allocated and freed for every batch.
MMAP_THRESHOLD_BYTES = 8 * 1024 * 1024
_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number


def _libc_function(name: str, argtypes: list[type]) -> Callable[..., int] | None:
    library = ctypes.util.find_library("c")
    if library is None:
        return None
    try:
        function = getattr(ctypes.CDLL(library), name)
    except (OSError, AttributeError):  # not glibc
        return None
    function.argtypes = argtypes
    function.restype = ctypes.c_int
    return function  # type: ignore[no-any-return]


_malloc_trim = _libc_function("malloc_trim", [ctypes.c_size_t])
_mallopt = _libc_function("mallopt", [ctypes.c_int, ctypes.c_int])


def configure_allocator(mmap_threshold: int = MMAP_THRESHOLD_BYTES) -> bool:
    """Give large allocations their own mmap (see the module docstring); True if set."""
    if _mallopt is None:
        return False
    return bool(_mallopt(_M_MMAP_THRESHOLD, mmap_threshold))


def release_free_memory() -> bool:
    """Return free heap memory to the OS; True if anything was released."""
    if _malloc_trim is None:
        return False
    return bool(_malloc_trim(0))


class FreedMemory:
    """Bytes freed since the last trim; trims when due (thread-safe)."""

    def __init__(
        self,
        every: int = RELEASE_EVERY_BYTES,
        release: Callable[[], object] = release_free_memory,
    ):
        self.every = every
        self._release = release
        self._pending = 0
        self._lock = threading.Lock()
        self.releases = 0

    def freed(self, nbytes: int) -> None:
        with self._lock:
            self._pending += nbytes

    def release_if_due(self, idle: bool = False) -> bool:
        """Trim if ``every`` bytes were freed since the last trim (with ``idle``: if any)."""
        with self._lock:
            due = self._pending >= self.every or (idle and self._pending > 0)
            if due:
                self._pending = 0
                self.releases += 1
        if due:
            self._release()
        return due
