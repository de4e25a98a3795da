"""KV cache: per layer K and V [B, Hkv, S, Dh], preallocated, plus which key slots are real tokens.

All rows share one length (left padding keeps the batch rectangular); `key_mask` marks the slots
holding padding so attention skips them. Micro-batches write and read row slices of the same
tensors.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tiermem.engine.config import ModelConfig
from tiermem.errors import ConfigError


@dataclass
class KVCache:
    """Keys/values of every layer for a batch; `length` slots of `max_len` are filled."""

    keys: list[torch.Tensor]  # per layer [B, Hkv, S_max, Dh]
    values: list[torch.Tensor]  # per layer [B, Hkv, S_max, Dh]
    key_mask: torch.Tensor  # bool [B, S_max]: slot holds a real token
    length: int = 0

    @classmethod
    def allocate(
        cls, cfg: ModelConfig, batch: int, max_len: int, dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> KVCache:
        """Zeroed cache for `batch` sequences of up to `max_len` tokens."""
        shape = (batch, cfg.num_kv_heads, max_len, cfg.head_dim)
        return cls(
            keys=[torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_layers)],
            values=[torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_layers)],
            key_mask=torch.zeros(batch, max_len, dtype=torch.bool, device=device),
        )

    @property
    def batch(self) -> int:
        return self.key_mask.shape[0]

    @property
    def max_len(self) -> int:
        return self.key_mask.shape[1]

    @property
    def nbytes(self) -> int:
        """Bytes held by K and V of all layers (the mask excluded)."""
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))

    def begin_step(self, new_mask: torch.Tensor) -> torch.Tensor:
        """Record the mask [B, T] of the T tokens about to be added; returns key_mask [B, length + T]."""
        end = self.length + new_mask.shape[1]
        if new_mask.shape[0] != self.batch:
            raise ConfigError(f"batch of {new_mask.shape[0]} rows does not match the KV cache's {self.batch}")
        if end > self.max_len:
            raise ConfigError(f"KV cache holds {self.max_len} tokens; {end} needed: allocate a longer cache")
        self.key_mask[:, self.length:end] = new_mask.to(torch.bool)
        return self.key_mask[:, :end]

    def update(
        self, layer: int, rows: slice, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v [b, Hkv, T, Dh] of `rows` after the filled slots; return K, V [b, Hkv, S, Dh]."""
        end = self.length + k.shape[2]
        self.keys[layer][rows, :, self.length:end] = k
        self.values[layer][rows, :, self.length:end] = v
        return self.keys[layer][rows, :, :end], self.values[layer][rows, :, :end]

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
        for tensors in (self.keys, self.values):
            for i, old in enumerate(tensors):
                new = old.new_zeros((old.shape[0], old.shape[1], max_len, old.shape[3]))
                new[:, :, :L] = old[:, :, :L]
                tensors[i] = new
        mask = self.key_mask.new_zeros((self.batch, max_len))
        mask[:, :L] = self.key_mask[:, :L]
        self.key_mask = mask

    def to(self, device: torch.device | str) -> KVCache:
        """This cache with its tensors on `device` (tensors already there are shared, not copied)."""
        return KVCache([k.to(device) for k in self.keys], [v.to(device) for v in self.values],
                       self.key_mask.to(device), self.length)
