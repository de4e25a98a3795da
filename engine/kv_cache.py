"""KV cache: per layer K and V [B, Hkv, S, Dh], preallocated, plus which key slots are real tokens.

All rows share one length (left padding keeps the batch rectangular); `key_mask` marks the slots
holding padding so attention skips them. Micro-batches write and read row slices of the same
tensors.

Optionally (`kv_quant`, an int8/int4 QuantScheme) K and V are stored quantized per (row, kv head,
token) along head_dim (see tiermem.kernels.kv_quant): each layer's K and V is then a `QuantizedKV`
holding codes + fp16 scales + zeros; `update` quantizes the new tokens on write and returns the
dequantized filled prefix in the compute dtype.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from tiermem.engine.config import ModelConfig
from tiermem.errors import ConfigError
from tiermem.kernels import ops
from tiermem.kernels.kv_quant import check_kv_scheme, dequantize_kv
from tiermem.kernels.quant import QuantScheme


@dataclass
class QuantizedKV:
    """One layer's K or V, quantized: three tensors sharing the leading dims [B, Hkv, S_max]."""

    codes: torch.Tensor  # uint8 [B, Hkv, S_max, Dh * bits / 8]
    scale: torch.Tensor  # fp16 [B, Hkv, S_max, Dh / group_size]
    zero: torch.Tensor  # fp16 [B, Hkv, S_max, Dh / group_size]
    scheme: QuantScheme
    dtype: torch.dtype  # compute dtype that dequantize returns

    @classmethod
    def zeros(cls, batch: int, kv_heads: int, max_len: int, head_dim: int, scheme: QuantScheme,
              dtype: torch.dtype, device: torch.device | str) -> QuantizedKV:
        check_kv_scheme(scheme, head_dim)
        lead = (batch, kv_heads, max_len)
        groups = head_dim // scheme.group_size
        return cls(torch.zeros(*lead, head_dim * scheme.bits // 8, dtype=torch.uint8, device=device),
                   torch.zeros(*lead, groups, dtype=torch.float16, device=device),
                   torch.zeros(*lead, groups, dtype=torch.float16, device=device), scheme, dtype)

    @property
    def tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.codes, self.scale, self.zero

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """[B, Hkv, S_max, Dh] of the tensor it stands for."""
        B, H, S, nbytes = self.codes.shape
        return B, H, S, nbytes * 8 // self.scheme.bits

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors)

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> QuantizedKV:
        """fn applied to codes, scale and zero (slicing, moving, growing along the leading dims)."""
        return QuantizedKV(fn(self.codes), fn(self.scale), fn(self.zero), self.scheme, self.dtype)

    def write(self, rows: slice, start: int | torch.Tensor, x: torch.Tensor) -> None:
        """Quantize x [b, Hkv, T, Dh] into slots start..start+T-1 of `rows` (kernels.ops.write_quantized_kv; start
        may be held in a device tensor)."""
        ops.write_quantized_kv(x, self.codes, self.scale, self.zero, self.scheme, rows, start)

    def dequantize(self, rows: slice = slice(None), end: int | None = None) -> torch.Tensor:
        """Slots 0..end-1 of `rows` as [b, Hkv, end, Dh] in the compute dtype."""
        part = self.map(lambda t: t[rows, :, :end])
        return dequantize_kv(part.codes, part.scale, part.zero, self.scheme, self.dtype)


Stored = torch.Tensor | QuantizedKV


def write_tokens(stored: Stored, rows: slice, start: int, x: torch.Tensor) -> Stored:
    """Write x [b, Hkv, T, Dh] into slots start..start+T-1 of `rows` (quantized on write into a QuantizedKV);
    return those rows of `stored` over all slots ([b, Hkv, S_max, ...] views)."""
    if isinstance(stored, QuantizedKV):
        stored.write(rows, start, x)
        return stored.map(lambda t: t[rows])
    stored[rows, :, start:start + x.shape[2]] = x
    return stored[rows]


def filled(stored: Stored, end: int) -> torch.Tensor:
    """Slots 0..end-1 of `stored` [b, Hkv, S_max, ...] as [b, Hkv, end, Dh] in the compute dtype."""
    return stored.dequantize(slice(None), end) if isinstance(stored, QuantizedKV) else stored[:, :, :end]


@dataclass
class KVCache:
    """Keys/values of every layer for a batch; `length` slots of `max_len` are filled."""

    keys: list[Stored]  # per layer [B, Hkv, S_max, Dh] (QuantizedKV when kv_quant is set)
    values: list[Stored]  # per layer [B, Hkv, S_max, Dh]
    key_mask: torch.Tensor  # bool [B, S_max]: slot holds a real token
    length: int = 0
    cpu_attention = False  # attention runs where the cache is (tiermem.kv_offload.HostKVCache.attend)

    @classmethod
    def allocate(
        cls, cfg: ModelConfig, batch: int, max_len: int, dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu", kv_quant: QuantScheme | None = None,
    ) -> KVCache:
        """Zeroed cache for `batch` sequences of up to `max_len` tokens.

        kv_quant: store K and V as int8/int4 codes + fp16 scale/zero per group of head_dim
        (the group size must divide head_dim); attention still sees K, V in `dtype`.
        """
        shape = (batch, cfg.num_kv_heads, max_len, cfg.head_dim)
        if kv_quant is None:
            def make() -> Stored:
                return torch.zeros(shape, dtype=dtype, device=device)
        else:
            def make() -> Stored:
                return QuantizedKV.zeros(*shape, kv_quant, dtype, device)
        return cls(
            keys=[make() for _ in range(cfg.num_layers)],
            values=[make() for _ in range(cfg.num_layers)],
            key_mask=torch.zeros(batch, max_len, dtype=torch.bool, device=device),
        )

    @property
    def batch(self) -> int:
        return self.key_mask.shape[0]

    @property
    def max_len(self) -> int:
        return self.key_mask.shape[1]

    @property
    def kv_quant(self) -> QuantScheme | None:
        """The scheme K and V are stored in (None: dense, in the compute dtype)."""
        first = self.keys[0] if self.keys else None
        return first.scheme if isinstance(first, QuantizedKV) else None

    @property
    def dtype(self) -> torch.dtype | None:
        """The dtype update() returns K and V in (None for a cache of no layers)."""
        return self.keys[0].dtype if self.keys else None

    @property
    def nbytes(self) -> int:
        """Bytes held by K and V of all layers (codes, scales and zeros if quantized; the mask excluded)."""
        return sum(t.nbytes if isinstance(t, QuantizedKV) else t.numel() * t.element_size()
                   for t in (*self.keys, *self.values))

    def begin_step(self, new_mask: torch.Tensor) -> torch.Tensor:
        """Record the mask [B, T] of the T tokens about to be added; returns key_mask [B, length + T]."""
        end = self.length + new_mask.shape[1]
        if new_mask.shape[0] != self.batch:
            raise ConfigError(f"batch of {new_mask.shape[0]} rows does not match the KV cache's {self.batch}")
        if end > self.max_len:
            raise ConfigError(f"KV cache holds {self.max_len} tokens; {end} needed: allocate a longer cache")
        self.key_mask[:, self.length:end] = new_mask.to(torch.bool)
        return self.key_mask[:, :end]

    def append(self, layer: int, rows: slice, k: torch.Tensor, v: torch.Tensor) -> tuple[Stored, Stored]:
        """Write k, v [b, Hkv, T, Dh] of `rows` after the filled slots (quantized on write if kv_quant);
        return this layer's stored K, V of `rows` over all max_len slots ([b, Hkv, S_max, ...] views)."""
        return (write_tokens(self.keys[layer], rows, self.length, k),
                write_tokens(self.values[layer], rows, self.length, v))

    def update(
        self, layer: int, rows: slice, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v [b, Hkv, T, Dh] of `rows` after the filled slots; return K, V [b, Hkv, S, Dh].

        Quantized: the new tokens are quantized on write and the whole filled prefix (new tokens
        included) is returned dequantized.
        """
        end = self.length + k.shape[2]
        keys, values = self.append(layer, rows, k, v)
        return filled(keys, end), filled(values, end)

    def flush(self) -> None:
        """Make keys / values current where they are held (a no-op here: writes land at once)."""

    def clear(self) -> None:
        """Forget every token: length 0, no key real (the stored K and V stay until overwritten, masked out)."""
        self.key_mask.zero_()
        self.length = 0

    def end_step(self, num_tokens: int) -> None:
        """Every layer and micro-batch has written its `num_tokens` new slots."""
        self.length += num_tokens

    def grow(self, max_len: int) -> None:
        """Make room for `max_len` tokens in place, keeping the filled slots (no-op if there is room).

        Layer by layer, so that the extra memory at any moment is one layer's K or V.
        """
        if max_len <= self.max_len:
            return
        L = self.length

        def grown(old: torch.Tensor) -> torch.Tensor:
            new = old.new_zeros((old.shape[0], old.shape[1], max_len, old.shape[3]))
            new[:, :, :L] = old[:, :, :L]
            return new

        for tensors in (self.keys, self.values):
            for i, old in enumerate(tensors):
                tensors[i] = old.map(grown) if isinstance(old, QuantizedKV) else grown(old)
        mask = self.key_mask.new_zeros((self.batch, max_len))
        mask[:, :L] = self.key_mask[:, :L]
        self.key_mask = mask

    def to(self, device: torch.device | str) -> KVCache:
        """This cache with its tensors on `device` (tensors already there are shared, not copied)."""
        def move(t: Stored) -> Stored:
            return t.map(lambda x: x.to(device)) if isinstance(t, QuantizedKV) else t.to(device)

        return KVCache([move(k) for k in self.keys], [move(v) for v in self.values],
                       self.key_mask.to(device), self.length)
