"""A KV cache that lives in pinned host memory, for batches whose KV does not fit the GPU budget.

K and V of every layer stay in host memory (dense, or int8/int4 codes + scales + zeros) in the
layout of engine.kv_cache: [B, Hkv, S_max, X] per tensor. The GPU holds two layers' worth of
buffers. When attention of layer i starts (its first micro-batch), layer i's filled prefix is
already on its way into one buffer, and the copy of layer i + 1's prefix into the other buffer is
issued on a copy stream, so the PCIe transfer of the next layer's KV overlaps this layer's compute;
the last layer primes layer 0 of the next step. The new tokens' K/V are written into the GPU buffer
for attention and copied back to the host (only the new slots) on the same stream, so the host
copy is complete before any later read of that layer.

Both directions are 2-D copies: slots start..end-1 of batch rows r0..r1 are, per tensor, (r1 - r0)
* Hkv runs of (end - start) * X elements at a pitch of S_max * X elements (cudaMemcpy2DAsync).

The copy engine is a `Mover`: `CudaMover` (a stream, events, CuPy's memcpy2DAsync) on a GPU, or
`SyncMover` (plain tensor copies, in order) on the CPU, where CI checks the bookkeeping against the
dense cache without a GPU.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from tiermem.engine.attention import grouped_attention
from tiermem.engine.config import ModelConfig
from tiermem.engine.kv_cache import KVCache, QuantizedKV, Stored, filled, write_tokens
from tiermem.errors import ConfigError
from tiermem.kernels.quant import QuantScheme
from tiermem.pinned import ArenaPool, PinnedArena, aligned_size

CUDA_MEMCPY_DEFAULT = 4  # cudaMemcpyDefault: direction from the (unified) addresses


def _parts(stored: Stored) -> tuple[torch.Tensor, ...]:
    return stored.tensors if isinstance(stored, QuantizedKV) else (stored,)


class SyncMover:
    """Copies done at once, in order, with tensor slicing (CPU, or any device: for tests and reference)."""

    def copy_slots(self, dst: torch.Tensor, src: torch.Tensor, rows: slice, start: int, end: int) -> None:
        dst[rows, :, start:end] = src[rows, :, start:end]

    def after_compute(self) -> None:
        """Later copies wait for the compute issued so far (nothing to wait for here)."""

    def mark(self) -> object:
        return None

    def wait(self, marker: object) -> None:
        """The compute stream waits for the copies before `marker` (done already here)."""

    def synchronize(self) -> None:
        """The host waits for every copy issued."""

    def host_wait(self, marker: object) -> None:
        """The calling host thread waits for the copies before `marker` (done already here)."""


class CudaMover:
    """Copies on a dedicated CUDA stream; markers are events the compute stream waits on."""

    def __init__(self, device: torch.device) -> None:
        import cupy  # the GPU path's dependency; imported here so that CPU-only installs never need it

        self._memcpy2d = cupy.cuda.runtime.memcpy2DAsync
        self.device = device
        self.stream = torch.cuda.Stream(device)

    def copy_slots(self, dst: torch.Tensor, src: torch.Tensor, rows: slice, start: int, end: int) -> None:
        B, H, S, X = src.shape
        if end <= start or rows.stop <= rows.start:
            return
        e = src.element_size()
        pitch = S * X * e
        offset = (rows.start * H * S + start) * X * e
        self._memcpy2d(dst.data_ptr() + offset, pitch, src.data_ptr() + offset, pitch, (end - start) * X * e,
                       (rows.stop - rows.start) * H, CUDA_MEMCPY_DEFAULT, self.stream.cuda_stream)

    def after_compute(self) -> None:
        self.stream.wait_stream(torch.cuda.current_stream(self.device))

    def mark(self) -> torch.cuda.Event:
        event = torch.cuda.Event()
        event.record(self.stream)
        return event

    def wait(self, marker: torch.cuda.Event) -> None:
        torch.cuda.current_stream(self.device).wait_event(marker)

    def synchronize(self) -> None:
        self.stream.synchronize()

    def host_wait(self, marker: torch.cuda.Event | None) -> None:
        if marker is not None:
            marker.synchronize()


def _arena(pool: ArenaPool | None, nbytes: int) -> PinnedArena:
    """A pinned arena of nbytes: from the pool, or newly registered."""
    return pool.get(nbytes) if pool is not None else PinnedArena(nbytes)


@dataclass
class _Fetch:
    layer: int
    length: int  # slots 0..length-1 copied
    buffer: int  # index into the GPU buffer pair
    done: object  # what _ready turns into the Mover marker after the copy


class HostKVCache(KVCache):
    """KVCache with keys/values in (pinned) host memory and two layers of GPU buffers (see module doc).

    keys / values / length / key_mask behave as in KVCache (key_mask lives on the compute device);
    the host tensors are current only after flush(). close() releases the pinned memory early.
    Compared and hashed by identity (a Model tracks its live host caches in a WeakSet).
    """

    __eq__ = object.__eq__
    __hash__ = object.__hash__

    def __init__(self, keys: list[Stored], values: list[Stored], key_mask: torch.Tensor,
                 buffers: list[tuple[Stored, Stored]], mover, arena: PinnedArena | None = None,
                 length: int = 0, cpu_attention: bool = False, pool: ArenaPool | None = None) -> None:
        super().__init__(keys, values, key_mask, length)
        self.buffers = buffers  # two (K, V) on the compute device, each shaped like one layer (none: CPU attention)
        self.cpu_attention = cpu_attention
        self.mover = mover
        self.arena = arena
        self.pool = pool  # where close() puts the arena back (None: close() releases it)
        self.closed = False
        self._pending: deque[_Fetch] = deque()
        self._next_buffer = 0
        self._current: tuple[int, int] | None = None  # (layer, buffer) whose prefix is on the GPU

    @classmethod
    def allocate(
        cls, cfg: ModelConfig, batch: int, max_len: int, dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu", kv_quant: QuantScheme | None = None, cpu_attention: bool = False,
        pool: ArenaPool | None = None,
    ) -> HostKVCache:
        """Host cache (pinned when on CUDA) for `batch` x `max_len`; zeroed buffers on `device`.

        cpu_attention: attention runs on the host over the host K/V (attend), so no GPU buffers.
        pool: where the pinned memory comes from and, on close(), goes back to (default: registered here,
        released on close).

        Pinned host slots are not zeroed (slots past `length` are never read: copies and the session
        state take slots 0..length-1 only)."""
        device = torch.device(device)
        shape = (batch, cfg.num_kv_heads, max_len, cfg.head_dim)
        template = KVCache.allocate(cfg, batch, max_len, dtype, "meta", kv_quant)
        parts = [t for stored in (*template.keys, *template.values) for t in _parts(stored)]
        arena = _arena(pool, aligned_size([t.numel() * t.element_size() for t in parts])) \
            if device.type == "cuda" else None

        def host(t: torch.Tensor) -> torch.Tensor:
            if arena is None:
                return torch.zeros(t.shape, dtype=t.dtype)
            flat = arena.take(t.numel() * t.element_size(), "KV cache")  # never read past `length`
            return flat.view(t.dtype).view(t.shape)

        def make(on_device) -> Stored:
            if kv_quant is None:
                return on_device(torch.empty(shape, dtype=dtype, device="meta"))
            return template.keys[0].map(on_device)

        def gpu(t: torch.Tensor) -> torch.Tensor:
            return torch.zeros(t.shape, dtype=t.dtype, device=device)

        try:
            keys = [make(host) for _ in range(cfg.num_layers)]
            values = [make(host) for _ in range(cfg.num_layers)]
            buffers = [] if cpu_attention else [(make(gpu), make(gpu)) for _ in range(2)]
        except BaseException:
            if arena is not None:
                arena.close()
            raise
        mover = CudaMover(device) if device.type == "cuda" else SyncMover()
        mask = torch.zeros(batch, max_len, dtype=torch.bool, device=device)
        return cls(keys, values, mask, buffers, mover, arena, cpu_attention=cpu_attention, pool=pool)

    @property
    def num_layers(self) -> int:
        return len(self.keys)

    def _prefetch(self, layer: int, length: int) -> None:
        """Copy slots 0..length-1 of `layer` (all rows) into the buffer not read by the current layer."""
        buffer = self._next_buffer
        self._next_buffer ^= 1
        self.mover.after_compute()  # the buffer's last reader (two layers back) has been issued
        self._pending.append(_Fetch(layer, length, buffer, self._copy_in(layer, buffer, length)))

    def _copy_in(self, layer: int, buffer: int, length: int) -> object:
        """Issue the copy of `layer`'s slots 0..length-1 into GPU buffer `buffer`; returns its marker."""
        for host, dev in zip((self.keys[layer], self.values[layer]), self.buffers[buffer], strict=True):
            for h, d in zip(_parts(host), _parts(dev), strict=True):
                self.mover.copy_slots(d, h, slice(0, self.batch), 0, length)
        return self.mover.mark()

    def _ready(self, done: object) -> object:
        """The Mover marker of a fetch's copy (`done` as _copy_in returned it)."""
        return done

    def _copy_out(self, layer: int, buffer: int, rows: slice, start: int, end: int) -> None:
        """Issue the copy of slots start..end-1 of `rows` from GPU buffer `buffer` back to `layer`'s host K/V."""
        for dev, host in zip(self.buffers[buffer], (self.keys[layer], self.values[layer]), strict=True):
            for d, h in zip(_parts(dev), _parts(host), strict=True):
                self.mover.copy_slots(h, d, rows, start, end)

    def _take(self, layer: int) -> int:
        """The buffer holding `layer`'s filled prefix (fetched now if no matching prefetch is pending)."""
        while self._pending and (self._pending[0].layer, self._pending[0].length) != (layer, self.length):
            self._pending.popleft()  # stale: a step was rolled back or the layers ran out of order
        if not self._pending:
            self._prefetch(layer, self.length)
        fetch = self._pending.popleft()
        self.mover.wait(self._ready(fetch.done))
        return fetch.buffer

    def append(self, layer: int, rows: slice, k: torch.Tensor, v: torch.Tensor) -> tuple[Stored, Stored]:
        """As KVCache.append, in the GPU buffer holding `layer`'s prefix; the new slots also go back to the host."""
        start, stop, _ = rows.indices(self.batch)
        rows = slice(start, stop)
        end = self.length + k.shape[2]
        if self._current is None or self._current[0] != layer:
            if start != 0:
                raise ConfigError(f"layer {layer} of a host KV cache started at batch row {start}: micro-batches "
                                  "must run in order, the first one from row 0")
            self._current = (layer, self._take(layer))
            if layer + 1 < self.num_layers:
                self._prefetch(layer + 1, self.length)
            elif layer > 0:  # prime the next step: layer 0's new slots went back to the host long ago
                self._prefetch(0, end)
        keys, values = self.buffers[self._current[1]]
        rows_k, rows_v = write_tokens(keys, rows, self.length, k), write_tokens(values, rows, self.length, v)
        self.mover.after_compute()
        self._copy_out(layer, self._current[1], rows, self.length, end)
        return rows_k, rows_v

    def store(self, layer: int, rows: slice, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append new k, v [b, Hkv, T, Dh] to the host K/V of `rows` of an empty cpu_attention cache (a prompt,
        whose attention runs on the GPU); returns the k, v to attend over there: as given, or as stored (quantized
        and back, on k's device) when the cache is quantized, so that the prompt sees what a device cache gives."""
        start, stop, _ = rows.indices(self.batch)
        end = self.length + k.shape[2]
        out = []
        for stored, x in ((self.keys[layer], k), (self.values[layer], v)):
            rows_stored = write_tokens(stored, slice(start, stop), self.length, x.to("cpu"))
            out.append(x if self.kv_quant is None else filled(rows_stored, end).to(x.device, x.dtype))
        return out[0], out[1]

    def attend(self, layer: int, rows: slice, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
               softmax_scale: float, softcap: float | None = None) -> torch.Tensor:
        """Attention on the host (FlexGen's cpu_cache_compute): q [b, H, T, Dh] and the new k, v [b, Hkv, T, Dh]
        come to the host, k and v are appended there, attention runs over the layer's host K, V in their dtype
        (dequantized when quantized) under mask [b, 1, T, S] (scores soft-capped at softcap, Gemma 2's); returns
        [b, H, T, Dh] on q's device in q's dtype.
        Only the activations cross PCIe. No fp32 copy of K and V: torch's CPU attention kernel takes bf16 and
        accumulates in fp32, and the copy cost 5-8x the attention itself (llama3-8b, batch 16 x 2048: 1.1 s per
        step). The query heads sharing a kv head are folded into the query length, as on the GPU."""
        start, stop, _ = rows.indices(self.batch)
        rows = slice(start, stop)
        end = self.length + k.shape[2]
        K, V = (filled(write_tokens(stored, rows, self.length, x.to("cpu")), end)
                for stored, x in ((self.keys[layer], k), (self.values[layer], v)))  # [b, Hkv, S, Dh]
        b, H, T, Dh = q.shape
        kv_heads = K.shape[1]
        group = H // kv_heads
        folded = q.to("cpu", K.dtype).reshape(b, kv_heads, group * T, Dh)
        mask = mask.to("cpu")
        if group > 1 and T > 1:
            mask = mask.expand(b, group, T, mask.shape[-1]).reshape(b, 1, group * T, mask.shape[-1])
        if softcap is None:
            out = F.scaled_dot_product_attention(folded, K, V, attn_mask=mask, scale=softmax_scale)
        else:  # Gemma 2's capped scores (engine.attention.grouped_attention)
            out = grouped_attention(folded, K, V, mask, softmax_scale, softcap)
        return out.reshape(b, H, T, Dh).to(q.device, q.dtype)

    def begin_step(self, new_mask: torch.Tensor) -> torch.Tensor:
        self._current = None  # also after a step that failed half-way
        return super().begin_step(new_mask)

    def end_step(self, num_tokens: int) -> None:
        super().end_step(num_tokens)
        self._current = None

    def flush(self) -> None:
        """Wait until every copy back to the host has landed (before reading keys / values on the host)."""
        self.mover.synchronize()

    def grow(self, max_len: int) -> None:
        """Make room for `max_len` tokens: new host memory and buffers, the filled slots copied over."""
        if max_len <= self.max_len:
            return
        self.flush()
        bigger = self._allocate_like(max_len)
        L = self.length
        for old, new in ((self.keys, bigger.keys), (self.values, bigger.values)):
            for o, n in zip(old, new, strict=True):
                for a, b in zip(_parts(o), _parts(n), strict=True):
                    b[:, :, :L] = a[:, :, :L]
        bigger.key_mask[:, :L] = self.key_mask[:, :L]
        bigger.length = L
        self.close()
        vars(self).update(vars(bigger))  # become the bigger cache, keeping this identity (a Model tracks it)

    def _layer_shape(self) -> SimpleNamespace:
        """What allocate() reads of a ModelConfig, for a cache shaped like this one."""
        _, heads, _, head_dim = self.keys[0].shape
        return SimpleNamespace(num_layers=self.num_layers, num_kv_heads=heads, head_dim=head_dim)

    def _allocate_like(self, max_len: int) -> HostKVCache:
        """An empty cache like this one with room for `max_len` tokens."""
        return HostKVCache.allocate(self._layer_shape(), self.batch, max_len, self.dtype, self.key_mask.device,
                                    self.kv_quant, self.cpu_attention, self.pool)

    def copy_from(self, cache: KVCache) -> None:
        """Take the filled slots of another cache of the same batch, layers and storage (e.g. a restored one)."""
        theirs = [_parts(t) for t in (*cache.keys, *cache.values)]
        mine = [_parts(t) for t in (*self.keys, *self.values)]
        L = cache.length
        def layout(parts: list[tuple[torch.Tensor, ...]]) -> list[list[tuple[int, int, int]]]:
            return [[(p.shape[0], p.shape[1], p.shape[3]) for p in t] for t in parts]  # all but the length

        if (cache.batch != self.batch or L > self.max_len or cache.kv_quant != self.kv_quant
                or layout(theirs) != layout(mine)):
            raise ConfigError(f"a KV cache of batch {cache.batch}, {L} tokens, {len(cache.keys)} layers, "
                              f"{cache.kv_quant} does not fit this host KV cache (batch {self.batch}, up to "
                              f"{self.max_len} tokens, {len(self.keys)} layers, {self.kv_quant})")
        self.flush()  # no copy issued earlier lands on the slots written here
        for src, dst in zip(theirs, mine, strict=True):
            for a, b in zip(src, dst, strict=True):
                b[:, :, :L] = a[:, :, :L]
        self.key_mask[:, :L] = cache.key_mask[:, :L]
        self.length = L
        self._pending.clear()
        self._current = None

    def to(self, device: torch.device | str) -> KVCache:
        """Itself when `device` is its compute device; otherwise a dense-or-quantized KVCache copy there."""
        device, mine = torch.device(device), self.key_mask.device
        if device.type == mine.type and device.index in (None, mine.index):
            return self
        self.flush()
        return KVCache(list(self.keys), list(self.values), self.key_mask, self.length).to(device)

    def close(self) -> None:
        """Release the pinned host memory, or put it back in the pool it came from (the cache is unusable
        afterwards)."""
        self.flush()
        self._pending.clear()
        self.closed = True
        if self.arena is not None:
            if self.pool is not None:
                self.pool.put(self.arena)
            else:
                self.arena.close()
            self.arena = None

