"""Giving freed memory back to the operating system.

glibc's malloc keeps memory that Python, Pillow and gRPC free in its heaps for reuse, and
returns it to the OS only when the top of a heap is free. After a burst of large decodes
(or large requests) the server's RSS therefore stays near its peak while idle, though
nothing is in use — and a container's memory limit counts RSS. ``malloc_trim(0)`` hands
every free page back; it costs about a millisecond per few hundred MB of heap.

``FreedMemory`` counts the bytes of large, short-lived buffers as they are freed (decoded
pixels, request messages) and trims when enough has accumulated and no decode is running,
and on the server's periodic tick, so RSS returns to its resting level after a burst.
Elsewhere than glibc (musl, macOS) trimming is a no-op.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import threading
from collections.abc import Callable

# Trim at most once per this many freed bytes while busy (and on every idle tick).
RELEASE_EVERY_BYTES = 256 * 1024 * 1024


def _load_malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        trim = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim  # type: ignore[no-any-return]


_malloc_trim = _load_malloc_trim()


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
