"""A KV cache whose K/V live in a scratch file on disk, for batches whose KV fits neither HBM nor host RAM.

The file (tiermem.scratch_file, in `offload_dir`) holds every layer's K and V (dense, or int8/int4
codes + scales + zeros), each tensor part in its own 4 KiB-aligned region laid out token-major,
[S_max, B, Hkv, X]: a layer's filled prefix is one contiguous read per part, the new slots of a step
one contiguous write per part. Host RAM holds two staging slots of one layer each (pinned on CUDA),
the GPU the two layer buffers of kv_offload.HostKVCache (whose fetch / write-back bookkeeping this
class reuses) plus, on CUDA, a landing buffer of one part of one layer for the layout change.

Per layer i (its first micro-batch): layer i + 1's prefix is read on a background I/O thread into
the free staging slot and, once read, copied to its GPU buffer on the mover's stream, while layer i
computes; layer i's new slots go GPU buffer -> the same staging slot as its prefix (slots past the
prefix) and, once the layer is done, into the file, on the same I/O thread. The I/O thread runs its
tasks in order, so a layer's write lands before any later read of it and before its staging slot is
read into again. The staging copies permute between the layouts: on the GPU (CudaStagingMover,
through the landing buffer), or in the tensor copy itself on the CPU (SyncMover).

Writes are buffered (through the page cache): new slots end in partly written 4 KiB pages, which
O_DIRECT could only write by read-modify-write. A layer's prefix is read with O_DIRECT up to its last
whole page (the kernel first writes back any dirty page in that range, so the read sees every write)
and the partial page after it buffered: buffered reads of a prefix the prompt had just written reached
0.48-0.68 of the disk's O_DIRECT rate (llama3-8b, batch 16 x 2048, session 4; not recorded). With
O_DIRECT the prefix reads run at the disk's rate, 1.7-1.9 GB/s on the GPU machine, and keep the I/O thread
busy for 0.96-0.98 of each step (benchmarks/results/disk_kv_timeline_*).
After a layer's prefix is read, its whole pages are dropped from the page cache
(ScratchFile.drop_cached; not the last, partly filled one, which the next step's write extends): the
KV cache is on disk because it does not fit the RAM budget, so the page cache should not keep a copy
of it in RAM beyond cpu_memory. `keys` / `values` map the file ([B, Hkv, S_max, X]
views, current after flush()), for grow / copy_from / to / session state dicts.
"""

from __future__ import annotations

import os
import threading
import weakref
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from tiermem.engine.config import ModelConfig
from tiermem.engine.kv_cache import KVCache, QuantizedKV, Stored
from tiermem.errors import ConfigError
from tiermem.kernels.quant import QuantScheme
from tiermem.kv_offload import CUDA_MEMCPY_DEFAULT, CudaMover, HostKVCache, SyncMover, _arena, _parts
from tiermem.pinned import ALIGN, ArenaPool, PinnedArena, aligned_size
from tiermem.scratch_file import ScratchFile
from tiermem.storage.backends.base import aligned_empty
from tiermem.storage.backends.posix import PosixBackend

PAGE = 4096  # page cache granularity: drop_cached leaves a partly read page alone


@dataclass(frozen=True)
class _Region:
    """One tensor part of one layer in the file: token-major [S_max, B, Hkv, X] from `offset`."""

    offset: int
    slot_bytes: int  # bytes of one token slot: B * Hkv * X * element size


def _tokens_first(t: torch.Tensor) -> torch.Tensor:
    """A [B, Hkv, S, X] view of token-major storage -> that storage as [S, B, Hkv, X]."""
    return t.permute(2, 0, 1, 3)


def _heads_first(t: torch.Tensor) -> torch.Tensor:
    """Token-major [S, B, Hkv, X] -> its [B, Hkv, S, X] view (the layout of engine.kv_cache)."""
    return t.permute(1, 2, 0, 3)


def _map_parts(stored: Stored, fn) -> Stored:
    return stored.map(fn) if isinstance(stored, QuantizedKV) else fn(stored)


class CudaStagingMover(CudaMover):
    """CudaMover between GPU buffers [B, Hkv, S, X] and host staging laid out token-major [S, B, Hkv, X]
    (passed as its [B, Hkv, S, X] view): the host side moves as one 2-D copy into or out of a GPU landing
    buffer, and the permute between the layouts runs on the GPU, all on the copy stream. Copies may be
    issued from the I/O thread and the compute thread; a lock keeps each landing sequence whole."""

    def __init__(self, device: torch.device, landing_bytes: int) -> None:
        super().__init__(device)
        self.landing = torch.empty(max(landing_bytes, 1), dtype=torch.uint8, device=device)
        self._lock = threading.Lock()

    def copy_slots(self, dst: torch.Tensor, src: torch.Tensor, rows: slice, start: int, end: int) -> None:
        if end <= start or rows.stop <= rows.start:
            return
        to_host = dst.device.type == "cpu"
        host, dev = (dst, src) if to_host else (src, dst)
        tokens = _tokens_first(host)  # [S, B, Hkv, X], contiguous
        _, B, H, X = tokens.shape
        n, r, e = end - start, rows.stop - rows.start, host.element_size()
        width, pitch = r * H * X * e, B * H * X * e  # bytes of one slot of `rows`; of one slot of all rows
        host_at = tokens.data_ptr() + (start * B + rows.start) * H * X * e
        landing = self.landing[:n * width].view(host.dtype).view(n, r, H, X)
        with self._lock, torch.cuda.device(self.device), torch.cuda.stream(self.stream):
            if to_host:
                landing.copy_(_tokens_first(dev[rows, :, start:end]))
                self._memcpy2d(host_at, pitch, landing.data_ptr(), width, width, n, CUDA_MEMCPY_DEFAULT,
                               self.stream.cuda_stream)
            else:
                self._memcpy2d(landing.data_ptr(), width, host_at, pitch, width, n, CUDA_MEMCPY_DEFAULT,
                               self.stream.cuda_stream)
                dev[rows, :, start:end].copy_(_heads_first(landing))


class DiskKVCache(HostKVCache):
    """HostKVCache whose K/V live in a scratch file, staged through two pinned layer slots (see module doc).

    keys / values map the file; close() (or collection) deletes it. Attention runs on the GPU (no
    cpu_attention). Compared and hashed by identity, as HostKVCache.
    """

    def __init__(self, keys: list[Stored], values: list[Stored], key_mask: torch.Tensor,
                 buffers: list[tuple[Stored, Stored]], mover, file: ScratchFile, regions: list[list[_Region]],
                 staging: list[list[torch.Tensor]], arena: PinnedArena | None = None, io_threads: int = 4,
                 pool: ArenaPool | None = None) -> None:
        super().__init__(keys, values, key_mask, buffers, mover, arena, pool=pool)
        self.file = file
        self.regions = regions  # per layer: K's parts, then V's, as _parts lists them
        self.staging = staging  # two slots, each token-major [S_max, B, Hkv, X] per part of one layer
        self.io_threads = io_threads
        # a layer's parts are read together, chunks over 2 x io_threads threads: with io_threads threads a
        # 134 MB prefix read at 1.33 GB/s where the disk gave 1.75 (llama3-8b, batch 16 x 2048, bf16 KV)
        self.backend = PosixBackend(threads=2 * io_threads, direct=True)
        self._io = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tiermem-kv-disk")  # in order
        self._slot_free: list[object] = [None, None]  # marker after each slot's last copy to the GPU (I/O thread)
        self._writes: deque[Future] = deque()
        self._unwritten: tuple[int, int, int, int] | None = None  # (layer, slot, start, end) staged, not written

    @classmethod
    def allocate(
        cls, cfg: ModelConfig, batch: int, max_len: int, dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu", kv_quant: QuantScheme | None = None, *,
        offload_dir: str | os.PathLike | None = None, io_threads: int = 4, pool: ArenaPool | None = None,
    ) -> DiskKVCache:
        """A cache for `batch` x `max_len` in a new file in `offload_dir`; staging pinned when on CUDA.

        File slots are never read past `length`; ConfigError / BudgetError when offload_dir is not
        a writable directory or has too little free space. pool: as HostKVCache.allocate's, for the staging."""
        device = torch.device(device)
        template = KVCache.allocate(cfg, batch, max_len, dtype, "meta", kv_quant)  # shapes only
        layer_parts = [[*_parts(k), *_parts(v)] for k, v in zip(template.keys, template.values, strict=True)]
        file = ScratchFile(offload_dir, aligned_size([_nbytes(t) for parts in layer_parts for t in parts]))
        flat = file.tensor()
        regions: list[list[_Region]] = []
        offset = 0

        def on_file(t: torch.Tensor) -> torch.Tensor:  # meta [B, Hkv, S, X] -> its region, as [B, Hkv, S, X]
            nonlocal offset
            B, H, S, X = t.shape
            regions[-1].append(_Region(offset, _nbytes(t) // S))
            region = flat[offset:offset + _nbytes(t)].view(t.dtype).view(S, B, H, X)
            offset += -(-_nbytes(t) // ALIGN) * ALIGN
            return _heads_first(region)

        keys, values = [], []
        for k, v in zip(template.keys, template.values, strict=True):
            regions.append([])
            keys.append(_map_parts(k, on_file))
            values.append(_map_parts(v, on_file))
        parts = layer_parts[0]
        arena = _arena(pool, 2 * aligned_size([_nbytes(t) for t in parts])) if device.type == "cuda" else None
        try:
            staging = [[_staging_part(t, arena) for t in parts] for _ in range(2)]
            buffers = [(_map_parts(template.keys[0], lambda t: torch.zeros(t.shape, dtype=t.dtype, device=device)),
                        _map_parts(template.values[0], lambda t: torch.zeros(t.shape, dtype=t.dtype, device=device)))
                       for _ in range(2)]
            mover = CudaStagingMover(device, max(map(_nbytes, parts))) if device.type == "cuda" else SyncMover()
        except BaseException:
            if arena is not None:
                arena.close()
            file.close()
            raise
        mask = torch.zeros(batch, max_len, dtype=torch.bool, device=device)
        return cls(keys, values, mask, buffers, mover, file, regions, staging, arena, io_threads, pool)

    @property
    def staging_bytes(self) -> int:
        """Host bytes of the two staging slots (pinned on CUDA)."""
        return sum(_nbytes(t) for slot in self.staging for t in slot)

    def _device_parts(self, buffer: int) -> list[torch.Tensor]:
        keys, values = self.buffers[buffer]
        return [*_parts(keys), *_parts(values)]

    def _copy_in(self, layer: int, buffer: int, length: int) -> Future:
        """Read `layer`'s prefix into staging slot `buffer` and copy it on to GPU buffer `buffer`, on the I/O thread."""
        return self._submit("_read", layer, length, buffer)

    def _ready(self, done: Future) -> object:
        return done.result()

    def _read(self, layer: int, length: int, slot: int) -> object:
        """I/O thread: file -> staging slot -> GPU buffer; returns the mover marker after the copy to the GPU."""
        self.mover.host_wait(self._slot_free[slot])  # the slot's previous prefix has reached the GPU
        if length:
            requests = []
            for region, stage in zip(self.regions[layer], self.staging[slot], strict=True):
                out = stage.view(-1).view(torch.uint8)[:length * region.slot_bytes]
                whole = out.numel() // PAGE * PAGE  # O_DIRECT (aligned offset, length and staging address)
                requests += [(region.offset, out[:whole]), (region.offset + whole, out[whole:])]  # partial: buffered
            self.backend.read_many(self.file.path, requests)
            for region in self.regions[layer]:
                self.file.drop_cached(region.offset, length * region.slot_bytes // PAGE * PAGE)
        for stage, dev in zip(self.staging[slot], self._device_parts(slot), strict=True):
            self.mover.copy_slots(dev, _heads_first(stage), slice(0, self.batch), 0, length)
        self._slot_free[slot] = marker = self.mover.mark()
        return marker

    def _copy_out(self, layer: int, buffer: int, rows: slice, start: int, end: int) -> None:
        """New slots: GPU buffer -> staging slot `buffer` (past the prefix); to the file once the layer is done."""
        for dev, stage in zip(self._device_parts(buffer), self.staging[buffer], strict=True):
            self.mover.copy_slots(_heads_first(stage), dev, rows, start, end)
        self._unwritten = (layer, buffer, start, end)

    def _write_back(self) -> None:
        """Queue the write of the staged new slots of the last layer (after their copies to the host)."""
        if self._unwritten is None:
            return
        layer, slot, start, end = self._unwritten
        self._unwritten = None
        self._writes.append(self._submit("_write", layer, slot, start, end, self.mover.mark()))
        while len(self._writes) > 1 and self._writes[0].done():
            self._writes.popleft().result()  # raise a failed write early

    def _write(self, layer: int, slot: int, start: int, end: int, marker: object) -> None:
        """I/O thread: staging slot -> file, slots start..end-1 of every part of `layer`."""
        self.mover.host_wait(marker)
        for region, stage in zip(self.regions[layer], self.staging[slot], strict=True):
            staged = stage.view(-1).view(torch.uint8)[start * region.slot_bytes:end * region.slot_bytes]
            self.file.write(region.offset + start * region.slot_bytes, staged)

    def _submit(self, method: str, *args) -> Future:
        """Queue self.<method>(*args) on the I/O thread, which holds the cache only while it runs (see _call)."""
        if self.closed:
            raise ConfigError("this disk KV cache is closed: allocate a new one")
        return self._io.submit(_call, weakref.ref(self), method, *args)

    def append(self, layer: int, rows: slice, k: torch.Tensor, v: torch.Tensor) -> tuple[Stored, Stored]:
        if self._current is not None and self._current[0] != layer:
            self._write_back()  # the previous layer is done: before any read queued from here on
        return super().append(layer, rows, k, v)

    def attend(self, *args, **kwargs) -> torch.Tensor:
        raise ConfigError("a disk KV cache attends on the GPU: cpu_attention needs kv_placement='cpu'")

    def begin_step(self, new_mask: torch.Tensor) -> torch.Tensor:
        self._unwritten = None  # left by a step that failed half-way: slots past `length`, never read
        return super().begin_step(new_mask)

    def end_step(self, num_tokens: int) -> None:
        self._write_back()
        super().end_step(num_tokens)

    def flush(self) -> None:
        """Wait until every queued read and write is done (the file, and so keys / values, are current)."""
        self.mover.synchronize()
        if not self.closed:
            self._io.submit(lambda: None).result()  # the I/O thread runs its tasks in order
        while self._writes:
            self._writes.popleft().result()

    def _allocate_like(self, max_len: int) -> DiskKVCache:
        return DiskKVCache.allocate(self._layer_shape(), self.batch, max_len, self.dtype, self.key_mask.device,
                                    self.kv_quant, offload_dir=self.file.directory, io_threads=self.io_threads,
                                    pool=self.pool)

    def close(self) -> None:
        """Wait for the queued I/O, then delete the file and release the staging memory."""
        try:
            super().close()
        finally:
            self._io.shutdown(wait=True)
            self.backend.close()
            self.file.close()


def _call(ref: weakref.ref, method: str, *args) -> object:
    """I/O thread: ref().<method>(*args), or nothing if the cache is gone. The strong reference ends when this
    returns, before the task's Future completes: a bound method submitted instead stays referenced by the
    executor's worker for a moment after, so dropping the last reference to a cache (a session) did not always
    free it, and delete its file, at once."""
    cache = ref()
    return None if cache is None else getattr(cache, method)(*args)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _staging_part(t: torch.Tensor, arena: PinnedArena | None) -> torch.Tensor:
    """Token-major [S, B, Hkv, X] host storage for a part shaped t [B, Hkv, S, X] (from the pinned arena if any)."""
    B, H, S, X = t.shape
    flat = aligned_empty(_nbytes(t)) if arena is None else arena.take(_nbytes(t), "KV staging")  # O_DIRECT reads
    return flat.view(t.dtype).view(S, B, H, X)
