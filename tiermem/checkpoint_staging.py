"""Host staging memory of async checkpoints: one buffer handed out as FIFO regions.

The caller copies pieces of a state dict into regions; the writer frees each region once its
bytes are on disk. `alloc` blocks while the buffer is full, so a save larger than the buffer is
staged piece by piece as the writer drains it, and a second save waits for memory instead of
overwriting bytes not yet written.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass

import numpy as np
import torch

from tiermem.checkpoint_format import PAGE
from tiermem.errors import CheckpointError


@dataclass
class Region:
    start: int
    nbytes: int
    tensor: torch.Tensor  # uint8 [nbytes] view into the ring buffer (pinned when the ring is)
    array: np.ndarray  # the same bytes as a numpy array, for pwrite and hashing


class StagingRing:
    """A host buffer handed out as regions in FIFO order; `alloc` waits until the writer frees space.

    With `grow=True` the buffer is (re)allocated by `reserve` to fit a whole save, once the ring is
    empty; otherwise its capacity is fixed and saves larger than it are staged piece by piece.
    """

    def __init__(self, capacity: int, pin: bool, grow: bool) -> None:
        self.pin, self.grow = pin, grow
        self._cond = threading.Condition()
        self._live: deque[list] = deque()  # [start, end, freed] in allocation order
        self._buffer: torch.Tensor | None = None
        self.capacity = 0
        if capacity:
            self._allocate(capacity)

    def _allocate(self, capacity: int) -> None:
        self._buffer = None  # let the old buffer go before taking a new one
        try:  # page-aligned base, so regions suit O_DIRECT (torch's pinned allocator gave 512-byte alignment)
            raw = torch.empty(capacity + PAGE, dtype=torch.uint8, pin_memory=self.pin)
            shift = -raw.data_ptr() % PAGE
            self._buffer = raw[shift:shift + capacity]
            if not self.pin:
                self._buffer.zero_()  # fault the pages in now rather than inside the first save
        except RuntimeError as exc:
            self.capacity = 0
            raise CheckpointError(f"cannot allocate {capacity} bytes of {'pinned ' if self.pin else ''}host "
                                  f"staging memory ({exc}); pass a smaller staging_bytes") from exc
        self.capacity = capacity

    def reserve(self, total: int) -> None:
        """Grow mode: make the buffer hold `total` bytes (waits for in-flight saves to drain)."""
        total = -(-total // PAGE) * PAGE
        with self._cond:
            if not self.grow or total <= self.capacity:
                return
            while self._live:
                self._cond.wait()
            self._allocate(total)

    def _fit(self, n: int) -> int | None:
        if not self._live:
            return 0 if n <= self.capacity else None
        oldest, newest_end = self._live[0][0], self._live[-1][1]
        if newest_end > oldest:  # not wrapped: free space is [newest_end, capacity) and [0, oldest)
            if newest_end + n <= self.capacity:
                return newest_end
            return 0 if n <= oldest else None
        return newest_end if newest_end + n <= oldest else None  # wrapped: [newest_end, oldest)

    def alloc(self, nbytes: int) -> Region:
        n = -(-nbytes // PAGE) * PAGE
        with self._cond:
            if self._buffer is None or n > self.capacity:
                raise CheckpointError(f"staging ring of {self.capacity} bytes cannot hold a {n}-byte piece")
            while (start := self._fit(n)) is None:
                self._cond.wait()
            self._live.append([start, start + n, False])
            view = self._buffer[start:start + n]
        return Region(start, n, view, view.numpy())

    def free(self, region: Region) -> None:
        with self._cond:
            for entry in self._live:
                if entry[0] == region.start and not entry[2]:
                    entry[2] = True
                    break
            while self._live and self._live[0][2]:
                self._live.popleft()
            self._cond.notify_all()

    def release(self) -> None:
        """Drop the buffer (the checkpointer is closed and idle)."""
        with self._cond:
            self._buffer, self.capacity = None, 0
