"""The disk tier of the GPU path: blocks read from the store into a ring of pinned staging buffers.

Reads run ahead of use on the asyncio prefetcher's thread pool (O_DIRECT preadv into page-aligned
pinned buffers, checksum verified), so that disk reads, host -> HBM copies and compute overlap.
A staging buffer returns to the ring only when the consumer advances past its block; the GPU
tier makes sure that block's H2D copy has completed before advancing (see gpu_tier.GpuWeights).
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch

from tiermem.errors import TiermemError
from tiermem.pinned import PinnedArena
from tiermem.prefetch import Prefetcher


class DiskStager:
    """Streams the bytes of disk-tier blocks, in order, through `buffers` pinned staging buffers."""

    def __init__(self, reader, names: Sequence[str], arena: PinnedArena, lookahead: int, io_threads: int,
                 backend=None) -> None:
        self.reader = reader
        self.names = frozenset(names)
        self.backend = backend
        size = max(reader.block_nbytes(n) for n in names)
        self._free = deque(arena.take(size, f"disk staging buffer {i}") for i in range(lookahead + 1))
        self._lock = threading.Lock()
        self.bytes_read = 0
        self._prefetcher: Prefetcher[tuple[torch.Tensor, torch.Tensor]] = Prefetcher(
            self._load, lookahead, io_threads, release=self._release)

    def _load(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Runs in an I/O thread: read and verify block `name` into a free staging buffer."""
        with self._lock:
            if not self._free:
                raise TiermemError(f"no free staging buffer for block {name!r}: prefetch bound broken")
            buf = self._free.popleft()
        try:
            view = self.reader.read_block(name, out=buf, backend=self.backend)
        except BaseException:
            with self._lock:
                self._free.append(buf)
            raise
        with self._lock:
            self.bytes_read += view.numel()
        return view, buf

    def _release(self, _name: str, loaded: tuple[torch.Tensor, torch.Tensor]) -> None:
        with self._lock:
            self._free.append(loaded[1])

    @contextmanager
    def stream(self, names: Sequence[str]) -> Iterator[Iterator[tuple[str, torch.Tensor]]]:
        """Yield (name, pinned bytes) for `names` in order; a buffer is reused once the iterator advances."""
        with self._prefetcher.stream(names) as blocks:
            yield ((name, view) for name, (view, _buf) in blocks)

    def close(self) -> None:
        self._prefetcher.close()
