"""Page-locked host memory of exactly the size asked for.

torch's pinned allocator rounds every request up to a power of two (8.7 GB takes 16 GiB), which
a host tier of tens of GB cannot afford. A PinnedArena allocates one ordinary buffer, page-locks it
with cudaHostRegister, and hands out 4 KiB-aligned slices; close() unregisters it. An ArenaPool keeps the
arenas of closed KV caches registered for the next cache of the same size. device_alias gives kernels on the
GPU a view of page-locked memory that they read in place, over PCIe.
"""

from __future__ import annotations

import weakref

import torch

from tiermem.errors import BudgetError, ConfigError, TierIOError

ALIGN = 4096


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def aligned_size(sizes: list[int]) -> int:
    """Arena bytes that `take` calls of these sizes need, each starting on a 4 KiB boundary."""
    return sum(_round_up(n, ALIGN) for n in sizes)


CUDA_MEMORY_TYPE_HOST = 1  # cudaPointerAttributes.type of page-locked host memory


def device_alias(buffer: torch.Tensor, device: torch.device | str) -> torch.Tensor | None:
    """A uint8 tensor on CUDA `device` over the bytes of `buffer` [n] (uint8, page-locked: cudaHostRegister'd or
    pinned), which stays on the host: a kernel that reads it reads host memory over PCIe, no copy issued. None
    where CuPy is missing or CUDA does not map the memory into the device's address space. The alias keeps
    `buffer` alive; `buffer` must stay page-locked as long as the alias is used."""
    if buffer.device.type != "cpu" or buffer.dtype != torch.uint8 or buffer.dim() != 1:
        raise ConfigError(f"device_alias takes a 1-D uint8 host buffer, got {buffer.dtype} {tuple(buffer.shape)} "
                          f"on {buffer.device}")
    try:
        import cupy
    except (ImportError, OSError, RuntimeError):
        return None
    device = torch.device(device)
    index = device.index if device.index is not None else torch.cuda.current_device()
    with cupy.cuda.Device(index):
        try:
            attributes = cupy.cuda.runtime.pointerGetAttributes(buffer.data_ptr())
        except cupy.cuda.runtime.CUDARuntimeError:
            return None
        if attributes.type != CUDA_MEMORY_TYPE_HOST or not attributes.devicePointer:
            return None
        memory = cupy.cuda.UnownedMemory(attributes.devicePointer, buffer.numel(), buffer, device_id=index)
        mapped = cupy.ndarray((buffer.numel(),), cupy.uint8, cupy.cuda.MemoryPointer(memory, 0))
    return torch.from_dlpack(mapped)


def _unregister(buffer: torch.Tensor) -> None:
    torch.cuda.cudart().cudaHostUnregister(buffer.data_ptr())


class PinnedArena:
    """One page-locked host allocation of `nbytes` (rounded to 4 KiB), carved into aligned slices."""

    def __init__(self, nbytes: int) -> None:
        self.capacity = _round_up(max(nbytes, ALIGN), ALIGN)
        raw = torch.empty(self.capacity + ALIGN, dtype=torch.uint8)
        start = -raw.data_ptr() % ALIGN
        self._buffer = raw[start:start + self.capacity]
        self._used = 0
        self._unregister = None
        self._closed = False
        if torch.cuda.is_available():
            status = torch.cuda.cudart().cudaHostRegister(self._buffer.data_ptr(), self.capacity, 0)
            if int(status) != 0:
                raise TierIOError(f"cudaHostRegister of {self.capacity} bytes failed ({status}): lower "
                                  "cpu_memory or free host memory")
            # Unregistered on close() or, at the latest, when the arena is collected: memory freed while still
            # registered would make a later cudaHostRegister of the same addresses fail.
            self._unregister = weakref.finalize(self, _unregister, self._buffer)

    @property
    def registered(self) -> bool:
        """Page-locked with CUDA (torch's Tensor.is_pinned() does not see cudaHostRegister'd memory)."""
        return self._unregister is not None and self._unregister.alive

    @property
    def closed(self) -> bool:
        """close() was called: the memory is released and take() refuses."""
        return self._closed

    @property
    def used(self) -> int:
        return self._used

    def reset(self) -> None:
        """Forget every slice handed out (their memory is handed out again by later take calls)."""
        self._used = 0

    def take(self, nbytes: int, what: str = "buffer") -> torch.Tensor:
        """A slice of `nbytes` starting on a 4 KiB boundary; BudgetError when the arena is full."""
        if self._closed:
            raise TierIOError(f"pinned host arena of {self.capacity} B is closed: it cannot hold {what}")
        start = _round_up(self._used, ALIGN)
        if start + nbytes > self.capacity:
            raise BudgetError(f"pinned host arena of {self.capacity} B cannot fit {what} ({nbytes} B, "
                              f"{self._used} B used): raise cpu_memory")
        self._used = start + nbytes
        return self._buffer[start:start + nbytes]

    def close(self) -> None:
        if self._unregister is not None:
            self._unregister()
            self._unregister = None
        self._buffer = torch.empty(0, dtype=torch.uint8)
        self._closed = True

    def __enter__(self) -> PinnedArena:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ArenaPool:
    """PinnedArenas kept registered between the caches that use them, one after another.

    Registering is slow: 4.3 GB took 1.3-1.7 s on the GPU machine (benchmarks/results/pinned_arena_time_h200.json),
    which a KV cache in host RAM paid inside every generation's prefill. get(nbytes) hands out a kept arena of that
    capacity, or closes every kept arena (so that what is pinned never exceeds what the caller's budget has
    checked: the live arenas plus the new one) and registers a new one; put(arena) keeps it for the next get.
    """

    def __init__(self) -> None:
        self._kept: list[PinnedArena] = []
        self._closed = False

    @property
    def kept_bytes(self) -> int:
        """Bytes of the arenas kept for reuse (pinned, held by no cache)."""
        return sum(a.capacity for a in self._kept)

    def get(self, nbytes: int) -> PinnedArena:
        capacity = _round_up(max(nbytes, ALIGN), ALIGN)
        for arena in self._kept:
            if arena.capacity == capacity:
                self._kept.remove(arena)
                arena.reset()
                return arena
        self.release_kept()
        return PinnedArena(nbytes)

    def put(self, arena: PinnedArena) -> None:
        """Keep `arena` (not closed) for a later get, or release it once the pool is closed; its slices must no
        longer be in use (no copy in flight)."""
        if self._closed:
            arena.close()
        else:
            self._kept.append(arena)

    def release_kept(self) -> None:
        """Release every kept arena (the pool stays usable)."""
        for arena in self._kept:
            arena.close()
        self._kept = []

    def close(self) -> None:
        """Release every kept arena, and from now on every arena put back."""
        self.release_kept()
        self._closed = True
