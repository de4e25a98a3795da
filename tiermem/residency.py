"""Weights of a block store held in host RAM under a byte budget; the blocks that do not fit stream from disk.

`TieredWeights` implements the engine's WeightSource contract: `stream(names)` yields
`(name, {HF name: tensor | QuantizedWeight})` in order, prefetching ahead. Blocks chosen by
`plan_residency` are read (and checksum-verified) once and stay resident; every other block is
re-read from disk on every pass into one of `lookahead + 1` ring buffers, which a block gives back
only when the consumer advances past it.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from tiermem.blocks import BlockTable
from tiermem.config import PrefetchConfig, format_size
from tiermem.errors import BudgetError, TiermemError
from tiermem.prefetch import Prefetcher, PrefetchStats
from tiermem.tiers import HostPool, Tier

DEFAULT_PREFETCH = PrefetchConfig()  # frozen, so sharing it is safe


class BlockReader(Protocol):
    """The part of `tiermem.storage.format.StoreReader` that TieredWeights uses (from several threads)."""

    block_names: list[str]

    def block_nbytes(self, name: str) -> int: ...

    def read_block(self, name: str, out: torch.Tensor | None = None, backend: Any = None) -> torch.Tensor: ...

    def decode_block(self, name: str, buf: torch.Tensor) -> dict[str, Any]: ...


@dataclass(frozen=True)
class ResidencyPlan:
    """Which blocks stay in host RAM, which stream, and the ring that streaming needs."""

    resident: tuple[str, ...]
    streamed: tuple[str, ...]
    ring_buffers: int
    ring_buffer_nbytes: int

    @property
    def ring_nbytes(self) -> int:
        return self.ring_buffers * self.ring_buffer_nbytes


def plan_residency(sizes: Mapping[str, int], budget: int | None, lookahead: int) -> ResidencyPlan:
    """Pure: choose resident blocks for a host budget (`sizes` in execution order).

    Everything is resident when it fits (or budget is None). Otherwise a ring of lookahead + 1
    buffers is reserved first, then blocks become resident first-fit in execution order as long as
    they fit beside the ring, which is sized to the largest block still streamed.
    """
    names = list(sizes)
    total = sum(sizes.values())
    if budget is None or total <= budget:
        return ResidencyPlan(tuple(names), (), 0, 0)
    count = lookahead + 1
    largest = max(names, key=sizes.__getitem__)
    need = count * sizes[largest]
    if need > budget:
        fits_lookahead = budget // sizes[largest] - 1
        smaller = f", or lower lookahead to {fits_lookahead}" if fits_lookahead >= 1 else ""
        raise BudgetError(
            f"cpu_memory {format_size(budget)} cannot hold the {count} staging buffers of "
            f"{format_size(sizes[largest])} (the largest block, {largest!r}) that streaming with "
            f"lookahead {lookahead} needs ({format_size(need)}); the whole model is {format_size(total)}: "
            f"raise cpu_memory to at least {format_size(need)}{smaller}"
        )
    streamed = list(names)
    used = 0
    for name in names:
        rest = [n for n in streamed if n != name]
        ring = count * max((sizes[n] for n in rest), default=0)
        if used + sizes[name] + ring <= budget:
            streamed = rest
            used += sizes[name]
    resident = tuple(n for n in names if n not in streamed)
    return ResidencyPlan(resident, tuple(streamed), count, max(sizes[n] for n in streamed))


@dataclass(frozen=True)
class _Loaded:
    """A block's decoded weights and the ring buffer they live in (None when resident)."""

    weights: dict[str, Any]
    buffer: torch.Tensor | None


class TieredWeights:
    """WeightSource over a block store with at most `cpu_memory` bytes of host buffers.

    `backend` is passed to `reader.read_block`; `pin` as in HostPool (default: pin when CUDA exists).
    """

    def __init__(
        self,
        reader: BlockReader,
        cpu_memory: int | None,
        prefetch: PrefetchConfig = DEFAULT_PREFETCH,
        backend: Any = None,
        pin: bool | None = None,
    ) -> None:
        self._closed = False
        self._reader = reader
        self._backend = backend
        self._lock = threading.Lock()  # guards _free, _bytes_read and table moves from I/O threads
        self._bytes_read = 0
        self._free: deque[torch.Tensor] = deque()
        self._resident: dict[str, dict[str, Any]] = {}
        names = list(reader.block_names)
        self.table = BlockTable.from_sizes(names, [reader.block_nbytes(n) for n in names])
        self.plan = plan_residency({i.name: i.nbytes for i in self.table}, cpu_memory, prefetch.lookahead)
        self._pool = HostPool(cpu_memory, pin)
        try:
            for slot in range(self.plan.ring_buffers):
                self._free.append(self._pool.allocate(self.plan.ring_buffer_nbytes, f"staging buffer {slot}"))
            for name in self.plan.resident:
                self._resident[name] = self._read(name, self._pool.allocate(self.table[name].nbytes, name))
                self.table.set_home(name, Tier.HOST)
                self.table.move(name, Tier.HOST)
        except BaseException:
            self._pool.close()
            raise
        self._prefetcher: Prefetcher[_Loaded] = Prefetcher(
            self._load, prefetch.lookahead, prefetch.io_threads, release=self._release
        )

    @property
    def bytes_read_from_disk(self) -> int:
        """Total bytes read from the store so far (resident blocks once, streamed ones every pass)."""
        with self._lock:
            return self._bytes_read

    @property
    def peak_host_bytes(self) -> int:
        """Most host bytes allocated at once (ring + resident blocks); never above cpu_memory."""
        return self._pool.peak_bytes

    @property
    def prefetch_stats(self) -> PrefetchStats:
        return self._prefetcher.stats

    @property
    def host_bytes(self) -> int:
        return self._pool.used_bytes

    @property
    def resident_blocks(self) -> tuple[str, ...]:
        return self.plan.resident

    @property
    def streamed_blocks(self) -> tuple[str, ...]:
        return self.plan.streamed

    def _read(self, name: str, buf: torch.Tensor) -> dict[str, Any]:
        view = self._reader.read_block(name, out=buf, backend=self._backend)
        weights = self._reader.decode_block(name, view)
        with self._lock:
            self._bytes_read += self.table[name].nbytes
        return weights

    def _load(self, name: str) -> _Loaded:
        """Runs in an I/O thread: a resident block at once, else a read into a free ring buffer."""
        if name in self._resident:
            return _Loaded(self._resident[name], None)
        with self._lock:
            if not self._free:
                raise TiermemError(f"no free staging buffer for block {name!r}: prefetch bound broken")
            buf = self._free.popleft()
        try:
            weights = self._read(name, buf)
        except BaseException:
            with self._lock:
                self._free.append(buf)
            raise
        with self._lock:
            self.table.move(name, Tier.HOST)
        return _Loaded(weights, buf)

    def _release(self, name: str, loaded: _Loaded) -> None:
        if loaded.buffer is not None:
            with self._lock:
                self._free.append(loaded.buffer)
                self.table.move(name, Tier.DISK)

    @property
    def free_staging_buffers(self) -> int:
        """Ring buffers not holding a block (all of them between passes)."""
        with self._lock:
            return len(self._free)

    def stream(self, names: Sequence[str]) -> AbstractContextManager[Iterator[tuple[str, dict[str, Any]]]]:
        """Yield `(name, weights)` in the order of `names`; a streamed block's weights stay valid only
        until the iterator is advanced past it (its ring buffer is then reused)."""
        if self._closed:
            raise TiermemError("these weights are closed; load the store again")
        for name in names:
            self.table[name]  # raises StoreError naming an unknown block
        return self._stream(names)

    @contextmanager
    def _stream(self, names: Sequence[str]) -> Iterator[Iterator[tuple[str, dict[str, Any]]]]:
        with self._prefetcher.stream(names) as blocks:
            yield ((name, loaded.weights) for name, loaded in blocks)

    def close(self) -> None:
        """Stop prefetching and drop every host buffer (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self._prefetcher.close()
        self._resident.clear()
        self._free.clear()
        self._pool.close()

    def __enter__(self) -> TieredWeights:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
