"""The decode budget: how many pixels may be decoded at once across every call.

A 70-byte PNG can declare 6300×6300 pixels, and decoding it costs ~160 MB whatever the
file size; a few hundred such calls at once would exhaust any container. The budget makes
memory for decoding a shared, bounded resource: before an image is decoded, its pixel
count (from the header, after any JPEG draft reduction) is reserved here and released
when its resize is done. A reservation that does not fit waits for room until the call's
deadline; one that could never fit is refused at once. Nothing is decoded without room.

Holders never wait for anything but their own decode, so waiting cannot deadlock.

Freed decode memory stays in the C allocator's heaps (and in RSS) unless given back: the
budget reports what each decode freed to ``service.model.memory.FreedMemory`` and, when it
falls idle, lets it trim if enough has accumulated.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from service.model.errors import DeadlineExceededError, LimitExceededError
from service.model.memory import FreedMemory

# Pillow holds decoded pixels in 4 bytes each (RGB is stored as RGBX).
BYTES_PER_PIXEL = 4


class DecodeBudget:
    """A counting budget of pixels, shared by the decode threads (thread-safe)."""

    def __init__(self, max_pixels: int, freed: FreedMemory | None = None):
        if max_pixels < 1:
            raise ValueError("max_pixels must be >= 1")
        self.max_pixels = max_pixels
        self._in_use = 0
        self._room = threading.Condition()
        self._freed = freed

    @property
    def in_use(self) -> int:
        with self._room:
            return self._in_use

    @contextmanager
    def reserve(
        self, pixels: int, deadline: float | None = None, index: int | None = None
    ) -> Iterator[None]:
        """Hold ``pixels`` of the budget for the ``with`` block.

        ``deadline`` is a ``time.monotonic()`` instant (None: wait as long as needed);
        raises LimitExceededError if ``pixels`` alone exceed the budget and
        DeadlineExceededError if no room was free in time.
        """
        if pixels > self.max_pixels:
            raise LimitExceededError(
                "pixels to decode",
                pixels,
                self.max_pixels,
                setting="max_decode_pixels",
                index=index,
            )
        with self._room:
            while self._in_use + pixels > self.max_pixels:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    where = "" if index is None else f"image {index}: "
                    raise DeadlineExceededError(
                        f"{where}the deadline passed while waiting for decode memory "
                        f"({self._in_use:,} of max_decode_pixels {self.max_pixels:,} pixels "
                        f"in use, this image needs {pixels:,})"
                    )
                self._room.wait(left)
            self._in_use += pixels
        try:
            yield
        finally:
            with self._room:
                self._in_use -= pixels
                idle = self._in_use == 0
                self._room.notify_all()
            if self._freed is not None:
                self._freed.freed(pixels * BYTES_PER_PIXEL)
                if idle:
                    self._freed.release_if_due()  # outside the lock: trimming takes a while
